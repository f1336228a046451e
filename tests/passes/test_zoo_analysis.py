"""Every zoo architecture, batch 1 and 2, static and dynamic graphs: the sites and regions the analysis finds."""

import pytest

from dyllm_compile.models.zoo import ZOO
from dyllm_compile.passes.op_rules import Kind
from graph_helpers import assert_region_runs_on_rows, capture

LAYERS = 2
LENGTH = 12
CASES = [(name, batch, dynamic) for name in ZOO for batch in (1, 2) for dynamic in (False, True)]
_cache = {}


def analysed(name, batch, dynamic):
    key = (name, batch, dynamic)
    if key not in _cache:
        entry = ZOO[name]
        captured = capture(entry.build(), entry.inputs(batch, LENGTH), dynamic=dynamic)
        assert len(captured) == 1, "zoo models trace to one graph"
        _cache[key] = captured[0]
    return _cache[key]


def _weight(cap, node):
    """The placeholder name of a linear's weight: the test's way to know which projection it is."""
    return node.args[1].name


@pytest.mark.parametrize("name,batch,dynamic", CASES)
def test_one_site_one_ffn_per_layer_and_lm_head(name, batch, dynamic):
    cap = analysed(name, batch, dynamic)
    a = cap.analysis
    entry = ZOO[name]
    assert [s.layer for s in a.sites] == list(range(LAYERS))
    # hand-written attention and flex_attention arrive as SDPA, the hand-written marked so
    assert {(s.kind, s.hand_written) for s in a.sites} == {("sdpa", entry.config.attention in ("manual", "einsum"))}
    assert all((s.sinks is not None) == (entry.config.sinks != "none") for s in a.sites)
    assert all(bool(s.softcap) == bool(entry.config.softcap) for s in a.sites)  # (dynamic: an input's .item())
    assert all(s.heads == entry.config.n_heads for s in a.sites)
    ffn_role = "moe" if entry.config.ffn == "moe" else "ffn"
    gated = [(r.role, r.layer) for r in a.gated_regions if r.role != "shared_proj"]
    assert gated == [(ffn_role, 0), (ffn_role, 1), ("lm_head", 1)]
    # hyper-connections: the attention's read and write weights, one projection split between them
    shared = [r.layer for r in a.gated_regions if r.role == "shared_proj"]
    assert shared == ([0, 1] if entry.config.hyper_connections else [])
    (lm_head,) = [r for r in a.gated_regions if r.role == "lm_head"]
    assert any("lm_head" in _weight(cap, n) for n in lm_head.nodes if cap.ops([n]) == ["linear"])


@pytest.mark.parametrize("name,batch,dynamic", CASES)
def test_qkv_chains_reach_their_projections(name, batch, dynamic):
    cap = analysed(name, batch, dynamic)
    for site, chains in zip(cap.analysis.sites, cap.analysis.chains):
        for which in ("q", "k", "v"):
            linears = [n for n in chains[which].nodes if cap.ops([n]) == ["linear"]]
            assert len(linears) == 1, (which, chains[which].ops())
            # a fused projection is in all three chains (tests/passes/test_fused_projections.py)
            assert ("qkv_proj" if ZOO[name].config.fused_qkv else f"{which}_proj") in _weight(cap, linears[0])
            assert f"layers_modules_{site.layer}_" in _weight(cap, linears[0])
        assert chains["k"].gated and chains["v"].gated and not chains["q"].gated


@pytest.mark.parametrize("name,batch,dynamic", CASES)
def test_gated_regions_run_on_gathered_rows(name, batch, dynamic):
    cap = analysed(name, batch, dynamic)
    a = cap.analysis
    for region in a.gated_regions + [c for chains in a.chains for c in chains.values()]:
        assert all(a.infos[n].kind is Kind.ROW for n in region.nodes)
        assert_region_runs_on_rows(cap, region)


@pytest.mark.parametrize("name", list(ZOO))
def test_static_and_dynamic_graphs_agree(name):
    def shape(a):
        regions = [(r.role, r.layer, r.gated, len(r.nodes), r.flops) for r in a.regions]
        chains = [(w, len(c.nodes), c.flops) for chains in a.chains for w, c in chains.items()]
        return [(s.kind, s.layer) for s in a.sites], regions, chains

    assert shape(analysed(name, 2, False).analysis) == shape(analysed(name, 2, True).analysis)


def test_token_conv_is_mixing_and_outside_the_ffn_region():
    cap = analysed("token_conv", 1, False)
    a = cap.analysis
    convs = [n for n in cap.gm.graph.nodes if cap.ops([n]) == ["conv1d"]]
    assert len(convs) == LAYERS
    assert all(a.infos[c].kind is Kind.MIXING for c in convs)
    for region, conv in zip([r for r in a.gated_regions if r.role == "ffn"], convs):
        # The conv runs densely; the FFN region starts right after it.
        assert conv not in region.nodes and conv in region.token_inputs
    assert any("conv1d" in reason for reason in a.dense_reasons)
    # and the rows it moves are tested each call, along its output's token dim ([B, D, N])
    assert [(p.node, p.axis) for p in a.mixing] == [(conv, 2) for conv in convs]
    assert not analysed("llada", 1, False).analysis.mixing


def test_attention_output_projection_and_residual_adds_are_not_gated():
    a = analysed("llada", 1, False).analysis
    o_proj = [r for r in a.regions if r.role == "attn_out"]
    assert len(o_proj) == LAYERS and not any(r.gated for r in o_proj)
    assert len(a.spine.merges) == 2 * LAYERS  # attention and FFN residual adds
    gated_nodes = {n for r in a.gated_regions for n in r.nodes}
    assert not gated_nodes & a.spine.merges


def test_gateable_flops_share():
    a = analysed("llada", 1, False).analysis
    assert 0.5 < a.gated_flops / a.total_flops < 1.0
