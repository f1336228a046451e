"""Fused q/k/v projections: one linear whose output is split (``split`` / ``chunk`` / ``unbind``) into q, k and v.

Before: the token axis did not go back through a tuple op's results (``unbind`` also did not move it), and each
chain stopped at its result of the split, with the tuple as its input. After: the split and the projection are in
every chain that reads them; a split also read elsewhere leaves the site dense, with the reason."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_compile import explain
from dyllm_compile.config import DyllmConfig
from dyllm_compile.models.zoo import ZOO
from dyllm_compile.passes.graph_utils import tensor_value
from dyllm_compile.passes.op_rules import Kind
from dyllm_compile.passes.rewrite_plan import plan_rewrite
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from graph_helpers import assert_region_runs_on_rows, capture
from hf_builders import build


def _shared_projection(cap, chains):
    """The one linear in each of the site's q, k and v chains (the same node)."""
    linears = {w: [n for n in c.nodes if cap.ops([n]) == ["linear"]] for w, c in chains.items()}
    assert all(len(found) == 1 for found in linears.values()), linears
    assert len({found[0] for found in linears.values()}) == 1
    return linears["k"][0]


@pytest.mark.parametrize("model,split", [("modernbert", "unbind"), ("fused_qkv", "split")])
def test_chains_share_the_fused_projection(model, split):
    ids = torch.randint(3, 120, (2, 12))
    fn = build(model)[1] if model == "modernbert" else ZOO[model].build()
    (cap,) = capture(fn, (ids,), dynamic=False)
    a = cap.analysis
    ids_node = next(n for n in cap.gm.graph.nodes if n.op == "placeholder")
    assert a.infos[ids_node].kind is Kind.SOURCE and a.infos[ids_node].axis.dim == 1
    assert [s.layer for s in a.sites] == [0, 1]
    assert [(r.role, r.layer) for r in a.gated_regions] == [("ffn", 0), ("ffn", 1), ("lm_head", 1)]
    for chains in a.chains:
        projection = _shared_projection(cap, chains)
        splits = [n for n in chains["v"].nodes if cap.ops([n]) == [split]]
        assert len(splits) == 1 and all(splits[0] in c.nodes for c in chains.values())
        assert projection in chains["q"].nodes and chains["k"].gated and chains["v"].gated
        for chain in chains.values():
            assert all(tensor_value(t) is not None for t in chain.token_inputs)  # no tuple as an input
            assert all(a.infos[n].kind is Kind.ROW for n in chain.nodes)
            assert_region_runs_on_rows(cap, chain)
    plan = plan_rewrite(a, DyllmConfig())
    assert all(s.cached and s.gated_q for s in plan.sites) and not plan.reasons


def test_explain_counts_a_fused_projection_once():
    entry = ZOO["fused_qkv"]
    report = explain(entry.build(), *entry.inputs(1, 12), verbose=False)
    (graph,) = report.graphs
    for row, chains in zip(report.layers(graph), graph.chains):
        assert row.kv_heads == entry.config.n_kv_heads and row.heads == entry.config.n_heads
        assert row.gated == ["q proj", "k proj", "v proj", "ffn"] and 0 < row.share < 1
        ffn = next(r for r in graph.regions if r.layer == row.layer and r.role == "ffn")
        assert row.gated_flops == chains["k"].flops + ffn.flops  # the projection once, not three times


class LeakySplit(nn.Module):
    """A fused projection split four ways: q, k, v and a gate added to the residual stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.qkvg = nn.Linear(32, 128)
        self.o, self.up = nn.Linear(32, 32), nn.Linear(32, 64)
        self.down, self.head = nn.Linear(64, 32), nn.Linear(32, 64)

    def forward(self, ids):
        h = self.embed(ids)
        b, n, _ = h.shape
        q, k, v, gate = self.qkvg(h).split(32, dim=-1)
        q, k, v = (t.view(b, n, 2, 16).transpose(1, 2) for t in (q, k, v))
        h = h + gate + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 32))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


def test_split_read_outside_the_chains_caches_the_site_from_its_results():
    """The projection is not in the chains (the residual stream reads the gate): each chain starts at its own result
    of the split, a tensor (before, a chain reached into the split, a tuple, and the site stayed dense: "it reads
    one result of 'split', whose other results are used elsewhere"). The projection and its split are a region of
    their own, each result an exit (passes/mixer_inputs.py), which the plan keeps dense: the residual stream reads
    the gate on every row."""
    (cap,) = capture(LeakySplit(), (torch.randint(0, 64, (1, 10)),), dynamic=False)
    (chains,) = cap.analysis.chains
    assert not any(cap.ops([n]) == ["linear"] for c in chains.values() for n in c.nodes)  # not shared
    for which, chain in chains.items():
        (start,) = chain.token_inputs
        assert cap.ops([start]) == ["getitem"] and cap.ops([start.args[0]]) == ["split"], which
        assert cap.ops(chain.nodes) == ["view", "transpose"]
    (shared,) = [r for r in cap.analysis.regions if r.role == "shared_proj"]
    assert cap.ops(shared.nodes) == ["linear", "split"] + ["getitem"] * 4 and len(shared.exits) == 4
    assert sorted(shared.exits, key=str) == sorted([c.token_inputs[0] for c in chains.values()]
                                                   + [shared.exit], key=str)  # q, k, v and the gate
    plan = plan_rewrite(cap.analysis, DyllmConfig())
    assert plan.sites[0].cached and shared not in plan.regions and not plan.reasons


def test_split_read_outside_the_chains_compiles_and_equals_dense():
    """End to end: threshold 1 equals the model at every call, the site cached from the split's results."""
    torch._dynamo.reset()
    before = last_serial()
    model = LeakySplit().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(0, 63, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 4:] = 63
    with torch.inference_mode():
        for call in range(3):
            torch.testing.assert_close(compiled(ids.clone()), model(ids.clone()), rtol=1e-5, atol=1e-5)
            ids[:, 4 + call] = call
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 2 and runtime.plan.sites[0].cached
    assert {r.role for r in runtime.plan.regions} == {"k", "v", "q", "ffn", "lm_head"}
