"""dyllm-compile: a torch.compile backend that recomputes only salient tokens of diffusion LMs."""

from .config import DyllmConfig
from .explain import Report, explain

__all__ = ["DyllmConfig", "Report", "explain"]
__version__ = "0.1.0"
