"""Shared fixtures. Without a CUDA device, Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be
set before any @triton.jit runs (importing torch runs none); with one, they and Inductor's generated kernels run
natively."""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist's workers share the cores: each takes its part for intra-op threads. With the default (every core a
# worker), two workers on two cores ran four OpenMP threads, and the suite's compile work, Python on one thread,
# waited on the other worker's threads (six rewrite modules, two workers: 229-230 s, 182-201 s with one thread each)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _workers))

import pytest  # noqa: E402

from dyllm_compile.models import dream_like, llada_like  # noqa: E402


def _interpreter_broken() -> str:
    """Why Triton's interpreter cannot run the kernels here, or "": Triton 3.6 (torch 2.11's CUDA build) converts a
    kernel's integer arguments to one-element arrays and takes int() of them, which numpy >= 2.4 refuses."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ""
    try:
        import numpy
        import triton
    except ImportError:
        return ""
    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run on numpy {numpy.__version__} (int() of a "
                f"one-element array): install numpy<2.4 or Triton >= 3.7, or run on a GPU")
    return ""


def pytest_collection_modifyitems(config, items):
    reason = _interpreter_broken()
    if reason:
        for item in items:
            marker = item.get_closest_marker("kernels")
            if marker and marker.kwargs.get("interpreted", True):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_llada():
    return llada_like("tiny")


@pytest.fixture(scope="session")
def tiny_dream():
    return dream_like("tiny")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture
def incremental_attention(monkeypatch):
    """``dyllm::cached_attention`` called at every cached site and, in exact mode, on its incremental update: neither
    the small-problem route (``RECOMPUTE_WORK``, which traces either mode's attention into the graph) nor the
    per-element recompute where many columns changed (``UPDATE_COST``) is taken, whatever the sizes and salient
    sets."""
    op = importlib.import_module("dyllm_compile.ops.cached_attention")
    monkeypatch.setattr(op, "RECOMPUTE_WORK", 0)
    monkeypatch.setattr(op, "UPDATE_COST", 0)
