"""The row-wise projections feeding token mixing other than attention are gated regions, a split's results read
outside each an exit of its own (passes/mixer_inputs.py).

Before, nothing grew a region backward from a convolution's or a scan's input: LFM2's and a Mamba layer's input
projections ran on every row at every call (60% of Falcon-H1's FLOPs, 14% of LFM2's at test size)."""

import pytest
import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.explain import Report
from dyllm_compile.passes.rewrite_plan import plan_rewrite
from graph_helpers import assert_region_runs_on_rows, capture
from hybrid_layers import HybridLM

_cache = {}


def analysed(batch: int, dynamic: bool, late_gate: bool = False):
    key = (batch, dynamic, late_gate)
    if key not in _cache:
        ids = torch.randint(0, 120, (batch, 12), generator=torch.Generator().manual_seed(0))
        (_cache[key],) = capture(HybridLM(late_gate=late_gate), (ids,), dynamic=dynamic)
    return _cache[key]


@pytest.mark.parametrize("batch, dynamic", [(1, False), (2, False), (2, True)])
def test_split_projections_feeding_token_mixing_are_regions_with_an_exit_per_part(batch, dynamic):
    """Graph before: norm -> in_proj -> chunk into B, C, x -> B * x -> conv over the tokens -> C * conv -> out_proj
    (and norm -> in_proj -> split into gate, xs, dt -> conv of xs, softplus(dt) times it, a recurrence -> times
    silu(gate) -> out_proj). After: everything up to the mixers' inputs is one region per layer, whose exits are
    the mixers' inputs and the split's results read after them (C; the gate), each exit correct on gathered rows."""
    cap = analysed(batch, dynamic)
    short, scan = (r for r in cap.analysis.regions if r.role == "mixer_in")
    assert cap.ops(short.nodes) == ["layer_norm", "linear", "chunk", "getitem", "getitem", "getitem", "mul", "mul",
                                    "transpose"]
    assert [x.name for x in short.exits] == ["c", short.exit.name] and cap.ops([short.exit]) == ["transpose"]
    assert cap.ops(scan.nodes) == ["layer_norm", "linear", "split", "getitem", "getitem", "getitem", "transpose",
                                   "softplus"]
    assert cap.ops(scan.exits) == ["getitem", "transpose", "softplus"]  # the gate, the conv's input, the steps
    for region in (short, scan):
        assert region.gated and region.flops > 0
        assert_region_runs_on_rows(cap, region)
    # what reads the side exits after the mixers reads their caches: C times the conv (token mixing), and the
    # branch silu(gate) * y -> out_proj
    assert [cap.analysis.infos[u].kind.value for u in short.side_exits[0].users] == ["token-mixing"]
    assert any(scan.side_exits[0] in r.token_inputs for r in cap.analysis.regions if r.role == "ffn")
    report = Report([cap.analysis])
    assert report.outside(cap.analysis) == []  # no matmul left on every row (before: both in_proj)
    gated, total = report.gated_flops()
    assert gated / total > 0.85


def test_a_region_reading_a_value_computed_after_its_first_exit_stays_dense_named():
    """The sparse variant emits a region with several exits where its first exit is: a value it reads computed
    after that (sigmoid(h), after the chunk whose C is read outside) keeps it dense, with the reason."""
    cap = analysed(1, False, late_gate=True)
    plan = plan_rewrite(cap.analysis, DyllmConfig())
    assert [r.role for r in plan.regions].count("mixer_in") == 1  # the Mamba-like layer's only
    assert "layer 0: mixer_in region computed densely (it reads 'g' after its output 'c')" in plan.reasons
