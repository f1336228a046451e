"""Operand order of the linear layers that gated regions run on gathered rows (option ``linear_order``).

A region re-emitted on its salient rows multiplies a few rows by each weight: ``linear(x [..., U, K], W [N, K])``,
U often a handful. A BLAS library picks its kernel from the operand shapes, and some pick a poor one for few rows:
on a 2-core AMD EPYC VM, MKL's sgemm (torch 2.13) streamed a 1-3 MB weight at about 5 GB/s for 2-4 rows, against
about 15 GB/s for the same product with the operands swapped (``W @ x^T``: the rows as the narrow right-hand
operand) and 30-40 GB/s for a plain read of the weight; from 6-8 rows on the two orders were about even, and at
a few hundred rows the model's order was up to 30% faster (docs/rewrite.md, "Linear layers on gathered rows").

Pattern: a ``linear(x, weight, bias)`` node with a 2-D weight inside a region emitted on gathered rows.
Replacement: :func:`weight_first_linear`, which traces to ``mm(weight, x^T)^T`` copied row-major, plus the bias.
Invariant: the same products (each output element is the same dot product over K); only the operand order the
BLAS call sees changes, so results agree to float rounding. Regions run on every row keep the model's order.

The order is fixed per compiled graph (a choice per call would need ``torch.cond`` around each product, which
Inductor 2.13 mis-lowers with unbacked row counts). ``auto`` times both orders once per weight shape, dtype, batch
and thread count in a process, on the CPU (where the difference was found), at the rows a sparse call at a small
salient fraction gathers and at the rows of a dense call; other devices keep the model's order until measured.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Iterable, Optional

import torch
from torch import fx

from ..runtime.rows import UNBACKED_PAD
from .graph_utils import arg, op_name, tensor_value
from .regions import Region

log = logging.getLogger("dyllm_compile")

#: Rows per batch element of the few-row timing: a couple of salient rows plus the unbacked gather's padding.
FEW_ROWS = UNBACKED_PAD + 2
#: Weights cycled through while timing the few-row product, in bytes: more than a core's share of the last-level
#: cache, so that each product reads its weight from memory, as in a step that runs every layer's weights in turn.
RING_BYTES = 32 << 20
#: Row cap of the dense call's timing (batch x tokens, every row on the unbacked route).
MANY_ROWS_CAP = 512
#: ``auto`` emits weight first when it takes at most this share of the model's order's time for few rows ...
FEW_ROWS_GAIN = 0.9
#: ... and at most this multiple for many: a dense call comes once per block or refresh, a sparse one every step.
MANY_ROWS_LOSS = 1.5


def weight_first_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """``linear(x, weight, bias)`` computed as ``(weight @ x^T)^T``: the rows of ``x`` as the narrow operand.

    The product comes out feature-major; it is copied to row-major (a few rows: cheap) because what reads it
    next gathers whole rows of it, e.g. :func:`~dyllm_compile.runtime.rows.place_rows` over every cache row, which
    Inductor vectorises along a row only when the row is contiguous (measured: 207 -> 127 us for one gated 512 x 512
    projection placed into a 256-row cache). Inductor inlines such a copy into its reader; ``place_rows`` pins it
    as a buffer."""
    out = torch.mm(weight, x.flatten(0, -2).t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def is_linear(node: fx.Node) -> bool:
    """A ``linear`` call on a batch of rows with a 2-D weight: the pattern :func:`weight_first_linear` replaces."""
    if op_name(node) != "linear" or node.op != "call_function":
        return False
    x, weight = tensor_value(arg(node, 0, "input")), tensor_value(arg(node, 1, "weight"))
    return x is not None and weight is not None and x.dim() >= 2 and weight.dim() == 2


def as_weight_first(node: fx.Node) -> None:
    """Turns ``node``, a copy of a linear :func:`is_linear` accepted, into a :func:`weight_first_linear` call."""
    node.target = weight_first_linear
    node.args = (arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias"))
    node.kwargs = {}


def choose(regions: Iterable[Region], order: str, batch: int, tokens: int) -> frozenset[fx.Node]:
    """The linear nodes of ``regions`` (run on gathered rows) to emit weight first under ``order``, for a graph of
    ``batch`` sequences of ``tokens`` rows (example sizes)."""
    candidates = [n for region in regions for n in region.nodes if is_linear(n)]
    if order == "input_first":
        return frozenset()
    if order == "weight_first":
        return frozenset(candidates)
    chosen = set()
    for node in candidates:
        weight = tensor_value(arg(node, 1, "weight"))
        if weight.device.type == "cpu" and weight_first_faster(
                int(weight.shape[0]), int(weight.shape[1]), weight.dtype, batch * FEW_ROWS,
                min(batch * (tokens + UNBACKED_PAD), MANY_ROWS_CAP), torch.get_num_threads()):
            chosen.add(node)
    return frozenset(chosen)


@functools.lru_cache(maxsize=None)
def weight_first_faster(out_features: int, in_features: int, dtype: torch.dtype, few_rows: int, many_rows: int,
                        threads: int) -> bool:
    """Whether weight first is faster on the CPU for [rows, in] x [out, in]^T: by FEW_ROWS_GAIN at ``few_rows``
    and within MANY_ROWS_LOSS at ``many_rows``; timed once per arguments."""
    size = out_features * in_features
    copies = max(2, min(64, RING_BYTES // (size * dtype.itemsize)))
    with torch.no_grad():
        ring = torch.full((copies, out_features, in_features), 1e-2, dtype=dtype)
        few_input, few_weight = _best_times(ring, torch.full((few_rows, in_features), 1e-2, dtype=dtype))
        many_input, many_weight = _best_times(ring[:2], torch.full((many_rows, in_features), 1e-2, dtype=dtype))
    faster = few_weight <= FEW_ROWS_GAIN * few_input and many_weight <= MANY_ROWS_LOSS * many_input
    log.info("dyllm: linear %dx%d on gathered rows (%s, %d threads): weight first %.0f vs %.0f us at %d rows, "
             "%.0f vs %.0f us at %d: %s", out_features, in_features, dtype, threads, 1e6 * few_weight,
             1e6 * few_input, few_rows, 1e6 * many_weight, 1e6 * many_input, many_rows,
             "weight first" if faster else "input first")
    return faster


def _best_times(ring: torch.Tensor, x: torch.Tensor, rounds: int = 3) -> tuple[float, float]:
    """Seconds per product of ``x`` with each weight of ``ring``, input first and weight first (as emitted, the
    row-major copy included): the best of ``rounds`` passes over the ring each, the two orders alternating (a slow
    phase of the machine then slows both), after one untimed pass of each."""
    products = (lambda w: torch.nn.functional.linear(x, w), lambda w: weight_first_linear(x, w))
    best = [float("inf")] * len(products)
    for attempt in range(rounds + 1):
        for i, product in enumerate(products):
            start = time.perf_counter()
            for weight in ring:
                product(weight)
            if attempt:
                best[i] = min(best[i], (time.perf_counter() - start) / len(ring))
    return best[0], best[1]
