"""Where a reshape puts the token axis: batch folded before the tokens (``lead``), heads or feature groups folded
after them (``trail``), and what is not a reshape of whole token rows. End to end: a q/k norm applied to the heads
folded into the rows (``q.reshape(-1, head_dim)``, LLaDA-MoE's) is in the k chain, which runs on gathered rows."""

import pytest
import torch

from dyllm_compile.models import llada_like
from dyllm_compile.passes.graph_utils import op_name, same_size
from dyllm_compile.passes.op_rules import Axis, map_view_axis
from graph_helpers import assert_region_runs_on_rows, capture

B, N, H, D = 2, 12, 4, 8


@pytest.mark.parametrize("shape, axis, out, expected", [
    ((B, N, H * D), Axis(1), (B * N, H * D), Axis(0, B)),  # batch folded into the rows
    ((B, N, H * D), Axis(1), (B * N * H, D), Axis(0, B, H)),  # and the heads after each token
    ((B * N * H, D), Axis(0, B, H), (B, N, H * D), Axis(1)),  # and back
    ((B, N, H, D), Axis(1), (B, N * H, D), Axis(1, 1, H)),
    ((B, N, H * D), Axis(1), (B * N * H * D,), Axis(0, B, H * D)),  # flat: every element after its token
    ((B, N, H * D), Axis(1), (B, N // 2, 2 * H * D), None),  # two tokens in one row
    ((B, N, H * D), Axis(1), (B * N // 2, 2, H * D), None),
])
def test_a_reshape_keeps_whole_token_rows_or_loses_the_axis(shape, axis, out, expected):
    assert map_view_axis(shape, out, axis, N) == expected


def test_a_symbolic_batch_folds_into_the_rows_when_it_divides_them():
    """Dynamic shapes: the batch ``b`` and sequence ``n`` are symbols, and a fold is followed where the rows'
    size over ``n`` is a product of symbols and integers (the fold), not a fraction."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(shape_env=ShapeEnv()).from_tensor(
        torch.empty(B, N, H * D), symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3))
    b, n, width = fake.shape
    folded = map_view_axis((b, n, width), (b * n, width), Axis(1), n)
    assert folded.dim == 0 and same_size(folded.lead, b) and folded.trail == 1 and folded.folded
    assert map_view_axis((b * n, width), (b, n, width), folded, n) == Axis(1)  # and back
    assert map_view_axis((b, n, width), (b * n // 2, 2 * width), Axis(1), n) is None  # two tokens in one row
    assert not Axis(1).folded and Axis(0, 2).folded


@pytest.mark.parametrize("batch", [1, 2])
def test_norm_on_heads_folded_into_rows_is_in_the_k_chain(batch):
    model = llada_like("tiny", init_std=0.2, qk_norm=True, qk_norm_layout="rows")
    (cap,) = capture(model, (torch.randint(0, 100, (batch, N), generator=torch.Generator().manual_seed(0)),))
    assert not cap.analysis.dense_reasons
    for chains in cap.analysis.chains:
        k = chains["k"]
        assert k.gated and op_name(k.exit) == "add"  # rotary, after the norm
        folded = [n for n in k.nodes if op_name(n) == "reshape" and cap.analysis.infos[n].axis.trail != 1]
        assert len(folded) == 1 and cap.analysis.infos[folded[0]].axis == Axis(0, batch, model.cfg.n_kv_heads)
        assert_region_runs_on_rows(cap, k, rows=5)
