"""DiffusionGemma's denoising step (transformers 5.25; random weights): dense Inductor vs dyllm, per experts
implementation and threshold, in one run.

    python benchmarks/bench_diffusion_gemma.py [--hidden 320] [--layers 4] [--canvas 256] [--prompt 256]

The decoder denoises a canvas attending to the prompt's KV cache (a site with a prefix) and runs MoE layers; the
steps give ``canvas / calls`` canvas rows new random tokens each, as its sampler re-noises rows (no mask id: dyllm
with ``token_changes="any"``; no self-conditioning). Random weights make
the salient sets say nothing about accuracy, and at threshold 0.99 these grow to every row by the last layer:
rows at a lower threshold show what the rewritten step runs at trained-model-like salient fractions. Each mode's
step is timed over ``--repeats`` passes of ``--calls`` steps after a first pass that compiles (its time is the
``first_pass_s`` column; each mode compiles cold). CSV: ``benchmarks/results/diffusion_gemma_<device>.csv``, and a
plot of the speedups.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch
from torch._inductor.utils import fresh_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import cold_compiles, machine_facts, write_csv  # noqa: E402

from dyllm_compile.models.diffusion_gemma import diffusion_gemma_like  # noqa: E402
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["device", "torch", "transformers", "weights", "hidden", "layers", "canvas", "prompt", "experts", "mode",
          "threshold", "ms_per_step", "speedup_vs_inductor", "first_pass_s", "salient_fraction_per_layer",
          "rows_computed_fraction", "dense_reasons"]


def _steps(canvas: int, vocab: int, calls: int):
    """Canvas ids, then ``canvas // calls`` more positions set to new tokens a step (a fixed order)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, canvas), generator=gen)
    order = torch.randperm(canvas, generator=gen)
    per_call = max(1, canvas // calls)
    for call in range(calls):
        yield ids.clone()
        ids[0, order[call * per_call: (call + 1) * per_call]] = torch.randint(0, vocab, (per_call,), generator=gen)


def _time(fn, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds a step, best of the timed passes; seconds of the first pass, compiles included)."""
    with torch.inference_mode():
        start = time.perf_counter()
        for x in _steps(args.canvas, args.vocab, args.calls):
            fn(x)
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for x in _steps(args.canvas, args.vocab, args.calls):
                fn(x)
            best = min(best, (time.perf_counter() - start) / args.calls)
    return best, first


def run(args: argparse.Namespace) -> list[dict]:
    import transformers

    facts = machine_facts(torch.device("cpu"))
    rows = []
    for experts in args.experts:
        _, step = diffusion_gemma_like(args.hidden, args.layers, args.vocab, args.canvas, args.prompt, experts)
        torch._dynamo.reset()
        with fresh_cache():  # each mode compiles cold (bench_decode.run_config)
            dense, first = _time(torch.compile(step, backend=args.lowering), args)
        rows.append(dict(mode=args.lowering, threshold="", ms_per_step=1e3 * dense, first_pass_s=first,
                         experts=experts))
        for threshold in args.thresholds:
            torch._dynamo.reset()
            before = last_serial()
            # the steps re-noise rows, no mask id
            options = {"threshold": threshold, "token_changes": "any", "lowering": args.lowering}
            with fresh_cache():
                ms, first = _time(torch.compile(step, backend="dyllm", options=options), args)
            used = [r for r in runtimes(before) if r.stats.dense_calls or r.stats.sparse_calls]
            stats = used[0].stats if used else None
            reasons = "; ".join(r for runtime in used for r in runtime.plan.reasons) if used else "compiled dense"
            rows.append(dict(
                mode="dyllm", threshold=threshold, ms_per_step=1e3 * ms, first_pass_s=first, experts=experts,
                salient_fraction_per_layer=" ".join(f"{f:.3f}" for f in stats.salient_fraction) if stats else "",
                rows_computed_fraction=stats.rows_fraction if stats and stats.sparse_calls else 1.0,
                dense_reasons=reasons))
        for row in rows:
            if row["experts"] == experts:
                row["speedup_vs_inductor"] = 1e3 * dense / row["ms_per_step"]
    for row in rows:
        row.update(device=facts["device"], torch=facts["torch"], transformers=transformers.__version__,
                   weights="random", hidden=args.hidden, layers=args.layers, canvas=args.canvas, prompt=args.prompt)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dyllm = [r for r in rows if r["mode"] == "dyllm"]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"{r['experts']}\nthreshold {r['threshold']}" for r in dyllm]
    ax.bar(labels, [r["speedup_vs_inductor"] for r in dyllm], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("x dense Inductor (step)")
    ax.set_title(f"DiffusionGemma-shaped decoder, random weights ({rows[0]['device']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=320, help="model width (not the canvas length: see docs)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--canvas", type=int, default=256, help="canvas (block) tokens")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens in the encoder's KV cache")
    parser.add_argument("--calls", type=int, default=32, help="denoising steps a pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (the best is kept)")
    parser.add_argument("--experts", default="batched_mm,grouped_mm")
    parser.add_argument("--thresholds", default="0.99,0.9")
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor",
                        help="both modes' lowering (aot_eager only for smoke runs: the dense mode is then named "
                             "aot_eager, and the speedups compare with it)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "diffusion_gemma_cpu.csv"))
    args = parser.parse_args(argv)
    args.experts = args.experts.split(",")
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    cold_compiles()  # first_pass_s compares compiles
    rows = run(args)
    write_csv(rows, args.out, FIELDS)
    plot(rows, os.path.splitext(args.out)[0] + "_speedup.png")
    for r in rows:
        print(f"{r['experts']:<11} {r['mode']:<8} {str(r['threshold']):<5} {r['ms_per_step']:8.2f} ms/step "
              f"x{r['speedup_vs_inductor']:.2f}  salient {r.get('salient_fraction_per_layer', '')} "
              f"{r.get('dense_reasons', '')}")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
