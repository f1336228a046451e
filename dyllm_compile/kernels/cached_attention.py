"""Triton kernel for ``dyllm::cached_attention`` in paper mode, and the op's CUDA implementation (both modes).

Same contract as :func:`dyllm_compile.ops.cached_attention.cached_attention_reference` (``mode="paper"``):

- every query row: the softmax statistics ``m, l`` of ``q k^T`` over all keys (first loop over key blocks);
- rows salient in their batch element: exact attention ``softmax(q k^T) v``. Its accumulation shares the first
  loop and runs only in row blocks that hold a salient row (a per-program branch, not per element);
- the other rows: ``c_old + softmax(q k^T)[:, J] (v - v_old)[J]`` over the batch element's changed columns
  ``J`` only (its rows in ``salient_in``), compacted on the device (fixed size, no sync) and walked by a second
  loop that stops at their count.

The query rows are every position, or query pruning's ``queried`` subset (read through their positions). All
products are as ``tiles.dot`` says (16-bit inputs on the tensor cores on CUDA); masks are bool (True = attend) or
additive, broadcastable to ``[B, H, N, N]``. Exact mode's kernels are in ``exact_attention.py``; shared
pieces in ``tiles.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .exact_attention import cached_attention_exact
from .tiles import (TUNED_ON, UNSPECIALIZED, apply_mask, dot, head_tile, prepare_launch, program_tile, scores,
                    softmax_pass, tile_candidates)


# Every row's full pass over the keys, as in flash attention, but with two [rows, D] fp32 accumulators (the exact
# context and the change over the changed columns): at 128 x 64 tiles on 8 warps they spill registers on sm_90
# (tests/kernels/test_kernels_compile_for_hopper.py), so at most 64 rows
@triton.autotune(configs=tile_candidates((16, 32, 4), (64, 32, 8), (64, 64, 8)), key=TUNED_ON)
@triton.jit(do_not_specialize=UNSPECIALIZED)
def _paper_kernel(
    q_ptr, k_ptr, v_ptr, vo_ptr, co_ptr, sal_ptr, cols_ptr, count_ptr, mask_ptr, pos_ptr, c_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sm_b, sm_h, sm_q, sm_k, B, H, R, N, GROUP, scale, softcap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_POS: tl.constexpr, TENSOR_CORES: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b, h, rows, row_ok, pos, q_at, q_ok, kv_base, mask_base = program_tile(
        pos_ptr, sq_b, sq_h, sq_n, sk_b, sk_h, sm_b, sm_h, H, R, GROUP, D, BLOCK_D, BLOCK_M, HAS_POS)
    q = tl.load(q_ptr + q_at, mask=q_ok, other=0.0)
    salient = tl.load(sal_ptr + b * N + pos, mask=row_ok, other=0).to(tl.int1)
    any_salient = tl.max(salient.to(tl.int32), axis=0) > 0

    m_i, l_i, acc = softmax_pass(q, k_ptr, v_ptr, kv_base, sk_n, N, mask_ptr, mask_base, pos, row_ok, sm_q, sm_k,
                                 scale, softcap, any_salient, D, BLOCK_D, BLOCK_M, BLOCK_N, MASK_KIND, TENSOR_CORES,
                                 SOFTCAP)

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    delta = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(count_ptr + b)
    for start in range(0, count, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        cols = tl.load(cols_ptr + b * N + offs, mask=offs < count, other=0)
        col_ok = offs < count
        kv_at, kv_ok = head_tile(kv_base, cols, col_ok, sk_n, D, BLOCK_D)
        k = tl.load(k_ptr + kv_at, mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + kv_at, mask=kv_ok, other=0.0)
        vo = tl.load(vo_ptr + kv_at, mask=kv_ok, other=0.0)
        s = scores(q, k, scale, softcap, TENSOR_CORES, SOFTCAP)
        s = apply_mask(s, mask_ptr, mask_base, pos, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND)
        p = tl.where(col_ok[None, :], tl.exp(s - m_safe[:, None]), 0.0)
        delta += dot(p, v, TENSOR_CORES) - dot(p, vo, TENSOR_CORES)

    c_old = tl.load(co_ptr + q_at, mask=q_ok, other=0.0).to(tl.float32)
    denom = tl.where(l_i > 0, l_i, 1.0)  # rows past R (masked out of the store) have no mass
    out = tl.where(salient[:, None], acc, c_old * l_i[:, None] + delta) / denom[:, None]
    tl.store(c_ptr + q_at, out.to(c_ptr.dtype.element_ty), mask=q_ok)
    stat = (b * H + h) * R + rows
    tl.store(m_ptr + stat, m_i, mask=row_ok)
    tl.store(l_ptr + stat, l_i, mask=row_ok)


def cached_attention_paper(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, c_old: torch.Tensor,
    salient_in: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float,
    queried: Optional[torch.Tensor] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
    num_warps: int = 4, tensor_cores: Optional[bool] = None, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper-mode cached attention with the Triton kernel; (c [B,H,R,D] in q's dtype, m, l [B,H,R] fp32). The tiles
    are the autotuner's unless ``block_m``, ``block_n`` (and ``num_warps``) fix them."""
    q, k, v, v_old, c_old = (t.contiguous() for t in (q, k, v, v_old, c_old))
    launch = prepare_launch(q, k, salient_in, attn_mask, queried, block_m, block_n, num_warps, tensor_cores, softcap)
    launch.run(_paper_kernel, q, k, v, v_old, c_old, *launch.row_args, *launch.outputs, *launch.sizes, scale,
               softcap)
    return launch.outputs


def cuda_implementation(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale, mode,
                        recompute_share, queried=None, softcap=0.0, mask_old=None, **tiling):
    """The op's CUDA implementation: the kernel of the mode. ``tiling`` (``block_m``, ``block_n``, ``num_warps``)
    is for benchmarks that time fixed tiles; the op leaves them to the kernels' autotuners. With ``mask_old`` (exact
    mode, a mask that changes with the keys) the plain-torch reference, on the GPU: the kernels read one mask."""
    if mode == "exact" and mask_old is not None:
        from ..ops.cached_attention import cached_attention_reference

        return cached_attention_reference(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale,
                                          mode, recompute_share, queried, softcap, mask_old)
    if mode == "paper":
        return cached_attention_paper(q, k, v, v_old, c_old, salient_in, attn_mask, scale, queried,
                                      softcap=softcap, **tiling)
    return cached_attention_exact(q, k, v, k_old, v_old, c_old, m_old, l_old, salient_in, attn_mask, scale,
                                  recompute_share, queried, softcap=softcap, **tiling)
