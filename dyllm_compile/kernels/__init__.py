"""Triton kernels for the dyllm ops. Importing this package registers them as the ops' CUDA implementations;
the plain-torch references stay the CPU path. Needs Triton (the CUDA build of torch brings it)."""

from ..ops import cached_attention as _op
from .cached_attention import cached_attention_paper, cuda_implementation
from .exact_attention import cached_attention_exact

_op.register_kernel("cuda")(cuda_implementation)

__all__ = ["cached_attention_exact", "cached_attention_paper", "cuda_implementation"]
