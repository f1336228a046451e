"""Two attention sites that read the same keys and values (one projection, two attentions per layer on it, as a
differential attention writes them): one cache and one chain per value, run once on the first site's rows.

Before: the second site's k/v chains had the same exit as the first's, the sparse graph emitted one of them, and
building the sparse variant failed (a warning, then the graph lowered unchanged)."""

import torch
import torch.nn.functional as F
from torch import nn

from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

MASK = 63


class TwoAttentions(nn.Module):
    """Per layer: q, k, v from one projection; one attention with q, one with q scaled per head; both added."""

    def __init__(self, layers: int = 2, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(64, width)
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, width))
                                 for _ in range(layers))
        self.temperature = nn.Parameter(torch.tensor([0.5, 2.0])[None, :, None, None])
        self.head = nn.Linear(width, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        b, n, d = h.shape
        for qkv, o, ffn in zip(self.qkv, self.o, self.ffn):
            q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv(F.rms_norm(h, (d,))).chunk(3, -1))
            first = F.scaled_dot_product_attention(q, k, v)
            second = F.scaled_dot_product_attention(q * self.temperature, k, v)
            h = h + o(torch.cat([first, second], dim=-1).transpose(1, 2).reshape(b, n, 2 * d))
            h = h + ffn(F.rms_norm(h, (d,)))
        return self.head(h)


def _decode(options: dict):
    torch._dynamo.reset()
    before = last_serial()
    model = TwoAttentions().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "mask_token_id": MASK,
                                                               **options})
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 4:] = MASK
    with torch.inference_mode():
        for call in range(4):
            torch.testing.assert_close(compiled(ids.clone()), model(ids.clone()), rtol=1e-5, atol=1e-5)
            ids[:, 4 + 2 * call: 6 + 2 * call] = call + 1
    (runtime,) = runtimes(before)
    return runtime


def test_sites_sharing_keys_and_values_share_their_caches_and_equal_dense():
    runtime = _decode({"threshold": 1.0})
    sites = runtime.plan.sites
    assert runtime.stats.sparse_calls == 3 and len(sites) == 4 and all(s.cached for s in sites)
    for first, second in (sites[0:2], sites[2:4]):
        assert first.caches["k"] == second.caches["k"] and first.caches["v"] == second.caches["v"]
        assert first.caches["c"] != second.caches["c"]
    assert [r.role for r in runtime.plan.regions].count("k") == 2  # one k chain per layer


def test_a_policy_reading_values_keeps_the_second_site_dense():
    """dLLM-Cache's hook on the values runs where a value chain does: a second site sharing it stays dense, named."""
    runtime = _decode({"threshold": 1.0, "policy": "dllm_cache"})
    assert [s.cached for s in runtime.plan.sites] == [True, False, True, False]
    assert sum("k/v chain is an earlier site's" in r for r in runtime.plan.reasons) == 2
