"""A state each layer hands to the next beside the residual stream (Zaya's router state: each layer's router adds its
own projection to the previous layer's state). The paths through it go around the residual stream values between
the layers, which then did not post-dominate the source: the spine jumped from the first layer's attention to the
last merge, the layers between had no merges, so no branches, and their FFNs ran on every row. The spine is found
without such reads (``regions._side_states``).

At a threshold just below 1 with a banded mask, exact mode recomputes every row that moved and no other: the
compiled model must equal eager at every call, with each FFN on its salient rows."""

import torch
import torch.nn.functional as F
from torch import nn

from decode_driver import NEARLY_ONE, banded_decode
from dyllm_compile.explain import Report


class CarriedStateLM(nn.Module):
    """Pre-norm layers of attention and an FFN scaled by a gate computed from a router state: ``r = route(x)`` plus
    the previous layer's state times a scale, handed on (``r.clone()``), as Zaya's router does. The state is
    narrower than the stream (8 wide against 32). ``forward(ids, mask)``: SDPA's additive mask."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 3, state: int = 8, vocab: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.RMSNorm(d), qkv=nn.Linear(d, 3 * d, bias=False), o=nn.Linear(d, d, bias=False),
            norm2=nn.RMSNorm(d), route=nn.Linear(d, state), gate=nn.Linear(state, d), up=nn.Linear(d, 2 * d),
            down=nn.Linear(2 * d, d))) for _ in range(layers))
        self.scales = nn.Parameter(torch.full((layers, state), 0.5))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        b, n, d = h.shape
        carried = None
        for i, layer in enumerate(self.layers):
            q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2)
                       for t in layer["qkv"](layer["norm1"](h)).chunk(3, dim=-1))
            h = h + layer["o"](F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d))
            x = layer["norm2"](h)
            r = layer["route"](x)
            if carried is not None:
                r = r + carried * self.scales[i]
            carried = r.clone()
            h = h + layer["down"](F.gelu(layer["up"](x))) * torch.sigmoid(layer["gate"](F.gelu(r)))
        return self.head(self.norm(h))


def test_ffns_reading_a_carried_state_run_on_the_salient_rows():
    """Every layer's FFN is a gated branch (before: the last one only, grown back over the layers between) reading
    the previous layer's state, which the spine no longer follows. The first two layers' state projections are each
    read by two FFNs (their own layer's and the next one's): one shared projection, computed on every row, as its
    readers are not q/k/v chains (docs/rewrite.md, "Open"); the last layer's, read by its own FFN alone, is in that
    FFN."""
    runtime = banded_decode(CarriedStateLM(), "exact", NEARLY_ONE)
    plan = runtime.plan
    assert [(r.role, r.layer) for r in plan.regions if r.role == "ffn"] == [("ffn", 0), ("ffn", 1), ("ffn", 2)]
    assert all(site.cached for site in plan.sites) and not plan.reasons
    assert len(plan.analysis.spine.merges) == 6  # an attention and an FFN merge per layer
    (shared,) = [r for r in plan.analysis.regions if r.role == "shared_proj"]
    assert [op for op in shared.ops() if op == "linear"] == ["linear"] * 2 and shared not in plan.regions
    assert runtime.stats.rows_computed < 0.85 * runtime.stats.rows_dense  # the rows near the changed ones (81%)
    report = Report([plan.analysis], runtime.config)
    rows = report.layers(plan.analysis)
    assert [row.gated for row in rows[:3]] == [["q proj", "k proj", "v proj", "ffn"]] * 3
    assert report.outside(plan.analysis) == []
