"""Triton kernels for the dyllm ops. ops/cached_attention.py registers them as the op's CUDA implementation
when CUDA and Triton are there; the plain-torch references stay the CPU path. Needs Triton (the CUDA build of
torch brings it)."""

from .cached_attention import cached_attention_paper, cuda_implementation
from .exact_attention import cached_attention_exact

__all__ = ["cached_attention_exact", "cached_attention_paper", "cuda_implementation"]
