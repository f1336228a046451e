"""Hand-written attention becomes one SDPA node where it is SDPA's function, and stays as written where not.

Each accepted case shows the graph's ops before and after the pass and checks the new graph against Dynamo's on
the same inputs; each refused case checks the reason the site keeps and that the graph is the one handed over."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dyllm_compile.passes import analysis as analysis_module
from dyllm_compile.passes.attention_sites import find_attention_sites
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.passes.hand_written_attention import sdpa_from_hand_written
from graph_helpers import ops, traced

B, H, N, D = 2, 4, 6, 8
LOWEST = torch.finfo(torch.float32).min


def qkv(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3)]


def padding_mask():
    """Key padding [B, 1, 1, N]: element 1's last two keys are padding."""
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[1, ..., -2:] = False
    return keep


def assert_same_function(gm, new, inputs):
    torch.testing.assert_close(new(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5, equal_nan=True)


def llama_eager(q, k, v, mask):
    """HF's eager attention: scaled scores plus the additive mask, an fp32 softmax, eval-mode dropout."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=0.1, training=False), v)


def bert(q, k, v, mask):
    return torch.matmul((q @ k.transpose(-1, -2) / math.sqrt(D) + mask).softmax(-1), v)


def gptj(q, k, v, scale, mask):
    """GPT-J: q and k upcast to fp32, the scores divided by a 0-d tensor, probabilities cast back to v's dtype."""
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) / scale + mask
    return torch.matmul(F.softmax(scores, dim=-1).to(v.dtype), v)


def zoo(q, k, v, keep):
    """dyllm's zoo entry: a boolean mask filled with -inf, softmax in fp32."""
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    return torch.matmul(F.softmax(scores.masked_fill(~keep, float("-inf")).float(), dim=-1).to(q.dtype), v)


def mpt(q, k, v, bias, masked):
    """MPT: ALiBi's per-head bias added, then padding filled with the dtype's lowest value."""
    scores = (torch.matmul(q, k.transpose(-1, -2)) * 0.35 + bias).masked_fill(masked, LOWEST)
    return torch.matmul(scores.float().softmax(-1), v)


def gpt2_where(q, k, v, keep):
    """Older GPT-2 style: where(keep, scores, lowest) and a shift by a constant."""
    scores = torch.where(keep, torch.matmul(q, k.permute(0, 1, 3, 2)) - 3.0, LOWEST)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def keys_given_transposed(q, kt, v):
    """The keys arrive transposed (no transpose node to look through): the SDPA gets kt transposed back."""
    return torch.matmul(torch.softmax(torch.matmul(q, kt) * 0.3, dim=-1), v)


def per_head_scale(q, k, v, scale):
    """A learned per-head temperature [H, 1, 1]: the same for every key, so it scales q."""
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1), v)


def x_transformers(q, k, v, mask):
    """lucidrains' x-transformers: the products as einsums (spaces in the equation), a mask filled with -inf."""
    scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * D ** -0.5
    return torch.einsum("bhij,bhjd->bhid", scores.masked_fill(~mask, float("-inf")).softmax(dim=-1), v)


def gpt_oss(q, k, v, sinks, mask):
    """GPT-OSS: a learned sink logit per head concatenated to the scores, the row max subtracted, the softmax in the
    scores' dtype, the sink's column dropped."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([scores, column], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(F.dropout(probs, p=0.1, training=False).to(v.dtype), v)


def flint(q, k, v, sinks):
    """Flint: fp32 scores, the sink expanded to the scores' leading dims, no shift."""
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * 0.3
    column = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.matmul(F.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1].to(v.dtype), v)


def sink_first(q, k, v, sinks):
    """A sink logit per row and head given whole ([B, H, N, 1]), its column first and dropped as ``[:, :, :, 1:]``,
    the shift by ``amax``."""
    logits = torch.cat([sinks, q @ k.transpose(-1, -2) * 0.3], dim=3)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1)[:, :, :, 1:] @ v


def gemma2(q, k, v, mask):
    """Gemma-2's eager attention: the scaled scores divided by the cap, tanh, times the cap, then the additive mask."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    scores = torch.tanh(scores / 50.0) * 50.0 + mask
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def number_shift(q, k, v):
    """A shift by a number right before the softmax (which does not see it)."""
    return torch.softmax(q @ k.transpose(-1, -2) * 0.3 - 2.0, dim=-1) @ v


def row_max_shift(q, k, v):
    """No sink: a shift by the row max only, which the softmax does not see."""
    scores = q @ k.transpose(-1, -2) * 0.3
    return torch.softmax(scores - scores.max(-1, keepdim=True)[0], dim=-1) @ v


def granite_swa(q, k, v, sinks, mask):
    """Granite-SWA: the sink applied after the softmax, as the share of the mass it leaves, in fp32."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
    gate = (torch.logsumexp(scores, dim=-1) - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
    out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    return out * gate.unsqueeze(-1).to(out.dtype)


def lse_gate_indexed(q, k, v, sinks):
    """The same with a sink per row ([B, H, N]), the gate first in the product and its dim added by indexing."""
    scores = q @ k.transpose(-1, -2) * 0.3
    return torch.sigmoid(scores.logsumexp(-1) - sinks)[..., None] * (scores.softmax(-1) @ v)


SINKS = {
    "granite_swa": (granite_swa, lambda: (*qkv(), torch.randn(H), torch.where(padding_mask(), 0.0, LOWEST))),
    "lse_gate_indexed": (lse_gate_indexed, lambda: (*qkv(), torch.randn(B, H, N))),
    "gpt_oss": (gpt_oss, lambda: (*qkv(), torch.randn(H), torch.where(padding_mask(), 0.0, LOWEST))),
    "flint": (flint, lambda: (*qkv(), torch.randn(H))),
    "sink_first": (sink_first, lambda: (*qkv(), torch.randn(B, H, N, 1))),
}

ACCEPTED = {
    "llama_eager": (llama_eager, lambda: (*qkv(), torch.zeros(B, 1, N, N))),
    "bert": (bert, lambda: (*qkv(), torch.where(padding_mask(), 0.0, LOWEST))),
    "gptj": (gptj, lambda: (*qkv(), torch.tensor(math.sqrt(D)), torch.where(padding_mask(), 0.0, LOWEST))),
    "zoo": (zoo, lambda: (*qkv(), padding_mask())),
    "mpt": (mpt, lambda: (*qkv(), torch.randn(H, 1, N), ~padding_mask())),
    "gpt2_where": (gpt2_where, lambda: (*qkv(), padding_mask())),
    "keys_given_transposed": (keys_given_transposed, lambda: (qkv()[0], qkv()[1].transpose(-2, -1), qkv()[2])),
    "per_head_scale": (per_head_scale, lambda: (*qkv(), torch.rand(H, 1, 1) + 0.5)),
    "x_transformers": (x_transformers, lambda: (*qkv(), padding_mask())),
    "number_shift": (number_shift, qkv),
    "gemma2": (gemma2, lambda: (*[t * 8 for t in qkv()], torch.where(padding_mask(), 0.0, LOWEST))),
    "row_max_shift": (row_max_shift, qkv),
    **SINKS,
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_hand_written_attention_becomes_sdpa(name):
    fn, make = ACCEPTED[name]
    gm, inputs = traced(fn, *make())
    before = ops(gm)
    new = sdpa_from_hand_written(gm)
    after = ops(new)
    assert "softmax" in before and "sdpa" not in before
    assert new is not gm and ops(gm) == before  # a copy: Dynamo's graph is as it was
    assert after.count("sdpa") == 1 and not {"softmax", "logsumexp", "matmul", "einsum"} & set(after), after
    (site,) = find_attention_sites(new.graph)
    assert site.kind == "sdpa" and site.hand_written and (site.sinks is not None) == (name in SINKS)
    assert_same_function(gm, new, inputs)


def test_graph_before_and_after():
    """BERT's form, op by op: the scores' matmul, scale, mask and softmax and the context's matmul become one SDPA
    with the scale as a number and the mask as given; the transpose of k is looked through."""
    gm, inputs = traced(bert, *ACCEPTED["bert"][1]())
    assert ops(gm) == ["transpose", "matmul", "div", "add", "softmax", "matmul"]
    new = sdpa_from_hand_written(gm)
    (sdpa,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    inputs = {n.name: n for n in new.graph.nodes if n.op == "placeholder"}
    q, k, v, mask = (inputs[f"l_{name}_"] for name in ("q", "k", "v", "mask"))
    assert ops(new) == ["sdpa"]
    assert sdpa.args == (q, k, v) and sdpa.kwargs == {"attn_mask": mask, "scale": 1 / math.sqrt(D)}


def test_attention_sink_graph_before_and_after():
    """GPT-OSS's form, op by op: scores, sink column, shift, softmax, the column dropped, dropout, cast and product
    become one ``dyllm::sdpa_with_sinks`` whose ``sinks`` is the per-head logit as reshaped, before its broadcast
    (the op broadcasts it), with the mask and the scale as SDPA would take them."""
    gm, inputs = traced(gpt_oss, *SINKS["gpt_oss"][1]())
    assert ops(gm) == ["transpose", "matmul", "mul", "add", "reshape", "expand", "cat", "max", "getitem", "sub",
                       "softmax", "getitem", "dropout", "to", "matmul"]
    new = sdpa_from_hand_written(gm)
    assert ops(new) == ["reshape", "sdpa"]
    (node,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    placeholders = {n.name: n for n in new.graph.nodes if n.op == "placeholder"}
    q, k, v, mask = (placeholders[f"l_{name}_"] for name in ("q", "k", "v", "mask"))
    assert node.target is torch.ops.dyllm.sdpa_with_sinks.default and node.args == (q, k, v)
    assert node.kwargs == {"sinks": next(n for n in new.graph.nodes if op_name(n) == "reshape"), "attn_mask": mask,
                           "scale": D ** -0.5}
    assert_same_function(gm, new, inputs)


def test_soft_capping_graph_before_and_after():
    """Gemma-2's form, op by op: the product, its scale, the division by the cap, tanh, the cap, the mask, the fp32
    softmax and the context's product become one ``dyllm::sdpa_softcap`` with ``softcap`` the number after the tanh
    and ``scale`` the numbers before it times the cap (``c * tanh(s * a) = c * tanh(s * (a c) / c)``). The scores are
    large here (q and k scaled by 8): the cap changes the result, which the new graph still computes."""
    tensors = ACCEPTED["gemma2"][1]()
    gm, inputs = traced(gemma2, *tensors)
    assert ops(gm) == ["transpose", "matmul", "mul", "div", "tanh", "mul", "add", "softmax", "to", "matmul"]
    new = sdpa_from_hand_written(gm)
    assert ops(new) == ["sdpa"]
    (node,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    placeholders = {n.name: n for n in new.graph.nodes if n.op == "placeholder"}
    q, k, v, mask = (placeholders[f"l_{name}_"] for name in ("q", "k", "v", "mask"))
    assert node.target is torch.ops.dyllm.sdpa_softcap.default and node.args == (q, k, v)
    assert node.kwargs == {"softcap": 50.0, "attn_mask": mask, "scale": pytest.approx(D ** -0.5)}
    (site,) = find_attention_sites(new.graph)
    assert site.softcap == 50.0 and site.label == "hand-written+softcap"
    assert_same_function(gm, new, inputs)
    uncapped = F.scaled_dot_product_attention(*tensors[:3], attn_mask=tensors[3])
    assert not torch.allclose(gemma2(*tensors), uncapped, atol=1e-3)


def test_gptj_scale_tensor_moves_to_queries():
    gm, inputs = traced(gptj, *ACCEPTED["gptj"][1]())
    new = sdpa_from_hand_written(gm)
    (sdpa,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    scaled_q = sdpa.args[0]
    assert op_name(scaled_q) == "div" and scaled_q.args[1].name == "l_scale_" and sdpa.kwargs["scale"] == 1.0


class AttributeScale(torch.nn.Module):
    """A float attribute: Dynamo reads it from a 0-d input (``.item()``) when compiling with dynamic shapes."""

    scale = 0.35

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v


def test_unspecialised_float_scale_moves_to_queries():
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(AttributeScale(), dynamic=True,
                             backend=lambda gm, inputs: graphs.append((gm, list(inputs))) or gm.forward)
    compiled(*qkv())
    (gm, inputs), = graphs
    assert "item" in ops(gm)
    new = sdpa_from_hand_written(gm)
    (sdpa,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    assert op_name(sdpa.args[0]) == "mul" and op_name(sdpa.args[0].args[1]) == "item"
    assert_same_function(gm, new, inputs)


def test_fully_masked_row_matches():
    """An absorbing fill makes a row whose every key is masked the uniform average of the values, as written."""
    q, k, v, masked = *qkv(), torch.zeros(1, 1, N, N, dtype=torch.bool)
    masked[..., 2, :] = True
    gm, inputs = traced(mpt, q, k, v, torch.zeros(H, 1, N), masked)
    new = sdpa_from_hand_written(gm)
    assert new is not gm
    out = new(*inputs)[0]
    torch.testing.assert_close(out[:, :, 2], v.mean(dim=2).expand(B, H, D).contiguous(), rtol=1e-5, atol=1e-6)
    assert_same_function(gm, new, inputs)


def test_bf16_upcast_queries_and_keys_are_stripped():
    """GPT-J in bf16: q and k are cast to fp32 only for the scores; the SDPA takes them in bf16 (it accumulates in
    fp32 itself) and returns v's dtype, as the context was."""
    q, k, v = qkv(torch.bfloat16)
    gm, inputs = traced(gptj, q, k, v, torch.tensor(math.sqrt(D)), torch.zeros(B, 1, 1, N))
    new = sdpa_from_hand_written(gm)
    (sdpa,) = [n for n in new.graph.nodes if op_name(n) == "sdpa"]
    assert sdpa.meta["example_value"].dtype == torch.bfloat16
    assert sdpa.args[1].op == "placeholder" and sdpa.args[0].args[0].op == "placeholder"  # no fp32 casts
    torch.testing.assert_close(new(*inputs)[0], gm(*inputs)[0], rtol=2e-2, atol=2e-2)


def non_absorbing_fill(q, k, v, masked):
    return torch.matmul(torch.softmax((q @ k.transpose(-2, -1)).masked_fill(masked, -1e9), dim=-1), v)


def scaled_after_masking(q, k, v, mask):
    return torch.matmul(torch.softmax((q @ k.transpose(-2, -1) + mask) * 0.3, dim=-1), v)


def probabilities_returned(q, k, v):
    probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return probs @ v, probs


def training_dropout(q, k, v):
    return F.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.1, training=True) @ v


def capped_after_masking(q, k, v, mask):
    """tanh over the masked scores: the mask's -inf would become -cap, a finite logit."""
    return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * 0.2 + mask) * 5.0, dim=-1) @ v


def capped_shifted(q, k, v):
    """A shift before the tanh changes what it caps: not a shift the softmax ignores."""
    return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * 0.2 + 1.0) * 5.0, dim=-1) @ v


def capped_by_a_tensor(q, k, v, cap):
    """A cap per head (a tensor after the tanh): the op takes one number."""
    return torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * 0.2) * cap, dim=-1) @ v


def per_key_scale(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def mask_from_scores(q, k, v):
    scores = q @ k.transpose(-2, -1)
    return torch.softmax(scores.masked_fill(scores < 0, float("-inf")), dim=-1) @ v


def sink_from_scores(q, k, v):
    """A "sink" computed from the scores themselves: they are read outside the attention's pattern."""
    scores = q @ k.transpose(-1, -2)
    return torch.softmax(torch.cat([scores, scores.mean(-1, keepdim=True)], dim=-1), dim=-1)[..., :-1] @ v


def lse_gate_context_returned(q, k, v, sinks):
    """The sink-free context is returned too: the logsumexp reads the scores outside a sink's pattern."""
    scores = q @ k.transpose(-1, -2)
    context = scores.softmax(-1) @ v
    return context * torch.sigmoid(scores.logsumexp(-1) - sinks)[..., None], context


def lse_gate_inverted(q, k, v, sinks):
    """sigmoid(s - logsumexp): the sink's share, not the share it leaves."""
    scores = q @ k.transpose(-1, -2)
    return (scores.softmax(-1) @ v) * torch.sigmoid(sinks - scores.logsumexp(-1)).unsqueeze(-1)


REFUSED = {
    "non_absorbing_fill": (non_absorbing_fill, lambda: (*qkv(), ~padding_mask()),
                           "fills the scores with -1e+09, which is neither -inf nor below -1e+30"),
    "scaled_after_masking": (scaled_after_masking, lambda: (*qkv(), torch.zeros(B, 1, N, N)), "after masking"),
    "probabilities_returned": (probabilities_returned, qkv, "also used outside the attention"),
    "training_dropout": (training_dropout, qkv, "dropout in training mode"),
    "capped_after_masking": (capped_after_masking, lambda: (*qkv(), torch.where(padding_mask(), 0.0, -math.inf)),
                             "soft-caps the scores after masking them"),
    "capped_shifted": (capped_shifted, qkv, "soft-caps shifted scores"),
    "capped_by_a_tensor": (capped_by_a_tensor, lambda: (*qkv(), torch.rand(H, 1, 1) + 1.0),
                           "scales soft-capped scores by other than a number"),
    "per_key_scale": (per_key_scale, lambda: (*qkv(), torch.rand(N)), "varies along the keys"),
    "mask_from_scores": (mask_from_scores, qkv, "'scores' (scores or probabilities) is also used outside"),
    "sink_from_scores": (sink_from_scores, qkv, "(scores or probabilities) is also used outside"),
    "lse_gate_context_returned": (lse_gate_context_returned, lambda: (*qkv(), torch.randn(H, 1)),
                                  "(scores or probabilities) is also used outside"),
    "lse_gate_inverted": (lse_gate_inverted, lambda: (*qkv(), torch.randn(H, 1)),
                          "(scores or probabilities) is also used outside"),
}


def sink_column_kept(q, k, v, sinks):
    """The sink's probability is not dropped but multiplies a value row of its own: not attention with a sink."""
    probs = torch.softmax(torch.cat([q @ k.transpose(-1, -2), sinks], dim=-1), dim=-1)
    return probs @ torch.cat([v, torch.ones_like(v[:, :, :1])], dim=2)


def two_columns(q, k, v, extra):
    """Two extra logits, one dropped: the other still takes mass, so it is no sink."""
    probs = torch.softmax(torch.cat([q @ k.transpose(-1, -2), extra], dim=-1), dim=-1)
    return probs[..., :-2] @ v


@pytest.mark.parametrize("fn, extra", [(sink_column_kept, (B, H, N, 1)), (two_columns, (B, H, N, 2))])
def test_extra_logits_that_are_not_a_sink_are_no_site(fn, extra):
    """Anything but one column concatenated to the scores and dropped right after the softmax is not attention:
    no site is found (the graph then stays dense, its reason named: tests/passes/test_hf_attention.py)."""
    gm, _ = traced(fn, *qkv(), torch.randn(extra))
    assert find_attention_sites(gm.graph) == [] and sdpa_from_hand_written(gm) is gm


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_hand_written_attention_stays_with_its_reason(name):
    fn, make, reason = REFUSED[name]
    gm, _ = traced(fn, *make())
    assert sdpa_from_hand_written(gm) is gm
    (site,) = find_attention_sites(gm.graph)
    assert site.kind == "manual" and reason in site.dense_reason, site.dense_reason


def two_fills(q, k, v, padded, causal):
    """Two finite fills: one mask term (where either holds), not two summed (fp32's lowest twice is -inf)."""
    scores = (q @ k.transpose(-2, -1)).masked_fill(padded, LOWEST)
    return torch.softmax(torch.where(causal, scores, LOWEST), dim=-1) @ v


def test_two_fills_make_one_term_and_fully_masked_rows_still_match():
    padded = ~padding_mask()
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    causal[0] = False  # row 0 masked by both fills everywhere
    gm, inputs = traced(two_fills, *qkv(), padded, causal)
    new = sdpa_from_hand_written(gm)
    assert ops(new).count("where") == 1 and ops(new).count("or") == 1
    assert_same_function(gm, new, inputs)


def upcast_and_filled(q, k, v, masked):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).masked_fill(masked, LOWEST)
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def test_finite_fill_in_half_precision_stays():
    """Scores in fp32 filled with fp32's lowest, attention in fp16: an fp16 mask has no value that absorbs."""
    gm, _ = traced(upcast_and_filled, *qkv(torch.float16), ~padding_mask())
    assert sdpa_from_hand_written(gm) is gm
    (site,) = find_attention_sites(gm.graph)
    assert "which no torch.float16 mask can absorb" in site.dense_reason


def test_a_failing_replacement_leaves_the_graph_as_written(monkeypatch, caplog):
    """The replacement is an optimisation: if it raises, the analysis goes on with Dynamo's graph (the site found
    as written, dense) and says so, instead of compiling the whole graph dense."""
    def broken(gm):
        raise RuntimeError("boom")

    monkeypatch.setattr(analysis_module.HandWrittenAttention, "edit", staticmethod(broken))
    gm, _ = traced(bert, *ACCEPTED["bert"][1]())
    with caplog.at_level(logging.WARNING, logger="dyllm_compile"):
        result = analysis_module.analyze(gm)
    assert result.gm is gm and [s.kind for s in result.sites] == ["manual"]
    assert any("replacing hand-written attention by SDPA failed (RuntimeError: boom)" in m for m in caplog.messages)


@pytest.mark.parametrize("equations", [
    ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"),  # heads after tokens: q's token dim is not second to last
    ("bhid,bhjd->bhji", "bhji,bhjd->bhid"),  # scores keyed [j, i]: the softmax runs over the queries
    ("bhid,bhjd->bhij", "bhij,bhid->bhjd"),  # the context contracts the queries
])
def test_einsums_that_are_not_attention_are_not_sites(equations):
    scores_eq, context_eq = equations

    def fn(q, k, v):
        return torch.einsum(context_eq, torch.einsum(scores_eq, q, k).softmax(-1), v)

    q, k, v = (torch.randn(B, N, H, D) for _ in range(3)) if "q" in scores_eq else qkv()
    gm, _ = traced(fn, q, k, v)
    assert find_attention_sites(gm.graph) == [] and sdpa_from_hand_written(gm) is gm
