"""Triton kernels for ``dyllm::cached_attention`` in exact mode: two launches, no host sync.

Same contract as :func:`dyllm_compile.ops.cached_attention.cached_attention_reference` (``mode="exact"``):

1. ``_update_kernel``, every query row: the running max ``m``, denominator ``l`` and context are updated for the
   batch element's changed key columns ``J`` only (its rows in ``salient_in``, compacted on the device): each
   column's old score's mass leaves the sums and its new one enters, O(R |J| D) per head. A row block whose rows
   are all salient skips the loop (they are recomputed anyway). The kernel flags rows whose removed mass exceeds
   ``recompute_share`` of the kept mass, or whose result is not finite (removing most of a sum cancels badly),
   and every row where more than half the columns changed: there recomputing all rows (4 N^2 D multiply-adds)
   costs less than the update and the salient rows' recompute (8 (N - |J|) |J| D + 4 |J| N D).
2. The rows to recompute (salient, or flagged in any head, as the reference flags them; the reference's own rule
   for recomputing every row is its CPU cost's, ``UPDATE_COST``) are compacted per batch
   element on the device (``tiles.compact``: one launch, fixed sizes, no sync), and ``_recompute_kernel`` runs
   exact attention for those rows only, in programs over the compacted list; programs past an element's count
   do nothing. The work is O(|recomputed| N D), not a whole row block per salient row.

Both kernels multiply 16-bit inputs on the tensor cores with fp32 accumulation (``tiles.dot``); sums, statistics
and the cached context's rescaling stay fp32. The update's scores are exact products (16-bit q and k), so only
its value products round the probabilities to 16 bits, an error below the one of storing the context in the
input dtype, which every step does anyway. (The update first ran in fp32 FMA arithmetic; on an H200 that made it
the op's cost: 0.70 ms at LLaDA-8B's attention shapes, batch 1, 1% of columns changed, 8x dense SDPA.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .tiles import (TUNED_ON, UNSPECIALIZED, apply_mask, compact, dot, head_tile, positions, prepare_launch,
                    program_tile, scores, softmax_pass, tile_candidates)


# Many rows per program: the update's work per row is small (the changed columns only)
@triton.autotune(configs=tile_candidates((16, 32, 4), (64, 32, 4), (128, 32, 8)), key=TUNED_ON)
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _update_kernel(
    q_ptr, k_ptr, v_ptr, ko_ptr, vo_ptr, co_ptr, mo_ptr, lo_ptr, sal_ptr, cols_ptr, count_ptr, mask_ptr, pos_ptr,
    c_ptr, m_ptr, l_ptr, unstable_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sm_b, sm_h, sm_q, sm_k, B, H, R, N, GROUP, scale, softcap, share,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_POS: tl.constexpr,
    TENSOR_CORES: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b, h, rows, row_ok, pos, q_at, q_ok, kv_base, mask_base = program_tile(
        pos_ptr, sq_b, sq_h, sq_n, sk_b, sk_h, sm_b, sm_h, H, R, GROUP, D, BLOCK_D, BLOCK_M, HAS_POS)
    stat = (b * H + h) * R + rows
    m_run = tl.load(mo_ptr + stat, mask=row_ok, other=0.0)
    kept = tl.load(lo_ptr + stat, mask=row_ok, other=0.0)
    salient = tl.load(sal_ptr + b * N + pos, mask=row_ok, other=1) != 0

    # Sums relative to the running max m_run, rescaled when it grows: the old mass kept, the removed and added
    # column masses, and the numerator change sum(e_new v) - sum(e_old v_old).
    removed = tl.zeros([BLOCK_M], tl.float32)
    added = tl.zeros([BLOCK_M], tl.float32)
    delta = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(count_ptr + b)
    recompute_all = count * 2 > N
    if (tl.min(salient.to(tl.int32), axis=0) == 0) & ~recompute_all:
        q = tl.load(q_ptr + q_at, mask=q_ok, other=0.0)
        for start in range(0, count, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            live = offs < count
            cols = tl.load(cols_ptr + b * N + offs, mask=live, other=0)
            kv_at, kv_ok = head_tile(kv_base, cols, live, sk_n, D, BLOCK_D)
            k_new = tl.load(k_ptr + kv_at, mask=kv_ok, other=0.0)
            k_old = tl.load(ko_ptr + kv_at, mask=kv_ok, other=0.0)
            zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            bias = apply_mask(zero, mask_ptr, mask_base, pos, cols, row_ok, live, sm_q, sm_k, MASK_KIND)
            bias = tl.where(live[None, :], bias, float("-inf"))
            s_new = scores(q, k_new, scale, softcap, TENSOR_CORES, SOFTCAP) + bias
            s_old = scores(q, k_old, scale, softcap, TENSOR_CORES, SOFTCAP) + bias
            m_new = tl.maximum(m_run, tl.max(s_new, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_run - m_safe)
            e_new = tl.exp(s_new - m_safe[:, None])
            e_old = tl.exp(s_old - m_safe[:, None])
            kept *= alpha
            removed = removed * alpha + tl.sum(e_old, axis=1)
            added = added * alpha + tl.sum(e_new, axis=1)
            v_new = tl.load(v_ptr + kv_at, mask=kv_ok, other=0.0)
            v_old = tl.load(vo_ptr + kv_at, mask=kv_ok, other=0.0)
            delta = delta * alpha[:, None] + dot(e_new, v_new, TENSOR_CORES) - dot(e_old, v_old, TENSOR_CORES)
            m_run = m_new

    l = kept - removed + added
    # No mass left (a row whose statistics were never filled: zero caches at a sequence's first call, all rows
    # salient; or everything removed) is unstable, like a result that is not finite; rows past R have l = 0 too.
    has_mass = l > 0
    l_div = tl.where(has_mass, l, 1.0)
    c_old = tl.load(co_ptr + q_at, mask=q_ok, other=0.0).to(tl.float32)
    c = c_old * (kept / l_div)[:, None] + delta / l_div[:, None]
    total = tl.sum(c, axis=1)
    finite = (total == total) & (tl.abs(total) != float("inf"))
    unstable = (removed > share * kept) | ~finite | ~has_mass | recompute_all
    tl.store(c_ptr + q_at, c.to(c_ptr.dtype.element_ty), mask=q_ok)
    tl.store(m_ptr + stat, m_run, mask=row_ok)
    tl.store(l_ptr + stat, l, mask=row_ok)
    tl.store(unstable_ptr + stat, unstable.to(tl.uint8), mask=row_ok)  # salient rows are redone anyway


# Few rows per program (the compacted rows run out early) over many keys; and 64 x 32 in 4 warps, not a candidate
# when an H200 ran the whole exact op 1.2-1.4x faster with it than with the autotuner's pick (16 x 64) at batch 8,
# 5% and 20% changed (docs/benchmarks.md, "GPU")
@triton.autotune(configs=tile_candidates((16, 32, 4), (16, 64, 4), (64, 32, 4), (64, 64, 8)), key=TUNED_ON)
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _recompute_kernel(
    q_ptr, k_ptr, v_ptr, order_ptr, redo_count_ptr, mask_ptr, pos_ptr, c_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sm_b, sm_h, sm_q, sm_k, B, H, R, N, GROUP, scale, softcap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_POS: tl.constexpr, TENSOR_CORES: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # The program's row block indexes the batch element's compacted list of rows to recompute.
    b, h, slots, _, _, _, _, kv_base, mask_base = program_tile(
        pos_ptr, sq_b, sq_h, sq_n, sk_b, sk_h, sm_b, sm_h, H, R, GROUP, D, BLOCK_D, BLOCK_M, False)
    count = tl.load(redo_count_ptr + b)
    if tl.program_id(1) * BLOCK_M < count:
        row_ok = slots < count
        rows = tl.load(order_ptr + b * R + slots, mask=row_ok, other=0)
        pos = positions(pos_ptr, rows, row_ok, HAS_POS)
        q_at, q_ok = head_tile(b * sq_b + h * sq_h, rows, row_ok, sq_n, D, BLOCK_D)
        q = tl.load(q_ptr + q_at, mask=q_ok, other=0.0)
        m_i, l_i, acc = softmax_pass(q, k_ptr, v_ptr, kv_base, sk_n, N, mask_ptr, mask_base, pos, row_ok, sm_q,
                                     sm_k, scale, softcap, True, D, BLOCK_D, BLOCK_M, BLOCK_N, MASK_KIND,
                                     TENSOR_CORES, SOFTCAP)
        c = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(c_ptr + q_at, c.to(c_ptr.dtype.element_ty), mask=q_ok)
        stat = (b * H + h) * R + rows
        tl.store(m_ptr + stat, m_i, mask=row_ok)
        tl.store(l_ptr + stat, l_i, mask=row_ok)


def cached_attention_exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor,
    c_old: torch.Tensor, m_old: torch.Tensor, l_old: torch.Tensor, salient_in: torch.Tensor,
    attn_mask: Optional[torch.Tensor], scale: float, recompute_share: float,
    queried: Optional[torch.Tensor] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
    num_warps: int = 4, tensor_cores: Optional[bool] = None, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-mode cached attention with the Triton kernels; (c [B,H,R,D] in q's dtype, m, l [B,H,R] fp32). The
    tiles are the autotuners' unless ``block_m``, ``block_n`` (and ``num_warps``) fix them for both kernels."""
    q, k, v, k_old, v_old, c_old = (t.contiguous() for t in (q, k, v, k_old, v_old, c_old))
    m_old, l_old = (t.float().contiguous() for t in (m_old, l_old))
    launch = prepare_launch(q, k, salient_in, attn_mask, queried, block_m, block_n, num_warps, tensor_cores, softcap)
    unstable = torch.empty(q.shape[:-1], dtype=torch.uint8, device=q.device)  # the kernel writes every row
    launch.run(_update_kernel, q, k, v, k_old, v_old, c_old, m_old, l_old, *launch.row_args, *launch.outputs,
               unstable, *launch.sizes, scale, softcap, recompute_share)
    salient_q = launch.salient if queried is None else launch.salient.index_select(1, queried)
    # Rows to redo: salient, or unstable in any head (then recomputed in all, as the reference does)
    launch.run(_recompute_kernel, q, k, v, *compact(salient_q, unstable), launch.mask, launch.pos, *launch.outputs,
               *launch.sizes, scale, softcap)
    return launch.outputs
