"""An MoE on rows sorted by expert (transformers 5's default ``grouped_mm`` experts: sort the (token, slot) rows by
expert id, gather each one's input, one grouped product per projection over offsets counted from the sorted ids,
the rows put back by the inverse permutation) is one gated region: the sort, the counts and the inverse are
proved to compose to a row-wise computation (passes/sorted_rows.py), and the region run on gathered rows equals
the dense values on them (the zoo's ``moe_grouped``: tests/passes/test_zoo_analysis.py). The same ops composed so
that a row's output depends on the other rows stay dense, each with its reason."""

import pytest
import torch
import torch.nn.functional as F

from dyllm_compile.models import llada_like
from dyllm_compile.models.grouped_mm import grouped_mm
from dyllm_compile.models.transformer import MoE
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.passes.op_rules import Kind
from graph_helpers import assert_region_runs_on_rows, capture


def analysed(moe=None, batch=1, dynamic=False):
    model = llada_like("tiny", init_std=0.2, ffn="moe", moe_routing="grouped", n_layers=1)
    if moe is not None:
        model.layers[0].ffn.__class__ = moe
    ids = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(batch))
    (cap,) = capture(model, (ids,), dynamic=dynamic)
    return cap


def test_sorted_rows_and_order_values_are_told_apart():
    """Before: 'sort' along the token axis made the MoE token-mixing. After: the sort's keys and every row
    computed from them in its order carry ``by = sort``; its permutation, the inverse, the counts and offsets are
    order values; the rows put back by the inverse are in token order again."""
    cap = analysed()
    (moe,) = [r for r in cap.analysis.regions if r.role == "moe"]
    assert moe.gated and not cap.analysis.dense_reasons
    infos = cap.analysis.infos
    (sort,) = [n for n in moe.nodes if op_name(n) == "sort"]
    order = {op_name(n) or n.op for n in moe.nodes if infos[n].axis.order}
    assert order == {"getitem", "div", "histc", "cumsum", "empty_like", "arange", "call_function"}  # (set_items)
    assert all(infos[n].axis.by is sort for n in moe.nodes if infos[n].axis.order)
    grouped = [n for n in moe.nodes if op_name(n) == "grouped_mm"]
    assert len(grouped) == 2 and all(infos[n].axis.by is sort and not infos[n].axis.order for n in grouped)
    assert infos[moe.exit].axis.by is None and all(infos[n].kind is Kind.ROW for n in moe.nodes)


@pytest.mark.parametrize("batch, dynamic, moe", [(3, False, None), (3, True, None), (3, False, "unit_weights"),
                                                (3, True, "unit_weights"), (3, False, "skip"), (3, False, "zero")])
def test_region_with_a_batch_folded_in_runs_on_rows(batch, dynamic, moe):
    """Gathered rows (5 of each element's) through the region equal the dense values on them; with Ergo's unit
    weights too, their factory sized for the region's rows; with Zaya's skip expert; with LongCat-Flash's zero
    experts."""
    variants = {None: None, "unit_weights": grouped(unit_weights="rows"), "skip": grouped(skip="last"),
                "zero": grouped(skip="zero")}
    cap = analysed(variants[moe], batch=batch, dynamic=dynamic)
    (moe,) = [r for r in cap.analysis.regions if r.role == "moe"]
    assert moe.gated
    assert_region_runs_on_rows(cap, moe, rows=5)


def grouped(descending=False, histogram=None, keys="ids", restore="inverse", positions_as_data=False,
            unit_weights=None, skip=None):
    """A sorted-rows MoE (one grouped product per expert's projection) with one part changed. ``unit_weights``:
    as Ergo's experts, each (token, slot) row its own input row (``repeat_interleave``), weighted by
    ``rows.new_ones(...)`` in the sorted order and by the routing weights after the rows are put back ("rows"), or
    with those ones also contracted with every row ("contracted": a sum over the rows). ``skip``: as Zaya's skip
    expert, the ``"last"`` (or ``"first"``) id picked computes nothing: its weight 0, its id replaced by 0, one
    expert fewer counted and multiplied; as LongCat-Flash's zero experts (``"zero"``), the last two ids compute
    nothing but pass the row through times their weight, their ids spread over the others' (``(i - E) * E // 2``),
    two experts fewer counted and multiplied (``"zero_unspread"``: ``(i - E) * E``, the second one's id E itself,
    outside the histogram)."""

    class Grouped(MoE):
        def _grouped(self, x, top_p, top_i):
            flat, k, experts = x.reshape(-1, x.shape[-1]), top_i.shape[-1], self.cfg.n_experts
            gate_up, down = self.experts.gate_up, self.experts.down
            passed = 0
            if skip in ("zero", "zero_unspread"):
                real = experts - 2
                zero = top_i >= real
                passed = (x * top_p.masked_fill(~zero, 0.0).sum(-1, keepdim=True)).reshape(flat.shape)
                spread = (top_i - real) * real // (2 if skip == "zero" else 1)
                top_i, top_p = torch.where(zero, spread, top_i), top_p.masked_fill(zero, 0.0)
                experts, gate_up, down = real, gate_up[:real], down[:real]
            elif skip:
                skipped = top_i == (experts - 1 if skip == "last" else 0)
                top_i, top_p = top_i.masked_fill(skipped, 0), top_p.masked_fill(skipped, 0)
                experts, gate_up, down = experts - 1, gate_up[:-1], down[:-1]
            ids, perm = torch.sort((top_i if keys == "ids" else top_p).reshape(-1), descending=descending)
            histogram_range = {"min": 0, "max": experts - 1} if histogram is None else histogram
            offsets = torch.histc(ids.float(), bins=experts, **histogram_range)
            offsets = offsets.cumsum(0).int()
            if unit_weights:
                rows = flat.repeat_interleave(k, dim=0)
                ones = rows.new_ones((rows.shape[0], 1)).reshape(-1)
                gate, up = grouped_mm(rows[perm], gate_up, offsets).chunk(2, dim=-1)
                out = grouped_mm(F.silu(gate) * up, down, offsets) * ones[perm, None]
                if unit_weights == "contracted":
                    out = out + ones[perm] @ out
            else:
                gate, up = grouped_mm(flat[perm // k], gate_up, offsets).chunk(2, dim=-1)
                out = grouped_mm(F.silu(gate) * up, down, offsets) * top_p.reshape(-1)[perm, None]
            if positions_as_data:
                out = out + perm.unsqueeze(-1)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.shape[0])
            out = out[inverse if restore == "inverse" else perm].view(-1, k, x.shape[-1])
            if unit_weights:
                out = out * top_p.reshape(-1, k, 1)
            return (out.sum(1) + passed).view_as(x)
    return Grouped


@pytest.mark.parametrize("moe, reason", [
    (grouped(), None),
    # offsets count ascending groups, rows sorted descending: rows meet other experts' weights
    (grouped(descending=True), "'grouped_mm' of rows not provably sorted ascending by the keys its offsets count"),
    # the histogram's range is the data's (min = max = 0): counts depend on every row's key
    (grouped(histogram={}), "'histc' of keys that are not provably indices inside its range"),
    (grouped(keys="weights"), "'histc' of keys that are not provably indices inside its range"),
    # put back by the permutation, not its inverse: a token receives another one's row
    (grouped(restore="permutation"), "'getitem' reads token positions or group counts as data"),
    # a row's position in the sorted order depends on the other rows' keys
    (grouped(positions_as_data=True), "'unsqueeze' reads token positions or group counts as data"),
    # Ergo's experts: ones as each routed row's weight (before, "'getitem' reads token positions..." made it dense)
    (grouped(unit_weights="rows"), None),
    # the ones contracted with the rows: a sum over every row
    (grouped(unit_weights="contracted"), "no row-wise rule for op 'matmul (1-D)'"),
    # Zaya's skip expert: the last id replaced by 0, so the ids count one expert fewer (before, "'histc' of keys
    # that are not provably indices inside its range": the bound came from the topk alone)
    (grouped(skip="last"), None),
    # the first id replaced: the last one is still there, outside the histogram's range
    (grouped(skip="first"), "'histc' of keys that are not provably indices inside its range"),
    # LongCat-Flash's zero experts, their ids spread over the real experts' by a where on the ids' range (before
    # 2026-12-06, "'histc' of keys that are not provably indices inside its range": passes/index_ranges.py)
    (grouped(skip="zero"), None),
    (grouped(skip="zero_unspread"), "'histc' of keys that are not provably indices inside its range"),
])
def test_sorted_rows_that_are_not_per_token_stay_dense(moe, reason):
    cap = analysed(moe)
    gated = [r for r in cap.analysis.regions if r.role == "moe" and r.gated]
    if reason is None:  # the variants' common form is gated: each stays dense for its change alone
        assert gated and not cap.analysis.dense_reasons
        return
    assert not gated
    assert any(reason in r for r in cap.analysis.dense_reasons), cap.analysis.dense_reasons
