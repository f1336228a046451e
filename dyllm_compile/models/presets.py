"""Named configurations: LLaDA-like and Dream-like, from test-tiny up to the real 8B / 7B shapes."""

from __future__ import annotations

from .transformer import DiffusionTransformer, TransformerConfig

_SIZES = {
    "tiny": dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, d_ffn=128, mask_token_id=127),
    "small": dict(vocab_size=512, d_model=256, n_layers=4, n_heads=8, d_ffn=768, mask_token_id=511),
}

#: LLaDA-8B-Instruct's shapes (config.json of GSAI-ML/LLaDA-8B-Instruct).
LLADA_8B = dict(
    vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, d_ffn=12288, mask_token_id=126336,
    max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5,
)
#: Dream-v0-Instruct-7B's shapes (Qwen2.5-7B backbone).
DREAM_7B = dict(
    vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ffn=18944,
    mask_token_id=151666, max_seq_len=4096, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
)


def llada_config(size: str = "tiny", **overrides) -> TransformerConfig:
    """MHA, SwiGLU, RMSNorm, RoPE from a cached table, no biases."""
    base = LLADA_8B if size == "8b" else _size(size)
    return TransformerConfig(**{**base, **overrides})


def dream_config(size: str = "tiny", **overrides) -> TransformerConfig:
    """GQA (repeat_kv), QKV bias, RoPE computed per call; callers shift logits right by one."""
    if size == "7b":
        base = DREAM_7B
    else:
        base = {**_size(size), "qkv_bias": True, "n_kv_heads": _size(size)["n_heads"] // 2}
    return TransformerConfig(**{**base, "rope_table": "computed", **overrides})


def llada_like(size: str = "tiny", **overrides) -> DiffusionTransformer:
    return DiffusionTransformer(llada_config(size, **overrides)).eval()


def dream_like(size: str = "tiny", **overrides) -> DiffusionTransformer:
    return DiffusionTransformer(dream_config(size, **overrides)).eval()


def _size(size: str) -> dict:
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(_SIZES)} or the full-size presets")
    return _SIZES[size]
