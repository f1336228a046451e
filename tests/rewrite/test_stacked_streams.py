"""Residual streams stacked ahead of the batch (Gemma-3n's AltUp keeps four predictions of the hidden state as one
[streams, B, N, D] tensor): the token axis is found back through the ``stack`` to the token ids, so the attention
sites are cached and threshold 1 equals dense. Before 2026-12-06 ``stack`` had no backward rule: the ids carried
no token axis and the whole graph was lowered unchanged ("no graph input carries the tokens on a batch-first
layout"). Not built: the layers' FFNs and output projections stay dense, in no region (``explain`` names them):
the stream is the stack, whose merges are stacks, not the adds a branch is found between (docs/rewrite.md, "Open";
in Gemma-3n a region with the stacked streams as its output is dense for its layout, not batch-first)."""

import torch
import torch.nn.functional as F
from torch import nn

import dyllm_compile
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.passes.op_rules import Kind
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from decode_driver import unmasking

MASK = 63


class StackedStreams(nn.Module):
    """Two layers over two streams: each layer's attention and FFN read the first stream, and both streams are
    updated from their output and stacked again."""

    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(64, d)
        self.second = nn.Linear(d, d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            qkv=nn.Linear(d, 3 * d), o=nn.Linear(d, d), up=nn.Linear(d, 2 * d), down=nn.Linear(2 * d, d),
            norm=nn.LayerNorm(d), mix=nn.Linear(d, d))) for _ in range(2))
        self.head = nn.Linear(d, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        streams = torch.stack([h, self.second(h)])
        b, n, d = h.shape
        for layer in self.layers:
            x = streams[0]
            qkv = layer["qkv"](layer["norm"](x)).chunk(3, -1)
            q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv)
            x = x + layer["o"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
            x = x + layer["down"](F.gelu(layer["up"](layer["norm"](x))))
            streams = torch.stack([x, streams[1] + layer["mix"](x)])
        return self.head(streams[0] + streams[1])


def test_token_axis_reaches_the_ids_through_the_stack():
    (graph,) = dyllm_compile.explain(StackedStreams().eval(), torch.randint(0, 64, (2, 12)), verbose=False).graphs
    infos, nodes = graph.infos, list(graph.gm.graph.nodes)
    (ids,) = [n for n in nodes if n.op == "placeholder" and n.name.endswith("ids_")]
    assert infos[ids].kind is Kind.SOURCE and infos[ids].axis.dim == 1
    stacks = [n for n in nodes if op_name(n) == "stack"]
    assert len(stacks) == 3 and all(infos[n].axis.dim == 2 for n in stacks)
    assert [s.layer for s in graph.sites] == [0, 1]


def test_threshold_one_equals_dense_with_the_sites_cached():
    torch._dynamo.reset()
    before = last_serial()
    model = StackedStreams().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    with torch.inference_mode():
        for ids in unmasking(torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0)), 4, MASK, 4):
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 3 and all(s.cached for s in runtime.plan.sites)
    assert {r.role for r in runtime.plan.regions} >= {"k", "v", "q"}
