"""Shared projections (passes/mixer_inputs.py): a projection that several chains read, none holding it, is a region
of its own, each value read outside it an exit with a cache, where every reader runs on the salient rows. Here a
value projection split between two attentions, as DiffLlama's, and a query projection split into the queries and
an output gate read after the attention, as Qwen3-Next's (which stays dense: the output projection runs on every
row). Before 2026-12-06 every such projection ran on every row at every call.

At a threshold just below 1 with a banded mask, every row that moved is recomputed and the others are not: in
exact mode the compiled model must equal eager at every call. Paper mode, which computes q for every row (here
from the cached split), approximates the attention of the rows outside S_in by design (DESIGN.md, 2.3): at
threshold 1, where every row is in S_in, it must equal eager too."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decode_driver import NEARLY_ONE, banded_decode
from dyllm_compile.explain import Report


class DifferentialLM(nn.Module):
    """Pre-norm layers of two attentions on one q and one k, each with half of one value projection
    (``v(x).view(B, N, H, 2 * D).chunk(2, -1)``, as DiffLlama's), their contexts' difference projected, then an
    MLP. ``gate``: the queries projected with a per-head output gate (``q_gate(x).view(B, N, H, 2 * D).chunk(2,
    -1)``, as Qwen3-Next's), the gate's sigmoid applied to the contexts. ``forward(ids, mask)``: SDPA's additive
    mask."""

    def __init__(self, gate: bool = False, d: int = 32, heads: int = 2, layers: int = 2, vocab: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.gate = heads, gate
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.RMSNorm(d), q=nn.Linear(d, (2 if gate else 1) * d, bias=False), k=nn.Linear(d, d, bias=False),
            v=nn.Linear(d, 2 * d, bias=False), o=nn.Linear(d, d, bias=False), norm2=nn.RMSNorm(d),
            up=nn.Linear(d, 2 * d), down=nn.Linear(2 * d, d))) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        b, n, d = h.shape
        for layer in self.layers:
            x = layer["norm1"](h)
            q = layer["q"](x).view(b, n, self.heads, -1)
            q, gate = q.chunk(2, dim=-1) if self.gate else (q, None)
            k = layer["k"](x).view(b, n, self.heads, -1).transpose(1, 2)
            v1, v2 = layer["v"](x).view(b, n, self.heads, -1).chunk(2, dim=-1)
            a1, a2 = (F.scaled_dot_product_attention(q.transpose(1, 2), k, v.transpose(1, 2), attn_mask=mask)
                      for v in (v1, v2))
            att = (a1 - 0.5 * a2).transpose(1, 2)
            if gate is not None:
                att = att * torch.sigmoid(gate)
            h = h + layer["o"](att.reshape(b, n, d))
            h = h + layer["down"](F.gelu(layer["up"](layer["norm2"](h))))
        return self.head(self.norm(h))


@pytest.mark.parametrize("mode, threshold", [("exact", NEARLY_ONE), ("paper", 1.0)])
def test_a_value_projection_split_between_two_attentions_runs_on_the_salient_rows(mode, threshold):
    """Each half is read by its attention's v chain alone, which runs on S_in, as the projection does. The query
    projection, which each attention views on its own (two q chains), is a shared projection too: exact mode runs
    both q chains on S_in; paper mode computes q for every row, so it stays dense there, named."""
    runtime = banded_decode(DifferentialLM(), mode, threshold)
    shared = [r for r in runtime.plan.regions if r.role == "shared_proj"]
    # each layer's (the two attentions are layers 2i and 2i + 1): the value projection and its split, both halves
    # exits, each cached; in exact mode the query projection, one exit
    halves = [(r.layer, len(r.exits)) for r in shared]
    assert halves == ([(1, 1), (1, 2), (3, 1), (3, 2)] if mode == "exact" else [(1, 2), (3, 2)])
    assert not runtime.plan.reasons  # dense as the algorithm computes paper mode's q: not a refusal
    cached = [spec.node for spec in runtime.plan.caches]
    assert all(x in cached for r in shared for x in r.exits)
    if threshold < 1:  # the rows near the changed ones (each of the four sites widens them), not every row
        assert runtime.stats.rows_computed < 0.8 * runtime.stats.rows_dense
    report = Report([runtime.plan.analysis], runtime.config)
    assert report.outside(runtime.plan.analysis) == []  # no product left on every row


def test_a_gated_query_projection_stays_on_every_row_named():
    """The gate is read after the attention, by the output projection's branch, which runs on every row: a row
    outside S_in would read a cached gate where the algorithm computes it from the row's current input. The
    projection stays dense, as that branch does (no reason given: the algorithm's choice), listed dense by
    ``explain``; the value projection's split is still gated."""
    runtime = banded_decode(DifferentialLM(gate=True), "exact", NEARLY_ONE)
    assert [(r.layer, len(r.exits)) for r in runtime.plan.regions if r.role == "shared_proj"] == [(1, 2), (3, 2)]
    analysed = [(r.layer, len(r.exits)) for r in runtime.plan.analysis.regions if r.role == "shared_proj"]
    assert analysed == [(1, 2), (1, 2), (3, 2), (3, 2)] and not runtime.plan.reasons
    rows = Report([runtime.plan.analysis], runtime.config).layers(runtime.plan.analysis)
    assert [("shared proj" in row.gated, "shared proj" in row.dense) for row in rows[:2]] == [(False, False),
                                                                                            (True, True)]
