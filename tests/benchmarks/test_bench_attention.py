"""The attention benchmark runs end to end on tiny shapes (the kernels under the interpreter without a GPU); only
the shape of its output is asserted, and that every implementation computed what the reference computes."""

import csv
import math

import pytest
import torch
from bench_modules import load


@pytest.mark.kernels  # the Triton kernels, under the interpreter without a GPU
def test_rows_are_well_formed_and_implementations_agree(tmp_path):
    bench = load("bench_attention")
    out = tmp_path / "attention.csv"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench.main(["--batch", "1,2", "--heads", "4", "--kv-heads", "2", "--tokens", "24", "--head-dim", "16",
                "--fractions", "0.1,0.5", "--impls", "kernel,reference", "--blocks", "auto,32x16x2", "--dtype",
                "float32", "--repeats", "1", "--device", device, "--out", str(out)])
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        rows = list(reader)
    impls = [("kernel", "auto", "", ""), ("kernel", "32", "16", "2"), ("reference", "", "", "")]
    assert [(r["batch"], r["salient_fraction"], r["mode"], r["impl"], r["block_m"], r["block_n"], r["num_warps"])
            for r in rows] == [
        (b, f, mode, *impl) for b in ("1", "2") for f in ("0.1", "0.5") for mode in ("exact", "paper")
        for impl in impls]
    for r in rows:
        for key in ("ms_per_call", "bound_ms", "dense_ms"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0
        assert float(r["max_err_vs_reference"]) < 1e-5


def test_profile_prints_each_timed_implementations_operators(tmp_path, capsys):
    bench = load("bench_attention")
    bench.main(["--batch", "1", "--heads", "2", "--kv-heads", "2", "--tokens", "24", "--head-dim", "16",
                "--fractions", "0.5", "--modes", "exact", "--impls", "reference", "--dtype", "float32",
                "--repeats", "1", "--device", "cpu", "--profile", "--out", str(tmp_path / "a.csv")])
    out = capsys.readouterr().out
    assert "-- profile: 10 calls: exact reference" in out
    assert "aten::" in out.split("-- profile: 10 calls: exact reference", 1)[1]


@pytest.mark.parametrize("blocks", ["16", "16x24", "8x32", "16x32,x", "16x32x3", "16x32x4x1", "automatic"])
def test_bad_tile_sizes_are_refused(blocks, capsys):
    with pytest.raises(SystemExit):
        load("bench_attention").main(["--blocks", blocks, "--impls", "kernel"])
    assert "--blocks" in capsys.readouterr().err


def test_step_inputs_follow_the_ops_contract():
    q, k, v, k_old, v_old, c_old, m_old, l_old, salient, mask, scale = load("bench_attention").step_inputs(
        3, 4, 2, 20, 16, 0.2, torch.float32, torch.device("cpu"))
    assert salient.sum(dim=1).tolist() == [4, 4, 4]
    # keys and values differ from the previous step's exactly on each element's own salient rows
    assert torch.equal((k != k_old).any(dim=(1, 3)), salient) and torch.equal((v != v_old).any(dim=(1, 3)), salient)
    assert mask is None and c_old.shape == q.shape and m_old.shape == l_old.shape == q.shape[:-1]


def test_attention_cost_counts_by_hand():
    roofline = load("roofline")
    b, h, g, n, d, e = 2, 4, 2, 10, 16, 2
    dense = roofline.attention_cost("dense", b, h, g, n, d, changed=0, recomputed=0, elem_bytes=e)
    assert dense.flops == 4 * b * h * n * n * d and dense.bytes == 2 * b * h * n * d * e + 2 * b * g * n * d * e
    exact = roofline.attention_cost("exact", b, h, g, n, d, changed=1, recomputed=0, elem_bytes=e)
    # two score and two value products over the one changed column, for every row; no full pass over the keys
    assert exact.flops == 8 * b * h * n * d
    assert exact.bytes == 3 * b * h * n * d * e + 4 * b * h * n * 4 + 4 * b * g * d * e
    recomputing = roofline.attention_cost("exact", b, h, g, n, d, changed=1, recomputed=1, elem_bytes=e)
    assert recomputing.bytes - exact.bytes == 2 * b * g * n * d * e  # all keys and values, once
    paper = roofline.attention_cost("paper", b, h, g, n, d, changed=1, recomputed=0, elem_bytes=e)
    assert exact.flops < paper.flops < dense.flops
