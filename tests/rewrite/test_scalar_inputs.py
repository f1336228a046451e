"""A float attribute that Dynamo makes a 0-d input read with ``.item()`` (``dynamic=True``; transformers 5's
attention ``scaling``) as the attention's scale: the site is cached with the scale taken in each variant as the
constant it is at that call (the runtime keys variants by it), and dense calls run through a variant too.

Before, the plan took the scale for a number (``float`` of a node: the analysis failed, the graph compiled dense),
and a dense variant compiled with the scale as an input failed on SDPA's guard on it; then, where the dense variant
calls ``dyllm::cached_attention`` (exact mode, sizes past ``RECOMPUTE_WORK``), on the op's ``float scale``: a scale
read from an input is a SymFloat, which a float argument guards on. The op takes Scalars now (its soft-cap too)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_compile.runtime.graph_runtime import last_serial, runtimes


class ScaledAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.qkv = nn.Embedding(64, 32), nn.Linear(32, 96)
        self.out, self.ffn, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 64)
        self.scaling = 0.25

    def forward(self, ids):
        h = self.embed(ids)
        b, n, _ = h.shape
        q, k, v = (t.view(b, n, 4, 8).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        context = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        h = h + self.out(context.transpose(1, 2).reshape(b, n, 32))
        return self.head(h + self.ffn(torch.relu(h)))


@pytest.mark.parametrize("route", ["recompute", "incremental"])
def test_a_scale_read_from_an_input_is_each_variant_constant(route, monkeypatch):
    """``incremental``: the variants call the op (at these sizes exact mode would trace its dense form instead)."""
    if route == "incremental":
        monkeypatch.setattr(importlib.import_module("dyllm_compile.ops.cached_attention"), "RECOMPUTE_WORK", 0)
    torch._dynamo.reset()
    model = ScaledAttention().eval()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", dynamic=True,
                             options={"lowering": "aot_eager", "threshold": 1 - 1e-12})
    with torch.inference_mode():
        ids = torch.randint(0, 63, (1, 12), generator=torch.Generator().manual_seed(1))
        for call in range(4):
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
            ids = ids.clone()
            ids[0, call] = 5
        model.scaling = 0.3  # a new value: a variant of its own (or Dynamo's recompile), never the old constant
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    used = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert used and all(s.cached and isinstance(s.scale, torch.fx.Node) for r in used for s in r.plan.sites)
    assert all(r.stats.fallback is None for r in runtimes(before))
