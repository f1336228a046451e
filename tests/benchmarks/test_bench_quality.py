"""The quality benchmark's result files merge into one table (parts run separately share a dense baseline)."""

import csv
import os

import pytest
from bench_modules import load


@pytest.fixture(scope="module")
def modules():
    return load("bench_quality"), load("report")


def _row(config, decoding="low-confidence", accuracy=0.5, speed=float("nan")):
    mode = "" if config == "dense" else "paper"
    return dict(device="cpu", torch="x", decoding=decoding, config=config, policy="dyllm" if mode else "",
                threshold="0.99" if mode else "", attention_mode=mode, task="all", problems=10.0,
                accuracy=accuracy, accuracy_ci95=0.1, diff_vs_dense=0.0, diff_ci95=0.0, ffn_rows_fraction=1.0,
                tokens_per_s_b1=speed, speedup_vs_inductor_b1=speed)


def test_merge_keeps_the_first_copy_of_each_configuration(modules, tmp_path):
    quality, report = modules
    a, b, out = (str(tmp_path / name) for name in ("a.csv", "b.csv", "q.csv"))
    quality.write([_row("dense", accuracy=0.6, speed=1.0), _row("dyllm paper 0.99")], a)
    quality.write([_row("dense", accuracy=0.1), _row("dyllm exact 0.99"), _row("dense", "threshold 0.9")], b)
    quality.main(["--merge", a, b, "--out", out])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["decoding"], r["config"]) for r in rows] == [
        ("low-confidence", "dense"), ("low-confidence", "dyllm paper 0.99"), ("low-confidence", "dyllm exact 0.99"),
        ("threshold 0.9", "dense")]
    assert float(rows[0]["accuracy"]) == 0.6  # the first file's dense baseline, not the second's
    assert os.path.getsize(str(tmp_path / "q_pareto.png")) > 0
    table = report.quality_table(out)
    assert "| low-confidence | dense | 60.0 (10) |" in table and "1.00x" in table
    assert "nan" not in table  # untimed configurations show "-"
