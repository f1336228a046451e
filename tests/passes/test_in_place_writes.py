"""In-place writes become data flow before any other pass reads the graph.

Each accepted form shows the graph's writes before the pass and none after, and runs against Dynamo's graph on
the same inputs; each refused form keeps Dynamo's graph and names the write; the backend then compiles that
graph dense, saying why. End to end: a model that adds its FFN into the residual stream in place."""

import logging

import pytest
import torch
import torch.nn.functional as F

from dyllm_compile.passes.analysis import analyze
from dyllm_compile.passes.in_place_writes import functionalize_writes, writes_first_operand
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from graph_helpers import ops, traced


def writes(gm):
    return [str(n.target) if n.op == "call_method" else n.target.__name__ for n in gm.graph.nodes
            if writes_first_operand(n)]


def functional(fn, *inputs):
    """Dynamo's graph of ``fn``, the pass's copy of it (checked to compute the same), and the writes it had."""
    gm, args = traced(fn, *inputs)
    new, problems = functionalize_writes(gm)
    assert problems == [] and new is not gm
    assert writes(new) == []
    for got, expected in zip(new(*args), gm(*args)):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return gm, new


def moe_combine(x, top):
    """HF's sparse MoE block (OLMoE, LLaDA-MoE): each expert's rows added into zeros by a statement."""
    out = torch.zeros_like(x)
    for e in range(3):
        rows = torch.where(top == e)[0]
        out.index_add_(0, rows, x[rows] * (e + 1))
    return (out,)


def test_index_add_statements_become_the_value_returned():
    gm, new = functional(moe_combine, torch.randn(10, 4), torch.randint(0, 3, (10,)))
    assert writes(gm) == ["index_add_"] * 3
    assert ops(new).count("index_add") == 3
    # Before, the returned value's node was the zeros it started as; now it is the last accumulation.
    (returned,) = new.graph.output_node().args[0]
    assert writes(gm) and ops(gm)[0] == "zeros_like" and returned.target is torch.Tensor.index_add


def readers_before_and_after(x):
    h = x + 1
    before = h * 2  # reads h as it was
    h.mul_(3)
    h.add_(1)  # a second write into the same value
    return before, h, h.view(-1)


def promoting(x, y):
    h = x.half()
    h += y  # in place h stays fp16; h + y would be fp32
    return (h,)


def set_item_and_relu(x):
    h = x * 2
    h[:, 0] = -5.0
    F.relu(h, inplace=True)
    return (h + 1,)


def flag_set_then_written(x):
    """MRA's ``zeros_like(q).requires_grad_()``: named like a write, it sets autograd's flag and changes no value;
    the write beside it is followed. Until the masked-LM sweep of 2026-12-06 it was taken for a write whose
    out-of-place form is ``Tensor.requires_grad``, a property, and the analysis raised."""
    h = torch.zeros_like(x).requires_grad_()
    g = x * 3
    g.add_(x)
    return ((h + g) * 2,)


def augmented_twice(x, y):
    """``h += y`` rebinds ``h`` to the write's result, so Dynamo records the second write into the first's: the
    node the pass had just replaced. Until the masked-LM sweep of 2026-12-06 (RoCBERT's embeddings) that write
    was refused ("no recorded value to follow") and the whole graph stayed dense."""
    h = x * 2
    h += y
    h += 1
    return (h / 3,)


@pytest.mark.parametrize("fn, inputs, before", [
    (readers_before_and_after, (torch.randn(3, 4),), ["mul_", "add_"]),
    (augmented_twice, (torch.randn(3, 4), torch.randn(3, 4)), ["iadd", "iadd"]),
    (flag_set_then_written, (torch.randn(3, 4),), ["add_"]),
    (promoting, (torch.randn(3, 4), torch.randn(3, 4)), ["iadd"]),
    (set_item_and_relu, (torch.randn(3, 4),), ["setitem", "relu"]),
])
def test_writes_become_out_of_place_ops(fn, inputs, before):
    try:
        gm, _ = functional(fn, *inputs)
    except torch._dynamo.exc.Unsupported as err:
        if "requires_grad_" not in str(err):
            raise
        pytest.skip("this torch's Dynamo breaks the graph at requires_grad_() (torch 2.11): no such node to follow")
    assert writes(gm) == before


def masked_in_place(q, k, v, keep):
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    scores.masked_fill_(~keep, float("-inf"))
    return (scores.softmax(-1) @ v,)


def test_a_mask_filled_in_place_is_part_of_the_attention_it_masks():
    """Before the pass, the softmax read the unmasked scores' node: the hand-written pass refused the site."""
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., -2:] = False
    gm, args = traced(masked_in_place, *[torch.randn(2, 4, 6, 8) for _ in range(3)], keep)
    analysis = analyze(gm)
    (site,) = analysis.sites
    assert site.hand_written and not site.dense_reason
    torch.testing.assert_close(analysis.gm(*args), gm(*args), rtol=1e-5, atol=1e-6)


def into_views(x, k_nope, k_rot):
    """transformers 5's DeepSeek-V3 builds its key by two writes into views of a fresh tensor."""
    h = x + 1
    h[:, :2].mul_(2)
    key = k_nope.new_empty(*k_nope.shape[:-1], 12)
    key[..., :8].copy_(k_nope)
    key[..., 8:].copy_(k_rot.expand(-1, 4, -1))
    return h, key


def test_writes_into_views_write_the_value_viewed():
    """A write into ``x[index]`` (a basic index: a view of x) becomes ``set_items(x, index, written view)``, which
    later readers of x read; before, it kept the graph dense (x is read after the write)."""
    gm, new = functional(into_views, torch.randn(3, 4), torch.randn(2, 4, 8), torch.randn(2, 1, 4))
    assert writes(gm) == ["mul_", "copy_", "copy_"]
    assert [n.target.__name__ for n in new.graph.nodes if n.op == "call_function"].count("set_items") == 3


def view_then_write(x):
    """Two views made before the first write: the second would need the first write replayed into it."""
    h = x + 1
    left, right = h[:, :2], h[:, 1:]
    left.copy_(x[:, 2:])
    right.copy_(x[:, :3])
    return (h,)


def into_an_input(x):
    x.add_(1)
    return (x * 2,)


def view_read_after(x):
    h = x + 1
    first = h[:, :2]
    h.mul_(2)
    return (first + 0,)


@pytest.mark.parametrize("fn, reason", [
    (into_an_input, "in-place 'add_' into 'l_x_': writes into a graph input or module attribute"),
    (view_read_after, "in-place 'mul_' into 'h': 'first' shares its memory and is read after the write (by "
                      "'add_1'), which would need it replayed"),
    (view_then_write, "in-place 'copy_' into 'h' (through its view 'left'): 'right' shares its memory and is "
                      "read after the write (by 'copy__1'), which would need it replayed"),
])
def test_writes_the_pass_cannot_follow_keep_the_graph_and_are_named(fn, reason):
    gm, _ = traced(fn, torch.randn(3, 4))
    new, problems = functionalize_writes(gm)
    assert new is gm and problems == [reason]
    analysis = analyze(gm)
    assert analysis.sites == [] and analysis.dense_reasons == [reason]


class InPlaceResidual(torch.nn.Module):
    """Pre-norm layers whose FFN is added into the residual stream by a statement, ``h.add_(ffn(norm(h)))``:
    dataflow alone says the layer returns ``h`` without its FFN."""

    def __init__(self, vocab=64, d=32, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, 3 * d) for _ in range(layers))
        self.o = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.ffn = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                                           torch.nn.Linear(4 * d, d)) for _ in range(layers))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(2 * layers + 1))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        b, n, d = h.shape
        for i, (qkv, o, ffn) in enumerate(zip(self.qkv, self.o, self.ffn)):
            q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv(self.norms[2 * i](h)).chunk(3, -1))
            h = h + o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
            h.add_(ffn(self.norms[2 * i + 1](h)))
        return self.head(self.norms[-1](h))


def test_model_writing_its_residual_in_place_is_cached_and_equals_dense():
    torch._dynamo.reset()
    before = last_serial()
    torch.manual_seed(0)
    model = InPlaceResidual().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 5:] = 63
    with torch.inference_mode():
        for call in range(3):
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
            ids[:, 5 + call] = 7
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 2
    assert [r.layer for r in runtime.plan.regions if r.role == "ffn"] == [0, 1]


def test_backend_compiles_a_graph_with_an_unfollowed_write_dense_and_says_why(caplog):
    torch._dynamo.reset()
    x = torch.randn(3, 4)
    compiled = torch.compile(into_an_input, backend="dyllm", options={"lowering": "aot_eager"})
    with caplog.at_level(logging.WARNING, logger="dyllm_compile"), torch.inference_mode():
        (got,) = compiled(x.clone())
    torch.testing.assert_close(got, into_an_input(x.clone())[0])
    assert any("compiled dense: in-place 'add_' into 'l_x_'" in m for m in caplog.messages)
