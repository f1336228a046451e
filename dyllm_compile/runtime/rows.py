"""Row selection and scatter, traced into the sparse variant as plain torch code.

The row set of a gated region is the union over the batch of its salient rows, picked either by top-K with a static
capacity K (capacity buckets: no data-dependent shapes, no host sync) or exactly, by ``nonzero`` (an unbacked row
count: one variant for every count, no padding up to a bucket). Gathering one index set for the whole batch lets
inputs without a batch dim (RoPE tables) be gathered the same way. Rows computed for one batch element but salient
only in another keep their cached value, so the result equals the per-element algorithm exactly.

With capacity buckets, a region can instead gather each batch element's own rows (``*_per_element``: top-K per
element, index [B, K]; per-position tables as [B, 1, ..., K, ...]): the union of independent salient sets grows
quickly with the batch (eight elements with 10% of rows each: about 57% of the rows), each element's set does not.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

from ..policies import cosine_below


def _first_rows(flags: torch.Tensor, capacity: int) -> torch.Tensor:
    """The ``capacity`` positions along the last dim of ``flags`` [..., N], sorted: the flagged ones first (score
    > N), then the others, earlier rows before later ones: a fixed order."""
    n = flags.shape[-1]
    position = torch.arange(n, device=flags.device)
    score = flags.to(torch.int64) * (2 * n) - position
    return torch.topk(score, capacity, dim=-1, sorted=False).indices.sort(dim=-1).values


def select_rows(salient: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``salient [B, N]`` -> (indices [K] sorted, valid [B, K], number of union rows as a 0-d tensor)."""
    union = salient.any(dim=0)
    index = _first_rows(union, capacity)
    return index, salient.index_select(1, index), union.sum()


def select_rows_per_element(salient: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``salient [B, N]`` -> (indices [B, K], each element's sorted, valid [B, K], the most salient rows of any
    element as a 0-d tensor): each element's own salient rows first, then its other rows, in a fixed order."""
    index = _first_rows(salient, capacity)
    return index, salient.gather(1, index), salient.sum(dim=1).max()


def _per_row(flags: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """``flags [B, R]`` viewed to broadcast over a rank-``ndim`` tensor whose batch is dim 0 and rows ``axis``."""
    shape = [1] * ndim
    shape[0], shape[axis] = flags.shape
    return flags.view(shape)


def _along(index: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """``index [B, K]`` broadcast to ``x``'s shape with ``axis`` of size K, as ``gather`` and ``scatter`` take it."""
    size = list(x.shape)
    size[axis] = index.shape[1]
    return _per_row(index, x.dim(), axis).expand(size)


def gather_rows_per_element(x: torch.Tensor, index: torch.Tensor, axis: int, rank: Optional[int] = None
                            ) -> torch.Tensor:
    """Rows ``index [B, K]`` of each batch element of ``x`` along ``axis``: ``x`` batch first (a batch of one is
    broadcast), or with ``rank`` a per-position table (token axis first, no batch dim), whose rows come back as
    [B, 1, ..., K, ...] of that rank, to broadcast as the table did against rank-``rank`` tensors."""
    if rank is not None:
        picked = x.index_select(0, index.flatten())
        return picked.view(index.shape[0], *[1] * (rank - x.dim() - 1), index.shape[1], *x.shape[1:])
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    return x.gather(axis, _along(index, x, axis))


def scatter_rows_per_element(cache: torch.Tensor, fresh: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                             axis: int, in_place: bool = False) -> torch.Tensor:
    """Out-of-place ``cache`` with each element's rows ``index [B, K]`` (along ``axis``, distinct within an
    element) replaced by ``fresh`` where ``valid [B, K]``; ``in_place`` writes into ``cache`` instead (a temporary
    of eager code: traced code stays functional)."""
    at = _along(index, cache, axis)
    chosen = torch.where(_per_row(valid, cache.dim(), axis), fresh.to(cache.dtype), cache.gather(axis, at))
    return cache.scatter_(axis, at, chosen) if in_place else cache.scatter(axis, at, chosen)


#: Rows appended to an unbacked selection's gather: its size is then provably not 0 or 1, so lowerings that
#: specialise on a size of one need no data-dependent guard (without them Inductor 2.13 fails at batch > 1 on
#: Eq(u, 1) in bmm's layout choice).
UNBACKED_PAD = 2


def select_rows_unbacked(salient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``salient [B, N]`` -> (gather index [G], position [N], number of union rows U as a 0-d tensor).

    The gather index lists the U union rows in order, then UNBACKED_PAD copies of row N - 1 (computed, never
    read back). Its length G = U + UNBACKED_PAD is one data-dependent size of its own (``nonzero`` over the union
    with the padding appended), not an expression ``u + 2``: Inductor's index simplification over a region's
    flattened batch x rows then meets ``x // G`` and ``x % G``, which it folds, instead of ``x // (u + 2)``, which
    it sends to sympy for seconds per kernel at batch > 1. ``position[n]`` is where row n sits in the gather
    (meaningful for union rows: :func:`place_rows` reads it only where the row is salient)."""
    union = salient.any(dim=0)
    n = union.shape[0]
    gather = torch.cat([union, union.new_ones(UNBACKED_PAD)]).nonzero().squeeze(1)
    torch._check(gather.shape[0] >= UNBACKED_PAD)
    position = (union.cumsum(0) - 1).clamp(min=0)
    return gather.clamp(max=n - 1), position, union.sum()


# From torch 2.13 on, Inductor orders a pinned layout's symbolic strides with its ShapeEnv; the lowering of 2.11 and
# 2.12 compares them as bare expressions and fails on the contiguous strides of an unbacked row count
# ("cannot determine truth value of Relational: 16*Max(1, u2) < 16"), so there nothing is pinned: the same values,
# the merge possibly reading the product where it is made (slower at batch 8, below). (Not only where the strides
# are symbolic: code Dynamo traces, as benchmarks/bench_rows.py's, cannot tell them apart.)
_PINS_ROWS = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"


def place_rows(cache: torch.Tensor, fresh: torch.Tensor, position: torch.Tensor, salient: torch.Tensor,
               axis: int) -> torch.Tensor:
    """Out-of-place ``cache`` whose rows salient in ``salient [B, N]`` (along ``axis``) come from ``fresh``, the
    rows of an unbacked gather, at ``position``: one pass over the cache, no scatter.

    ``fresh`` is pinned row-major as a buffer of its own (Inductor's ``inductor_force_stride_order``, a no-op in
    eager code on a contiguous tensor): Inductor would otherwise inline the op that made it into this gather, which
    runs for every cache row. A weight-first product's row-major copy (passes/linear_order.py) was inlined so, and
    the merge read the product feature-major, one element at a time: at batch 8 on the reference model (2-core
    CPU, every gated product weight first) a decode took 9.7-10.8 s, 7.9-8.6 s with the pin; at batch 1 the same
    with and without (docs/rewrite.md, "Linear layers on gathered rows")."""
    fresh = fresh.contiguous()  # (a view into a larger buffer, as a fused projection's part, pinned as its copy)
    if _PINS_ROWS:
        fresh = torch.ops.prims.inductor_force_stride_order(fresh, fresh.stride())
    return merge_rows(salient, gather_rows(fresh, position, axis).to(cache.dtype), cache, axis)


def unfold_rows(x: torch.Tensor, salient: torch.Tensor, trail: int) -> torch.Tensor:
    """``x [B * R * trail, ...]``, the batch folded into its rows ahead of the tokens (``trail`` rows a token after
    them), as ``[B, R, ...]`` (``trail`` 1) or ``[B, R, trail, ...]``: rows along dim 1, gathered and scattered as
    a batch-first value's are. ``salient [B, N]`` gives B; R is N for a cache, a selection's count for fresh rows."""
    return x.unflatten(0, (salient.shape[0], -1) if trail == 1 else (salient.shape[0], -1, trail))


def fold_rows(x: torch.Tensor, trail: int) -> torch.Tensor:
    """The inverse of :func:`unfold_rows`."""
    return x.flatten(0, 1 if trail == 1 else 2)


def gather_rows(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    return x.index_select(axis, index)


def scatter_rows(cache: torch.Tensor, fresh: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                 axis: int) -> torch.Tensor:
    """Out-of-place ``cache`` with its rows ``index`` (along ``axis``) replaced by ``fresh`` where valid.

    ``valid [B, K]`` applies per batch element (dim 0 of ``cache``)."""
    chosen = torch.where(_per_row(valid, cache.dim(), axis), fresh.to(cache.dtype), cache.index_select(axis, index))
    return cache.index_copy(axis, index, chosen)


def merge_rows(salient: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-row choice between a fresh and a cached value: ``salient [B, N]`` along ``axis``."""
    return torch.where(_per_row(salient, fresh.dim(), axis), fresh, cached.to(fresh.dtype))


def moved_rows(salient: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor, axis: Optional[int],
               threshold: float, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``salient`` plus the rows a mixing point (passes/mixing_points.py) moved since its cached value: along
    ``axis``, those whose cosine with their cached row falls below ``threshold`` (an attention context's test; for
    a mask, or one number a row, those that changed at all); without an axis, every row when any element changed.
    Every row at threshold 1. ``keys`` ([B, N]): for an attention mask ([B, ..., N], keys last) that the op gets
    with its last value (``mask_old``), the changed keys: their columns are not compared (the op removes their old
    scores under the last value), nor, where the mask has a row per query, the rows of the salient queries (the op
    recomputes them)."""
    if threshold >= 1.0:
        return torch.ones_like(salient)
    if keys is not None:
        b, n = keys.shape
        kept = keys.view(b, *(1,) * (fresh.dim() - 2), n)
        if fresh.dim() >= 3 and fresh.shape[-2] == n:
            kept = kept | keys.view(b, *(1,) * (fresh.dim() - 3), n, 1)
        fresh = torch.where(kept, cached, fresh)
    if axis is None:
        return salient | (fresh != cached).any()
    if not fresh.is_floating_point() or fresh.dim() == 2:  # a mask, or one number a row: any change
        changed = fresh != cached
        return salient | (changed if changed.dim() == 2 else changed.movedim(axis, 1).flatten(2).any(-1))
    return salient | cosine_below(fresh, cached, axis, threshold)


def all_rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.ones(x.shape[0], x.shape[axis], dtype=torch.bool, device=x.device)


def zero_stats(q: torch.Tensor) -> torch.Tensor:
    """Softmax statistics placeholder for paper mode, which does not read them."""
    return q.new_zeros(q.shape[:-1], dtype=torch.float32)


def salient_fraction(salient: torch.Tensor) -> torch.Tensor:
    return salient.float().mean(dim=1)


def no_fractions(salient: torch.Tensor) -> torch.Tensor:
    """The per-site fractions [0, B] of a graph without attention."""
    return salient.new_zeros((0, salient.shape[0]), dtype=torch.float32)


def stack_counts(*counts: torch.Tensor) -> torch.Tensor:
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.int64)


def prefix_operands(k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor,
                    prefix_k: torch.Tensor, prefix_v: torch.Tensor, salient: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], prefix_first: bool):
    """The cached-attention op's operands for a site whose keys extend its N own rows by a prefix of P rows
    (passes/attention_sites.py): keys and values with the own rows first, then the prefix (attention does not
    depend on the order of its keys), so the query rows are the keys' positions 0..N-1 (the op's ``queried``);
    the changed-key flags [B, N + P] (the prefix never changed within a sequence: it is computed from inputs
    the runtime compares whole each call, and any change starts a new sequence); the mask's columns in the
    same order. Returns (k, v, k_old, v_old, flags, mask, positions)."""
    n, p = k.shape[2], prefix_k.shape[2]

    def keys(own: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return torch.cat([own, prefix.to(own.dtype)], dim=2)

    flags = torch.cat([salient, salient.new_zeros(salient.shape[0], p)], dim=1)
    if attn_mask is not None and prefix_first and attn_mask.shape[-1] != 1:
        attn_mask = torch.cat([attn_mask[..., p:], attn_mask[..., :p]], dim=-1)
    positions = torch.arange(n, device=salient.device)
    return (keys(k, prefix_k), keys(v, prefix_v), keys(k_old, prefix_k), keys(v_old, prefix_v), flags, attn_mask,
            positions)
