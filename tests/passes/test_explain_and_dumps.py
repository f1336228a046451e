import logging
import re

import pytest
import torch

import dyllm_compile
import dyllm_compile.backend as backend_mod
from dyllm_compile.models.zoo import ZOO
from dyllm_compile.passes.analysis import ANALYSIS_PASSES
from dyllm_compile.passes.graph_utils import op_name


def test_explain_returns_report_and_prints_table(capsys):
    entry = ZOO["dream"]
    report = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False)
    out = capsys.readouterr().out
    (graph,) = report.graphs
    rows = report.layers(graph)
    assert [(r.layer, r.heads, r.kv_heads) for r in rows[:2]] == [(0, 4, 2), (1, 4, 2)]
    # default exact mode: the q projection runs on S_in like k and v
    assert rows[0].gated == ["q proj", "k proj", "v proj", "ffn"] and rows[0].dense == ["o proj"]
    assert rows[-1].layer == -1 and rows[-1].gated == ["lm_head"]
    assert 0.5 < rows[0].share < 1.0
    assert "q proj, k proj, v proj, ffn" in out and re.search(r"head .* lm_head .* 100\.0%", out)
    assert "gated (exact mode)" in out


def test_explain_follows_the_options():
    """The table is the rewrite plan for the given options: paper mode projects q for every row; query pruning
    runs the o projection on the queried rows, output_projection="salient" on S_out. What the options keep dense is
    listed below the table with the plan's reason."""
    entry = ZOO["dream"]
    paper = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False,
                                  attention_mode="paper")
    rows = paper.layers(paper.graphs[0])
    assert rows[0].gated == ["k proj", "v proj", "ffn"] and rows[0].dense == ["q proj", "o proj"]
    pruned = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False,
                                   attention_mode="paper", query_pruning_period=4, mask_token_id=3)
    rows = pruned.layers(pruned.graphs[0])
    assert rows[0].gated == ["q proj", "k proj", "v proj", "o proj", "ffn"] and rows[0].dense == []
    salient_o = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False,
                                      output_projection="salient", dense_layers=[1])
    rows = salient_o.layers(salient_o.graphs[0])
    assert rows[0].gated == ["q proj", "k proj", "v proj", "o proj", "ffn"] and rows[0].dense == []
    assert rows[1].gated == [] and "o proj" in rows[1].dense  # a dense layer keeps its o projection dense
    # the table says why, as the backend's warning does (the lm_head counts as part of the last layer)
    table = salient_o.table()
    assert [line for line in table.splitlines() if "for these options" in line] == [
        "  dense for these options: layer 1: attention computed densely (dense_layers option)",
        "  dense for these options: layer 1: ffn region computed densely (dense_layers option)",
        "  dense for these options: layer 1: lm_head region computed densely (dense_layers option)"]
    assert "for these options" not in paper.table()
    gated, total = salient_o.gated_flops()
    assert gated == sum(r.gated_flops for r in rows) and 0 < gated < total
    dense = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False,
                                  dense_layers=[0])
    assert dense.layers(dense.graphs[0])[0].gated == []


def test_explain_says_what_gating_the_output_projection_would_add():
    """With the o projection dense (the default), the table gives the share of the FLOPs output_projection="salient"
    would gate besides (MobileBERT: 71% more, its stacked FFNs on the attention's output branch): the two plans'
    difference. ``with_options`` plans the same graphs as an explain given those options."""
    entry = ZOO["dream"]
    dense_o = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False)
    salient_o = dense_o.with_options(output_projection="salient")
    traced = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False,
                                   output_projection="salient")
    assert salient_o.gated_flops() == traced.gated_flops()
    (gated, total), (more, _) = dense_o.gated_flops(), salient_o.gated_flops()
    assert gated < more < total
    (line,) = [line for line in dense_o.table().splitlines() if "would also gate" in line]
    assert f"gate {100 * (more - gated) / total:.1f}% of the FLOPs" in line
    assert "would also gate" not in salient_o.table()


def test_explain_names_why_sites_stay_dense(capsys):
    entry = ZOO["token_conv"]
    report = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), verbose=False)
    assert any("'conv1d' x2: token-mixing" in r for r in report.graphs[0].dense_reasons)
    assert report.table().count("tested each call (token mixing other than attention): 'conv1d") == 2
    assert capsys.readouterr().out == ""


def test_explain_says_when_a_graph_is_lowered_unchanged():
    """Nothing to gate: the table gives the analysis's reason and that the backend lowers the graph as it is."""
    report = dyllm_compile.explain(torch.nn.Embedding(10, 4), torch.randint(0, 10, (1, 6)), dynamic=False,
                                   verbose=False)
    assert report.table().splitlines()[-2:] == ["  dense: no self-attention site found in this graph",
                                                "  lowered unchanged"]
    assert report.gated_flops() == (0, 0)


def test_explain_names_attention_with_sinks():
    """Hand-written attention with a sink per head is one attention node, cached, its q/k/v projections gated."""
    entry = ZOO["sinks"]
    report = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False)
    rows = report.layers(report.graphs[0])
    assert [r.attention for r in rows[:2]] == ["hand-written+sinks"] * 2
    assert rows[0].gated == ["q proj", "k proj", "v proj", "ffn"]
    assert re.search(r"\n0\s+hand-written\+sinks\s+4\s+2\s+q proj", report.table())


def test_explain_lists_products_outside_every_region():
    """A matrix product that no region or chain holds runs on every row at every call, which the table's columns
    did not show (only the graph's total share): the table lists it with its share of the FLOPs. Attention sinks
    projected from each row: the site reads the projection itself (no region or chain does). None in the reference
    model. (Until 2026-12-06 the example was the hyper-connections' read and write weights, one projection split
    between the branch's read and the residual stream's write-back: a region of its own now, below, dense because
    the residual stream reads it on every row.)"""
    entry = ZOO["row_sinks"]
    report = dyllm_compile.explain(entry.build(), *entry.inputs(1, 12), dynamic=False, verbose=False)
    graph = report.graphs[0]
    outside = report.outside(graph)
    assert len(outside) == 2 and all(op_name(n) == "linear" for n in outside)
    assert not any(n in r.nodes for r in graph.regions for n in outside)
    assert re.search(r"dense, in no region or chain \(\d+\.\d% of the FLOPs\): "
                     rf"'{outside[0].name}' \(in layers\.0\.attn\.sink_proj\), '{outside[1].name}' \(in layers\.1\.",
                     report.table())
    hyper = dyllm_compile.explain(ZOO["hyper_connections"].build(), *ZOO["hyper_connections"].inputs(1, 12),
                                  dynamic=False, verbose=False)
    rows = hyper.layers(hyper.graphs[0])
    assert hyper.outside(hyper.graphs[0]) == [] and all("shared proj" in row.dense for row in rows[:2])
    llada = dyllm_compile.explain(ZOO["llada"].build(), *ZOO["llada"].inputs(1, 12), dynamic=False, verbose=False)
    assert llada.outside(llada.graphs[0]) == [] and "in no region" not in llada.table()


def test_explain_validates_options():
    with pytest.raises(ValueError, match="unknown dyllm option"):
        dyllm_compile.explain(ZOO["llada"].build(), *ZOO["llada"].inputs(1, 8), bogus=1)


def test_pass_uuids_identify_pass_sources():
    uuids = [p.uuid() for p in ANALYSIS_PASSES]
    assert len(set(uuids)) == len(uuids) and all(re.fullmatch(r"[0-9a-f]{16}", u) for u in uuids)


def test_backend_logs_summary_and_dumps_graphs_before_and_after_each_pass(tmp_path, caplog):
    """On the zoo's hand-written attention, so that the pass that replaces it by SDPA shows in its dumps."""
    torch._dynamo.reset()
    entry = ZOO["manual_attention"]
    model = entry.build()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "eager", "debug_dir": str(tmp_path)})
    with caplog.at_level(logging.INFO, logger="dyllm_compile"), torch.inference_mode():
        torch.testing.assert_close(compiled(*entry.inputs(1, 12)), model(*entry.inputs(1, 12)))
    assert any("2 attention sites (2 hand-written)" in m and "'ffn': 2" in m for m in caplog.messages)
    (graph_dir,) = list(tmp_path.iterdir())
    dumps = sorted(p.name for p in graph_dir.iterdir())
    assert dumps == ["00_flex_attention.after.txt", "00_flex_attention.before.txt",
                     "01_in_place_writes.after.txt", "01_in_place_writes.before.txt",
                     "02_dead_code.after.txt", "02_dead_code.before.txt",
                     "03_fused_layers.after.txt", "03_fused_layers.before.txt",
                     "04_folded_heads.after.txt", "04_folded_heads.before.txt",
                     "05_hand_written_attention.after.txt", "05_hand_written_attention.before.txt",
                     "06_attention_sites.after.txt", "06_attention_sites.before.txt", "07_token_axes.after.txt",
                     "07_token_axes.before.txt", "08_regions.after.txt", "08_regions.before.txt", "explain.txt"]

    def count(name, pattern):
        return len(re.findall(pattern, (graph_dir / name).read_text()))

    # Each pass's work appears in its "after" dump and not before it.
    assert count("05_hand_written_attention.before.txt", r" softmax ") == 2
    assert count("05_hand_written_attention.before.txt", r" sdpa ") == 0
    assert count("05_hand_written_attention.after.txt", r" softmax ") == 0
    assert count("05_hand_written_attention.after.txt", r" sdpa ") == 2
    assert count("06_attention_sites.before.txt", r"attention\(sdpa\)") == 0
    assert count("06_attention_sites.after.txt", r"attention\(sdpa\)") == 2
    assert count("07_token_axes.before.txt", "row-wise") == 0
    assert count("07_token_axes.after.txt", "token-mixing") >= 2
    assert count("08_regions.before.txt", r"\.ffn\*") == 0
    assert count("08_regions.after.txt", r"L0\.ffn\*") > 5 and count("08_regions.after.txt", r" merge") == 4
    assert "lm_head" in (graph_dir / "explain.txt").read_text()


def test_analysis_failure_never_breaks_compilation(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(backend_mod, "analyze", broken)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 3, backend="dyllm", options={"lowering": "eager"})
    with caplog.at_level(logging.WARNING, logger="dyllm_compile"), torch.inference_mode():
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 3.0))
    assert any("analysis failed (RuntimeError: boom)" in m for m in caplog.messages)
