"""A random-weight DiffusionGemma (transformers >= 5.25), for the tests and benchmarks: the newest architecture
they run, one the compiler was not written for.

DiffusionGemma generates block by block: an encoder writes the prompt's KV cache, then a bidirectional decoder
with MoE layers denoises a canvas of tokens attending to that cache and to itself (conditioned, in the
generation loop, on the last step's logits). :func:`diffusion_gemma_like` returns the model and its denoising
step over the cache of a random prompt, the function a user compiles.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def diffusion_gemma_like(hidden: int = 64, layers: int = 2, vocab: int = 128, canvas: int = 8, prompt: int = 12,
                         experts: str = "batched_mm", seed: int = 0
                         ) -> tuple[torch.nn.Module, Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]:
    """The model (sliding-window layers and a last full-attention layer, 8 heads over 4 kv heads at hidden >= 128,
    4 experts of which 2 per token) with its ``experts`` implementation (``batched_mm``: per-row weight gathers
    and a batched product, which the analysis proves row-wise; ``grouped_mm``, transformers' default: rows sorted
    by expert, which it does not), and ``step(canvas ids [B, canvas], self-conditioning logits or None) ->
    logits``."""
    try:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
        from transformers.cache_utils import DynamicCache
    except ImportError as err:
        raise ImportError("DiffusionGemma needs transformers >= 5.25") from err
    heads = 8 if hidden >= 128 else 4
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                global_head_dim=hidden // heads, max_position_embeddings=max(256, 2 * (prompt + canvas)),
                sliding_window=max(16, prompt + canvas), num_experts=4, top_k_experts=2,
                moe_intermediate_size=hidden // 2,
                layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    config = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=canvas)
    for c in (config, config.text_config):
        c._attn_implementation, c._experts_implementation = "sdpa", experts
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed + 2))
    with torch.inference_mode():
        cache = model.model.encoder(input_ids=ids, cache=DynamicCache(config=config.text_config)).cache

    def step(canvas_ids: torch.Tensor, self_conditioning: Optional[torch.Tensor] = None) -> torch.Tensor:
        return model(cache=cache, decoder_input_ids=canvas_ids, self_conditioning_logits=self_conditioning).logits
    return model, step
