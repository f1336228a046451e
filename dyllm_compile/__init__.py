"""dyllm-compile: a torch.compile backend that recomputes only salient tokens of diffusion LMs."""

from .config import DyllmConfig

__all__ = ["DyllmConfig"]
__version__ = "0.1.0"
