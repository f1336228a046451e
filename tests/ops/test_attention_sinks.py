"""``dyllm::sdpa_with_sinks`` against attention with the sink's column written out, and the identity the rewrite
uses: the sink-free context and its softmax statistics (``dyllm::cached_attention``'s ``c, m, l``) gated by
``sigmoid(m + log l - s)`` give the same function."""

import pytest
import torch

from dyllm_compile.ops.attention_sinks import sdpa_with_sinks, with_sinks
from dyllm_compile.ops.cached_attention import cached_attention_reference

B, H, N, D = 3, 5, 7, 12  # odd sizes: nothing lines up by accident
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def written_out(q, k, v, sinks, mask, scale):
    """What the models write: the sink's column concatenated, the softmax over both, the column dropped (fp32)."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    column = sinks.float().expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


def operands(dtype, sinks_shape, mask_kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3))
    sinks = (2 * torch.randn(sinks_shape, generator=gen)).to(dtype)
    keep = torch.rand(B, 1, N, N, generator=gen) > 0.3
    keep[..., 0] = True  # every row attends to something
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, -1e4).to(dtype)}[mask_kind]
    return q, k, v, sinks, mask


SINKS = {"per_head": (1, H, 1, 1), "per_row": (B, H, N, 1)}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("sinks_shape", list(SINKS.values()), ids=list(SINKS))
def test_op_matches_the_sink_column_written_out(dtype, mask_kind, sinks_shape):
    q, k, v, sinks, mask = operands(dtype, sinks_shape, mask_kind)
    got = sdpa_with_sinks(q, k, v, sinks=sinks, attn_mask=mask, scale=0.3)
    assert got.dtype == dtype and got.shape == (B, H, N, D)
    torch.testing.assert_close(got, written_out(q, k, v, sinks, mask, 0.3), **TOLERANCE[dtype])


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("sinks_shape", list(SINKS.values()), ids=list(SINKS))
def test_gated_sink_free_statistics_equal_the_op(mode, mask_kind, sinks_shape):
    """The cached attention's dense result (every row salient) and its statistics, gated, are the op's result."""
    q, k, v, sinks, mask = operands(torch.float32, sinks_shape, mask_kind, seed=1)
    zero = torch.zeros(B, H, N)
    c, m, l = cached_attention_reference(q, k, v, k, v, q, zero, zero, torch.ones(B, N, dtype=torch.bool), mask,
                                         0.3, mode, 0.9)
    torch.testing.assert_close(with_sinks(c, m, l, sinks), sdpa_with_sinks(q, k, v, sinks=sinks, attn_mask=mask,
                                                                          scale=0.3), rtol=1e-5, atol=1e-5)


def test_a_sink_far_above_the_scores_takes_the_mass():
    """A sink logit far above every score leaves the context near zero; far below, the context is SDPA's."""
    q, k, v, _, _ = operands(torch.float32, (1, H, 1, 1), "none")
    high, low = torch.full((1, H, 1, 1), 60.0), torch.full((1, H, 1, 1), -60.0)
    assert sdpa_with_sinks(q, k, v, sinks=high, scale=0.3).abs().max() < 1e-12
    torch.testing.assert_close(sdpa_with_sinks(q, k, v, sinks=low, scale=0.3),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
