"""Heads folded into the batch for the products (fairseq's and DeBERTa's attention) are unfolded, so that the
attention is a site (passes/folded_heads.py).

Each case shows the graph's ops before and after the pass and checks the new graph against Dynamo's on the same
inputs; where nothing commutes into a product of two folds, the graph handed over comes back as it was."""

import math

import pytest
import torch

from dyllm_compile.passes.attention_sites import find_attention_sites
from dyllm_compile.passes.folded_heads import unfold_heads
from dyllm_compile.passes.graph_utils import hint
from dyllm_compile.passes.hand_written_attention import sdpa_from_hand_written
from graph_helpers import ops, traced

B, H, N, D = 2, 4, 6, 8


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[1, ..., -2:] = False  # element 1's last two keys are padding
    return q, k, v, keep


def fairseq(q, k, v, keep, relative=None):
    """Bart's and XGLM's attention as fairseq wrote it: q, k and v as [B * H, N, D], the scores viewed to
    [B, H, N, N] for the mask and back for the second product. ``relative``: scores of each query against
    position embeddings, added while folded (DeBERTa's c2p)."""
    fold = (-1, N, D)
    q, k, v = (t.reshape(fold) for t in (q, k, v))
    scores = torch.bmm(q, k.transpose(1, 2) / math.sqrt(D))
    if relative is not None:
        scores = scores + torch.bmm(q, relative.repeat(B, 1, 1).transpose(1, 2))
    scores = scores.view(B, H, N, N).masked_fill(~keep, torch.finfo(torch.float32).min)
    probs = torch.nn.functional.softmax(scores, dim=-1).view(-1, N, N)
    return torch.bmm(probs, v).view(B, H, N, D).transpose(1, 2).reshape(B, N, H * D)


def check_same_function(gm, new, args):
    torch.testing.assert_close(new(*args), gm(*args), rtol=1e-5, atol=1e-5)


def test_folded_attention_becomes_a_site():
    gm, args = traced(fairseq, *inputs())
    assert not find_attention_sites(gm.graph)
    before = ops(gm)  # (bmm's canonical name is "matmul")
    assert before == ["reshape", "reshape", "reshape", "transpose", "div", "matmul", "view", "invert", "masked_fill",
                      "softmax", "view", "matmul", "view", "transpose", "reshape"]
    new = unfold_heads(gm)
    # the folds of q, k and v and the views between the products and the softmax are gone
    assert ops(new) == ["transpose", "div", "matmul", "invert", "masked_fill", "softmax", "matmul", "transpose",
                        "reshape"]
    (site,) = find_attention_sites(new.graph)
    assert site.kind == "manual" and not site.dense_reason
    check_same_function(gm, new, args)
    sdpa = sdpa_from_hand_written(new)
    assert "sdpa" in ops(sdpa) and "matmul" not in ops(sdpa)
    check_same_function(gm, sdpa, args)
    assert ops(gm) == before  # Dynamo's graph is not edited


def test_scores_added_while_folded_become_the_mask():
    """DeBERTa adds relative-position scores ([B * H, N, N], from q) to the folded scores: unfolded by an
    ``unflatten`` (not ``reshape_as`` of the scores, which would read them outside the attention), they are an
    additive mask of the site."""
    relative = torch.randn(H, N, D, generator=torch.Generator().manual_seed(1))
    gm, args = traced(fairseq, *inputs(), relative)
    new = unfold_heads(gm)
    # the relative product stays folded (its second operand is not a fold), its sum unflattened
    assert ops(new) == ["reshape", "transpose", "div", "matmul", "repeat", "transpose", "matmul", "unflatten", "add",
                        "invert", "masked_fill", "softmax", "matmul", "transpose", "reshape"]
    (site,) = find_attention_sites(new.graph)
    assert not site.dense_reason
    check_same_function(gm, new, args)
    sdpa = sdpa_from_hand_written(new)
    (site,) = find_attention_sites(sdpa.graph)
    assert site.kind == "sdpa" and site.mask is not None
    check_same_function(gm, sdpa, args)


def test_dynamic_shapes():
    """A symbolic batch and length: folds are found by the ShapeEnv's sizes, and the unfolded products are emitted
    with no size named."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, [hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]))
        return gm.forward

    def dynamic_fairseq(q, k, v):
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)).view(b, h, n, n) * 0.5, dim=-1)
        return torch.bmm(probs.view(b * h, n, n), v).view(b, h, n, d)

    with torch.inference_mode():
        torch.compile(dynamic_fairseq, backend=backend, dynamic=True, fullgraph=True)(*inputs()[:3])
    ((gm, args),) = graphs
    assert any(isinstance(a, int) for a in args)  # the sizes are inputs
    new = unfold_heads(gm)
    (site,) = find_attention_sites(new.graph)
    assert not site.dense_reason and "view" not in ops(new)
    check_same_function(gm, new, args)


def product_of_a_fold_and_a_table(q, table):
    """Each head's queries times a table shared by the batch, repeated over it: one operand is not a fold."""
    return torch.bmm(q.reshape(-1, N, D), table.repeat(B, 1, 1)).view(B, H, N, -1).softmax(-1)


@pytest.mark.parametrize("fn, extra", [(product_of_a_fold_and_a_table, lambda: torch.randn(H, D, 3))])
def test_a_product_with_an_operand_not_folded_is_left_as_it_was(fn, extra):
    q, *_ = inputs()
    gm, _ = traced(fn, q, extra())
    assert unfold_heads(gm) is gm


def test_a_fold_read_across_its_folded_dim_keeps_that_reader():
    """A sum over the folded dim does not commute with the fold: it reads the fold, which stays beside the
    unfolded products."""

    def attention_and_a_sum(q, k, v, keep):
        out = fairseq(q, k, v, keep)
        return out, q.reshape(-1, N, D).sum(0)

    gm, args = traced(attention_and_a_sum, *inputs())
    new = unfold_heads(gm)
    assert len(find_attention_sites(new.graph)) == 1
    assert "sum" in ops(new) and ops(new).count("reshape") >= 1
    check_same_function(gm, new, args)
