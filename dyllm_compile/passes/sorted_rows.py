"""Token-axis rules for rows computed in a data-dependent order: sorted by a key, multiplied in groups, put back.

transformers 5's default MoE experts (``grouped_mm``) sort the (token, slot) rows by expert id, gather each row's
input in that order, multiply each group of rows by its expert's weights in one grouped product (the groups'
offsets counted from the sorted ids), and put the rows back with the inverse permutation. No one of those ops is
row-wise (the sort reads every row's key, the counts count them all), but together they are: each output row is
its own input row through its own expert, so the same ops run on a subset of the rows give that subset's rows.

The rules here prove that piece by piece, and stand for :class:`op_rules.Rules` (a mixin of it). With ``S`` a
``sort`` (or ``argsort``) of 1-D row-wise keys along the token axis, two kinds of values carry ``Axis.by = S``:

- *sorted rows*: entry ``j`` belongs to the ``j``-th row in ``S``'s order: the sorted keys, ``x[perm]``,
  ``x[perm // r]`` (``r`` of S's rows per row of ``x``: a token's top-k slots), a grouped product over
  them, and what row-wise ops make of those;
- *order values* (``Axis.order``): S's permutation (and its floor division), the inverse permutation
  (``inv[perm] = arange(len)``), the keys' group counts (``histc``) and their offsets (``cumsum``). Their
  entries are positions or counts, not rows' data: an op that reads one is row-wise only as one of the patterns
  below, each checked whole; any other stays token-mixing. (An MoE dispatch's positions, ``where(mask)``'s
  entry along the tokens, are order values too, read only by its gathers and ``index_add``: op_rules.)

``x[inverse]`` of sorted rows is the rows back in token order: row-wise with S's rows, ``by`` cleared.

Invariant: every value these rules call row-wise is, over the region's rows, what the dense graph computes for
those rows; order values live inside the region that holds their sort (a region reading one from outside stays
dense: rewrite_plan._region_problem).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch import fx

from .graph_utils import arg, example_value, index_position, op_name, same_size, tensor_args, tensor_value
from .in_place_writes import set_items
from .index_ranges import CASTS, index_bound

SORTS = frozenset(("sort", "argsort"))
#: A grouped product ``(input [M, K], weight [G, K, N], offs [G])``: rows ``offs[g - 1]:offs[g]`` times weight g
#: (torch's, and the custom op transformers falls back to where torch's does not compile)
GROUPED_MM = frozenset(("grouped_mm", "_grouped_mm", "grouped_mm_fallback"))


def through_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and op_name(node) in CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def floor_divisor(node: fx.Node) -> Optional[int]:
    """``r`` for ``x // r`` with an integer ``r`` (``x`` never negative here, so truncation is the same)."""
    rounding = node.kwargs.get("rounding_mode")
    if len(node.args) != 2 or not isinstance(node.args[1], int) or node.args[1] <= 0:
        return None
    if node.target is operator.floordiv or op_name(node) == "floor_divide" or rounding in ("floor", "trunc"):
        return node.args[1]
    return None


class SortedRows:
    """Rules for sorted rows and order values (module doc); :class:`op_rules.Rules` provides ``axis_of``,
    ``_row`` and ``_mixing``."""

    def sort_rows(self, node: fx.Node, name: str) -> Any:
        """``sort(keys)`` / ``argsort(keys)`` of 1-D row-wise keys: sorted keys (a tuple's entry 0) and the
        permutation (entry 1, or argsort's result)."""
        axis = self.axis_of(node.args[0])
        if tensor_value(node.args[0]).dim() != 1 or axis.by is not None or axis.order:
            return self._mixing(node, f"'{name}' along the token axis")
        return self._row(0, dataclasses.replace(axis, by=node, order=name == "argsort"))

    def positions(self, node: Any) -> Optional[tuple[fx.Node, int]]:
        """``(S, r)`` when ``node`` is ``S``'s permutation floor-divided by ``r`` (1 for the permutation)."""
        node, r = through_casts(node), 1
        while isinstance(node, fx.Node) and (d := floor_divisor(node)) is not None:
            node, r = through_casts(node.args[0]), r * d
        if not isinstance(node, fx.Node):
            return None
        if op_name(node) == "argsort":
            sort = node
        elif op_name(node) == "getitem" and node.args[1] == 1 and op_name(node.args[0]) == "sort":
            sort = node.args[0]
        else:
            return None
        axis = self.axis_of(node)
        return (sort, r) if axis is not None and axis.by is sort and axis.order else None

    def inverse_range(self, node: fx.Node) -> Optional[Any]:
        """``arange(len(perm))`` written at ``perm`` (``inv[perm] = arange``, the inverse permutation): an order
        value, its length S's rows (so that a region re-targets it to its own)."""
        users = list(node.users)
        if len(users) != 1 or users[0].target is not set_items or users[0].args[2] is not node:
            return None
        found = self.positions(users[0].args[1])
        end = node.args[0] if len(node.args) == 1 and not node.kwargs.keys() - {"device", "dtype"} else None
        if found is None or found[1] != 1 or end is None:
            return None
        end = example_value(end)
        if not isinstance(end, (int, torch.SymInt)) or not same_size(end, tensor_value(found[0].args[0]).shape[0]):
            return None
        return self._row(0, self.axis_of(users[0].args[1]))

    def read_order(self, node: fx.Node, name: str) -> Any:
        """An op reading an order value: row-wise only as one of the module doc's patterns."""
        first = node.args[0] if node.args else None
        orders = [a for a in tensor_args(node) if self.axis_of(a) is not None and self.axis_of(a).order]
        if name in CASTS or name in ("empty_like", "zeros_like"):
            if orders == [first] and len(list(tensor_args(node))) == 1:
                return self._row(0, self.axis_of(first))
        elif floor_divisor(node) is not None and orders == [first]:
            return self._row(0, self.axis_of(first))
        elif name == "getitem" and (found := self._gathers_selection(node) or self._sorted_gather(node)):
            return found
        elif name == "index_add":  # an enumeration's rows added back at their positions (op_rules)
            return self._index_add(node)
        elif node.target is set_items and (found := self._inverse(node)) is not None:
            return found
        elif name == "cumsum" and orders == [first] and op_name(through_casts(first)) == "histc" and \
                arg(node, 1, "dim") in (0, -1):
            return self._row(0, self.axis_of(first))
        elif name in GROUPED_MM:
            return self._grouped_mm(node, name)
        return self._mixing(node, f"'{name}' reads token positions or group counts as data")

    def _sorted_gather(self, node: fx.Node) -> Optional[Any]:
        """``x[perm // r]``: x's rows in S's order; ``y[inverse]`` (y sorted rows): y's rows in token order."""
        src, index = node.args
        entries = list(index) if isinstance(index, tuple) else [index]
        tensors = [e for e in entries if isinstance(e, fx.Node)]
        axis = self.axis_of(src)
        # One index tensor, on dim 0, where x has its rows; the other entries new dims (None) or whole ones.
        if (axis is None or axis.dim != 0 or axis.order or len(tensors) != 1
                or index_position(entries, tensor_value(src).dim(), 0) != entries.index(tensors[0])
                or any(e is not None and e is not Ellipsis and e != slice(None)
                       for e in entries if e is not tensors[0])):
            return None
        at = entries.index(tensors[0])  # the result's rows dim: after the None entries before the index
        found = self.positions(tensors[0])
        if found is not None and axis.by is None:
            sort, r = found
            rows = self.axis_of(sort)
            if same_size(axis.lead, rows.lead) and same_size(axis.trail * r, rows.trail):
                return self._row(at, dataclasses.replace(rows, order=False))
            return None
        inverse = through_casts(tensors[0])
        if inverse.target is set_items and self.axis_of(inverse).order and axis.by is self.axis_of(inverse).by:
            return self._row(at, dataclasses.replace(axis, by=None))
        return None

    def _inverse(self, node: fx.Node) -> Optional[Any]:
        """``set_items(base, perm, arange(len))``: ``inv[perm[j]] = j`` for every j (perm is a permutation, so
        every entry of base is written): the inverse permutation."""
        base, index, value = node.args
        found = self.positions(index)
        if found is None or found[1] != 1:
            return None
        sort = found[0]
        if any(self.axis_of(a) is None or self.axis_of(a).by is not sort or not self.axis_of(a).order
               for a in (base, value)) or op_name(value) != "arange" or tensor_value(base).dim() != 1:
            return None
        return self._row(0, self.axis_of(index))

    def group_counts(self, node: fx.Node) -> Any:
        """``histc(keys, bins, min=0, max)`` of S's sorted keys, indices never negative and all inside the
        range (so every row is counted, in the bin a grouped product gives it): counts per group."""
        keys = through_casts(node.args[0])
        low, high = arg(node, 2, "min", 0), arg(node, 3, "max", 0)
        axis = self.axis_of(keys)
        if (axis is None or axis.by is None or axis.order or op_name(keys) != "getitem" or keys.args[1] != 0
                or keys.args[0] is not axis.by):
            return self._mixing(node, "'histc' of values other than a sort's keys")
        bound = index_bound(axis.by.args[0])
        if bound is None or low != 0 or not isinstance(high, (int, float)) or high <= 0 or high < bound - 1:
            return self._mixing(node, "'histc' of keys that are not provably indices inside its range")
        return self._row(0, dataclasses.replace(axis, order=True))

    def _grouped_mm(self, node: fx.Node, name: str) -> Any:
        """``grouped_mm(x, weight, offs)`` of sorted rows x, a weight without the token axis and offsets counted
        from x's sort's keys in ascending order: each row times its own group's weight."""
        x, weight, offs = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "offs")
        axis, offsets = self.axis_of(x), self.axis_of(offs)
        if (axis is None or axis.by is None or axis.order or axis.dim != 0 or tensor_value(x).dim() != 2
                or offsets is None or offsets.by is not axis.by or op_name(through_casts(offs)) != "cumsum"
                or self.axis_of(weight) is not None or tensor_value(weight).dim() != 3
                or not same_size(tensor_value(offs).shape[0], tensor_value(weight).shape[0])
                or arg(axis.by, 2, "descending", False) is not False
                or any(self.axis_of(a) is not None for a in tensor_args(node) if a not in (x, offs))):
            return self._mixing(node, f"'{name}' of rows not provably sorted ascending by the keys its offsets count")
        return self._row(0, axis)
