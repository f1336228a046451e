"""On a CUDA machine, importing dyllm_compile registers the Triton kernels as the op's CUDA implementation.

The registration runs while the ops package is still initializing; a first version of it imported the op through
the half-built package and failed on every CUDA machine, which the CPU suite never saw because the registration is
skipped without CUDA. This test imports the package in a fresh interpreter that reports CUDA as available."""

import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PROBE = """
import torch
torch.cuda.is_available = lambda: True
import dyllm_compile
assert torch._C._dispatch_has_kernel_for_dispatch_key("dyllm::cached_attention", "CUDA"), "no CUDA kernel"
print("ok")
"""


def test_importing_the_package_registers_the_cuda_kernels():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
