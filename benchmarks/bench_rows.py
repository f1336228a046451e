"""Row counts of a gated region: static capacity buckets (dyllm's route) vs unbacked sizes (``nonzero``).

    python benchmarks/bench_rows.py [--tokens 256] [--d-model 512] [--d-ffn 1536] [--batch 1]

A SwiGLU FFN on the salient rows of a ``[B, N, d]`` hidden state, scattered into its cache, compiled by Inductor
two ways:

- ``buckets``: top-K rows, K the smallest of N/16, N/8, N/4, N/2, N holding the salient rows
  (:func:`dyllm_compile.runtime.rows.select_rows`): static shapes, one compiled variant per bucket, rows padded
  up to the bucket;
- ``unbacked``: exactly the salient rows, from ``nonzero``
  (:func:`dyllm_compile.runtime.rows.select_rows_unbacked`: a data-dependent size, compiled with
  ``capture_dynamic_output_shape_ops``, plus the two padding rows dyllm gathers): one variant for every count,
  a device-to-host sync for the size.

Per salient-row count: time per call (median of repeats), the dense FFN's time on all N rows, and the number
of compiled graphs each route needed over the whole sweep. CSV: ``benchmarks/results/rows_<device>.csv``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import machine_facts, write_csv  # noqa: E402

from dyllm_compile.runtime import rows  # noqa: E402
from dyllm_compile.runtime.graph_runtime import bucket_sizes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["device", "torch", "tokens", "d_model", "d_ffn", "batch", "salient_rows", "route", "capacity",
          "ms_per_call", "dense_ms", "speedup_vs_dense", "graphs_compiled"]


def ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def bucket_step(h, cache, salient, w1, w3, w2, capacity: int):
    index, valid, _ = rows.select_rows(salient, capacity)
    return rows.scatter_rows(cache, ffn(h.index_select(1, index), w1, w3, w2), index, valid, 1)


def unbacked_step(h, cache, salient, w1, w3, w2):
    gather, position, _ = rows.select_rows_unbacked(salient)
    return rows.place_rows(cache, ffn(h.index_select(1, gather), w1, w3, w2), position, salient, 1)


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    b, n, d, f = args.batch, args.tokens, args.d_model, args.d_ffn
    h = torch.randn(b, n, d, generator=gen).to(device)
    cache = torch.randn(b, n, d, generator=gen).to(device)
    w1, w3 = (torch.randn(d, f, generator=gen).to(device) / d ** 0.5 for _ in range(2))
    w2 = torch.randn(f, d, generator=gen).to(device) / f ** 0.5
    torch._dynamo.reset()
    dense = torch.compile(ffn)
    dense_s = timed(lambda: dense(h, w1, w3, w2), args.repeats, device)
    buckets = torch.compile(bucket_step, dynamic=False)  # static: one variant per capacity, as dyllm compiles
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        unbacked = torch.compile(unbacked_step)
        results, graphs = [], {}
        for route in ("buckets", "unbacked"):
            counters.clear()
            for count in args.counts:
                salient = torch.zeros(b, n, dtype=torch.bool, device=device)
                salient[:, torch.randperm(n, generator=gen)[:count].to(device)] = True
                if route == "buckets":
                    capacity = next(k for k in bucket_sizes(n) if k >= count)
                    seconds = timed(lambda: buckets(h, cache, salient, w1, w3, w2, capacity), args.repeats, device)
                else:
                    capacity = count
                    seconds = timed(lambda: unbacked(h, cache, salient, w1, w3, w2), args.repeats, device)
                results.append(dict(salient_rows=count, route=route, capacity=capacity, ms_per_call=1e3 * seconds,
                                    dense_ms=1e3 * dense_s, speedup_vs_dense=dense_s / seconds))
            graphs[route] = counters["stats"]["unique_graphs"]
    facts = machine_facts(device)
    for r in results:
        r.update(device=facts["device"], torch=facts["torch"], tokens=n, d_model=d, d_ffn=f, batch=b,
                 graphs_compiled=graphs[r["route"]])
    return results


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ffn", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--counts", default="1,4,12,16,40,64,100,128",
                        help="salient row counts to sweep (comma-separated)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/rows_<device>.csv)")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    if any(c < 1 or c > args.tokens for c in args.counts):
        parser.error(f"--counts must lie in [1, --tokens={args.tokens}]")
    results = run(args)
    out = args.out or os.path.join(RESULTS, f"rows_{torch.device(args.device).type}.csv")
    write_csv(results, out, FIELDS)
    for r in results:
        print(f"{r['route']:<9} rows {r['salient_rows']:>4} (capacity {r['capacity']:>4}): "
              f"{r['ms_per_call']:.3f} ms  x{r['speedup_vs_dense']:.2f} vs dense ({r['dense_ms']:.3f} ms); "
              f"{r['graphs_compiled']} graphs")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
