"""The range analysis of index tensors (passes/index_ranges.py) against the values the same graphs compute: every
range holds every value drawn, is as tight as the rewrite needs, and is None where nothing bounds the values."""

import pytest
import torch

from dyllm_compile.passes.index_ranges import index_bound, index_range
from graph_helpers import capture

E = 6  # the router's experts


def _ids(scores):
    return scores.topk(2, dim=-1).indices


def on_ids(fn):
    """``fn`` of the router's top-2 ids (one node: a condition narrows the range of the value it compares)."""
    return lambda scores: fn(_ids(scores))


# f(scores) -> integer tensor, and its range (None: not bounded)
CASES = {
    "topk": (_ids, (0, E - 1)),
    # Zaya's skip expert: the last id sent to 0
    "last_replaced": (on_ids(lambda i: i.masked_fill(i == E - 1, 0)), (0, E - 2)),
    # an inner id replaced: no end of the range moves
    "inner_replaced": (on_ids(lambda i: i.masked_fill(i == 2, 0)), (0, E - 1)),
    # LongCat-Flash's zero experts (the last two) spread over the four real ones
    "zero_experts": (on_ids(lambda i: torch.where(i >= 4, (i - 4) * 4 // 2, i)), (0, 3)),
    # the same condition negated, and written the other way round
    "negated": (on_ids(lambda i: torch.where(~(i < 4), i - 4, i)), (0, 3)),
    "mirrored": (on_ids(lambda i: torch.where(4 <= i, i - 4, i)), (0, 3)),
    # the condition on another node computing the same ids (Dynamo does not merge them): no narrowing
    "another_node": (lambda s: torch.where(_ids(s) >= 4, (_ids(s) - 4) * 4 // 2, _ids(s)), (-8, E - 1)),
    # a condition on the data, not on the ids: both sides whole
    "data_condition": (lambda s: torch.where(s[..., :2] > 0, _ids(s), _ids(s) + 10), (0, E + 9)),
    "clamped": (lambda s: (_ids(s) - 1).clamp(min=0), (0, E - 2)),
    "remainder": (lambda s: s.argmax(-1) % 4, (0, 3)),
    "concatenated": (lambda s: torch.cat([_ids(s), s.argmax(-1, keepdim=True) + 1], -1), (0, E)),
    "cast_and_flattened": (lambda s: _ids(s).float().reshape(-1), (0, E - 1)),
    "negative": (lambda s: _ids(s) - 3, (-3, E - 4)),
    "truncated": (lambda s: torch.div(_ids(s), 4, rounding_mode="trunc"), (0, 1)),
    # nothing bounds these
    "true_division": (lambda s: _ids(s) / 2, None),
    # rounded toward zero, a quotient of either sign: not the floor the intervals compute
    "truncated_negative": (lambda s: torch.div(_ids(s) - 3, 2, rounding_mode="trunc"), None),
    "data": (lambda s: (s * 10).long(), None),
}


def _traced(fn, experts=E):
    """The node ``fn``'s graph returns, traced on random scores over ``experts``."""
    (cap,) = capture(fn, (torch.randn(3, 8, experts),))
    (output,) = [n for n in cap.gm.graph.nodes if n.op == "output"]
    return output.args[0][0]


@pytest.mark.parametrize("name", list(CASES))
def test_range_holds_every_value_and_is_the_expected_one(name):
    fn, expected = CASES[name]
    found = index_range(_traced(fn))
    if expected is None:
        assert found is None
        return
    assert (int(found.lower), int(found.upper)) == expected
    drawn = torch.cat([fn(torch.randn(64, 8, E, generator=torch.Generator().manual_seed(seed))).flatten()
                       for seed in range(8)])
    assert found.lower <= drawn.min().item() and drawn.max().item() <= found.upper


def test_index_bound_is_the_range_of_indices_never_negative():
    assert index_bound(_traced(CASES["zero_experts"][0])) == 4
    assert index_bound(_traced(CASES["last_replaced"][0])) == E - 1
    assert index_bound(_traced(CASES["negative"][0])) is None  # below 0: not indices
    assert index_bound(_traced(CASES["data"][0])) is None


def test_a_cast_keeps_the_range_only_where_the_dtype_holds_every_index_exactly():
    """bfloat16 holds integers exactly up to 256, half up to 2048: with 300 experts a bfloat16 cast may round id 299
    up to 300, past a histogram's last bin; a half or float32 cast keeps every id."""
    ranges = {dtype: index_range(_traced(lambda s, d=dtype: _ids(s).to(d), experts=300))
              for dtype in (torch.bfloat16, torch.half, torch.float32)}
    assert ranges[torch.bfloat16] is None
    assert all((int(r.lower), int(r.upper)) == (0, 299) for r in (ranges[torch.half], ranges[torch.float32]))
    assert (torch.tensor([299]).to(torch.bfloat16) == 300).all()  # the rounding the bound guards against
