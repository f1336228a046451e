"""Quality sweep on the trained default model: dyllm threshold x attention mode vs dense, paired per problem.

    python benchmarks/bench_quality.py [--count 1000] [--thresholds 0.95,0.98,0.99,0.995,1.0]
    python benchmarks/bench_quality.py --merge a.csv b.csv [--out ...]   # one table from parts run separately

For every configuration the same held-out problems are decoded (low-confidence remasking, one token per step;
plus one pair with confidence-threshold parallel decoding). Accuracy comes with a 95% confidence interval, and
the difference to dense with a paired 95% interval. "FFN rows" is the share of FFN rows the per-sequence
algorithm recomputes (mean salient fraction over all calls and layers, dense calls counting as all rows); the
accuracy decode batches problems, so its union-over-batch row count says nothing about speed. Speed is measured
separately at batch 1 with Inductor: tokens/s of each configuration and of dense Inductor, in the same run.
The default threshold (0.99, the paper's) was fixed before this sweep was run.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import RESULTS, machine_facts, write_csv  # noqa: E402

import dyllm_compile  # noqa: E402
from dyllm_compile.config import ATTENTION_MODES, DyllmConfig  # noqa: E402
from dyllm_compile.evaluate import evaluate, paired_difference, proportion_interval  # noqa: E402
from dyllm_compile.models import load_default_model  # noqa: E402
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes  # noqa: E402
from dyllm_compile.tasks import ANSWER_LENGTH, TASKS  # noqa: E402

FIELDS = ["device", "torch", "decoding", "config", "policy", "threshold", "attention_mode", "task", "problems",
          "accuracy", "accuracy_ci95", "diff_vs_dense", "diff_ci95", "ffn_rows_fraction", "tokens_per_s_b1",
          "speedup_vs_inductor_b1"]


def dyllm(model, options: dict, lowering: str):
    return torch.compile(model, backend="dyllm", options={**options, "lowering": lowering})


def rows_fraction(since: int) -> float:
    per_call = [r.stats.per_call_fractions(len(r.plan.sites)) for r in runtimes(since) if r.stats.history]
    calls = torch.cat(per_call) if per_call else torch.ones(1, 1)
    return float(calls.mean())


def accuracy_run(model, count: int, batch: int, confidence: Optional[float]):
    since = last_serial()
    results = evaluate(model, count=count, batch_size=batch, confidence_threshold=confidence, progress=True)
    return results, rows_fraction(since)


def speed_run(model, count: int, confidence: Optional[float]) -> float:
    """Tokens/s at batch 1 over ``count`` problems per task, after one warm-up pass over the first problem."""
    evaluate(model, count=1, batch_size=1, confidence_threshold=confidence)
    start = time.perf_counter()
    results = evaluate(model, count=count, batch_size=1, confidence_threshold=confidence)
    seconds = time.perf_counter() - start
    return sum(len(r.correct) for r in results.values()) * ANSWER_LENGTH / seconds


# The policies, parallel decoding and (unless --pruning-mode says otherwise) query pruning are compared in paper
# mode: the library default when the committed sweep ran; their rows are labelled so.
OTHERS_MODE = "paper"


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000,
                        help="held-out problems per task for dense and the defaults (threshold 0.99, the default "
                             "attention mode)")
    parser.add_argument("--sweep-count", type=int, default=200,
                        help="held-out problems per task for the other thresholds and the policies")
    parser.add_argument("--batch", type=int, default=250, help="problems per decode in the accuracy runs")
    parser.add_argument("--thresholds", default="0.95,0.98,0.99,0.995,1.0")
    parser.add_argument("--modes", default="paper,exact")
    parser.add_argument("--speed-count", type=int, default=4, help="problems per task for the batch-1 timing")
    parser.add_argument("--policies", default="block_freeze,dllm_cache,es_dllm",
                        help="policies also compared at their defaults (paper mode, threshold 0.99)")
    parser.add_argument("--query-pruning-period", type=int, default=32,
                        help="also compare threshold 0.99 with query pruning at this period (0: skip)")
    parser.add_argument("--pruning-mode", choices=ATTENTION_MODES, default=OTHERS_MODE,
                        help="the attention mode of the query-pruning comparison")
    parser.add_argument("--salient-output-projection", action="store_true",
                        help="also compare threshold 0.99 (the default attention mode) with output_projection="
                             "'salient' (the o projection on S_out only)")
    parser.add_argument("--parallel-confidence", type=float, default=0.9,
                        help="also compare dense and dyllm (0.99, paper) with this threshold parallel decoding")
    parser.add_argument("--out", default=os.path.join(RESULTS, "quality_cpu.csv"))
    parser.add_argument("--merge", nargs="+", metavar="CSV",
                        help="instead of running: join these result files (a configuration already in an "
                             "earlier file is skipped) into --out, with its plot")
    args = parser.parse_args(argv)
    if args.merge:
        return write(merge(args.merge), args.out)
    facts = machine_facts(torch.device("cpu"))
    model = load_default_model()
    # (name, dyllm options or None for dense, confidence of parallel decoding or None, problems per task, timed)
    configs: list[tuple[str, Optional[dict], Optional[float], int, bool]] = [("dense", None, None, args.count, True)]
    for m in filter(None, args.modes.split(",")):
        for t in filter(None, args.thresholds.split(",")):
            default = float(t) == 0.99
            configs.append((f"dyllm {m} {t}", {"threshold": float(t), "attention_mode": m}, None,
                            args.count if default and m == DyllmConfig().attention_mode else args.sweep_count, default))
    if args.query_pruning_period:
        pruning = {"threshold": 0.99, "attention_mode": args.pruning_mode, "mask_token_id": model.cfg.mask_token_id,
                   "query_pruning_period": args.query_pruning_period}
        configs.append((f"dyllm {args.pruning_mode} 0.99 qp{args.query_pruning_period}", pruning, None, args.count,
                        True))
    if args.salient_output_projection:
        mode = DyllmConfig().attention_mode
        configs.append((f"dyllm {mode} 0.99 so", {"threshold": 0.99, "attention_mode": mode,
                                                  "output_projection": "salient"}, None, args.count, True))
    configs += [(f"policy {p}", {"policy": p, "attention_mode": OTHERS_MODE}, None, args.sweep_count, True)
                for p in filter(None, args.policies.split(","))]
    if args.parallel_confidence:
        configs += [("dense", None, args.parallel_confidence, args.sweep_count, True),
                    (f"dyllm {OTHERS_MODE} 0.99", {"threshold": 0.99, "attention_mode": OTHERS_MODE},
                     args.parallel_confidence, args.sweep_count, True)]
    rows, dense_results, inductor_speed = [], {}, {}
    for name, options, confidence, count, timed in configs:
        decoding = "low-confidence" if confidence is None else f"threshold {confidence}"
        dyllm_compile.reset()
        torch._dynamo.reset()
        runner = model if options is None else dyllm(model, options, "aot_eager")
        results, fraction = accuracy_run(runner, count, args.batch, confidence)
        speed = float("nan")
        if timed:
            torch._dynamo.reset()
            fast = torch.compile(model) if options is None else dyllm(model, options, "inductor")
            speed = speed_run(fast, args.speed_count, confidence)
        options = options or {}
        threshold = options.get("threshold", 0.99) if options and "policy" not in options else None
        if not options:
            dense_results[decoding], inductor_speed[decoding] = results, speed
        everything = {"all": [c for r in results.values() for c in r.correct]}
        for task, correct in {**{t: results[t].correct for t in TASKS}, **everything}.items():
            dense = dense_results[decoding]
            dense_correct = [c for r in dense.values() for c in r.correct[:count]] if task == "all" else (
                dense[task].correct[:count])
            diff, diff_ci = paired_difference(correct, dense_correct)
            rows.append(dict(
                facts, decoding=decoding, config=name, policy=options.get("policy", "dyllm" if options else ""),
                threshold=threshold or "", attention_mode=options.get("attention_mode", ""),
                task=task,
                problems=len(correct), accuracy=sum(correct) / len(correct),
                accuracy_ci95=proportion_interval(correct), diff_vs_dense=diff, diff_ci95=diff_ci,
                ffn_rows_fraction=fraction if options else 1.0, tokens_per_s_b1=speed,
                speedup_vs_inductor_b1=speed / inductor_speed[decoding],
            ))
        overall = rows[-1]
        print(f"{decoding:<16} {name:<20} accuracy {100 * overall['accuracy']:.2f}% "
              f"(vs dense {100 * overall['diff_vs_dense']:+.2f} +- {100 * overall['diff_ci95']:.2f}) "
              f"FFN rows {100 * overall['ffn_rows_fraction']:.1f}%  {speed:.1f} tok/s b1 "
              f"(x{overall['speedup_vs_inductor_b1']:.2f} vs Inductor)", flush=True)
    return write(rows, args.out)


def write(rows: list[dict], out: str) -> list[dict]:
    """The CSV and, next to it, the Pareto plot."""
    write_csv(rows, out, FIELDS, digits=5)
    plot(rows, os.path.splitext(out)[0] + "_pareto.png")
    return rows


NUMERIC = ("problems", "accuracy", "accuracy_ci95", "diff_vs_dense", "diff_ci95", "ffn_rows_fraction",
           "tokens_per_s_b1", "speedup_vs_inductor_b1")


def merge(paths: Sequence[str]) -> list[dict]:
    """Rows of several result files; a (decoding, config) already in an earlier file is skipped (e.g. the dense
    baseline each part ran for its paired differences)."""
    rows: list[dict] = []
    for path in paths:
        with open(path) as f:
            part = [{k: float(v) if k in NUMERIC else v for k, v in r.items()} for r in csv.DictReader(f)]
        seen = {(r["decoding"], r["config"]) for r in rows}
        rows += [r for r in part if (r["decoding"], r["config"]) not in seen]
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in rows if r["task"] == "all" and r["decoding"] == "low-confidence"
               and r["policy"] in ("", "dyllm")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ffn_rows_fraction", "FFN rows recomputed (share of dense)"),
                           (axes[1], "speedup_vs_inductor_b1", "tokens/s vs dense Inductor (batch 1)")):
        for mode, marker in (("", "s"), ("paper", "o"), ("exact", "^")):
            points = [r for r in overall if r["attention_mode"] == mode]
            ax.errorbar([r[key] for r in points], [100 * r["accuracy"] for r in points],
                        yerr=[100 * r["accuracy_ci95"] for r in points], fmt=marker, capsize=3,
                        label=mode or "dense")
            for r in points:
                if r["threshold"]:  # query-pruned (qp) and salient-o (so) configurations say so: other points
                    tags = "".join(f" {tag}" for tag in ("qp", "so") if f" {tag}" in r["config"])
                    text = f"{r['threshold']}{tags}"
                    ax.annotate(text, (r[key], 100 * r["accuracy"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="exact-match accuracy, all tasks (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"default model, held-out problems; {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
