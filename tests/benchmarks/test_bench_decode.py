"""The decode benchmark runs end to end in its smoke preset and writes well-formed rows and plots.

Only the shape of the output is asserted: speed is measured by the benchmark, never by tests.
"""

import csv
import importlib
import math
import re

import pytest
import torch
from bench_modules import load

from dyllm_compile.models import llada_like


@pytest.fixture(scope="module")
def bench():
    return load("bench_decode")


def test_smoke_run_writes_rows_and_plots(bench, tmp_path):
    out = tmp_path / "decode.csv"
    bench.main(["--preset", "smoke", "--modes", "eager,dyllm-paper,dyllm-exact,dyllm-exact-qp,dyllm-exact-so",
                "--lowering", "aot_eager", "--out", str(out)])
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        rows = list(reader)
    assert [r["mode"] for r in rows] == ["eager", "dyllm-paper", "dyllm-exact", "dyllm-exact-qp", "dyllm-exact-so"]
    for r in rows:
        assert r["device"] and r["torch"] and r["triton"]
        for key in ("tokens_per_s", "step_ms_median", "step_ms_p90", "bound_ms", "bound_share", "speedup_vs_eager"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r[key])
        assert float(r["step_ms_p90"]) >= float(r["step_ms_median"])
        assert int(r["forward_calls"]) == 2 and int(r["recompiles_timed"]) == 0
    for r in rows[1:]:
        layers = [float(x) for x in r["salient_fraction_per_layer"].split(";")]
        assert len(layers) == int(r["layers"]) and all(0 <= x <= 1 for x in layers)
        assert 0 < float(r["gated_flops_share"]) < 1 and float(r["cache_mb"]) > 0
        # the weights linear_order emitted weight first, by shape (the tiny model's: this machine's choice)
        assert re.fullmatch(r"none|\d+x\d+(;\d+x\d+)*", r["weight_first"]), r["weight_first"]
        # a dense first call and a sparse one: with query pruning the second queries the response alone
        queried = float(r["queried_fraction"])
        assert 0.5 < queried < 1 if r["mode"].endswith("-qp") else queried == 1.0, (r["mode"], queried)
    table = load("report").decode_table(str(out))  # docs/benchmarks.md's table of these rows
    assert table.count("\n| llada-like tiny, random weights, ") == len(rows)
    assert (tmp_path / "decode_speedup.png").stat().st_size > 0
    assert (tmp_path / "decode_salient_heatmap.png").stat().st_size > 0


def test_rows_are_written_after_the_first_round(bench, tmp_path, monkeypatch, capsys):
    """A run stopped by a time limit (a device lease) keeps the rows of the rounds it finished: here it stops
    right after the first write, before the second round of timed decodes."""
    out = tmp_path / "decode.csv"
    write = bench.write_csv

    def write_then_stop(rows, path, *args, **kwargs):
        write(rows, path, *args, **kwargs)
        raise TimeoutError("the lease ended")

    monkeypatch.setattr(bench, "write_csv", write_then_stop)
    with pytest.raises(TimeoutError):
        bench.main(["--preset", "smoke", "--modes", "eager,dyllm-exact", "--lowering", "aot_eager", "--repeats", "2",
                    "--out", str(out)])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["eager", "dyllm-exact"]
    assert all(r["timed_decodes"] == "1" and float(r["speedup_vs_eager"]) > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "dyllm-exact: compiled and decoded once in" in printed and "dyllm-exact: timed decode 1 in" in printed


def test_rows_name_the_weights_emitted_weight_first(bench, tmp_path, monkeypatch):
    """``linear_order="auto"`` chooses per process; the rows say what it chose: here every candidate, by shape."""
    monkeypatch.setattr(importlib.import_module("dyllm_compile.passes.linear_order"), "weight_first_faster",
                        lambda *args: True)
    out = tmp_path / "decode.csv"
    bench.main(["--preset", "smoke", "--modes", "dyllm-exact", "--lowering", "aot_eager", "--repeats", "1",
                "--out", str(out)])
    with open(out) as f:
        (row,) = list(csv.DictReader(f))
    model = llada_like("tiny")
    d, ffn = model.cfg.d_model, model.cfg.d_ffn
    # the weights of the gated q/k/v projections and of the FFN
    assert {f"{d}x{d}", f"{ffn}x{d}", f"{d}x{ffn}"} <= set(row["weight_first"].split(";"))


def test_roofline_sparse_step_is_cheaper_and_dense_matches_hand_count(bench):
    roofline = load("roofline")
    shape = roofline.Shape(d_model=64, d_kv=64, d_ffn=128, n_layers=2, vocab_size=100)
    dense = roofline.step_cost(shape, batch=1, n=10, fractions=None, elem_bytes=4)
    layer_weights = 64 * (2 * 64 + 2 * 64) + 3 * 64 * 128
    expected = 2 * (2 * 10 * layer_weights + 4 * 10 * 10 * 64) + 2 * 10 * 64 * 100
    assert dense.flops == expected
    sparse = roofline.step_cost(shape, batch=1, n=10, fractions=[0.1, 0.1], elem_bytes=4)
    assert sparse.flops < dense.flops / 5
    machine = roofline.Machine("m", bandwidth=1e9, peak_flops=1e9)
    assert dense.bound_seconds(machine) == max(dense.bytes, dense.flops) / 1e9
    # a second measurement in a slow phase lowers neither number; a faster one raises each on its own
    assert machine.best(roofline.Machine("m", bandwidth=2e9, peak_flops=5e8)) == roofline.Machine("m", 2e9, 1e9)


def test_roofline_of_an_moe_counts_top_k_experts_per_row_and_the_experts_reached(bench):
    roofline = load("roofline")
    shape = roofline.Shape(d_model=64, d_kv=64, d_ffn=32, n_layers=1, vocab_size=100, experts=8, top_k=2)
    attention, router, expert = 64 * (2 * 64 + 2 * 64), 64 * 8, 3 * 64 * 32
    dense = roofline.step_cost(shape, batch=1, n=10, fractions=None, elem_bytes=4)
    assert dense.flops == 2 * 10 * (attention + router) + 2 * 20 * expert + 4 * 10 * 10 * 64 + 2 * 10 * 64 * 100
    one_row = roofline.step_cost(shape, batch=1, n=10, fractions=[0.1], elem_bytes=4)
    # weight bytes: all 8 experts for 20 routed rows, 2 for one row's
    assert dense.bytes - one_row.bytes > 6 * expert * 4


def test_roofline_counts_what_each_configuration_runs_on_every_queried_row(bench):
    """DESIGN.md step 5: the output projection runs on every row a step queries (unless only on the salient ones);
    paper mode also projects q and scores every key for each of them. One layer, 2 x 10 rows, 2 salient."""
    roofline = load("roofline")
    d = 64
    shape = roofline.Shape(d_model=d, d_kv=32, d_ffn=128, n_layers=1, vocab_size=100)

    def flops(**options):
        return roofline.step_cost(shape, batch=2, n=10, fractions=[0.1], elem_bytes=4, **options).flops

    salient = flops(output_projection="salient")
    assert flops() - salient == 2 * (20 - 2) * d * d
    assert flops(queried=0.5) - salient == 2 * (10 - 2) * d * d  # query pruning: 10 rows queried
    # q projection and scores against the 10 keys for the 18 rows that are not salient
    assert flops(mode="paper", output_projection="salient") - salient == 2 * 18 * d * d + 2 * 18 * 10 * d
    dense = roofline.step_cost(shape, batch=2, n=10, fractions=None, elem_bytes=4)
    assert dense == roofline.step_cost(shape, batch=2, n=10, fractions=None, elem_bytes=4, mode="paper", queried=0.5)


@pytest.mark.parametrize("argv", [
    ["--preset", "cpu", "--layers", "2"],  # no full-size workload in it
    ["--model", "reference", "--layers", "2"],
    ["--model", "llada", "--layers", "0"],
    ["--model", "llada", "--checkpoint", "/ckpt", "--layers", "2"],  # a checkpoint has its own layers
])
def test_layers_applies_to_random_full_size_weights_only(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--layers takes a positive count" in capsys.readouterr().err
    assert bench.parse_args(["--model", "dream", "--layers", "2"]).layers == 2
    assert bench.parse_args(["--preset", "gpu", "--layers", "2"]).layers == 2
    assert bench.parse_args(["--model", "host", "--layers", "2"]).layers == 2


def test_host_workload_is_many_layers_at_a_tiny_width_and_bk_sizes_rows_by_buckets(bench, monkeypatch):
    """32 layers of width 32 unless told (layers, prompt length); -bk sets the row-count route, no other mode does."""
    work = bench.make_workload("host", 2, bench.parse_args(["--model", "host"]), "cpu", torch.float32)
    assert (work.model.cfg.n_layers, work.model.cfg.d_model, work.prompts.shape) == (32, 32, (2, 32))
    args = bench.parse_args(["--model", "host", "--layers", "3"])
    work = bench.make_workload("host", 1, args, "cpu", torch.float32)
    assert work.model.cfg.n_layers == 3 and work.name == "host-bound: llada-like 3L d32"
    args = bench.parse_args(["--model", "host", "--layers", "2", "--prompt-length", "992"])
    work = bench.make_workload("host", 1, args, "cpu", torch.float32)
    assert work.prompts.shape == (1, 992) and work.name == "host-bound: llada-like 2L d32, 1024 tokens"
    assert work.model.cfg.max_seq_len >= 1024
    monkeypatch.setattr(bench.torch, "compile", lambda model, backend=None, options=None: options)
    assert bench.build("dyllm-exact-bk", work.model, args)["row_counts"] == "buckets"
    assert "row_counts" not in bench.build("dyllm-exact", work.model, args)


def test_cw_compiles_the_variants_with_the_cpp_wrapper_and_inductor_cpp_is_dense_inductor_with_it(bench, monkeypatch):
    """-cw adds wrapper="cpp" to a dyllm mode's options and nothing else; inductor-cpp is torch.compile's default
    backend with Inductor's own cpp_wrapper option (the dense comparison), inductor without it."""
    args = bench.parse_args(["--model", "tiny"])
    model = llada_like("tiny")
    monkeypatch.setattr(bench.torch, "compile", lambda model, backend="inductor", options=None: (backend, options))
    backend, options = bench.build("dyllm-exact-bk-cw", model, args)
    assert backend == "dyllm" and options["wrapper"] == "cpp" and options["row_counts"] == "buckets"
    assert {k: v for k, v in options.items() if k != "wrapper"} == bench.build("dyllm-exact-bk", model, args)[1]
    assert "wrapper" not in bench.build("dyllm-paper", model, args)[1]
    assert bench.build("inductor-cpp", model, args) == ("inductor", {"cpp_wrapper": True})
    assert bench.build("inductor", model, args) == ("inductor", None)


@pytest.mark.parametrize("argv", [
    ["--model", "reference", "--prompt-length", "64"],  # the full-size workloads' option
    ["--model", "llada", "--prompt-length", "0"],
])
def test_prompt_length_applies_to_full_size_workloads_only(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--prompt-length takes a positive count" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--model", "default", "--attention", "manual"],
                                  ["--preset", "cpu", "--attention", "manual"]])
def test_attention_applies_to_the_reference_model_only(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--attention applies to --model reference" in capsys.readouterr().err
    args = bench.parse_args(["--model", "reference", "--attention", "manual"])
    work = bench.make_workload("reference", 1, args, "cpu", torch.float32)
    assert work.model.cfg.attention == "manual" and "hand-written attention" in work.name
    args = bench.parse_args(["--model", "reference", "--attention", "sinks"])
    work = bench.make_workload("reference", 1, args, "cpu", torch.float32)
    assert (work.model.cfg.attention, work.model.cfg.sinks) == ("manual", "head") and "sink per head" in work.name
    args = bench.parse_args(["--model", "reference", "--attention", "softcap"])
    work = bench.make_workload("reference", 1, args, "cpu", torch.float32)
    assert (work.model.cfg.attention, work.model.cfg.softcap) == ("manual", 50.0) and "soft-capped" in work.name
    args = bench.parse_args(["--model", "reference", "--attention", "flex"])
    work = bench.make_workload("reference", 1, args, "cpu", torch.float32)
    assert work.model.cfg.attention == "flex" and "flex_attention" in work.name
    args = bench.parse_args(["--model", "reference", "--hyper-connections", "4"])
    work = bench.make_workload("reference", 1, args, "cpu", torch.float32)
    assert work.model.cfg.hyper_connections == 4 and "4 residual streams" in work.name
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "default", "--hyper-connections", "4"])


def test_full_size_workload_is_the_papers_length_unless_told(bench, monkeypatch):
    """1150 tokens in all by default (the length the targets are stated at), else the prompt asked for; the
    model's shapes do not matter here, so a tiny one stands in for LLaDA-8B's."""
    monkeypatch.setattr(bench, "llada_like", lambda size, **kw: llada_like("tiny"))
    args = bench.parse_args(["--model", "llada", "--layers", "1"])
    work = bench.make_workload("llada", 2, args, "cpu", torch.float32)
    assert work.prompts.shape == (2, bench.FULL_SIZE_TOKENS - work.gen_length) and work.gen_length == 256
    args = bench.parse_args(["--model", "llada", "--layers", "1", "--prompt-length", "64"])
    assert bench.make_workload("llada", 1, args, "cpu", torch.float32).prompts.shape == (1, 64)


def test_profile_decode_prints_the_profiled_steps_operators(bench, capsys):
    """--profile: one more decode of a mode, its operators' table over the steps after the first two."""
    model = llada_like("tiny")
    prompts = torch.randint(1, 127, (1, 4), generator=torch.Generator().manual_seed(0))
    work = bench.Workload("tiny", model, prompts, 8, 8, 8, "random")  # 8 calls: 2 skipped, 1 warm-up, 2 profiled
    run = bench.ModeRun("eager", bench.TimedModel(model, torch.device("cpu")), 0, 0, 0.0, 0, "", [])
    bench.profile_decode(run, work, bench.parse_args([]), steps=2)
    out = capsys.readouterr().out
    assert "-- profile: eager, 2 steps" in out
    table = out.split("-- profile: eager, 2 steps", 1)[1]
    assert "aten::mm" in table or "aten::addmm" in table or "aten::linear" in table  # the model's matmuls
