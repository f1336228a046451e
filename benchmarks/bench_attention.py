"""One attention site at one sparse step: ``dyllm::cached_attention`` vs dense SDPA, against the roofline bound.

    python benchmarks/bench_attention.py                  # LLaDA-8B's attention (32 heads, head dim 128), 1150 tokens
    python benchmarks/bench_attention.py --tokens 256 --heads 8 --kv-heads 8 --head-dim 64 --batch 1

Per batch size, salient fraction and mode (``exact``, ``paper``): the time per call of each implementation
(``kernel``: the op's CUDA implementation, the Triton kernels, at each ``--blocks`` tile size and warps;
``reference``: the plain-torch op, which is the op's implementation elsewhere), its roofline bound
(``benchmarks/roofline.py``: ``attention_cost``, with the bandwidth and matmul peak measured here) and the share of
it achieved, dense SDPA's time on the same shapes, and the largest difference of the kernel's context from the
reference's. The salient rows (a random ``--fractions`` share per batch element) are this step's changed key columns
and the rows known to need recomputing; rows the exact update flags as unstable come on top and are not counted in
the bound. CSV: ``benchmarks/results/attention_<device>.csv``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import machine_facts, profiled, write_csv  # noqa: E402
from bench_rows import timed  # noqa: E402
from roofline import attention_cost, measure_machine  # noqa: E402

from dyllm_compile.ops.cached_attention import (_attention_with_stats, cached_attention_reference,  # noqa: E402
                                                repeat_kv_heads)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["device", "torch", "triton", "dtype", "batch", "heads", "kv_heads", "tokens", "head_dim",
          "salient_fraction", "mode", "impl", "block_m", "block_n", "num_warps", "ms_per_call", "bound_ms",
          "bound_share", "dense_ms", "speedup_vs_dense", "max_err_vs_reference"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def step_inputs(batch: int, heads: int, kv_heads: int, n: int, d: int, fraction: float, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> tuple:
    """The op's arguments at a sparse step: keys and values changed on ``fraction`` of the rows per batch
    element, the previous context with its softmax statistics (dense attention over the old keys and values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    q, k_old, v_old = rnd(batch, heads, n, d), rnd(batch, kv_heads, n, d), rnd(batch, kv_heads, n, d)
    count = max(1, round(fraction * n))
    salient = torch.zeros(batch, n, dtype=torch.bool, device=device)
    for row in salient:
        row[torch.randperm(n, generator=gen, device=device)[:count]] = True
    changed = salient[:, None, :, None]  # each element's keys and values change on its own salient rows
    k = torch.where(changed, rnd(batch, kv_heads, n, d), k_old)
    v = torch.where(changed, rnd(batch, kv_heads, n, d), v_old)
    scale = d ** -0.5
    c_old, m_old, l_old = _attention_with_stats(q, repeat_kv_heads(k_old, heads), repeat_kv_heads(v_old, heads),
                                                None, scale)
    return q, k, v, k_old, v_old, c_old, m_old, l_old, salient, None, scale


def implementations(names: Sequence[str], blocks: Sequence[tuple]) -> dict:
    """(name, block_m, block_n, num_warps) -> the function to time: the kernels once per tile size and warps, and
    at the autotuners' choice for the block ``("auto",)``."""
    impls = {}
    for name in names:
        if name == "kernel":
            from dyllm_compile.kernels.cached_attention import cuda_implementation

            for block in blocks:
                if block == ("auto",):
                    impls[name, "auto", "", ""] = cuda_implementation
                    continue
                block_m, block_n, warps = block
                impls[name, block_m, block_n, warps] = functools.partial(
                    cuda_implementation, block_m=block_m, block_n=block_n, num_warps=warps)
        elif name == "reference":
            impls[name, "", "", ""] = cached_attention_reference
        else:
            raise ValueError(f"unknown implementation {name!r}: kernel, reference")
    return impls


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    machine = measure_machine(device, dtype)
    facts = machine_facts(device)
    impls = implementations(args.impls, args.blocks)
    h, g, n, d = args.heads, args.kv_heads, args.tokens, args.head_dim
    results = []
    with torch.inference_mode():
        for batch in args.batch:
            for fraction in args.fractions:
                inputs = step_inputs(batch, h, g, n, d, fraction, dtype, device)
                q, k, v = inputs[:3]
                dense_s = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h != g), args.repeats,
                                device)
                # Per batch element: its changed columns are its salient rows, which it also recomputes.
                changed = recomputed = int(inputs[8].sum(dim=1).float().mean().round())
                for mode in args.modes:
                    want = cached_attention_reference(*inputs, mode, 0.5)[0].float()
                    bound = attention_cost(mode, batch, h, g, n, d, changed, recomputed, dtype.itemsize
                                           ).bound_seconds(machine)
                    for (name, block_m, block_n, warps), impl in impls.items():
                        tiles = _tiles(block_m, block_n, warps)
                        try:
                            seconds = timed(lambda: impl(*inputs, mode, 0.5), args.repeats, device)
                        except OutOfResources as error:  # a tile size the device cannot hold
                            print(f"b{batch} f={fraction} {mode} {name} {tiles}: {error}", flush=True)
                            continue
                        err = (impl(*inputs, mode, 0.5)[0].float() - want).abs().max().item()
                        results.append(dict(
                            facts, dtype=args.dtype, batch=batch, heads=h, kv_heads=g, tokens=n, head_dim=d,
                            salient_fraction=fraction, mode=mode, impl=name, block_m=block_m, block_n=block_n,
                            num_warps=warps,
                            ms_per_call=1e3 * seconds,
                            bound_ms=1e3 * bound, bound_share=bound / seconds, dense_ms=1e3 * dense_s,
                            speedup_vs_dense=dense_s / seconds, max_err_vs_reference=err))
                        print(_line(results[-1]), flush=True)
                        if args.profile:
                            profile(lambda: impl(*inputs, mode, 0.5), f"{mode} {name} {tiles}")
    if args.profile:
        print_compiled_kernels()
    return results


def profile(fn, label: str, calls: int = 10) -> None:
    """Where one call's time goes: torch.profiler's table of host and device time per operator and kernel."""
    with profiled(f"{calls} calls: {label}"):
        for _ in range(calls):
            fn()


def print_compiled_kernels() -> None:
    """The tiles each autotuner chose, and the registers, spills and warps of each compiled Triton kernel of the op
    (Triton's caches)."""
    from dyllm_compile.kernels import cached_attention as paper_module
    from dyllm_compile.kernels import exact_attention as exact_module

    for tuned in (paper_module._paper_kernel, exact_module._update_kernel, exact_module._recompute_kernel):
        fn = tuned.fn if isinstance(tuned, triton.runtime.Autotuner) else tuned
        for key, config in getattr(tuned, "cache", {}).items():
            print(f"{fn.__name__}: the autotuner chose {config} for (B, H, R, N, ...) = {key}")
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                try:
                    meta = kernel.metadata
                    print(f"{fn.__name__}: regs {kernel.n_regs} spills {kernel.n_spills} warps {meta.num_warps} "
                          f"stages {meta.num_stages} shared {meta.shared} B")
                except AttributeError as error:  # Triton's cache layout is not an API
                    print(f"{fn.__name__}: {error}")


def _tiles(block_m, block_n, warps) -> str:
    """A timed implementation's tiles: rows x keys x warps, "auto" (the autotuners'), or "" (the reference)."""
    return f"{block_m}x{block_n}x{warps}" if block_n else str(block_m)


def _line(r: dict) -> str:
    tiles = _tiles(r["block_m"], r["block_n"], r["num_warps"])
    return (f"b{r['batch']} f={r['salient_fraction']:<5} {r['mode']:<5} {r['impl']:<9} {tiles:<8} "
            f"{r['ms_per_call']:8.3f} ms "
            f"(bound {r['bound_ms']:.3f} ms, {100 * r['bound_share']:.0f}%; dense SDPA {r['dense_ms']:.3f} ms, "
            f"x{r['speedup_vs_dense']:.2f}; max err {r['max_err_vs_reference']:.1e})")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1150)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--fractions", default="0.01,0.05,0.2", help="salient fractions (comma-separated)")
    parser.add_argument("--modes", default="exact,paper")
    parser.add_argument("--impls", default="kernel,reference" if cuda else "reference",
                        help="kernel (the Triton kernels; on CPU only under TRITON_INTERPRET=1), reference")
    parser.add_argument("--blocks", default="auto,16x32,64x32,128x32x8,64x64x8" if cuda else "auto,16x32",
                        help="the kernels' tiles to time, rows x keys [x warps, default 4], or auto (the autotuners' "
                             "choice, what the op uses), comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if cuda else "float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/attention_<device>.csv)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table after each timing, and the compiled kernels' registers")
    args = parser.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.modes = args.modes.split(",")
    args.impls = args.impls.split(",")
    try:
        args.blocks = [("auto",) if b == "auto" else tuple(int(x) for x in b.split("x"))
                       for b in args.blocks.split(",")]
    except ValueError:
        parser.error(f"--blocks takes auto or rows x keys [x warps] such as 16x32,64x64x8; got {args.blocks!r}")
    fixed = [b for b in args.blocks if b != ("auto",)]
    if any(len(b) not in (2, 3) or any(x < 1 or x & (x - 1) for x in b) or min(b[:2]) < 16 for b in fixed):
        parser.error(f"--blocks: tile sizes powers of two >= 16 (tl.dot's tiles), warps a power of two; got "
                     f"{args.blocks}")
    args.blocks = [b if len(b) != 2 else (*b, 4) for b in args.blocks]
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    if set(args.modes) - {"exact", "paper"}:
        parser.error(f"--modes takes exact, paper; got {args.modes}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    try:
        implementations(args.impls, args.blocks)
    except ValueError as error:
        parser.error(str(error))
    results = run(args)
    out = args.out or os.path.join(RESULTS, f"attention_{torch.device(args.device).type}.csv")
    write_csv(results, out, FIELDS)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
