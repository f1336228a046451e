"""``dyllm::cached_attention``: attention that reuses the previous step's context for non-salient rows.

Contract (shapes: B batch, H query heads, G kv heads with H % G == 0, N tokens, D head dim):

    cached_attention(q [B,H,N,D], k [B,G,N,D], v [B,G,N,D], k_old, v_old, c_old [B,H,N,D],
                     m_old [B,H,N], l_old [B,H,N], salient_in [B,N] bool, attn_mask, scale, mode,
                     recompute_share) -> (c [B,H,N,D], m [B,H,N], l [B,H,N])

``k, v`` are this step's keys/values (the caches after the salient rows were rewritten), ``k_old, v_old`` the
previous step's; they differ only on rows in ``salient_in``. ``c_old, m_old, l_old`` are the previous context and
the running softmax max / denominator of each row (fp32).

- rows in ``salient_in``: exact attention of their (new) query against ``k, v``.
- ``mode="paper"`` (DyLLM), other rows: ``c = c_old + softmax(q k^T) (v - v_old)``: the value change is
  propagated with the new attention weights; the re-weighting of unchanged values is ignored.
- ``mode="exact"``, other rows (whose query is unchanged): the running max, denominator and numerator are
  updated for the changed key columns only (old column mass removed, new added): equal to dense attention.
  Rows whose removed mass exceeds ``recompute_share`` of their denominator recompute exactly, since removing
  most of a sum cancels badly.

This file is the plain-torch reference: the CPU implementation and the oracle for the Triton kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

MODES = ("paper", "exact")


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


# exp of arguments below about -87 underflows into float32's subnormal range, which x86 vector exp handles on a
# slow path: measured 50x slower on the 2-core CI CPU, enough to triple a sparse step of a model with peaked
# attention. Terms below exp(-80) ~ 1.8e-35 of a row's largest term do not change an fp32 softmax, so scores are
# floored there first.
_EXP_FLOOR = -80.0


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """In place (``x`` is a temporary: no new [N, N] buffers, whose page faults cost as much as the math on
    CPU): ``exp`` of max-subtracted scores (all <= 0), floored off the subnormal slow path."""
    return x.clamp_min_(_EXP_FLOOR).exp_()


def _scores(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    s = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    return s


def cached_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_old: torch.Tensor,
    v_old: torch.Tensor,
    c_old: torch.Tensor,
    m_old: torch.Tensor,
    l_old: torch.Tensor,
    salient_in: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    mode: str,
    recompute_share: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads = q.shape[1]
    k, v, k_old, v_old = (_expand_kv(t, heads) for t in (k, v, k_old, v_old))
    if mode == "paper":
        s = _scores(q, k, attn_mask, scale)  # [B,H,N,N] fp32
        m = s.amax(dim=-1)
        p = _exp_(s.sub_(m[..., None]))
        l = p.sum(dim=-1)
        # V changed only on salient rows (union over the batch): P (V - V_old) needs those columns only, and
        # the exact context only the salient rows. Normalising after the products avoids an [N, N] pass.
        changed = salient_in.any(dim=0).nonzero().flatten()
        dv = (v.float() - v_old.float()).index_select(2, changed)
        c = c_old.float() + torch.matmul(p.index_select(3, changed), dv) / l[..., None]
        exact = torch.matmul(p.index_select(2, changed), v.float()) / l.index_select(2, changed)[..., None]
        keep_exact = salient_in.index_select(1, changed)[:, None, :, None]
        c[:, :, changed] = torch.where(keep_exact, exact, c.index_select(2, changed))
        return c.to(q.dtype).contiguous(), m.contiguous(), l.contiguous()
    c, m, l = c_old.float().clone(), m_old.float().clone(), l_old.float().clone()
    for b in range(q.shape[0]):
        _exact_update_one(b, q, k, v, k_old, v_old, attn_mask, scale, recompute_share, salient_in[b], c, m, l)
    return c.to(q.dtype).contiguous(), m, l


def _mask_rows(attn_mask: Optional[torch.Tensor], b: int, rows: torch.Tensor, cols: Optional[torch.Tensor]):
    """The [.., |rows|, |cols|] slice of a mask broadcastable to [B, H, N, N]."""
    if attn_mask is None:
        return None
    mask = attn_mask[b if attn_mask.shape[0] > 1 else 0]
    if mask.dim() == 2:
        mask = mask[None]
    mask = mask[:, rows] if mask.shape[-2] > 1 else mask
    return mask if cols is None else mask[..., cols]


def _exact_update_one(b, q, k, v, k_old, v_old, attn_mask, scale, recompute_share, salient, c, m, l) -> None:
    """Exact-mode update of batch element ``b`` in place: incremental for unchanged queries, exact otherwise."""
    n = q.shape[2]
    everyone = torch.arange(n, device=q.device)
    cols = salient.nonzero().flatten()
    use_exact = salient.clone()
    if 0 < cols.numel() < n:  # all rows salient: everything is recomputed below
        mask = _mask_rows(attn_mask, b, everyone, cols)
        s_new = _scores(q[b], k[b][:, cols], mask, scale)  # [H,N,|J|]
        s_old = _scores(q[b], k_old[b][:, cols], mask, scale)
        m0, l0 = m[b], l[b]
        m1 = torch.maximum(m0, s_new.amax(dim=-1))
        kept = l0 * torch.exp(m0 - m1)  # m0 <= m1: a rescale, no need of the floor
        e_old, e_new = _exp_(s_old.sub_(m1[..., None])), _exp_(s_new.sub_(m1[..., None]))
        removed = e_old.sum(dim=-1)
        l1 = kept - removed + e_new.sum(dim=-1)
        acc = (c[b] * kept[..., None] - torch.matmul(e_old, v_old[b][:, cols].float())
               + torch.matmul(e_new, v[b][:, cols].float()))
        c[b], m[b], l[b] = acc / l1[..., None], m1, l1
        # Removing most of a row's mass cancels badly: those rows (in any head) recompute exactly.
        unstable = (removed > recompute_share * kept) | ~torch.isfinite(c[b]).all(-1)
        use_exact |= unstable.any(dim=0)
    rows = use_exact.nonzero().flatten()
    if rows.numel():
        s = _scores(q[b][:, rows], k[b], _mask_rows(attn_mask, b, rows, None), scale)  # [H,|E|,N]
        m_rows = s.amax(dim=-1)
        p = _exp_(s.sub_(m_rows[..., None]))
        l_rows = p.sum(dim=-1)
        c[b][:, rows] = torch.matmul(p, v[b].float()) / l_rows[..., None]
        m[b][:, rows], l[b][:, rows] = m_rows, l_rows


# The reference is the op's implementation on every device until a kernel is registered (kernels/).
cached_attention = torch.library.custom_op("dyllm::cached_attention", mutates_args=())(cached_attention_reference)


@cached_attention.register_fake
def _(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale, mode, recompute_share):
    stats = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _register_cuda_kernels() -> None:
    """On a CUDA machine with Triton, the kernels become the op's CUDA implementation (kernels/)."""
    if not torch.cuda.is_available():
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from .. import kernels  # noqa: F401  (registers on import)


_register_cuda_kernels()
