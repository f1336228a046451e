"""The Triton kernels compile for Hopper (sm_90: H100 / H200) with bf16 data, without a GPU.

The interpreter (the other kernel tests on CPU) runs the kernels' Python semantics and accepts code that the
compiler rejects; here Triton lowers each kernel to PTX and ptxas assembles it for sm_90, for every mask kind,
with query positions, at LLaDA-8B's head dim (128) and a padded one (80: Phi-2's), with bf16 products on the
tensor cores as on a GPU, and the compaction kernel the launches share (once per configuration, though it reads
neither mask nor head dim). Under TRITON_INTERPRET=1 (set by conftest without a GPU)
``@triton.jit`` gives interpreted functions, so the compiles run in one subprocess without it: this file, run as a
script.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dyllm_compile.kernels.tiles import MASK_ADD, MASK_BOOL, MASK_NONE

# On a GPU the other kernel tests compile natively (and the device's Triton may take other ASTSource arguments).
pytestmark = [pytest.mark.kernels(interpreted=False),  # compiled by Triton in a subprocess, not interpreted
              pytest.mark.skipif(torch.cuda.is_available(), reason="compiled natively there")]
KERNELS = {"paper": ("cached_attention", "_paper_kernel"), "update": ("exact_attention", "_update_kernel"),
           "recompute": ("exact_attention", "_recompute_kernel"), "compact": ("tiles", "_compact_kernel")}
MASK_KINDS = {"no-mask": MASK_NONE, "bool": MASK_BOOL, "additive": MASK_ADD}
HEAD_DIMS = {128: 128, 80: 128}  # head dim -> its tiles' padded size (kernels/tiles.py: BLOCK_D)
# Pointer argument -> element type, by the kernels' names: data in bf16, statistics fp32, flags and the mask (a
# bool mask is passed as bytes) uint8, indices and counts int32.
POINTERS = {"flags": "u8", "any": "u8", "q": "bf16", "k": "bf16", "v": "bf16", "ko": "bf16", "vo": "bf16", "co": "bf16", "c": "bf16",
            "m": "fp32", "l": "fp32", "mo": "fp32", "lo": "fp32", "sal": "u8", "mask": "u8", "unstable": "u8",
            "cols": "i32", "count": "i32", "pos": "i32", "order": "i32", "redo_count": "i32"}
FLOATS = {"scale", "share"}


# Shared memory one program may take on sm_90 (227 KB): a candidate above it could never launch
SHARED_LIMIT = 227 * 1024


def _kernel(kernel_name: str):
    import importlib

    module, name = KERNELS[kernel_name]
    return getattr(importlib.import_module(f"dyllm_compile.kernels.{module}"), name)


def _compile(kernel_name: str, mask_kind: int, head_dim: int, candidate: int = 0) -> str:
    """The PTX target line of the kernel compiled for sm_90 at its autotuning candidate ``candidate`` (tiles and
    warps), and the shared memory it takes (raises what Triton or ptxas raise)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, tiles, warps = _kernel(kernel_name), dict(BLOCK_M=16, BLOCK_N=32), 4
    if isinstance(kernel, triton.runtime.Autotuner):
        config = kernel.configs[candidate]
        kernel, tiles, warps = kernel.fn, config.kwargs, config.num_warps
    constexprs = dict(D=head_dim, BLOCK_D=HEAD_DIMS[head_dim], MASK_KIND=mask_kind, HAS_POS=True, TENSOR_CORES=True,
                      HAS_ANY=True, **tiles)
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}  # the compaction takes two
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + POINTERS[arg[: -len("_ptr")]]
        else:
            signature[arg] = "fp32" if arg in FLOATS else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    target = next(line for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))
    return f"{target}, shared {compiled.metadata.shared}"


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("head_dim", list(HEAD_DIMS))
@pytest.mark.parametrize("mask_kind", list(MASK_KINDS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_compiles_for_sm90(compiled, kernel, mask_kind, head_dim):
    assert compiled[f"{kernel}/{mask_kind}/{head_dim}"].startswith(".target sm_90a, shared ")


def test_every_autotuning_candidate_compiles_for_sm90_within_shared_memory(compiled):
    """The autotuners time their candidates only on a GPU: each must compile for sm_90 (LLaDA-8B's head dim, no
    mask) and fit a program's shared memory, or the GPU would first find out."""
    candidates = {key: value for key, value in compiled.items() if key.startswith("candidate/")}
    assert {key.split("/")[1] for key in candidates} == {"paper", "update", "recompute"}
    assert len(candidates) >= 6  # at least two per kernel
    for key, value in candidates.items():
        assert value.startswith(".target sm_90a, shared "), (key, value)
        assert int(value.rsplit(" ", 1)[1]) <= SHARED_LIMIT, (key, value)


if __name__ == "__main__":
    results = {}
    for kernel in KERNELS:
        for mask, kind in MASK_KINDS.items():
            for head_dim in HEAD_DIMS:
                key = f"{kernel}/{mask}/{head_dim}"
                try:
                    results[key] = _compile(kernel, kind, head_dim)
                except Exception as error:  # reported per configuration by the tests
                    results[key] = f"{type(error).__name__}: {error}"[:2000]
        import triton

        tuned = _kernel(kernel)
        for candidate in range(1, len(tuned.configs) if isinstance(tuned, triton.runtime.Autotuner) else 1):
            key = f"candidate/{kernel}/{candidate}"
            try:
                results[key] = _compile(kernel, MASK_NONE, 128, candidate)
            except Exception as error:
                results[key] = f"{type(error).__name__}: {error}"[:2000]
    print(json.dumps(results))
