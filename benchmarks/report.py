"""Markdown tables of the committed benchmark CSVs, for docs/benchmarks.md (and docs/architectures.md).

    python benchmarks/report.py [benchmarks/results/decode_cpu.csv] [benchmarks/results/quality_cpu.csv] \
        [benchmarks/results/hf_architectures.csv]

The last is docs/architectures.md's table, from ``scripts/check_hf_architectures.py --csv``.
"""

from __future__ import annotations

import csv
import math
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(value: str, digits: int = 2, scale: float = 1.0) -> str:
    try:
        number = float(value)
    except ValueError:
        return "-"
    return "-" if math.isnan(number) else f"{number * scale:.{digits}f}"


def _pct(value: str, digits: int = 1) -> str:
    number = _num(value, digits, 100)
    return number if number == "-" else number + "%"


def _times(value: str) -> str:
    number = _num(value)
    return number if number == "-" else number + "x"


def _compile_ratio(row: dict) -> str:
    ratio = _num(row.get("compile_vs_inductor", ""))
    return "" if ratio == "-" or row["mode"] == "inductor" else f" ({ratio}x)"


def _model(row: dict) -> str:
    weights = "" if row["weights"] in row["model"] else f", {row['weights']} weights"
    return f"{row['model']}{weights}, {row['seq_len']} tokens"


def decode_table(path: str) -> str:
    rows = _rows(path)
    lines = [f"Device: {rows[0]['device']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}.", "",
             "| model | batch | decoding | mode | tokens/s | x Inductor | x eager | step ms (p50 / p90) | "
             "bound ms | share of bound | compile s (x Inductor) | salient | rows computed | same tokens as eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {_model(r)} | {r['batch']} | {r['decoding']} | {r['mode']} | "
            f"{_num(r['tokens_per_s'], 1)} | {_num(r['speedup_vs_inductor'])} | {_num(r['speedup_vs_eager'])} | "
            f"{_num(r['step_ms_median'])} / {_num(r['step_ms_p90'])} | {_num(r['bound_ms'], 3)} | "
            f"{_pct(r['bound_share'])} | {_num(r['compile_s'], 1)}{_compile_ratio(r)} | "
            f"{_num(r['salient_fraction_mean'], 3)} | "
            f"{_pct(r['rows_computed_fraction'])} | {r['same_tokens_as_eager']} |")
    return "\n".join(lines)


def quality_table(path: str) -> str:
    rows = _rows(path)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    configs = list(dict.fromkeys((r["decoding"], r["config"]) for r in rows))
    head = ("| decoding | config | " + " | ".join(tasks)
            + " | all vs dense (paired 95% CI) | FFN rows | tok/s b1 vs Inductor |")
    lines = [f"Device: {rows[0]['device']}; torch {rows[0]['torch']}. Exact-match accuracy in %, problems per "
             "task in parentheses.", "", head, "|" + "---|" * (len(tasks) + 5)]
    for decoding, config in configs:
        by_task = {r["task"]: r for r in rows if (r["decoding"], r["config"]) == (decoding, config)}
        cells = [f"{_num(by_task[t]['accuracy'], 1, 100)} ({by_task[t]['problems']})" for t in tasks]
        overall = by_task["all"]
        lines.append(
            f"| {decoding} | {config} | " + " | ".join(cells) +
            f" | {_num(overall['diff_vs_dense'], 2, 100):>6} +- {_num(overall['diff_ci95'], 2, 100)} | "
            f"{_pct(overall['ffn_rows_fraction'])} | {_times(overall['speedup_vs_inductor_b1'])} |")
    return "\n".join(lines)


#: Dense reasons that say a region holds no product (an embedding's lookup): not a finding, left out of the table
_NOTHING_TO_SAVE = "no matmul work to save"


def architectures_table(path: str) -> str:
    """docs/architectures.md's table: a row per architecture of ``scripts/check_hf_architectures.py --csv``."""
    rows = _rows(path)
    lines = [f"transformers {rows[0]['transformers']}, torch {rows[0]['torch']}, run {rows[0]['date']}: tiny random "
             f"models (2 layers, width 64), threshold 1, {rows[0].get('lowering') or 'aot_eager'} lowering, a decode "
             "of 8 calls at batch 2.", "",
             "| architecture | class | result | largest difference | tokens | FLOPs gated | what stays dense (first "
             "reason, of how many) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        reasons = [x for x in r["reasons"].split("\n") if x and _NOTHING_TO_SAVE not in x]
        note = r["detail"] or (f"{reasons[0][:140]}" + (f" ({len(reasons)})" if len(reasons) > 1 else "")
                               if reasons else "")
        gated = _num(r["gated"], 0)
        difference = float(r["difference"]) if r["difference"] else math.nan
        lines.append(f"| {r['name']} | {r['model'] or '-'} | {r['status']} | "
                     f"{'-' if math.isnan(difference) else f'{difference:.1e}'} | "
                     f"{r['tokens'] or '-'} | {gated if gated == '-' else gated + '%'} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    decode = argv[0] if argv else os.path.join(RESULTS, "decode_cpu.csv")
    quality = argv[1] if len(argv) > 1 else os.path.join(RESULTS, "quality_cpu.csv")
    architectures = argv[2] if len(argv) > 2 else os.path.join(RESULTS, "hf_architectures.csv")
    for path, table in ((decode, decode_table), (quality, quality_table), (architectures, architectures_table)):
        if os.path.exists(path):
            print(table(path), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
