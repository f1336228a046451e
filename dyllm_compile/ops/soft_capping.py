"""``dyllm::sdpa_softcap``: scaled dot-product attention with soft-capped scores (Gemma-2, VaultGemma).

    sdpa_softcap(q [B,H,R,D], k [B,G,N,D], v [B,G,N,D], *, softcap, attn_mask=None, scale=None)
        = softmax(softcap * tanh(q k^T * scale / softcap) + attn_mask) @ v      (k, v repeated to H heads)

SDPA has no soft-capping, so the models write it by hand (``c * tanh(scores / c)`` before the mask) or as a
flex_attention ``score_mod``; :mod:`~dyllm_compile.passes.hand_written_attention` and
:mod:`~dyllm_compile.passes.flex_attention` replace what they write by this op, so that the analysis and the rewrite
see one attention node with named operands, as for SDPA, and the rewrite passes ``softcap`` to
``dyllm::cached_attention``. Its implementation is CompositeImplicitAutograd: the lowering decomposes it into ATen
ops (which Inductor fuses), it has no kernel of its own.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cached_attention import repeat_kv_heads

_LIBRARY = torch.library.Library("dyllm", "FRAGMENT")
_LIBRARY.define("sdpa_softcap(Tensor query, Tensor key, Tensor value, *, Scalar softcap, Tensor? attn_mask=None, "
                "float? scale=None) -> Tensor")


def sdpa_softcap_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, softcap: float,
                           attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """The op's definition in plain torch: the scores and their cap in the inputs' dtype, the softmax in fp32 (as
    Gemma-2's eager attention computes them)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    key, value = repeat_kv_heads(key, query.shape[-3]), repeat_kv_heads(value, query.shape[-3])
    scores = torch.tanh(torch.matmul(query, key.transpose(-2, -1)) * (scale / softcap)) * softcap
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    # a row whose every key is masked: zeros, as SDPA and flex_attention return it (the softmax gives NaN there)
    probs = probs.masked_fill(scores.amax(dim=-1, keepdim=True).isneginf(), 0.0)
    return torch.matmul(probs.to(value.dtype), value)


_LIBRARY.impl("sdpa_softcap", sdpa_softcap_reference, "CompositeImplicitAutograd")
sdpa_softcap = torch.ops.dyllm.sdpa_softcap.default
