"""``dyllm::sdpa_with_sinks``: scaled dot-product attention with an attention sink, one more logit per query row
that attends to nothing (GPT-OSS, DeepSeek-V4, Flint, HunYuan-V4, ...: a learned logit per head, or one projected
from each row).

    sdpa_with_sinks(q [B,H,R,D], k [B,H,N,D], v [B,H,N,D], *, sinks, attn_mask=None, scale=None)
        = softmax(cat([q k^T * scale + attn_mask, sinks], dim=-1))[..., :-1] @ v

``sinks`` is broadcastable to the scores' shape with a last dim of 1 ([B, H, R, 1]; a per-head sink is
[1, H, 1, 1]). The models write this by hand; :mod:`~dyllm_compile.passes.hand_written_attention` replaces what
they write by this op, so that the analysis and the rewrite see one attention node with named operands, as for
SDPA. Its implementation is CompositeImplicitAutograd: the lowering decomposes it into ATen ops (which Inductor
fuses), it has no kernel of its own.

The rewrite does not pass the sink to ``dyllm::cached_attention``: with ``m, l`` the row max and denominator of the
scores without the sink (which the op returns), the sink scales the sink-free context ``c`` of each row and head by
``l / (l + exp(s - m)) = sigmoid(m + log l - s)`` (:func:`sink_gate`). So the caches hold the sink-free context
and the cached attention's updates stay as they are; the gate is applied to every row after it.
"""

from __future__ import annotations

from typing import Optional

import torch

_LIBRARY = torch.library.Library("dyllm", "FRAGMENT")
_LIBRARY.define("sdpa_with_sinks(Tensor query, Tensor key, Tensor value, *, Tensor sinks, Tensor? attn_mask=None, "
                "float? scale=None) -> Tensor")


def sdpa_with_sinks_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, sinks: torch.Tensor,
                              attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None
                              ) -> torch.Tensor:
    """The op's definition in plain torch: the scores in the inputs' dtype, the softmax in fp32 (as the models
    that write it by hand compute it, and SDPA does)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    column = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    return torch.matmul(probs.to(value.dtype), value)


_LIBRARY.impl("sdpa_with_sinks", sdpa_with_sinks_reference, "CompositeImplicitAutograd")
sdpa_with_sinks = torch.ops.dyllm.sdpa_with_sinks.default


def sink_gate(m: torch.Tensor, l: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """[B, H, R] fp32: the share of each row's softmax mass that is not the sink's, from the sink-free scores' row
    max ``m`` and denominator ``l`` (``dyllm::cached_attention``'s statistics) and ``sinks`` [.., R or 1, 1]."""
    return torch.sigmoid(m + torch.log(l) - sinks[..., 0].float())


def with_sinks(context: torch.Tensor, m: torch.Tensor, l: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``context`` [B, H, R, D] (sink-free attention) as the attention with ``sinks`` computes it."""
    return (context.float() * sink_gate(m, l, sinks)[..., None]).to(context.dtype)
