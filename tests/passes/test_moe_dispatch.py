"""An MoE that dispatches each expert's rows (``torch.where`` over a row-wise routing mask, the rows gathered by
the positions it returns, the expert's output added back with ``index_add``: OLMoE's and LLaDA-MoE's block) is one
gated region (static graphs and dynamic ones, whose reshape folds a symbolic batch into the rows, at batch 1 and
3): its dispatched values carry the selection they hold
(``Axis.by``), and the region run on gathered rows equals the dense values on them. Dispatches that are not
per-token stay dense with the reason."""

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dyllm_compile.models import llada_like
from dyllm_compile.models.transformer import MoE
from dyllm_compile.passes.graph_utils import _UNBOUNDED_HINT, hint, op_name
from dyllm_compile.passes.op_rules import Kind
from graph_helpers import assert_region_runs_on_rows, capture


def analysed(batch, dynamic=False, moe=None):
    model = llada_like("tiny", init_std=0.2, ffn="moe", moe_routing="dispatch", n_layers=1)
    if moe is not None:
        model.layers[0].ffn.__class__ = moe
    ids = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(batch))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (cap,) = capture(model, (ids,), dynamic=dynamic)
    return cap


@pytest.mark.parametrize("batch, dynamic", [(1, False), (3, False), (1, True), (3, True)])
def test_dispatching_moe_is_one_gated_region_that_runs_on_rows(batch, dynamic):
    cap = analysed(batch, dynamic)
    (moe,) = [r for r in cap.analysis.regions if r.role == "moe"]
    assert moe.gated and [op_name(t) for t in moe.token_inputs] == ["add"]  # the residual stream, then its norm
    ops = moe.ops()
    assert ops.count("where") == ops.count("index_add") == 4  # one per expert
    infos = cap.analysis.infos
    enumerations = [n for n in moe.nodes if op_name(n) == "where"]
    for node in moe.nodes:
        axis = infos[node].axis
        assert infos[node].kind is Kind.ROW
        if axis.by is not None:  # a dispatched value: of one expert's selection, computed after it
            assert axis.by in enumerations and op_name(node) not in ("index_add", "zeros_like")
    experts = [n for n in moe.nodes if op_name(n) == "linear" and infos[n].axis.by is not None]
    assert len(experts) == 12 and len({infos[n].axis.by for n in experts}) == 4
    assert_region_runs_on_rows(cap, moe, rows=5)


def routed(select, place):
    """An MoE dispatching each expert ``e``'s rows ``where(select(routing, e))`` and adding its output back at
    ``place(rows)``."""

    class Routed(MoE):
        def _dispatch(self, x, top_p, top_i):
            flat = x.reshape(-1, x.shape[-1])
            routing = top_i.reshape(-1, top_i.shape[-1])
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                rows, _ = torch.where(select(routing, e))
                out.index_add_(0, place(rows), expert(flat[rows]))
            return out.view_as(x)
    return Routed


# Adds each expert's outputs back at the positions reversed: a token receives another token's output.
CROSSED_COMBINE = routed(lambda routing, e: routing == e, lambda rows: rows.flip(0))
# Routes by a running count over the tokens (an expert capacity): the selection depends on other tokens.
TOKEN_MIXING_ROUTE = routed(lambda routing, e: (routing == e).cumsum(0) <= 3, lambda rows: rows)


class PositionsAsData(MoE):
    """Adds each selected row's position (its token index) to its output: on a subset of the rows the positions
    are other numbers (before 2026-12-05 this was gated, the positions taken for per-row data)."""

    def _dispatch(self, x, top_p, top_i):
        flat, routing = x.reshape(-1, x.shape[-1]), top_i.reshape(-1, top_i.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, _ = torch.where(routing == e)
            out.index_add_(0, rows, expert(flat[rows]) + rows[:, None].to(flat.dtype))
        return out.view_as(x)


@pytest.mark.parametrize("moe, reason", [
    (CROSSED_COMBINE, "'index_add' of values other than selected rows added back to their tokens"),
    (TOKEN_MIXING_ROUTE, "'cumsum' along the token axis"),
    (PositionsAsData, "'getitem' reads token positions or group counts as data"),
])
def test_dispatch_that_is_not_per_token_stays_dense(moe, reason):
    cap = analysed(1, moe=moe)
    assert not [r for r in cap.analysis.regions if r.role == "moe" and r.gated]
    assert any(reason in r for r in cap.analysis.dense_reasons), cap.analysis.dense_reasons


def test_a_data_dependent_size_nothing_bounds_gets_the_fallback_hint():
    """A size read from data (an expert's row count; ``.tolist()`` under Dynamo's ``capture_scalar_outputs``, as
    JetMoE's MoE does) with no bound: its upper bound is torch's integer infinity, which sympy takes for a finite
    number; converting it raised inside the analysis, which then kept the graph dense as failed. A bounded one has
    its bound."""
    count = ShapeEnv().create_unbacked_symint()
    assert hint(count * 64) == hint(count) == _UNBOUNDED_HINT
    torch._check(count <= 10)
    assert hint(count * 64) == 640
