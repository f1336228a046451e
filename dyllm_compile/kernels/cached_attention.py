"""Triton kernel for ``dyllm::cached_attention`` in paper mode: one pass per row block, no host sync.

Same contract as :func:`dyllm_compile.ops.cached_attention.cached_attention_reference` (``mode="paper"``):

- every row: the softmax statistics ``m, l`` of ``q k^T`` over all keys (first loop over key blocks);
- rows salient in their batch element: exact attention ``softmax(q k^T) v``. Its accumulation shares the first
  loop and runs only in row blocks that hold a salient row (a per-program branch, not per element);
- the other rows: ``c_old + softmax(q k^T)[:, J] (v - v_old)[J]`` over the changed columns ``J`` only (the
  union over the batch of ``salient_in``), compacted on the device with ``nonzero_static`` (fixed size, no
  sync) and walked by a second loop that stops at their count.

Computation is fp32 whatever the input dtype; GQA maps query head ``h`` to kv head ``h // (H // G)``; masks are
bool (True = attend) or additive, broadcastable to ``[B, H, N, N]`` (broadcast dims get stride 0).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _paper_kernel(
    q_ptr, k_ptr, v_ptr, vo_ptr, co_ptr, sal_ptr, cols_ptr, count_ptr, mask_ptr,
    c_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sm_b, sm_h, sm_q, sm_k,
    H, N, GROUP, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GROUP
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < N
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    salient = tl.load(sal_ptr + b * N + rows, mask=row_ok, other=0).to(tl.int1)
    any_salient = tl.max(salient.to(tl.int32), axis=0) > 0
    kv_base = b * sk_b + g * sk_h
    mask_base = b * sm_b + h * sm_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.load(k_ptr + kv_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        s = _apply_mask(s, mask_ptr, mask_base, rows, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if any_salient:
            v = tl.load(v_ptr + kv_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    delta = tl.zeros([BLOCK_M, D], tl.float32)
    count = tl.load(count_ptr)
    for start in range(0, count, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        cols = tl.load(cols_ptr + offs, mask=offs < count, other=0)
        col_ok = offs < count
        k = tl.load(k_ptr + kv_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        vo = tl.load(vo_ptr + kv_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        s = _apply_mask(s, mask_ptr, mask_base, rows, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND)
        p = tl.where(col_ok[None, :], tl.exp(s - m_safe[:, None]), 0.0)
        delta += tl.dot(p, v.to(tl.float32) - vo.to(tl.float32), input_precision="ieee")

    c_old = tl.load(co_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
    denom = tl.where(l_i > 0, l_i, 1.0)  # rows past N (masked out of the store) have no mass
    out = tl.where(salient[:, None], acc, c_old * l_i[:, None] + delta) / denom[:, None]
    tl.store(c_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :], out.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    stat = (b * H + h) * N + rows
    tl.store(m_ptr + stat, m_i, mask=row_ok)
    tl.store(l_ptr + stat, l_i, mask=row_ok)


@triton.jit
def _apply_mask(s, mask_ptr, base, rows, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND: tl.constexpr):
    if MASK_KIND == 0:
        return s
    ok = row_ok[:, None] & col_ok[None, :]
    mask = tl.load(mask_ptr + base + rows[:, None] * sm_q + cols[None, :] * sm_k, mask=ok, other=0)
    if MASK_KIND == 1:
        return tl.where(mask != 0, s, float("-inf"))
    return s + mask.to(tl.float32)


def _mask_args(attn_mask: Optional[torch.Tensor], q: torch.Tensor):
    """(tensor, kind, strides b/h/q/k) of a mask broadcast to [B, H, N, N] without copying."""
    if attn_mask is None:
        return q, MASK_NONE, (0, 0, 0, 0)
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], q.shape[2])
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
    if kind == MASK_BOOL:
        mask = mask.view(torch.uint8)
    return mask, kind, tuple(mask.stride())


def cached_attention_paper(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, c_old: torch.Tensor,
    salient_in: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
    block_m: int = 16, block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper-mode cached attention with the Triton kernel; (c [B,H,N,D] in q's dtype, m, l [B,H,N] fp32)."""
    b, h, n, d = q.shape
    if not _tileable(d):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim >= 16, got {d}")
    q, k, v, v_old, c_old = (t.contiguous() for t in (q, k, v, v_old, c_old))
    salient = salient_in.contiguous().to(torch.uint8)
    changed = salient_in.any(dim=0)
    cols = torch.nonzero_static(changed, size=n, fill_value=0).flatten().to(torch.int32)
    count = changed.sum().to(torch.int32).reshape(1)
    mask, kind, mstrides = _mask_args(attn_mask, q)
    c = torch.empty_like(q)
    m = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    grid = (b * h, triton.cdiv(n, block_m))
    _paper_kernel[grid](
        q, k, v, v_old, c_old, salient, cols, count, mask, c, m, l,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *mstrides,
        h, n, h // k.shape[1], scale,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, MASK_KIND=kind,
    )
    return c, m, l


def _tileable(head_dim: int) -> bool:
    """tl.dot tiles need a power-of-two head dim of at least 16."""
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def supports(q: torch.Tensor, mode: str) -> bool:
    return mode == "paper" and _tileable(q.shape[-1])


def cuda_implementation(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale, mode,
                        recompute_share, queried=None):
    """The op's CUDA implementation: the kernel where it applies, the reference otherwise (exact mode, and query
    pruning's row subsets, which the kernel's square row/column tiling does not take yet)."""
    from ..ops.cached_attention import cached_attention_reference

    if supports(q, mode) and queried is None:
        return cached_attention_paper(q, k, v, v_old, c_old, salient_in, attn_mask, scale)
    return cached_attention_reference(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale,
                                      mode, recompute_share, queried)
