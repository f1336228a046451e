"""The Triton kernels compile for Hopper (sm_90: H100 / H200) with bf16 data, without a GPU.

The interpreter (the other kernel tests on CPU) runs the kernels' Python semantics and accepts code that the
compiler rejects; here Triton lowers each kernel to PTX and ptxas assembles it for sm_90, at each of its
autotuning candidates, for every mask kind, with query positions, at LLaDA-8B's head dim (128) and a padded one
(80: Phi-2's), with bf16 products on the tensor cores as on a GPU, and the compaction kernel the launches share
(once per configuration, though it reads neither mask nor head dim). Each compile is specialized as Triton's
launcher specializes a launch at LLaDA-8B's attention shapes: pointers 16-byte aligned, and each integer argument
marked divisible by 16 where its value there is. That matters: without it the loads are not vectorized (one
2-byte load per element, a 64-bit address each) and the larger tiles spill registers that the launched kernels do
not. ptxas's resource report (registers, spill stores) is read for every compile: a candidate that spills is slow
on the device, and only a device's timing would otherwise show it. Under TRITON_INTERPRET=1 (set by conftest
without a GPU) ``@triton.jit`` gives interpreted functions, so the compiles run in one subprocess without it: this
file, run as a script.
"""

import contextlib
import io
import json
import os
import re
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
POINTERS = {"flags": "u8", "any": "u8", "q": "bf16", "k": "bf16", "v": "bf16", "ko": "bf16", "vo": "bf16",
            "co": "bf16", "c": "bf16",
            "m": "fp32", "l": "fp32", "mo": "fp32", "lo": "fp32", "sal": "u8", "mask": "u8", "unstable": "u8",
            "cols": "i32", "count": "i32", "pos": "i32", "order": "i32", "redo_count": "i32"}
FLOATS = {"scale", "share"}


# Shared memory one program may take on sm_90 (227 KB): a candidate above it could never launch
SHARED_LIMIT = 227 * 1024
# Spill stores (bytes per thread, ptxas's count) a candidate may have: a register or a few spilled once cost nothing
# measurable; the kernels the H200 found slow spilled their tiles, 0.6 to 72 KB (docs/rewrite.md)
SPILL_BUDGET = 16
# LLaDA-8B's attention at batch 1: heads, query rows, keys (no kv grouping)
HEADS, ROWS, KEYS = 32, 1150, 1150


def _int_values(head_dim: int, masked: bool) -> dict[str, int]:
    """The integer arguments' values at LLaDA-8B's attention shapes (contiguous q-like tensors [B, H, R, D], keys
    [B, H, N, D], a padding mask [B, 1, N, N] broadcast over the heads, or no mask: strides 0): Triton's launcher
    marks those divisible by 16."""
    mask_strides = dict(sm_b=KEYS * KEYS, sm_h=0, sm_q=KEYS, sm_k=1) if masked else dict(sm_b=0, sm_h=0, sm_q=0,
                                                                                          sm_k=0)
    return dict(sq_b=HEADS * ROWS * head_dim, sq_h=ROWS * head_dim, sq_n=head_dim, sk_b=HEADS * KEYS * head_dim,
                sk_h=KEYS * head_dim, sk_n=head_dim, **mask_strides, B=1, H=HEADS, R=ROWS, N=KEYS, GROUP=1)


def _kernel(kernel_name: str):
    import importlib

    module, name = KERNELS[kernel_name]
    return getattr(importlib.import_module(f"dyllm_compile.kernels.{module}"), name)


def _compile(kernel_name: str, mask_kind: int, head_dim: int, candidate: int = 0) -> dict:
    """The kernel compiled for sm_90 at its autotuning candidate ``candidate`` (tiles and warps): its PTX target
    line, the shared memory, registers and spill stores (bytes) of one program (raises what Triton or ptxas
    raise)."""
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
    values = _int_values(head_dim, mask_kind != MASK_NONE)
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
               if arg not in constexprs and (arg.endswith("_ptr") or values.get(arg, 1) % 16 == 0)}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=aligned)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's report here (the environment the fixture sets)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    report = log.getvalue()
    registers, spills = (re.search(pattern, report)
                         for pattern in (r"Used (\d+) registers", r"(\d+) bytes spill stores"))
    assert registers and spills, f"no ptxas resource report in: {report[-500:]!r}"
    target = next(line for line in compiled.asm["ptx"].splitlines() if line.startswith(".target"))
    return dict(target=target, shared=compiled.metadata.shared, registers=int(registers[1]), spills=int(spills[1]))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Triton prints ptxas's report (-v) for each compile, and compiles every time (a cached kernel has no report)
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("head_dim", list(HEAD_DIMS))
@pytest.mark.parametrize("mask_kind", list(MASK_KINDS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_compiles_for_sm90_at_every_candidate(compiled, kernel, mask_kind, head_dim):
    results = {key: value for key, value in compiled.items() if key.startswith(f"{kernel}/{mask_kind}/{head_dim}/")}
    # every candidate of the autotuned kernels (the subprocess counts them on the autotuner), the compaction's one
    assert len(results) == 1 if kernel == "compact" else len(results) >= 2, results
    for key, value in results.items():
        assert isinstance(value, dict) and value["target"] == ".target sm_90a", (key, value)
        assert value["shared"] <= SHARED_LIMIT, (key, value)


def test_no_autotuning_candidate_spills_registers(compiled):
    """The autotuners time their candidates only on a GPU: each must keep its tiles in registers (ptxas's spill
    stores to local memory within SPILL_BUDGET), or the GPU would first find out, as a slow candidate at best."""
    spilled = {key: value["spills"] for key, value in compiled.items()
               if isinstance(value, dict) and value["spills"] > SPILL_BUDGET}
    assert not spilled, spilled


if __name__ == "__main__":
    import triton

    results = {}
    for kernel in KERNELS:
        tuned = _kernel(kernel)
        candidates = len(tuned.configs) if isinstance(tuned, triton.runtime.Autotuner) else 1
        for mask, kind in MASK_KINDS.items():
            for head_dim in HEAD_DIMS:
                for candidate in range(candidates):
                    key = f"{kernel}/{mask}/{head_dim}/{candidate}"
                    try:
                        results[key] = _compile(kernel, kind, head_dim, candidate)
                    except Exception as error:  # reported per configuration by the tests
                        results[key] = f"{type(error).__name__}: {error}"[:2000]
    print(json.dumps(results))
