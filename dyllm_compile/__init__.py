"""dyllm-compile: a torch.compile backend that recomputes only salient tokens of diffusion LMs."""

from .config import DyllmConfig
from .explain import Report, explain
from .runtime.graph_runtime import reset_all as reset
from .runtime.graph_runtime import runtimes

__all__ = ["DyllmConfig", "Report", "explain", "reset", "runtimes"]
__version__ = "0.1.0"
