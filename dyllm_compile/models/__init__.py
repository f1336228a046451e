"""Reference diffusion LMs in plain PyTorch, and loading of local Hugging Face checkpoints."""

from .default import load_checkpoint, load_default_model
from .presets import dream_config, dream_like, llada_config, llada_like
from .transformer import DiffusionTransformer, TransformerConfig


def load_pretrained(*args, **kwargs):
    """See :func:`dyllm_compile.models.hf.load_pretrained` (imports transformers on first use)."""
    from .hf import load_pretrained as _load

    return _load(*args, **kwargs)


__all__ = [
    "DiffusionTransformer",
    "TransformerConfig",
    "dream_config",
    "dream_like",
    "llada_config",
    "llada_like",
    "load_checkpoint",
    "load_default_model",
    "load_pretrained",
]
