"""The range of integer values a graph's index tensor can hold, proved from the ops that make it.

An MoE's grouped experts count each expert's rows with ``histc(keys, bins=E, min=0, max=E - 1)``, which drops a
key outside ``[0, E - 1]``: the rows are gated only if every key is provably inside (sorted_rows.group_counts).
Keys are top-k indices of the router's scores, and models rewrite them before the experts: Zaya sends its skip
expert's index to expert 0 (``i.masked_fill(i == E, 0)``); LongCat-Flash spreads its zero experts' indices over
the real ones (``where(i >= E, (i - E) * E // Z, i)``). The range is interval arithmetic over the graph
(torch's own, ``torch.utils._sympy.value_ranges``, as Inductor bounds its indices), with one refinement: a
``where`` or ``masked_fill`` whose condition compares a value with a constant narrows that value's range on each
side (``i >= E`` true: ``i`` in ``[E, hi]``; false: ``[lo, E - 1]``), which is what proves both rewrites above.

Invariant: a range returned holds every value the node can take for any input; anything the rules cannot bound is
None, never a guess.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx
from torch.utils._sympy.value_ranges import SymPyValueRangeAnalysis as Intervals
from torch.utils._sympy.value_ranges import ValueRanges

from .graph_utils import arg, normalize_dim, op_name, tensor_value

#: Ops that change a tensor's dtype or memory, not its values' meaning
CASTS = frozenset("to int long float double half bfloat16 type contiguous clone detach".split())
#: Ops that keep each value (a cast: to a floating dtype only where it holds them exactly; a copy, a reshape)
KEEPS_VALUES = CASTS | frozenset(("view", "reshape", "flatten"))
# Ops whose result (or its tuple entry 1) holds indices along a dim, and those of them whose dim defaults to the
# last (the others flatten without one)
_INDEX_RESULTS = frozenset(("topk", "sort", "max", "min", "kthvalue", "mode"))
_INDEX_OPS = frozenset(("argmax", "argmin", "argsort"))
_LAST_DIM_DEFAULT = frozenset(("topk", "sort", "argsort", "kthvalue", "mode"))
# comparison -> the comparison that holds where it does not
_NEGATED = {"eq": "ne", "ne": "eq", "lt": "ge", "ge": "lt", "le": "gt", "gt": "le"}
_MIRRORED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def index_bound(node: Any) -> Optional[int]:
    """``D`` when every value of ``node`` is provably an index in ``[0, D)``; else None."""
    found = index_range(node)
    if found is None or not found.is_int or found.lower < 0 or not found.upper.is_finite:
        return None
    return int(found.upper) + 1


def index_range(node: Any, given: Optional[dict[fx.Node, ValueRanges]] = None) -> Optional[ValueRanges]:
    """The integer range of ``node``'s values, each node in ``given`` known to lie in its range there."""
    if isinstance(node, bool) or not isinstance(node, (int, fx.Node)):
        return None
    if isinstance(node, int):
        return ValueRanges.wrap(node)
    if given and node in given:
        return given[node]
    return _computed(node, given or {})


def _computed(node: fx.Node, given: dict[fx.Node, ValueRanges]) -> Optional[ValueRanges]:
    name = op_name(node)
    args = node.args
    if name in KEEPS_VALUES:
        return _kept(node, index_range(args[0], given))
    if name == "getitem" and args[1] == 1 and isinstance(args[0], fx.Node) and op_name(args[0]) in _INDEX_RESULTS:
        return _indices_along(args[0])
    if name in _INDEX_OPS:
        return _indices_along(node)
    if name in ("cat", "concat", "stack"):
        return _union([index_range(part, given) for part in args[0]])
    if name == "neg":
        return _applied(Intervals.mul, index_range(args[0], given), ValueRanges.wrap(-1))
    if name in ("add", "sub", "mul") and len(args) == 2 and not node.kwargs:
        a, b = index_range(args[0], given), index_range(args[1], given)
        if name == "sub":
            b = _applied(Intervals.mul, b, ValueRanges.wrap(-1))
        return _applied(Intervals.mul if name == "mul" else Intervals.add, a, b)
    if name in ("div", "floor_divide"):
        return _divided(node, name, given)
    if name in ("remainder", "mod") and isinstance(args[1], int) and args[1] > 0:
        return _applied(Intervals.python_mod, index_range(args[0], given), ValueRanges.wrap(args[1]))
    if name in ("clamp", "clamp_min", "clamp_max", "minimum", "maximum"):
        return _clamped(node, name, given)
    if name == "where" and len(args) == 3:
        return _union([index_range(args[1], _assumed(args[0], True, given)),
                       index_range(args[2], _assumed(args[0], False, given))])
    if name == "masked_fill" and len(args) == 3:
        return _union([index_range(args[0], _assumed(args[1], False, given)), index_range(args[2], given)])
    return None


def _kept(node: fx.Node, found: Optional[ValueRanges]) -> Optional[ValueRanges]:
    """``found`` through a cast, a copy or a reshape: a floating dtype holds integers exactly up to 2 / eps (256 in
    bfloat16, 2048 in half); past that a cast may round an index up, out of its range."""
    value = tensor_value(node)
    if found is None or value is None or not value.dtype.is_floating_point:
        return found
    exact = round(2 / torch.finfo(value.dtype).eps)
    return found if -exact <= found.lower and found.upper <= exact else None


def _indices_along(node: fx.Node) -> Optional[ValueRanges]:
    """``[0, size - 1]`` of the dim ``node`` (topk, argmax...) picks indices along, where that size is static."""
    name, source = op_name(node), tensor_value(node.args[0])
    dim = arg(node, 2 if name in ("topk", "kthvalue") else 1, "dim", -1 if name in _LAST_DIM_DEFAULT else None)
    if source is None or not isinstance(dim, int):
        return None
    size = source.shape[normalize_dim(dim, source.dim())] if source.dim() else 1
    return ValueRanges(0, size - 1) if isinstance(size, int) and size > 0 else None


def _divided(node: fx.Node, name: str, given: dict[fx.Node, ValueRanges]) -> Optional[ValueRanges]:
    """``a // b`` (``torch.div(a, b, rounding_mode="floor")``, ``floor_divide``), or a division rounded toward
    zero where the quotient is never negative (the same there); a true division is not an index."""
    rounding = node.kwargs.get("rounding_mode")
    floor = node.target is operator.floordiv or name == "floor_divide" or rounding == "floor"
    if len(node.args) != 2 or not (floor or rounding == "trunc"):
        return None
    a, b = index_range(node.args[0], given), index_range(node.args[1], given)
    if not floor and (a is None or b is None or a.lower < 0 or b.lower <= 0):
        return None
    return _applied(Intervals.floordiv, a, b)


def _clamped(node: fx.Node, name: str, given: dict[fx.Node, ValueRanges]) -> Optional[ValueRanges]:
    x = index_range(node.args[0], given)
    if name in ("minimum", "maximum"):
        other = index_range(node.args[1], given)
        return _applied(Intervals.minimum if name == "minimum" else Intervals.maximum, x, other)
    low = arg(node, 1, "min", None) if name != "clamp_max" else None
    high = arg(node, 2 if name == "clamp" else 1, "max", None) if name != "clamp_min" else None
    for bound, limit in ((low, Intervals.maximum), (high, Intervals.minimum)):
        if bound is not None:
            x = _applied(limit, x, index_range(bound, given))
    return x


def _assumed(condition: Any, holds: bool, given: dict[fx.Node, ValueRanges]) -> dict[fx.Node, ValueRanges]:
    """``given`` narrowed by ``condition`` holding (or not): a comparison of a value with an integer constant, or
    its negation; any other condition narrows nothing."""
    while isinstance(condition, fx.Node) and op_name(condition) in ("logical_not", "invert"):
        condition, holds = condition.args[0], not holds
    if not isinstance(condition, fx.Node) or op_name(condition) not in _NEGATED or len(condition.args) != 2:
        return given
    name, (x, c) = op_name(condition), condition.args
    if isinstance(x, int) and isinstance(c, fx.Node):
        name, x, c = _MIRRORED[name], c, x
    known = index_range(x, given) if isinstance(x, fx.Node) else None
    if known is None or isinstance(c, bool) or not isinstance(c, int):
        return given
    return {**given, x: _narrowed(known, name if holds else _NEGATED[name], c)}


def _narrowed(known: ValueRanges, comparison: str, c: int) -> ValueRanges:
    """The values of ``known`` for which ``x <comparison> c`` holds (an integer range: ``x != c`` trims an end);
    ``known`` itself where none does (a branch never taken: any range is right for it)."""
    low, high = known.lower, known.upper
    if comparison == "eq":
        low, high = max(low, c), min(high, c)
    elif comparison == "ne":
        low, high = low + (low == c), high - (high == c and low != c)
    elif comparison in ("lt", "le"):
        high = min(high, c - 1 if comparison == "lt" else c)
    else:
        low = max(low, c + 1 if comparison == "gt" else c)
    return ValueRanges(low, high) if low <= high else known


def _applied(fn, *ranges: Optional[ValueRanges]) -> Optional[ValueRanges]:
    if any(r is None for r in ranges):
        return None
    found = fn(*ranges)
    return found if found.is_int and found.lower.is_finite and found.upper.is_finite else None


def _union(ranges: list[Optional[ValueRanges]]) -> Optional[ValueRanges]:
    if not ranges or any(r is None for r in ranges):
        return None
    found = ranges[0]
    for r in ranges[1:]:
        found = found | r
    return found
