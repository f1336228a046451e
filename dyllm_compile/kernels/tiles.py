"""Pieces shared by the cached-attention kernels: query-row tiles, masks, products, one online-softmax pass, the
autotuning candidates, and the launch setup (per-element compaction of flagged rows, mask strides, results).

Layout conventions (both kernels): q-like tensors ``[B, H, R, D]`` (R query rows, contiguous), keys and values
``[B, G, N, D]`` (G kv heads; query head ``h`` reads kv head ``h // (H // G)``), statistics ``[B, H, R]`` fp32,
row flags ``[B, N]`` uint8. Tiles pad the head dim to ``BLOCK_D``, a power of two of at least 16 (what ``tl.dot``
takes), with the padding masked to zero: any head dim works. A query row ``r`` sits at sequence position
``pos[r]``: ``r`` itself, or with query pruning the entry of the queried-row index, which is where the mask and the
salient flags are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def positions(pos_ptr, rows, row_ok, HAS_POS: tl.constexpr):
    """Sequence positions of the query rows ``rows``."""
    if HAS_POS:
        return tl.load(pos_ptr + rows, mask=row_ok, other=0)
    return rows


@triton.jit
def head_tile(base, index, index_ok, stride, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of the ``[len(index), BLOCK_D]`` tile of rows ``index`` (row stride ``stride``) of one
    head's ``[*, D]`` matrix at ``base``."""
    dims = tl.arange(0, BLOCK_D)
    return base + index[:, None] * stride + dims[None, :], index_ok[:, None] & (dims < D)[None, :]


@triton.jit
def program_tile(pos_ptr, sq_b, sq_h, sq_n, sk_b, sk_h, sm_b, sm_h, H, R, GROUP, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_POS: tl.constexpr):
    """What a program over (batch x head, row block) works on: batch element, head, its rows and their validity
    and positions, the offsets and mask of its q-like tile, and the bases of its kv head and of its mask."""
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    pos = positions(pos_ptr, rows, row_ok, HAS_POS)
    q_at, q_ok = head_tile(b * sq_b + h * sq_h, rows, row_ok, sq_n, D, BLOCK_D)
    return b, h, rows, row_ok, pos, q_at, q_ok, b * sk_b + (h // GROUP) * sk_h, b * sm_b + h * sm_h


@triton.jit
def apply_mask(s, mask_ptr, base, pos, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND: tl.constexpr):
    """Scores ``s [rows, cols]`` with the attention mask applied (bool: False -> -inf; additive: added)."""
    if MASK_KIND == 0:
        return s
    ok = row_ok[:, None] & col_ok[None, :]
    mask = tl.load(mask_ptr + base + pos[:, None] * sm_q + cols[None, :] * sm_k, mask=ok, other=0)
    if MASK_KIND == 1:
        return tl.where(mask != 0, s, float("-inf"))
    return s + mask.to(tl.float32)


@triton.jit
def dot(a, b, TENSOR_CORES: tl.constexpr):
    """``a @ b`` accumulated in fp32. With ``TENSOR_CORES`` and a 16-bit ``b``: on the tensor cores, ``a`` rounded
    to ``b``'s type. For scores (16-bit q and k) that rounds nothing, and 16-bit products are exact in fp32, so
    only the order of the sums differs from the reference; for the value product the probabilities are rounded to
    16 bits, as flash attention does. Otherwise fp32 operands multiplied exactly (``ieee``, not tf32), as the
    reference does."""
    if TENSOR_CORES and b.dtype != tl.float32:
        return tl.dot(a.to(b.dtype), b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def scores(q, k, scale, softcap, TENSOR_CORES: tl.constexpr, SOFTCAP: tl.constexpr):
    """``q k^T * scale`` [rows, cols] in fp32; with ``SOFTCAP``, soft-capped: ``softcap * tanh(s / softcap)``."""
    s = dot(q, tl.trans(k), TENSOR_CORES) * scale
    if SOFTCAP:
        # tanh from exp (no tanh in every Triton version's tl): sign(x) (1 - e^-2|x|) / (1 + e^-2|x|), no overflow
        x = s / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        s = softcap * tl.where(x < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    return s


@triton.jit
def softmax_pass(q, k_ptr, v_ptr, kv_base, sk_n, N, mask_ptr, mask_base, pos, row_ok, sm_q, sm_k, scale, softcap,
                 with_values, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, TENSOR_CORES: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """Attention of the query tile ``q [BLOCK_M, BLOCK_D]`` (in the inputs' dtype) over all N keys, one
    online-softmax loop: the row max ``m``, denominator ``l`` (relative to ``m``) and, when ``with_values`` (a
    per-program scalar), the unnormalised numerator ``acc = sum_j exp(s_j - m) v_j``."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kv_at, kv_ok = head_tile(kv_base, cols, col_ok, sk_n, D, BLOCK_D)
        k = tl.load(k_ptr + kv_at, mask=kv_ok, other=0.0)
        s = scores(q, k, scale, softcap, TENSOR_CORES, SOFTCAP)
        s = apply_mask(s, mask_ptr, mask_base, pos, cols, row_ok, col_ok, sm_q, sm_k, MASK_KIND)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with every key masked so far
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if with_values:
            v = tl.load(v_ptr + kv_at, mask=kv_ok, other=0.0)
            acc = acc * alpha[:, None] + dot(p, v, TENSOR_CORES)
        m_i = m_new
    return m_i, l_i, acc


def _mask_args(attn_mask: Optional[torch.Tensor], like: torch.Tensor, heads: int, n: int):
    """(tensor, kind, strides b/h/q/k) of a mask broadcast to ``[B, heads, rows, n]`` without copying (broadcast
    dims get stride 0); ``like`` stands in for the pointer when there is no mask. Its rows are read at the query
    rows' positions: every key position, or (keys beyond a site's own rows) the own rows only."""
    if attn_mask is None:
        return like, MASK_NONE, (0, 0, 0, 0)
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(like.shape[0], heads, n if mask.shape[-2] == 1 else mask.shape[-2], n)
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
    if kind == MASK_BOOL:
        mask = mask.view(torch.uint8)
    return mask, kind, tuple(mask.stride())


def tile_candidates(*candidates: tuple[int, int, int]) -> list[triton.Config]:
    """A kernel's autotuning candidates, (rows, keys) per program and warps. Which is best is the device's call:
    on an H200 the first kernels' 16 x 32 tiles were too little work per program (docs/rewrite.md). Under the
    interpreter, which has no device to time them on, only the first."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        candidates = candidates[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in candidates]


# The autotuners' key: batch size, heads, query rows and keys. The kernels take the batch size only for this (their
# grid's first dimension is batch x heads): the best tiles depend on how many programs fill the device.
TUNED_ON = ["B", "H", "R", "N"]
# Arguments the kernels never read: no compiled variant per value (Triton specializes integers by divisibility)
UNSPECIALIZED = ["B"]


@dataclass
class Launch:
    """What a cached-attention kernel launch takes besides its mode's own tensors: the salient flags (uint8), each
    batch element's changed columns and their count, mask and query positions (``row_args``, in the kernels'
    order), ``outputs`` (c, m, l), ``sizes`` (strides of q-like tensors, keys and the mask; B, H, R, N, query heads
    per kv head), ``meta`` (the constexprs other than the tiles), ``programs`` (batch x heads, query rows) and
    ``tiles`` (``BLOCK_M``, ``BLOCK_N``, ``num_warps`` the caller fixed; None: the autotuner's). ``TENSOR_CORES``:
    products of 16-bit inputs on the tensor cores (``dot``); the Triton interpreter's 16-bit dots are wrong for
    bf16, so by default only on CUDA."""

    salient: torch.Tensor
    cols: torch.Tensor
    count: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    sizes: tuple
    meta: dict
    programs: tuple[int, int]
    tiles: Optional[dict]

    @property
    def row_args(self) -> tuple:
        return self.salient, self.cols, self.count, self.mask, self.pos

    def run(self, kernel: triton.runtime.Autotuner, *args: Any) -> None:
        """Launches the autotuned ``kernel`` on ``args`` and the constexprs, one program per (batch x head, block
        of rows): at the tiles the caller fixed, else at the autotuner's choice for these sizes."""
        heads, rows = self.programs
        if self.tiles is None:
            kernel[lambda tile: (heads, triton.cdiv(rows, tile["BLOCK_M"]))](*args, **self.meta)
        else:
            kernel.fn[(heads, triton.cdiv(rows, self.tiles["BLOCK_M"]))](*args, **self.meta, **self.tiles)


@triton.jit
def _compact_kernel(flags_ptr, any_ptr, order_ptr, count_ptr, N, H, BLOCK_N: tl.constexpr, HAS_ANY: tl.constexpr):
    """Program ``b``: the positions ``i`` where ``flags[b, i]`` (or, with ``HAS_ANY``, ``any[b, h, i]`` for some
    ``h``) is set, in order, to ``order[b, :count]``, and ``count[b]``: a running prefix sum over blocks of N."""
    b = tl.program_id(0)
    total = tl.full([], 0, tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        ok = offs < N
        hit = tl.load(flags_ptr + b * N + offs, mask=ok, other=0) != 0
        if HAS_ANY:
            for h in range(0, H):
                hit = hit | (tl.load(any_ptr + (b * H + h) * N + offs, mask=ok, other=0) != 0)
        ones = hit.to(tl.int32)
        tl.store(order_ptr + b * N + total + tl.cumsum(ones, axis=0) - ones, offs, mask=hit)
        total += tl.sum(ones, axis=0)
    tl.store(count_ptr + b, total)


def as_bytes(flags: torch.Tensor) -> torch.Tensor:
    """Flags as contiguous uint8 (a bool tensor is reinterpreted, not copied)."""
    flags = flags.contiguous()
    return flags.view(torch.uint8) if flags.dtype == torch.bool else flags.to(torch.uint8)


def compact(flags: torch.Tensor, any_of: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags [B, N]``, or of ``flags | any_of.any(dim=1)`` (``any_of [B, H, N]``), the positions of
    its true entries in order, int32 [B, N], and how many there are, int32 [B]. Entries past the count are left
    unwritten: the kernels loop to the count. One launch, fixed shapes, no host sync (it replaced a stable sort
    and its conversions: five launches, the host's cost of a call at small batches)."""
    b, n = flags.shape
    flags = as_bytes(flags)
    order = torch.empty(b, n, dtype=torch.int32, device=flags.device)
    count = torch.empty(b, dtype=torch.int32, device=flags.device)
    heads = 1 if any_of is None else any_of.shape[1]
    _compact_kernel[(b,)](flags, flags if any_of is None else as_bytes(any_of), order, count, n, heads,
                          BLOCK_N=min(1024, max(16, triton.next_power_of_2(n))), HAS_ANY=any_of is not None)
    return order, count


def prepare_launch(q: torch.Tensor, k: torch.Tensor, salient_in: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   queried: Optional[torch.Tensor], block_m: Optional[int] = None, block_n: Optional[int] = None,
                   num_warps: int = 4, tensor_cores: Optional[bool] = None, softcap: float = 0.0) -> Launch:
    """Compacts each batch element's changed key columns (its salient rows, whose keys and values are new) on the
    device, broadcasts the mask and allocates the results (``softcap``: whether the kernels soft-cap the scores, a
    compiled variant of its own). ``q`` and ``k`` must be contiguous. ``block_m`` and
    ``block_n`` (with ``num_warps``) fix the tiles, for benchmarks; by default the kernels' autotuners pick them."""
    if (block_m is None) != (block_n is None):
        raise ValueError(f"block_m and block_n go together (got {block_m}, {block_n}): both fix the tiles, neither "
                         "leaves them to the autotuner")
    b, h, r, d = q.shape
    n = k.shape[2]
    salient = as_bytes(salient_in)
    cols, count = compact(salient)
    mask, kind, mask_strides = _mask_args(attn_mask, q, h, n)
    pos = cols if queried is None else queried.to(torch.int32).contiguous()  # cols: any pointer, never read
    m = torch.empty(b, h, r, dtype=torch.float32, device=q.device)
    return Launch(
        salient=salient, cols=cols, count=count, mask=mask, pos=pos,
        outputs=(torch.empty_like(q), m, torch.empty_like(m)),
        sizes=(q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *mask_strides,
               b, h, r, n, h // k.shape[1]),
        meta=dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), MASK_KIND=kind, HAS_POS=queried is not None,
                  TENSOR_CORES=q.is_cuda if tensor_cores is None else tensor_cores, SOFTCAP=bool(softcap)),
        programs=(b * h, r),
        tiles=None if block_m is None else dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps),
    )
