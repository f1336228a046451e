"""The roofline bound of one decoding step, dense or sparse: one formula for every benchmark.

    bound = max(bytes moved / bandwidth, FLOPs / peak)

counted per forward call of a pre-norm transformer (attention + gated FFN + lm_head) from its shape. A layer
whose rows are recomputed for a fraction ``f`` of the sequence runs its k/v projections, FFN and exact attention
on ``f * N`` rows; the rows a step queries (all of them, or with query pruning the ones queried) run the output
projection (DESIGN.md step 5: o_proj for all rows, unless ``output_projection="salient"``) and, in paper mode,
the q projection and every key's scores; everything full-width (residual adds, norms, the merges of fresh and
cached rows) still touches all ``N`` rows. Bytes count the weights once per step, the activations each matmul
reads and writes, the K/V of all keys, and for sparse steps the cache traffic: reading the context and FFN-output
caches for the cosine test and the merge, writing the recomputed rows back. The lm_head reads and writes logits
of the recomputed rows, and a sparse step merges them into the logits cache (all rows). Machine numbers are
measured, not taken from a datasheet: :func:`measure_machine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_kv: int  # n_kv_heads * head_dim
    d_ffn: int
    n_layers: int
    vocab_size: int
    ffn_matrices: int = 3  # SwiGLU: gate, up, down
    experts: int = 1  # an MoE: this many FFNs of d_ffn (and a router), each row through top_k of them
    top_k: int = 1

    @classmethod
    def of(cls, cfg) -> "Shape":
        moe = cfg.ffn == "moe"  # SwiGLU experts
        return cls(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ffn, cfg.n_layers, cfg.vocab_size,
                   2 if cfg.ffn == "gelu" else 3, cfg.n_experts if moe else 1, cfg.moe_top_k if moe else 1)


@dataclass(frozen=True)
class Machine:
    name: str
    bandwidth: float  # bytes / s
    peak_flops: float  # FLOP / s at the benchmark's dtype

    def best(self, other: "Machine") -> "Machine":
        """The higher bandwidth and peak of two measurements of one machine (a shared machine's slow phase lowers
        a measurement; it never raises one)."""
        return Machine(self.name, max(self.bandwidth, other.bandwidth), max(self.peak_flops, other.peak_flops))


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    def bound_seconds(self, machine: Machine) -> float:
        return max(self.bytes / machine.bandwidth, self.flops / machine.peak_flops)


def step_cost(shape: Shape, batch: int, n: int, fractions: Optional[Sequence[float]], elem_bytes: int,
              lm_head_fraction: Optional[float] = None, queried: float = 1.0, mode: str = "exact",
              output_projection: str = "dense") -> StepCost:
    """FLOPs and bytes of one step; ``fractions`` per layer (None: a dense step). For a sparse step: ``queried``,
    the share of rows it queries (below 1 with query pruning); ``mode`` and ``output_projection``, dyllm's options
    of those names, which say which projections and scores run on every queried row."""
    sparse = fractions is not None
    fractions = list(fractions) if sparse else [1.0] * shape.n_layers
    d, kv, f, e = shape.d_model, shape.d_kv, shape.d_ffn, elem_bytes
    attention_weights, ffn_weights = d * (2 * d + 2 * kv), shape.ffn_matrices * d * f
    router = d * shape.experts if shape.experts > 1 else 0
    flops = 0.0
    moved = 0.0
    for frac in fractions:
        rows = batch * frac * n
        asked = max(rows, batch * queried * n) if sparse else rows  # the queried rows (a salient row is one)
        q_rows = asked if mode == "paper" else rows
        o_rows = asked if output_projection == "dense" else rows
        routed = rows * shape.top_k  # rows through an FFN: with an MoE, each through top_k experts
        # projections (q, o: d x d each; k, v: d x kv), router and FFNs; scores and values
        flops += 2 * ((q_rows + o_rows) * d * d + rows * (2 * d * kv + router)) + 2 * routed * ffn_weights
        flops += 2 * (q_rows + rows) * n * d
        # weights: every expert a routed row reaches (at most all of them)
        moved += (attention_weights + router + min(shape.experts, max(routed, 1)) * ffn_weights) * e
        # matmul inputs and outputs: x and q/k/v, the context and o, the FFN (its hidden tensor twice)
        moved += e * (rows * (d + 2 * kv) + q_rows * d + o_rows * 2 * d) + routed * e * ((d + 2 * f) + (f + d))
        moved += batch * n * 2 * kv * e  # every key and value
        moved += batch * n * d * e * 4  # full-width residual adds and norms
        if sparse:
            moved += batch * n * d * e * 4  # read context + FFN caches, merge them into the residual
            moved += rows * e * (2 * kv + 2 * d)  # write back K, V, context and FFN rows
    head = batch * n * (fractions[-1] if lm_head_fraction is None else lm_head_fraction)
    flops += 2 * head * d * shape.vocab_size
    moved += shape.vocab_size * d * e + head * shape.vocab_size * 4
    if sparse:
        moved += 2 * batch * n * shape.vocab_size * 4  # merge into the fp32 logits cache
    return StepCost(flops, moved)


def cache_bytes(shape: Shape, n_heads: int, n: int, mode: str, elem_bytes: int, batch: int = 1,
                projection_cache: bool = False) -> int:
    """Bytes of dyllm's caches for ``batch`` sequences of ``n`` tokens: per layer the keys and values (kv heads
    only), the attention context and the FFN output, in exact mode also the queries and each row's softmax max and
    denominator (fp32 per head), with ``projection_cache`` (query pruning, ``output_projection="salient"``) the
    attention output projection; and the logits, in the model's dtype."""
    d, kv = shape.d_model, shape.d_kv
    per_row = (2 * kv + 2 * d + (d if mode == "exact" else 0) + (d if projection_cache else 0)) * elem_bytes
    per_row += 2 * n_heads * 4 if mode == "exact" else 0
    return batch * n * (shape.n_layers * per_row + shape.vocab_size * elem_bytes)


def attention_cost(mode: str, batch: int, heads: int, kv_heads: int, n: int, d: int, changed: int, recomputed: int,
                   elem_bytes: int) -> StepCost:
    """FLOPs and bytes of one attention site's call at one step: ``dense`` (every row against every key),
    or ``dyllm::cached_attention`` in ``paper`` / ``exact`` mode with ``changed`` key columns and ``recomputed``
    query rows (per batch element). Bytes count q, the context read (cached) and written, the fp32 statistics,
    and the keys and values each mode reads: all of them once where any row attends to all keys (dense, paper's
    scores, exact's recomputed rows), the changed columns' new and old ones otherwise."""
    e = elem_bytes
    rows_bytes = batch * heads * n * d * e  # one q-like tensor
    kv_bytes = batch * kv_heads * n * d * e  # all keys (or all values)
    cols_bytes = batch * kv_heads * changed * d * e  # the changed columns of one of k, v, k_old, v_old
    if mode == "dense":
        return StepCost(4 * batch * heads * n * n * d, 2 * rows_bytes + 2 * kv_bytes)
    stats = batch * heads * n * 4 * (2 if mode == "paper" else 4)  # m, l written (exact: read too)
    moved = 3 * rows_bytes + stats  # q, c_old read, c written
    if mode == "paper":
        flops = 2 * batch * heads * n * n * d  # every row's scores
        flops += 2 * batch * heads * recomputed * n * d + 4 * batch * heads * n * changed * d  # P V, P[:, J] dV
        moved += kv_bytes + (kv_bytes if recomputed else 0) + 3 * cols_bytes
        return StepCost(flops, moved)
    flops = 8 * batch * heads * n * changed * d + 4 * batch * heads * recomputed * n * d
    moved += 4 * cols_bytes + (2 * kv_bytes if recomputed else 0)
    return StepCost(flops, moved)


def _time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(device: torch.device, dtype: torch.dtype) -> Machine:
    """Copy bandwidth (read + write of a large buffer) and matmul peak at ``dtype``, measured here."""
    big = 1 << (28 if device.type == "cuda" else 26)  # elements: 512 MiB / 128 MiB of bf16/fp32
    src = torch.empty(big, dtype=dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device)
    bandwidth = 2 * src.numel() * src.element_size() / seconds
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    peak = 2 * size ** 3 / _time(lambda: a @ b, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Machine(name, bandwidth, peak)
