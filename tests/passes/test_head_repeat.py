"""GQA head repetition at the end of a k/v chain is recognised from shapes, and only the exact repetition."""

import pytest
import torch

from dyllm_compile.passes.head_repeat import repeated_heads_source

B, G, N, D, R = 2, 3, 5, 4, 2


def _expand_getitem(x):
    return x[:, :, None, :, :].expand(B, G, R, N, D).reshape(B, G * R, N, D)


def _expand_unsqueeze(x):
    return x.unsqueeze(2).expand(B, G, R, N, D).reshape(B, G * R, N, D)


def _interleave(x):
    return x.repeat_interleave(R, dim=1)


def _tiled(x):  # heads tiled (0 1 2 0 1 2), not repeated in place: a different layout
    return x.repeat(1, R, 1, 1)


def _tokens_expanded(x):  # the singleton dim after the tokens: rows and heads mix
    return x[:, :, :, None, :].expand(B, G, N, R, D).reshape(B, G * R, N, D)


def _no_heads(x):  # HF's repeat_kv with more kv heads than heads (a 0-fold "repeat", found in DeepSeek-V3's config)
    return x[:, :, None, :, :].expand(B, G, 0, N, D).reshape(B, 0, N, D)


def _final_node(fn):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda x: fn(x * 2), backend=backend)(torch.randn(B, G, N, D))
    (gm,) = graphs
    return gm.graph.output_node().args[0][0]


@pytest.mark.parametrize("fn", [_expand_getitem, _expand_unsqueeze, _interleave])
def test_head_repetition_is_found(fn):
    out = _final_node(fn)
    source = repeated_heads_source(out)
    assert source is not None and source.op == "call_function" and source.args[1] == 2  # the x * 2 node
    x = torch.randn(B, G, N, D)  # and the pattern is what the op's own repetition does
    torch.testing.assert_close(fn(x), x.repeat_interleave(R, dim=1))


@pytest.mark.parametrize("fn", [_tiled, _tokens_expanded, _no_heads])
def test_other_layouts_are_not_taken_for_head_repetition(fn):
    assert repeated_heads_source(_final_node(fn)) is None
