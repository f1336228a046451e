"""The dead_code pass: values nothing reads are dropped before the passes that follow a value's readers.

Dynamo keeps a reshape of a result the model drops (Zaya's router returns its logits reshaped, and the MoE block
that calls it keeps only the routing): an FFN branch grown backward stopped at the value that reshape read, as at
any value read outside the branch, so the FFN's first projection became a region of its own, dense on every row.
"""

import torch
from torch import nn

from dyllm_compile.models import llada_like
from dyllm_compile.passes.graph_edit import without_dead_code
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from graph_helpers import capture, traced


class _Projections(nn.Module):
    """Returns a flattened view of its hidden value beside its output, as a router returns its logits."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.up(x)
        return hidden.reshape(-1, hidden.shape[-1]), self.down(torch.relu(hidden))


class _DroppingFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projections = _Projections(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, out = self.projections(x)
        return out


def _model() -> nn.Module:
    model = llada_like("tiny")
    for layer in model.layers:
        layer.ffn = _DroppingFFN(model.embed.embedding_dim)
    return model


def _unread(gm) -> list[str]:
    return [op_name(n) for n in gm.graph.nodes if not n.users and n.op not in ("output", "placeholder")]


def test_values_nothing_reads_are_dropped_on_a_copy():
    gm, _ = traced(_model(), torch.randint(0, 100, (1, 12)))
    before = len(gm.graph.nodes)
    assert _unread(gm) == ["reshape", "reshape"]  # one per layer, as Dynamo hands the graph over
    pruned = without_dead_code(gm)
    assert _unread(pruned) == [] and len(pruned.graph.nodes) == before - 2
    assert len(gm.graph.nodes) == before  # Dynamo's graph is never edited
    assert without_dead_code(pruned) is pruned  # nothing to drop: no copy


def test_a_dropped_value_does_not_split_the_ffn():
    """Before: each layer's FFN region held the relu and the second projection, the first projection a shared
    projection of its own (dense: the FFN is no q/k/v chain); after: one FFN region with both projections."""
    (cap,) = capture(_model(), (torch.randint(0, 100, (1, 12)),), dynamic=False)
    regions = [r for r in cap.analysis.regions if r.role not in ("attn_out", "lm_head")]
    assert [(r.role, r.layer, cap.ops(r.nodes).count("linear")) for r in regions] == [("ffn", 0, 2), ("ffn", 1, 2)]
    assert all(r.gated for r in regions)


def test_threshold_one_equals_dense():
    """The rewrite runs on the graph without them: both projections on the salient rows, equal to eager."""
    torch._dynamo.reset()
    model, before = _model().eval(), last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=gen)
    ids[:, 8:] = 127
    with torch.inference_mode():
        for call in range(4):
            torch.testing.assert_close(compiled(ids.clone()), model(ids), rtol=1e-5, atol=1e-5)
            ids[:, 8 + 2 * call: 10 + 2 * call] = torch.randint(0, 100, (2, 2), generator=gen)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3 and not runtime.plan.reasons
    ffns = [r for r in runtime.plan.regions if r.role == "ffn"]
    assert [(r.layer, [op_name(n) for n in r.nodes].count("linear")) for r in ffns] == [(0, 2), (1, 2)]
