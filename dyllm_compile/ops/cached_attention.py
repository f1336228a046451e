"""``dyllm::cached_attention``: attention that reuses the previous step's context for non-salient rows.

Contract (shapes: B batch, H query heads, G kv heads with H % G == 0, N tokens, D head dim):

    cached_attention(q [B,H,R,D], k [B,G,N,D], v [B,G,N,D], k_old, v_old, c_old [B,H,R,D],
                     m_old [B,H,R], l_old [B,H,R], salient_in [B,N] bool, attn_mask, scale, mode,
                     recompute_share, queried=None, softcap=0.0, mask_old=None) -> (c [B,H,R,D], m [B,H,R], l [B,H,R])

``k, v`` are this step's keys/values (the caches after the salient rows were rewritten), ``k_old, v_old`` the
previous step's; they differ only on rows in ``salient_in``. ``c_old, m_old, l_old`` are the previous context and
the running softmax max / denominator of each row (fp32). The query rows are all N rows (R = N), or with
``queried`` (int64 [R], query pruning) the rows it lists: q, c_old, m_old, l_old and the results hold those rows
only, ``attn_mask`` still covers all N, and a query row is salient when ``salient_in`` marks its position.

- rows in ``salient_in``: exact attention of their (new) query against ``k, v``.
- ``mode="paper"`` (DyLLM), other rows: ``c = c_old + softmax(q k^T) (v - v_old)``: the value change is
  propagated with the new attention weights; the re-weighting of unchanged values is ignored.
- ``mode="exact"``, other rows (whose query is unchanged): the running max, denominator and numerator are
  updated for the changed key columns only (old column mass removed, new added): equal to dense attention.
  Rows whose removed mass exceeds ``recompute_share`` of their denominator recompute exactly, since removing
  most of a sum cancels badly. Where recomputing every row is cheaper than the update (``RECOMPUTE_WORK``, small
  problems on CPU; ``UPDATE_COST``, a batch element with many changed columns) the op does that: the same dense
  attention, with the exact row max and denominator (the statistics are a running max and the denominator under
  it: two routes may give different pairs of the same normalizer, ``m + log l``).
- a query row whose every key is masked: context 0, statistics (-inf, 0), in both modes, as SDPA returns it.
- ``softcap`` > 0: every score (after ``scale``, before the mask) is soft-capped, ``softcap * tanh(s / softcap)``
  (Gemma-2's attention), in both modes and in the statistics; 0 leaves the scores as they are.
- ``mask_old`` (exact mode): the mask of the previous step, where the mask changes with the keys (one computed from
  the tokens): the changed keys' old scores are removed under it, their new ones added under ``attn_mask``. Without
  it both are taken under ``attn_mask``, right only where the changed keys' mask columns did not change.

This file is the plain-torch reference: the CPU implementation and the oracle for the Triton kernels, which are
the CUDA implementation (``kernels/``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.types import Number

from ..runtime.rows import gather_rows_per_element, scatter_rows_per_element, select_rows_per_element

MODES = ("paper", "exact")


def repeat_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys or values ``[..., G, N, D]`` of grouped-query attention repeated to ``heads`` query heads: each kv head
    serves ``heads / G`` consecutive query heads (SDPA's ``enable_gqa``); ``x`` itself where ``G == heads``."""
    groups = x.shape[-3]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=-3)


# exp of arguments below about -87 underflows into float32's subnormal range, which x86 vector exp handles on a
# slow path: measured 50x slower on the 2-core CI CPU, enough to triple a sparse step of a model with peaked
# attention. Terms below exp(-80) ~ 1.8e-35 of a row's largest term do not change an fp32 softmax, so scores are
# floored there first.
_EXP_FLOOR = -80.0


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """In place (``x`` is a temporary: no new [N, N] buffers, whose page faults cost as much as the math on
    CPU): ``exp`` of max-subtracted scores (all <= 0), floored off the subnormal slow path."""
    return x.clamp_min_(_EXP_FLOOR).exp_()


def _scores(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
            softcap: float = 0.0) -> torch.Tensor:
    # The scale goes on the operand with fewer rows: one pass over a few gathered rows, not over every query (a
    # choice made without a guard where the traced row count is data-dependent).
    if statically_known_true(q.shape[-2] < k.shape[-2]):
        s = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    elif statically_known_true(k.shape[-2] < q.shape[-2]):
        # Every row against a few keys (exact mode's changed columns): the product as [keys, rows], transposed
        # back (a view), since BLAS is slow at a product a few columns wide: on the 2-core CPU 256 rows against 6
        # keys (8 heads, D 64) took 95 us as [rows, keys] and 43 us as [keys, rows]; from 32 keys on, alike.
        s = torch.matmul(k.float() * scale, q.float().transpose(-1, -2)).transpose(-1, -2)
    else:
        s = torch.matmul(q.float(), (k.float() * scale).transpose(-1, -2))
    if isinstance(softcap, torch.SymFloat) or softcap:  # (a cap read from an input: no guard on its value)
        s = torch.tanh(s / softcap) * softcap
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    return s


def _exp_scores(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
                in_place: bool = True, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp(scores - m)`` [B, H, R, N] with the row max ``m`` and the row sum ``l`` (fp32). ``in_place=False``
    for code that is traced into a graph rather than run: no mutation for the tracer to functionalize."""
    s = _scores(q, k, attn_mask, scale, softcap)
    m = s.amax(dim=-1)
    if in_place:
        p = _exp_(s.sub_(m[..., None]))
    else:
        p = (s - m[..., None]).clamp_min(_EXP_FLOOR).exp()
    return p, m, p.sum(dim=-1)


def _attention_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                          scale: float, in_place: bool = True, softcap: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense attention of every query row with its exact row max and denominator: the op's result when it
    recomputes every row."""
    p, m, l = _exp_scores(q, k, attn_mask, scale, in_place, softcap)
    c = torch.matmul(p, v.float())
    c = c.div_(l[..., None]) if in_place else c / l[..., None]
    return _no_key_rows(c, m, l, q.dtype, in_place)


def _no_key_rows(c: torch.Tensor, m: torch.Tensor, l: torch.Tensor, dtype: torch.dtype, in_place: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The results in ``dtype``, rows whose every key is masked (row max -inf) set to context 0 and denominator 0:
    what SDPA returns for them (and the Triton kernels), where the arithmetic above gives NaN (``-inf - -inf``).
    Such rows occur where a mask hides padded queries from every key (Dream's generation builds its padded batches'
    mask as ``key_mask[:, None, :, None] & key_mask[:, None, None, :]``); the NaN would reach every row of the next
    layer through the padded rows' values (a masked column's weight is 0, and 0 * NaN is NaN). The statistics stay
    (-inf, 0), so an incremental update of such a row finds no mass and recomputes it, as the kernels do."""
    empty = m.isneginf()
    if in_place:
        if not bool(empty.any()):  # the common case: no pass over the context (on CPU, 10% of a call)
            return c.to(dtype), m, l
        return c.masked_fill_(empty[..., None], 0.0).to(dtype), m, l.masked_fill_(empty, 0.0)
    return c.masked_fill(empty[..., None], 0.0).to(dtype), m, l.masked_fill(empty, 0.0)


#: Exact mode recomputes every row when each of the two dense products (scores, weighted values) takes at most
#: this many multiply-adds (B * H * R * N * D): about 45 tensor ops of the incremental update cost more than that
#: on CPU. Measured on the 2-core CI CPU: the in-repo model's shapes (B 1-8, H 6, N 48, D 32: up to 3.5M) run
#: 3-4x faster recomputed; at B 1, H 8, N 128, D 64 (8.4M) recomputing is still faster, at N 256 (34M) the
#: incremental update is, by 1.7x. Both give dense attention: exact mode's contract.
RECOMPUTE_WORK = 1 << 24


def _recomputes(q: torch.Tensor, k: torch.Tensor):
    """Whether ``q`` against the keys ``k`` is a small problem (``RECOMPUTE_WORK``), where exact mode recomputes
    every row and the graphs trace either mode's attention as plain ops: a bool, or a SymBool when traced shapes
    are symbolic."""
    return q.numel() * k.shape[2] <= RECOMPUTE_WORK


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
    scale: Number,
    mode: str,
    recompute_share: float,
    queried: Optional[torch.Tensor] = None,
    softcap: Number = 0.0,
    mask_old: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # scale and softcap are Scalars in the schema, not floats: a graph compiled with dynamic shapes reads them from
    # an input (``.item()`` of a float attribute Dynamo made dynamic), a SymFloat that a float argument would guard
    heads = q.shape[1]
    k, v, k_old, v_old = (repeat_kv_heads(t, heads) for t in (k, v, k_old, v_old))
    salient_q = salient_in  # [B, R]: which query rows are salient
    if queried is not None:
        salient_q = salient_in.index_select(1, queried)
        attn_mask, mask_old = _mask_slice(attn_mask, -2, queried), _mask_slice(mask_old, -2, queried)
    if mode == "paper":
        p, m, l = _exp_scores(q, k, attn_mask, scale, softcap=softcap)  # [B,H,R,N] fp32
        # V changed only on salient rows (union over the batch): P (V - V_old) needs those columns only, and
        # the exact context only the salient rows. Normalising the few columns' weights instead of P avoids an
        # [R, N] pass, and the batched matmul adds into c_old in one pass over the context.
        changed = salient_in.any(dim=0).nonzero().flatten()
        dv = v.index_select(2, changed).float() - v_old.index_select(2, changed).float()
        c = _add_products(c_old.float(), p.index_select(3, changed).div_(l[..., None]), dv)
        rows, pick = _element_rows(salient_q)
        _put(c, rows, torch.matmul(_take(p, rows, 2), v.float()) / _take(l, rows, 2)[..., None], pick)
        c, m, l = _no_key_rows(c, m, l, q.dtype)
        return c.contiguous(), m.contiguous(), l.contiguous()
    if _recomputes(q, k):
        return _attention_with_stats(q, k, v, attn_mask, scale, softcap=softcap)
    return _exact(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, salient_q, attn_mask, scale,
                  recompute_share, softcap, mask_old)


def _add_products(c: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, in_place: bool = False
                  ) -> torch.Tensor:
    """``c + weights @ values`` for [B, H, R, D] ``c``, [B, H, R, J] ``weights``, [B, H, J, D] ``values``: one
    batched matmul that adds into ``c`` as it writes (one pass over the context, not three); ``in_place`` when
    ``c`` is a temporary of the caller's: the products are added into it, not into a copy."""
    b, h, r, d = c.shape
    operands = (c.reshape(b * h, r, d), weights.reshape(b * h, r, -1), values.reshape(b * h, -1, d))
    out = operands[0].baddbmm_(*operands[1:]) if in_place else torch.baddbmm(*operands)
    return out.view(b, h, r, d)


def _element_rows(flags: torch.Tensor, count: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each batch element's own flagged positions (``flags [B, N]``; ``count``, the most any element has, if
    known), padded with its other positions: index [B, K] (distinct within an element) and which entries are
    flagged [B, K]. In a batch of one: its flagged positions [K] and None (every entry is; the index's rank tells
    :func:`_take`, :func:`_element_mask` and :func:`_put` which, and a batch of one takes the cheaper ops). Each
    element gets its own rows, not the batch's union: at batch 8 with three salient rows an element (8 heads, N
    256, D 64) the union made every element's update and recompute about 8x wider (7.2 ms a call against 3.7 ms
    per element on the 2-core CPU)."""
    if flags.shape[0] == 1:
        return flags[0].nonzero().flatten(), None
    index, flagged, _ = select_rows_per_element(flags, int(flags.sum(dim=1).max()) if count is None else count)
    return index, flagged


def _take(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """``x``'s rows ``index`` (:func:`_element_rows`) along ``axis``."""
    return x.index_select(axis, index) if index.dim() == 1 else gather_rows_per_element(x, index, axis)


def _element_mask(attn_mask: Optional[torch.Tensor], dim: int, index: torch.Tensor) -> Optional[torch.Tensor]:
    """``attn_mask`` (broadcastable to [B, H, R, N]) restricted to the rows ``index`` (:func:`_element_rows`)
    along ``dim`` (-2 rows, -1 columns)."""
    if attn_mask is None or attn_mask.shape[dim] == 1 or index.dim() == 1:
        return _mask_slice(attn_mask, dim, index)
    mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    return gather_rows_per_element(mask, index, 4 + dim)


def _put(target: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor, flagged: Optional[torch.Tensor]) -> None:
    """In place: ``target``'s rows ``index`` (:func:`_element_rows`, along dim 2) set to ``fresh`` where
    ``flagged`` (None with a 1-d index: everywhere)."""
    if index.dim() == 1:
        target.index_copy_(2, index, fresh)
    else:
        scatter_rows_per_element(target, fresh, index, flagged, 2, in_place=True)


def _mask_slice(attn_mask: Optional[torch.Tensor], dim: int, index: torch.Tensor) -> Optional[torch.Tensor]:
    """``attn_mask`` (broadcastable to [B, H, N, N]) restricted to ``index`` along ``dim`` (-2 rows, -1 columns)."""
    if attn_mask is None or attn_mask.shape[dim] == 1:
        return attn_mask
    return attn_mask.index_select(dim, index)


def _changed_columns(attn_mask: Optional[torch.Tensor], mask_old: Optional[torch.Tensor], cols: torch.Tensor
                     ) -> Optional[torch.Tensor]:
    """The mask of the changed key columns ``cols`` (:func:`_element_rows`) twice, new scores' then old ones':
    ``attn_mask``'s both times, or with ``mask_old`` the old scores' from it."""
    if mask_old is None:
        return _element_mask(attn_mask, -1, torch.cat([cols, cols], dim=-1))
    new, old = (m if m.shape[-1] != 1 else m.expand(*m.shape[:-1], cols.shape[-1])
                for m in (_element_mask(attn_mask, -1, cols), _element_mask(mask_old, -1, cols)))
    return torch.cat(torch.broadcast_tensors(new, old), dim=-1)


#: Exact mode also recomputes every row of a batch element (R query rows against N keys: 4 R N D multiply-adds
#: per head) where that costs no more than this body's incremental route: the update of every row over the |J|
#: changed columns' new and old keys (8 R |J| D, UPDATE_COST per row and column in units of a recomputed row's per
#: key) plus the recompute of its S salient rows (4 S N D). Measured on the 2-core CPU (batch 1, 8 heads, N 512,
#: D 40): the update route at 20% of the columns changed 5.4 ms against 6.4 ms recomputed, at 33% 7.5 against 5.8,
#: at 88% 22.6 against 6.5. (The Triton kernel's update skips the salient rows' blocks, so its break-even is at half
#: the columns: ``kernels/exact_attention.py``.) 0 recomputes every row only where every row is salient.
UPDATE_COST = 2


def _recomputed_elements(salient_in: torch.Tensor, salient_q: torch.Tensor) -> tuple[list[bool], list[int]]:
    """Per batch element, whether exact mode recomputes its every query row (``UPDATE_COST``), and its number of
    changed key columns."""
    n, r = salient_in.shape[1], salient_q.shape[1]
    counts = torch.stack([salient_in.sum(dim=1), salient_q.sum(dim=1)], dim=1).tolist()  # one sync
    return [r * n > 0 and UPDATE_COST * j * r + s * n >= r * n for j, s in counts], [j for j, _ in counts]


def _exact(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, salient_q, attn_mask, scale, recompute_share,
           softcap, mask_old=None):
    """Exact mode for the whole batch: incremental for unchanged queries, exact attention for the others (every row
    of an element where that costs less: ``UPDATE_COST``).

    Each batch element updates over its own changed columns and recomputes its own rows (:func:`_element_rows`),
    padded to the most any element has (padding masked out). ``salient_q`` marks the salient query rows,
    ``attn_mask`` holds the query rows only.

    On CPU this body is the op's implementation and each tensor op costs a dispatch (several microseconds, as
    much as its arithmetic at these sizes): in a batch of one the padding masks are skipped (there is none), and
    results are written in place into the fresh tensors that hold them."""
    everything, changed = _recomputed_elements(salient_in, salient_q)
    if all(everything):  # every row salient, or enough of the columns changed in each element
        return _attention_with_stats(q, k, v, attn_mask, scale, softcap=softcap)
    c, m, l = c_old.float(), m_old.float(), l_old.float()
    if any(everything):  # those elements recompute every row: no update of theirs to run
        recomputed = torch.tensor(everything, device=salient_q.device)[:, None]
        salient_q, salient_in = salient_q | recomputed, salient_in & ~recomputed
    use_exact = salient_q
    j = max(count for count, every in zip(changed, everything) if not every)
    if j:
        cols, own = _element_rows(salient_in, j)  # each element's changed columns
        # The new and old keys of the changed columns in one product: scores [B, H, N, 2J], new ones first.
        keys = torch.cat([_take(k, cols, 2), _take(k_old, cols, 2)], dim=2)
        s = _scores(q, keys, _changed_columns(attn_mask, mask_old, cols), scale, softcap)
        own = None if own is None else own[:, None, None, :]  # a padding column is no column
        s_new = s[..., :j] if own is None else s[..., :j].masked_fill(~own, float("-inf"))
        m1 = torch.maximum(m, s_new.amax(dim=-1))
        kept = (m - m1).exp_().mul_(l)  # m <= m1: a rescale, no need of the floor
        e = _exp_(s.sub_(m1[..., None]))
        if own is not None:
            e.mul_(torch.cat([own, own], dim=-1))
        e_new, e_old = e[..., :j], e[..., j:]
        removed = e_old.sum(dim=-1)
        l = (kept - removed).add_(e_new.sum(dim=-1))
        # c = (c_old kept - e_old V_old + e_new V) / l, in one pass over the context: the columns' weights are
        # divided by l (they are few), c_old scaled by kept / l, and the products added into it.
        e_old.neg_()
        weights = e.div_(l[..., None])
        values = torch.cat([_take(v, cols, 2), _take(v_old, cols, 2)], dim=2).float()
        c, m = _add_products(c * (kept / l)[..., None], weights, values, in_place=True), m1
        # Removing most of a row's mass cancels badly: those rows (in any head) recompute exactly, as do rows
        # whose result is not finite (a sum over the head dim is not finite when any element is not).
        unstable = (removed > recompute_share * kept).logical_or_(c.sum(dim=-1).isfinite().logical_not_())
        use_exact = salient_q | unstable.any(dim=1)
    else:
        c, m, l = c.clone(), m.clone(), l.clone()
    rows, pick = _element_rows(use_exact)  # each element's rows to recompute
    if rows.numel():
        p, m_rows, l_rows = _exp_scores(_take(q, rows, 2), k, _element_mask(attn_mask, -2, rows), scale,
                                        softcap=softcap)
        c_rows = torch.matmul(p, v.float()).div_(l_rows[..., None])
        for target, fresh in ((c, c_rows), (m, m_rows), (l, l_rows)):
            _put(target, rows, fresh, pick)
    c, m, l = _no_key_rows(c, m, l, q.dtype)
    return c.contiguous(), m.contiguous(), l.contiguous()


# The reference is the op's implementation on every device but CUDA, where kernels/ registers the Triton kernels.
cached_attention = torch.library.custom_op("dyllm::cached_attention", mutates_args=())(cached_attention_reference)


@cached_attention.register_fake
def _(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale, mode, recompute_share,
      queried=None, softcap=0.0, mask_old=None):
    stats = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def cached_attention_or_dense(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale, mode,
                              recompute_share, queried=None, softcap=0.0, mask_old=None):
    """What the rewritten graphs call at each cached site (same contract as the op): the op, or where the shapes
    being traced prove the problem small (``RECOMPUTE_WORK``), the mode's attention as plain torch ops, which the
    lowering compiles with the rest of the graph (Inductor fuses it into its kernels) instead of calling the op:
    on CPU the op's dispatch and eager body cost about 0.25 ms a call at the in-repo model's shapes. Exact mode
    there is dense attention (it recomputes every row); paper mode is :func:`_paper_dense`. A data-dependent row
    count (query pruning's queried rows) is bounded by the sequence; where the bound cannot be proved (a symbolic
    sequence length), the op stays and decides at run time."""
    if statically_known_true(_recomputes(q, k)):
        heads = q.shape[1]
        k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
        attn_mask = attn_mask if queried is None else _mask_slice(attn_mask, -2, queried)
        # Out of place: this code is traced, and the tracer would have to functionalize every in-place op.
        if mode == "exact":
            return _attention_with_stats(q, k, v, attn_mask, scale, in_place=False, softcap=softcap)
        salient_q = salient_in if queried is None else salient_in.index_select(1, queried)
        return _paper_dense(q, k, v, repeat_kv_heads(v_old, heads), c_old, salient_q, attn_mask, scale, softcap)
    return torch.ops.dyllm.cached_attention.default(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in,
                                                    attn_mask, scale, mode, recompute_share, queried, softcap,
                                                    mask_old)


def _paper_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, c_old: torch.Tensor,
                 salient_q: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float, softcap: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper mode with static shapes, for tracing: every row's weights ``p`` times ``[v, v - v_old]`` in one
    product, salient rows taking the first half (exact attention) and the others ``c_old`` plus the second (the
    value change). ``v - v_old`` is zero outside the changed columns (the op's contract), so the product over every
    column is the reference's sum over the changed ones, without a data-dependent gather. Its cost is the scores
    and a product of width 2D for every row, what recomputing costs: only for small problems."""
    p, m, l = _exp_scores(q, k, attn_mask, scale, in_place=False, softcap=softcap)
    d = v.shape[-1]
    both = torch.matmul(p, torch.cat([v.float(), v.float() - v_old.float()], dim=-1)) / l[..., None]
    c = torch.where(salient_q[:, None, :, None], both[..., :d], c_old.float() + both[..., d:])
    return _no_key_rows(c, m, l, q.dtype, in_place=False)


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
    # Registered here, not by the kernels package on its import: this runs while the ops package is still
    # initializing, where `ops.cached_attention` is still this module, not the op.
    from ..kernels import cuda_implementation

    cached_attention.register_kernel("cuda")(cuda_implementation)


_register_cuda_kernels()
