"""Per-op token-axis rules: which ops are row-wise, and where their token axis goes.

Forward rules map the token axes of an op's inputs to its output's (:class:`Info`); backward rules map an
output's token axis to the inputs that must carry it (used to seed the analysis from attention's q/k/v on
graphs with static sizes). An op with no rule is *unknown* and treated as token-mixing: the analysis never
calls something row-wise that it cannot prove is.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import (arg, example_value, index_position, listed_args, normalize_dim, op_name, prod, reduced_dims,
                          same_size, tensor_args, tensor_value)
from .in_place_writes import set_items
from .sorted_rows import SORTS, SortedRows


@dataclass(frozen=True)
class Axis:
    """The token axis of a value: dimension ``dim``, holding ``lead`` folded leading rows times N tokens times
    ``trail`` rows each (``[B * N * H, D]``: heads folded into the rows after their token).

    ``by``: the dim holds not every token row but a data-dependent selection of them (an MoE's dispatch), entry
    ``j`` belonging to the ``j``-th true entry of a row-wise mask, as enumerated by the ``where`` / ``nonzero``
    node ``by``; ``lead`` is then the mask's (the selection's positions address ``lead * N`` rows). Or ``by`` is a
    ``sort``: the dim holds every row, in the sort's order (passes/sorted_rows.py).

    ``order``: the value's entries are not rows' data but a sort's positions or counts (sorted_rows.py), which
    only the ops that use them as such may read."""

    dim: int
    lead: Any = 1
    trail: Any = 1
    by: Optional[fx.Node] = None
    order: bool = False

    @property
    def fold(self) -> Any:
        """Rows of the dim per token: 1 for one row per token, batch first."""
        return self.lead * self.trail

    @property
    def selected(self) -> bool:
        """The dim holds a data-dependent number of rows (an enumeration's), not ``fold * N``."""
        return self.by is not None and op_name(self.by) not in SORTS

    @property
    def folded(self) -> bool:
        """More than one row per token, provably (a symbolic batch folded in counts): never a guard."""
        return not same_size(self.fold, 1)


class Kind(enum.Enum):
    NONE = "no-tokens"  # carries no token axis: weights, constants, per-sequence scalars
    SOURCE = "source"  # introduces the token axis: input ids, per-position tables (arange, rope[:N])
    ROW = "row-wise"  # each output row depends only on the same input row
    MIXING = "token-mixing"  # attention, reductions over tokens, and every op without a rule


@dataclass(frozen=True)
class Info:
    kind: Kind
    axis: Optional[Axis] = None
    reason: str = ""


NONE = Info(Kind.NONE)

ELEMENTWISE = frozenset(
    "add sub mul div neg pow rsqrt sqrt exp exp2 log log1p expm1 tanh sigmoid sin cos abs where clamp clamp_min "
    "clamp_max maximum minimum erf silu gelu relu relu6 leaky_relu elu selu softplus mish hardswish hardsigmoid "
    "masked_fill reciprocal square sign logical_not logical_and logical_or eq ne lt le gt ge and or invert lerp "
    "addcmul addcdiv floor ceil round trunc frac fmod remainder mod floor_divide rsub true_divide float_power "
    "log2 log10 logit erfc erfinv tan atan atan2 asin acos sinh cosh asinh acosh atanh hypot copysign xlogy "
    "nan_to_num isnan isinf isfinite signbit sgn positive fmin fmax heaviside xor logical_xor bitwise_and "
    "bitwise_or bitwise_xor bitwise_not softsign tanhshrink hardtanh celu threshold lgamma digamma log_sigmoid "
    "softshrink hardshrink".split()
)
# Ops whose result depends on ``self`` alone (other arguments are dtypes, devices, shapes, probabilities).
UNARY = frozenset(
    "float half bfloat16 double int long bool to type_as type contiguous clone detach dropout zeros_like ones_like "
    "empty_like full_like requires_grad share_memory".split()
)
# Convolutions: row-wise where every kernel dim is 1 (op_rules' _pointwise_conv), token mixing otherwise
CONVOLUTIONS = frozenset(("conv1d", "conv2d", "conv3d"))
# (index of the dim argument counting self, keyword, default) for ops along one dim that keep the shape.
ALONG_DIM = {
    "softmax": (1, "dim", None),
    "log_softmax": (1, "dim", None),
    "cumsum": (1, "dim", None),
    "cumprod": (1, "dim", None),
    "logcumsumexp": (1, "dim", None),
    "cummax": (1, "dim", None),
    "cummin": (1, "dim", None),
    "sort": (1, "dim", -1),
    "argsort": (1, "dim", -1),
    "topk": (2, "dim", -1),
    "scatter": (1, "dim", None),
    "scatter_add": (1, "dim", None),
    "gather": (1, "dim", None),
    "index_select": (1, "dim", None),
    "chunk": (2, "dim", 0),
    "split": (2, "dim", 0),
    "tensor_split": (2, "dim", 0),
    "unbind": (1, "dim", 0),
    "normalize": (2, "dim", 1),
}
REDUCTIONS = frozenset(
    "sum mean amax amin max min var std norm logsumexp prod all any argmax argmin count_nonzero median nansum "
    "nanmean var_mean std_mean linalg_vector_norm linalg_norm".split()
)
# Ops that return a tuple of pieces of their input along one dim (a getitem takes each piece).
SPLITS = frozenset("chunk split tensor_split unbind".split())
VIEWS = frozenset("view reshape flatten unflatten view_as reshape_as".split())
# Ops that make a tensor from sizes alone; one is token-carrying only as the accumulator of per-token rows.
FACTORIES = frozenset("zeros ones empty full".split())
# Ops that make a tensor from sizes like another tensor's, reading none of its values
LIKE_FACTORIES = frozenset("new_empty new_zeros new_ones new_full".split())
NON_TENSOR = frozenset("size dim numel item _enter_autocast _exit_autocast getattr sym_size".split())
# F.pad and the ATen op it lowers to: (self, pad, ...)
PADS = frozenset(("pad", "constant_pad_nd"))
# Ops that read only the size or dtype of their second tensor: their values are the first's
LIKE_OTHER = frozenset("expand_as view_as reshape_as type_as".split())


class Rules(SortedRows):
    """Forward and backward axis rules, given the token count ``n`` and the current axis of each node."""

    def __init__(self, n: Any, info_of: Callable[[Any], Optional[Info]]) -> None:
        self.n = n
        self.info_of = info_of

    def axis_of(self, node: Any) -> Optional[Axis]:
        info = self.info_of(node)
        return info.axis if info is not None else None

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(self, node: fx.Node) -> Info:
        name = op_name(node)
        if name == "getitem" and isinstance(example_value(node.args[0]), (tuple, list)):
            # One result of topk / sort / chunk / max(dim): classified like the op that made the tuple.
            source = self.info_of(node.args[0])
            if source is None or source.axis is None:
                return NONE
            if source.axis.by is node.args[0] and node.args[1] == self._positions_entry(node.args[0]):
                return Info(Kind.ROW, dataclasses.replace(source.axis, order=True))  # positions: order values
            return source
        operands = node.args[:1] if name in LIKE_OTHER else tensor_args(node)
        token_inputs = [a for a in operands if isinstance(a, fx.Node) and self.axis_of(a) is not None]
        if (name in FACTORIES and not token_inputs) or name in LIKE_FACTORIES:
            return self._accumulator(node)
        if name == "arange" and not token_inputs and (inverse := self.inverse_range(node)) is not None:
            return inverse
        if name == "expand_as" and not token_inputs and (broadcast := self._broadcast_to_rows(node)) is not None:
            return broadcast
        if name in NON_TENSOR or not token_inputs:
            return NONE
        if any(self.axis_of(a).order for a in token_inputs):
            return self.read_order(node, name)
        if name == "histc":
            return self.group_counts(node)
        out = example_value(node)
        if name in ("where", "nonzero") and self._enumerates(node, name):
            mask = self.axis_of(node.args[0])
            return Info(Kind.ROW, Axis(0, mask.lead, mask.trail, by=node))
        if name == "getitem" and (selected := self._gathers_selection(node)) is not None:
            return selected
        if name == "index_add":
            return self._index_add(node)
        if name == "repeat_interleave":
            return self._repeat_interleave(node)
        if name == "repeat":
            return self._repeat(node)
        if node.target is set_items:
            return self._set_items(node)
        if name == "copy" and node.op == "call_function":  # aten.copy(self, src): src in self's shape
            return self._copy(node, out)
        if name == "one_hot":  # a trailing dim of classes
            return self._unary(node)
        if name in ELEMENTWISE or (name in ("max", "min") and isinstance(arg(node, 1, "other"), fx.Node)):
            return self._elementwise(node, out)
        if name in UNARY:
            return self._unary(node)
        if name == "linear":
            return self._linear(node)
        if name == "matmul":
            return self._matmul(node, out)
        if name == "addmm":
            return self._addmm(node)
        if name == "embedding":
            return self._embedding(node)
        if name in ("layer_norm", "rms_norm"):
            return self._norm_last(node)
        if name in ALONG_DIM:
            return self._along_dim(node, name)
        if name in REDUCTIONS:
            return self._reduction(node, out)
        if name in VIEWS:
            return self._view(node, out)
        if name == "getitem":
            return self._getitem(node)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self._cat(node, name)
        if name in CONVOLUTIONS:
            pointwise = self._pointwise_conv(node)
            if pointwise is not None:
                return pointwise
            return self._mixing(node, "a convolution over the token axis: each output reads other positions than "
                                "its own", out)
        dims = self._dim_map(node, name)
        if dims is not None:
            return self._mapped(node, dims)
        return self._unknown(node, name or getattr(node.target, "__name__", str(node.target)), out)

    def _pointwise_conv(self, node: fx.Node) -> Optional[Info]:
        """A convolution whose kernel is 1 in every spatial dim, at stride 1 without padding, of the token axis on a
        spatial dim (SqueezeBERT's position-wise layers: 1x1 convolutions over [B, C, N]): each position's output is
        a linear map of its own channels, row-wise. None for any other (token mixing: no rule)."""
        x, axis = node.args[0], self.axis_of(node.args[0])
        if axis is None or axis.folded or axis.by is not None or not _pointwise_on(node, axis.dim):
            return None
        if any(self.axis_of(a) is not None for a in tensor_args(node) if a is not x):
            return None
        return self._row(axis.dim, axis)

    def _broadcast_to_rows(self, node: fx.Node) -> Optional[Info]:
        """``x.expand_as(rows)`` of an ``x`` without the token axis, of size 1 (or no dim) where ``rows`` has it
        (HRM's initial low-level state): the same value in every row, a per-position value as a RoPE table is."""
        x, like = tensor_value(node.args[0]), self.axis_of(node.args[1])
        if (like is None or like.by is not None or like.order or x is None
                or not self._aligned(node.args[0], x, tensor_value(node), like.dim, like)):
            return None
        return Info(Kind.SOURCE, like, "a value broadcast to the rows' shape")

    def _row(self, dim: int, like: Axis) -> Info:
        """Row-wise, the token axis at ``dim``, holding the rows ``like`` holds."""
        return Info(Kind.ROW, dataclasses.replace(like, dim=dim))

    def _mixing(self, node: fx.Node, reason: str, out: Any = None) -> Info:
        return Info(Kind.MIXING, self.guess_axis(out if out is not None else example_value(node)), reason)

    def guess_axis(self, value: Any) -> Optional[Axis]:
        """The only dim of size N, if exactly one: how the axis survives token-mixing ops (conv, attention)."""
        if isinstance(value, (tuple, list)):
            value = next((v for v in value if isinstance(v, torch.Tensor)), None)
        if not isinstance(value, torch.Tensor):
            return None
        dims = [d for d, s in enumerate(value.shape) if same_size(s, self.n)]
        return Axis(dims[0]) if len(dims) == 1 else None

    def _unknown(self, node: fx.Node, name: str, out: Any) -> Info:
        return self._mixing(node, f"no row-wise rule for op '{name}'", out)

    def _elementwise(self, node: fx.Node, out: torch.Tensor) -> Info:
        if not isinstance(out, torch.Tensor):
            return self._unknown(node, op_name(node), out)
        result: Optional[Axis] = None
        for operand in tensor_args(node):
            value = tensor_value(operand)
            offset = out.dim() - value.dim()
            axis = self.axis_of(operand)
            if axis is not None:
                mapped = dataclasses.replace(axis, dim=axis.dim + offset)
                if result is not None and mapped != result:
                    return self._mixing(node, "operands carry the token axis in different dims")
                result = mapped
        for operand in tensor_args(node):
            if self.axis_of(operand) is None:
                value = tensor_value(operand)
                aligned = result.dim - (out.dim() - value.dim())
                if aligned >= 0 and not same_size(value.shape[aligned], 1):
                    return self._mixing(
                        node, f"operand '{operand.name}' varies along the token axis but is not a per-token value"
                    )
        return self._row(result.dim, result)

    def _unary(self, node: fx.Node) -> Info:
        axis = self.axis_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if axis is None:
            return self._mixing(node, "token axis reaches a non-self argument")
        return self._row(axis.dim, axis)

    def _linear(self, node: fx.Node) -> Info:
        x, rest = node.args[0], [a for a in tensor_args(node) if a is not node.args[0]]
        axis = self.axis_of(x)
        if axis is None or any(self.axis_of(a) is not None for a in rest):
            return self._mixing(node, "linear weight carries the token axis")
        if axis.dim == tensor_value(x).dim() - 1:
            return self._mixing(node, "linear contracts the token axis")
        return self._row(axis.dim, axis)

    def _matmul(self, node: fx.Node, out: torch.Tensor) -> Info:
        a, b = node.args[0], node.args[1]
        va, vb = tensor_value(a), tensor_value(b)
        ax, bx = self.axis_of(a), self.axis_of(b)
        if va is None or vb is None or va.dim() < 2 or vb.dim() < 2:
            return self._unknown(node, "matmul (1-D)", out)
        if ax is not None and bx is not None:
            # Both with the tokens on one batch dim, alike: a product per row (Hugging Face's batched_mm experts,
            # bmm(weights[expert_ids], x[..., None])). Anywhere else it contracts or pairs tokens (attention scores).
            at = ax.dim + out.dim() - va.dim()
            if (ax.dim < va.dim() - 2 and bx.dim < vb.dim() - 2 and at == bx.dim + out.dim() - vb.dim()
                    and dataclasses.replace(ax, dim=0) == dataclasses.replace(bx, dim=0)):
                return self._row(at, ax)
            return self._mixing(node, "matmul of two token-carrying values (attention scores)")
        if ax is not None:
            if ax.dim == va.dim() - 1:
                return self._mixing(node, "matmul contracts the token axis")
            return self._batched_row(node, ax.dim + out.dim() - va.dim(), ax, b, out)
        if bx.dim == vb.dim() - 2:
            return self._mixing(node, "matmul contracts the token axis")
        if bx.dim == vb.dim() - 1:
            return self._row(out.dim() - 1, bx)
        return self._batched_row(node, bx.dim + out.dim() - vb.dim(), bx, a, out)

    def _batched_row(self, node: fx.Node, at: int, axis: Axis, other: fx.Node, out: torch.Tensor) -> Info:
        """A matmul row-wise along output dim ``at``, unless the tokens are on a batch dim along which ``other``
        (carrying no token axis) varies: each row then meets its own slice of a value mixed over the tokens
        (HunYuan-V4's indexer weights times its relu'd scores), as an elementwise op would."""
        value = tensor_value(other)
        aligned = at - (out.dim() - value.dim())
        if 0 <= aligned < value.dim() - 2 and not same_size(value.shape[aligned], 1):
            return self._mixing(node, f"operand '{other.name}' varies along the token axis but is not a per-token "
                                "value")
        return self._row(at, axis)

    def _addmm(self, node: fx.Node) -> Info:
        """``addmm(bias, x, W)`` (GPT-2's Conv1D on ``x.view(-1, D)``): row-wise along x's rows."""
        x, rest = node.args[1], [a for a in tensor_args(node) if a is not node.args[1]]
        axis = self.axis_of(x)
        if axis is None or axis.dim != 0 or any(self.axis_of(a) is not None for a in rest):
            return self._mixing(node, "'addmm' contracts the token axis or its other operands carry it")
        return self._row(0, axis)

    def _embedding(self, node: fx.Node) -> Info:
        axis = self.axis_of(node.args[0])
        if axis is None or any(self.axis_of(a) is not None for a in list(tensor_args(node))[1:]):
            return self._mixing(node, "embedding table carries the token axis")
        return self._row(axis.dim, axis)

    def _norm_last(self, node: fx.Node) -> Info:
        x = node.args[0]
        axis = self.axis_of(x)
        shape = arg(node, 1, "normalized_shape")
        count = len(shape) if isinstance(shape, (list, tuple)) else 1
        if axis is None or axis.dim >= tensor_value(x).dim() - count:
            return self._mixing(node, "normalizes over the token axis")
        if any(self.axis_of(a) is not None for a in list(tensor_args(node))[1:]):
            return self._mixing(node, "norm weight carries the token axis")
        return self._row(axis.dim, axis)

    def _along_dim(self, node: fx.Node, name: str) -> Info:
        index, keyword, default = ALONG_DIM[name]
        dim = arg(node, index, keyword, default)
        x = node.args[0]
        axis = self.axis_of(x)
        if not isinstance(dim, int) or axis is None:
            return self._mixing(node, f"'{name}' along an unknown dim")
        if normalize_dim(dim, tensor_value(x).dim()) == axis.dim:
            return self.sort_rows(node, name) if name in SORTS else self._mixing(node, f"'{name}' along the token axis")
        # Index and source operands (scatter, gather) must be per-token values in the same layout.
        if any(self.axis_of(a) not in (None, axis) for a in tensor_args(node)):
            return self._mixing(node, f"'{name}' operands carry the token axis in different dims")
        if name == "unbind" and normalize_dim(dim, tensor_value(x).dim()) < axis.dim:
            # unbind removes its dim: each result (getitem of the tuple) has the token axis one dim earlier.
            return self._row(axis.dim - 1, axis)
        return self._row(axis.dim, axis)

    def _reduction(self, node: fx.Node, out: Any) -> Info:
        name, axis = op_name(node), self.axis_of(node.args[0])
        dims = reduced_dims(node)
        if axis is None or dims is None:
            return self._mixing(node, f"'{name}' over all dims")
        if not dims:
            return self._mixing(node, f"'{name}' over an unknown dim")
        if axis.dim in dims:
            return self._mixing(node, f"'{name}' over the token axis")
        kept = _kept_dims(node, dims)
        if kept is None:
            return self._mixing(node, f"'{name}' returns no tensor")
        return self._row(kept.index(axis.dim), axis)

    def _view(self, node: fx.Node, out: torch.Tensor) -> Info:
        x = node.args[0]
        axis, shape = self.axis_of(x), tensor_value(x).shape
        if axis is not None and axis.by is not None:  # a selection of rows: kept whole, nothing folded into it
            mapped = map_view_axis(shape, out.shape, Axis(axis.dim), shape[axis.dim])
            if mapped is None or mapped.folded:
                return self._mixing(node, "reshape splits or merges selected rows with other dims")
            return self._row(mapped.dim, axis)
        mapped = map_view_axis(shape, out.shape, axis, self.n)
        if mapped is None:
            return self._mixing(node, "reshape splits or merges the token axis with feature dims")
        return self._row(mapped.dim, mapped)

    def _repeat_interleave(self, node: fx.Node) -> Info:
        """``x.repeat_interleave(r, dim)`` with an integer ``r``: along the token axis each row r times in place
        (r rows after each token: a top-k MoE's ``repeat_interleave(k, dim=0)``), or along another dim."""
        x, repeats, dim = node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
        axis = self.axis_of(x)
        if not isinstance(repeats, (int, torch.SymInt)) or dim is None or axis is None or axis.by is not None:
            return self._unknown(node, "repeat_interleave", example_value(node))
        if normalize_dim(dim, tensor_value(x).dim()) != axis.dim:
            return self._row(axis.dim, axis)
        return Info(Kind.ROW, dataclasses.replace(axis, trail=axis.trail * repeats))

    def _repeat(self, node: fx.Node) -> Info:
        """``x.repeat(*sizes)``: x tiled, new dims first. Along the token dim, ``r`` whole copies of every row one
        after another: ``r`` times the leading rows (Llama-4's ``x.repeat(experts, 1)``, a copy of every token per
        expert); along other dims, the axis where it was."""
        x = node.args[0]
        sizes = [example_value(size) for size in listed_args(node)]
        axis = self.axis_of(x)
        if axis.by is not None or axis.order or not all(isinstance(s, (int, torch.SymInt)) for s in sizes):
            return self._mixing(node, "'repeat' of rows in a data-dependent order or by data-dependent counts")
        offset = len(sizes) - tensor_value(x).dim()
        return self._row(axis.dim + offset, dataclasses.replace(axis, lead=axis.lead * sizes[axis.dim + offset]))

    def _getitem(self, node: fx.Node) -> Info:
        src, index = node.args
        axis = self.axis_of(src)
        if axis is None:
            # ``table[index]``: a table without the token axis read at a token-carrying integer index (a top-k MoE's
            # ``weights[expert_ids]``): like an embedding, row-wise, the index's dims first
            value = tensor_value(index) if isinstance(index, fx.Node) else None
            if value is None or value.dtype == torch.bool or value.is_floating_point():
                return self._mixing(node, "indexes with a token-carrying value that is not one integer index")
            return self._row(self.axis_of(index).dim, self.axis_of(index))
        mapping = getitem_dims(tensor_value(src), tensor_value(node), index)
        if mapping is None:
            return self._mixing(node, "indexes with a tensor along the token axis")
        entry = mapping.get(axis.dim)
        if entry is None:
            return self._mixing(node, "selects single token rows (pooling)")
        out_dim, full = entry
        if not full:
            return self._mixing(node, "slices the token axis")
        return self._row(out_dim, axis)

    # ---- an MoE's dispatch: rows selected by a row-wise mask, computed, added back to their tokens ----------

    def _enumerates(self, node: fx.Node, name: str) -> bool:
        """``where(mask)`` / ``nonzero(mask, as_tuple=True)`` of a row-wise mask: a tuple of index tensors, one per
        mask dim, entry ``j`` of each describing the mask's ``j``-th true entry, whose token row is entry ``j``
        of the one along the mask's token axis (its *positions*)."""
        mask = node.args[0]
        if len(node.args) != 1 or not isinstance(mask, fx.Node) or self.axis_of(mask) is None:
            return False
        if self.axis_of(mask).by is not None:
            return False
        return name == "where" and not node.kwargs or name == "nonzero" and node.kwargs == {"as_tuple": True}

    def _positions_entry(self, node: fx.Node) -> Optional[int]:
        """The entry of the tuple ``node`` makes that holds token positions: a sort's permutation, an enumeration's
        positions (rows' indices: a subset of the rows would give other ones, so only their uses read them)."""
        if op_name(node) == "sort":
            return 1
        return self.axis_of(node.args[0]).dim if op_name(node) in ("where", "nonzero") else None

    def _positions(self, node: Any) -> Optional[fx.Node]:
        """The enumeration (``where`` node) whose positions ``node`` is: ``where(mask)[d]``, d the mask's token
        axis; else None."""
        if not isinstance(node, fx.Node) or op_name(node) != "getitem":
            return None
        enumeration, which = node.args
        axis = self.axis_of(enumeration)
        if axis is None or axis.by is not enumeration or not isinstance(which, int):
            return None
        return enumeration if which == self.axis_of(enumeration.args[0]).dim else None

    def _gathers_selection(self, node: fx.Node) -> Optional[Info]:
        """``x[..., positions, ...]`` (x row-wise; the other tensor indices of the same enumeration, e.g. the
        top-k slot of each selected row): the selected rows of x, along the result's dim of the selection's size."""
        src, index = node.args
        axis, value = self.axis_of(src), tensor_value(src)
        if axis is None or axis.by is not None or value is None:
            return None
        entries = list(index) if isinstance(index, tuple) else [index]
        at = index_position(entries, value.dim(), axis.dim)
        enumeration = self._positions(entries[at]) if at is not None else None
        if enumeration is None or not _same_rows(self.axis_of(enumeration), axis):
            return None
        for entry in entries:
            if isinstance(entry, fx.Node) and tensor_value(entry) is not None and entry is not entries[at]:
                other = self.axis_of(entry)
                if other is None or other.by is not enumeration or tensor_value(entry).dim() != 1:
                    return None
        count = tensor_value(entries[at]).shape[0]
        dims = [d for d, size in enumerate(tensor_value(node).shape) if same_size(size, count)]
        return self._row(dims[0], self.axis_of(enumeration)) if len(dims) == 1 else None

    def _index_add(self, node: fx.Node) -> Info:
        """``base.index_add(d, positions, rows)``: rows of an enumeration added back into the token rows they were
        selected from: row-wise along ``d``, base's token axis."""
        base, dim, index, source = (arg(node, i, k) for i, k in enumerate(("self", "dim", "index", "source")))
        axis, added = self.axis_of(base), self.axis_of(source)
        enumeration = self._positions(index)
        if (axis is None or axis.by is not None or not isinstance(dim, int) or enumeration is None
                or normalize_dim(dim, tensor_value(base).dim()) != axis.dim
                or not _same_rows(self.axis_of(enumeration), axis) or added is None or added.by is not enumeration
                or added.dim != axis.dim):
            return self._mixing(node, "'index_add' of values other than selected rows added back to their tokens")
        return self._row(axis.dim, axis)

    def _accumulator(self, node: fx.Node) -> Info:
        """A tensor made from sizes (``zeros``, ``x.new_empty``) that per-token rows are added into (``index_add``
        along its dim of ``lead * N`` rows) or written into (``set_items`` of an index that keeps its one dim of N
        rows whole: DeepSeek-V3's key, built by two slice writes in transformers 5): a token axis there, whose
        rows a region rebuilds for its own rows."""
        out = tensor_value(node)
        if out is None:
            return NONE
        for user in node.users:
            if op_name(user) != "index_add" or user.args[0] is not node:
                continue
            dim = normalize_dim(arg(user, 1, "dim"), out.dim())
            size = out.shape[dim]
            lead = size // self.n
            if statically_known_true(lead * self.n == size):
                return self._row(dim, Axis(dim, lead))
        writes = [u for u in node.users if u.target is set_items and u.args[0] is node]
        views = [u for u in node.users if u.target is operator.getitem and _view_dims(out, u.args[1]) is not None]
        if writes and len(writes) + len(views) == len(node.users):  # (the views the writes were made through)
            kept = [d for d in range(out.dim()) if same_size(out.shape[d], self.n)]
            for write in writes:
                mapping = _view_dims(out, write.args[1]) or {}
                kept = [d for d in kept if (mapping.get(d) or (0, False))[1]]
            if len(kept) == 1:
                return self._row(kept[0], Axis(kept[0]))
        return self._constant_rows(node, out)

    def _constant_rows(self, node: fx.Node, out: torch.Tensor) -> Info:
        """``x.new_ones(sizes)`` (``new_zeros``, ``new_full``) of a row-wise ``x`` with exactly one dim as long as
        x's token dim: every entry the same constant, so any number of rows of it is what the dense graph holds
        for those rows; it takes x's token axis there, and a region makes it as long as its own rows (Ergo's
        experts pass ``hidden_states.new_ones(...)`` as every routed row's weight)."""
        source = self.axis_of(node.args[0]) if op_name(node) in ("new_ones", "new_zeros", "new_full") else None
        if source is None or source.by is not None or source.order:
            return NONE
        rows = tensor_value(node.args[0]).shape[source.dim]
        dims = [d for d, size in enumerate(out.shape) if same_size(size, rows)]
        return self._row(dims[0], dataclasses.replace(source, dim=dims[0])) if len(dims) == 1 else NONE

    def _set_items(self, node: fx.Node) -> Info:
        """``set_items(x, index, value)`` (``x[index] = value``, out of place: passes/in_place_writes.py) with a
        basic index that keeps x's token axis whole: row-wise when ``value`` carries the tokens where ``x[index]``
        does, or is the same for every row."""
        x, index, value = node.args
        axis = self.axis_of(x)
        mapping = _view_dims(tensor_value(x), index) if axis is not None and axis.by is None else None
        entry = None if mapping is None else mapping.get(axis.dim)
        if entry is None or not entry[1]:
            return self._mixing(node, "writes along the token axis, or into a value without it")
        written = tensor_value(value) if isinstance(value, fx.Node) else None
        view = tensor_value(x)[index]
        if written is not None and not self._aligned(value, written, view, entry[0], axis):
            return self._mixing(node, "writes a value that is not per-token where the tokens are")
        return self._row(axis.dim, axis)

    def _copy(self, node: fx.Node, out: torch.Tensor) -> Info:
        """``aten.copy(self, src)``: ``src`` broadcast into ``self``'s shape; ``self``'s values are not read."""
        target, src = node.args[0], node.args[1]
        axis = self.axis_of(target)
        if axis is None:
            moved = self.axis_of(src)
            axis = dataclasses.replace(moved, dim=moved.dim + out.dim() - tensor_value(src).dim())
        if axis.by is not None or not self._aligned(src, tensor_value(src), out, axis.dim, axis):
            return self._mixing(node, "copies a value that is not per-token where the tokens are")
        return self._row(axis.dim, axis)

    def _aligned(self, operand: fx.Node, value: torch.Tensor, like: torch.Tensor, dim: int, axis: Axis) -> bool:
        """``operand`` (its ``value``), broadcast right-aligned to ``like``, has the rows ``axis`` holds at ``dim``,
        or is the same along that dim."""
        moved = self.axis_of(operand)
        at = dim - (like.dim() - value.dim())
        if moved is None:
            return at < 0 or same_size(value.shape[at], 1)
        return moved.dim == at and dataclasses.replace(moved, dim=0) == dataclasses.replace(axis, dim=0)

    def _cat(self, node: fx.Node, name: str) -> Info:
        # torch.cat skips legacy empty 1-D operands (e.g. an empty KV cache's torch.tensor([])).
        tensors = [t for t in node.args[0] if not _is_legacy_empty(t)]
        dim = arg(node, 1, "dim", 0)
        values = [tensor_value(t) for t in tensors]
        axes = [self.axis_of(t) for t in tensors]
        if any(a is None for a in axes) or len(set(axes)) != 1:
            return self._mixing(node, f"'{name}' of per-token and other values")
        axis = axes[0]
        ndim = values[0].dim() + (1 if name == "stack" else 0)
        dim = normalize_dim(dim, ndim)
        if name == "stack":
            return self._row(axis.dim + (1 if dim <= axis.dim else 0), axis)
        if dim == axis.dim:
            return self._mixing(node, f"'{name}' along the token axis")
        return self._row(axis.dim, axis)

    def _mapped(self, node: fx.Node, dims: dict[int, int]) -> Info:
        axis = self.axis_of(node.args[0])
        if axis is None or axis.dim not in dims:
            what = "pads the token axis" if op_name(node) in PADS else "moves the token axis out of place"
            return self._mixing(node, f"'{op_name(node)}' {what}")
        return self._row(dims[axis.dim], axis)

    def _dim_map(self, node: fx.Node, name: Optional[str]) -> Optional[dict[int, int]]:
        """Input-dim -> output-dim map of pure layout ops that keep every dim's size (or broadcast; or pad, whose
        padded dims are not in the map: a token axis padded is shifted, and other rows read)."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        x, out = tensor_value(node.args[0]), tensor_value(node)
        if x is None or out is None:
            return None
        nd = x.dim()
        if name in ("transpose", "swapaxes"):
            d0, d1 = normalize_dim(node.args[1], nd), normalize_dim(node.args[2], nd)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return {perm[o]: o for o in range(nd)}
        if name == "t":
            return {0: 1, 1: 0} if nd == 2 else {0: 0}
        if name == "permute":
            perm = [normalize_dim(p, nd) for p in listed_args(node)]
            return {p: o for o, p in enumerate(perm)}
        if name == "unsqueeze":
            d = normalize_dim(node.args[1], nd + 1)
            return {i: i + (1 if i >= d else 0) for i in range(nd)}
        if name in ("expand", "expand_as"):  # dims right-aligned; the ones of size 1 broadcast (to any size)
            offset = out.dim() - nd
            return {i: i + offset for i in range(nd) if same_size(x.shape[i], out.shape[i + offset])}
        if name == "squeeze":
            return _size_preserving_map(x.shape, out.shape)
        if name in PADS:  # (left, right) pairs from the last dim back; a symbolic one may be > 0
            pads = arg(node, 1, "pad", ())
            padded = {nd - 1 - i // 2 for i, p in enumerate(pads) if not (isinstance(p, int) and p == 0)}
            return {i: i for i in range(nd) if i not in padded}
        if name == "view_as_complex":  # [..., 2] (real, imaginary) -> [...] complex: complex RoPE (Llama-4)
            return {i: i for i in range(nd - 1)}
        if name == "view_as_real":  # [...] complex -> [..., 2]
            return {i: i for i in range(nd)}
        return None

    # ---- backward ------------------------------------------------------------------------------------------

    def backward(self, node: fx.Node, axis: Axis) -> list[tuple[fx.Node, Axis]]:
        """Inputs of ``node`` that carry the token axis when its output carries ``axis``."""
        name = op_name(node)
        if name == "getitem" and isinstance(example_value(node.args[0]), (tuple, list)):
            # One result of a tuple op: the tuple node carries its results' axis, as in ``forward``.
            return [(node.args[0], axis)] if op_name(node.args[0]) in SPLITS else []
        if name in SPLITS:
            return self._split_backward(node, name, axis)
        out = tensor_value(node)
        if out is None or name in NON_TENSOR:
            return []
        if name in ELEMENTWISE or name in UNARY:
            operands = list(tensor_args(node)) if name in ELEMENTWISE else node.args[:1]
            result = []
            for operand in operands:
                value = tensor_value(operand)
                if value is None:
                    continue
                aligned = axis.dim - (out.dim() - value.dim())
                if aligned >= 0 and same_size(value.shape[aligned], out.shape[axis.dim]) and not same_size(
                    value.shape[aligned], 1
                ):
                    result.append((operand, dataclasses.replace(axis, dim=aligned)))
            return result
        if name in ("linear", "embedding", "layer_norm", "rms_norm") or name in ALONG_DIM:
            x = tensor_value(node.args[0])
            if x is not None and axis.dim < x.dim():
                return [(node.args[0], axis)]
            return []
        if name == "addmm":
            return [(node.args[1], axis)] if axis.dim == 0 else []
        if name in CONVOLUTIONS:  # a position-wise convolution keeps each position where it was
            kept = not axis.folded and axis.by is None and _pointwise_on(node, axis.dim)
            return [(node.args[0], axis)] if kept else []
        if name == "matmul":
            a, b = tensor_value(node.args[0]), tensor_value(node.args[1])
            if axis.dim == out.dim() - 2 and a.dim() >= 2:
                return [(node.args[0], dataclasses.replace(axis, dim=a.dim() - 2))]
            if axis.dim == out.dim() - 1 and b.dim() >= 2:
                return [(node.args[1], dataclasses.replace(axis, dim=b.dim() - 1))]
            return []
        if name in VIEWS:
            mapped = map_view_axis(out.shape, tensor_value(node.args[0]).shape, axis, self.n)
            return [(node.args[0], mapped)] if mapped else []
        if name == "getitem":
            src = tensor_value(node.args[0])
            mapping = getitem_dims(src, out, node.args[1]) if src is not None else None
            for in_dim, entry in (mapping or {}).items():
                if entry is not None and entry[0] == axis.dim and entry[1]:
                    return [(node.args[0], dataclasses.replace(axis, dim=in_dim))]
            return []  # a partial slice of a longer table: this node is a per-position source
        if name in ("cat", "concat", "concatenate"):
            dim = normalize_dim(arg(node, 1, "dim", 0), out.dim())
            return [] if dim == axis.dim else [(t, axis) for t in node.args[0]]
        if name == "stack":  # a new dim: each input has the axis one earlier past it (Gemma-3n's AltUp streams)
            dim = normalize_dim(arg(node, 1, "dim", 0), out.dim())
            moved = dataclasses.replace(axis, dim=axis.dim - (dim < axis.dim))
            return [] if dim == axis.dim else [(t, moved) for t in node.args[0]]
        if name in REDUCTIONS:  # over other dims (a weighted sum of hyper-connection streams): the kept dim
            dims = reduced_dims(node)
            kept = _kept_dims(node, dims) if dims else None
            return [(node.args[0], dataclasses.replace(axis, dim=kept[axis.dim]))] if kept else []
        dims = self._dim_map(node, name)
        if dims is not None:
            inverse = {o: i for i, o in dims.items()}
            if axis.dim in inverse:
                return [(node.args[0], dataclasses.replace(axis, dim=inverse[axis.dim]))]
        return []

    def _split_backward(self, node: fx.Node, name: str, axis: Axis) -> list[tuple[fx.Node, Axis]]:
        """The input of ``chunk`` / ``split`` / ``unbind`` whose results carry ``axis``; none when it splits
        along the token axis. ``unbind`` removes its dim, so the input's axis is one later past it."""
        x = tensor_value(node.args[0])
        index, keyword, default = ALONG_DIM[name]
        dim = arg(node, index, keyword, default)
        if x is None or not isinstance(dim, int):
            return []
        dim = normalize_dim(dim, x.dim())
        in_dim = axis.dim + 1 if name == "unbind" and dim <= axis.dim else axis.dim
        return [] if in_dim == dim else [(node.args[0], dataclasses.replace(axis, dim=in_dim))]


def _pointwise_on(node: fx.Node, dim: int) -> bool:
    """A convolution of kernel 1 in every spatial dim, at stride 1 without padding, with ``dim`` one of its
    input's spatial dims: each position of ``dim`` maps to itself."""
    value, kernel = tensor_value(node.args[0]), tensor_value(arg(node, 1, "weight"))
    if value is None or kernel is None:
        return False

    def every(setting: Any, size: int) -> bool:
        return all(v == size for v in (setting if isinstance(setting, (list, tuple)) else [setting]))

    padding = arg(node, 4, "padding", 0)
    return (all(same_size(k, 1) for k in kernel.shape[2:]) and every(arg(node, 3, "stride", 1), 1)
            and (padding in ("valid", "same") or every(padding, 0)) and value.dim() - (kernel.dim() - 2) <= dim
            < value.dim())


def _is_legacy_empty(node: Any) -> bool:
    value = tensor_value(node)
    return value is not None and value.dim() == 1 and same_size(value.shape[0], 0)


def _size_preserving_map(in_shape, out_shape) -> dict[int, int]:
    """Dims of ``in_shape`` that keep their size in ``out_shape`` (right-aligned, squeezed 1s skipped)."""
    mapping, j = {}, len(out_shape) - 1
    for i in range(len(in_shape) - 1, -1, -1):
        while j >= 0 and not same_size(in_shape[i], out_shape[j]) and same_size(out_shape[j], 1):
            j -= 1
        if j >= 0 and same_size(in_shape[i], out_shape[j]):
            mapping[i] = j
            j -= 1
    return mapping


def map_view_axis(in_shape, out_shape, axis: Optional[Axis], n: Any) -> Optional[Axis]:
    """Where a reshape puts the token axis: the output dim holding exactly the same rows.

    The rows before each token (outer dims and folded leads) and the elements of each token's row (features after
    the token dim, and folded trailing rows) must be preserved as products; the token dim may absorb or release
    leading dims (``[B, N, D] <-> [B * N, D]``: ``lead``) and trailing ones, whole (``[B, N, H * D] <->
    [B * N * H, D]``, a per-head norm on heads folded into rows: ``trail``), never split a token's row otherwise.
    """
    if axis is None:
        return None
    outer = prod(in_shape[: axis.dim]) * axis.lead
    inner = prod(in_shape[axis.dim + 1 :]) * axis.trail
    for j in range(len(out_shape)):
        lead, trail = _quotient(outer, prod(out_shape[:j])), _quotient(inner, prod(out_shape[j + 1 :]))
        if lead is not None and trail is not None and same_size(out_shape[j], n * lead * trail):
            return Axis(j, lead, trail)
    return None


def _same_rows(a: Axis, b: Axis) -> bool:
    """The two dims hold the token rows the same way (their positions address the same rows); symbolic folds
    compared without a guard."""
    return same_size(a.lead, b.lead) and same_size(a.trail, b.trail)


def _quotient(a: Any, b: Any) -> Optional[Any]:
    """``a / b`` where ``b`` divides ``a`` for every value of their symbols: 1 for the same size, the quotient of
    integers, or of sizes whose ratio is a polynomial (``B * N / N``: a symbolic batch folded into the rows);
    else None."""
    if same_size(a, b):
        return 1
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    if not all(isinstance(x, (int, torch.SymInt)) for x in (a, b)):
        return None
    ratio = sympy.cancel(sympy.sympify(a.node.expr if isinstance(a, torch.SymInt) else a)
                         / (b.node.expr if isinstance(b, torch.SymInt) else b))
    return a // b if sympy.fraction(ratio)[1] == 1 and ratio.is_integer else None  # sizes' symbols are integers


def _view_dims(src: torch.Tensor, index: Any) -> Optional[dict[int, Optional[tuple[int, bool]]]]:
    """:func:`getitem_dims` of ``src[index]`` for a basic index of plain values; None for any other."""
    entries = index if isinstance(index, tuple) else (index,)
    if any(isinstance(e, fx.Node) or (isinstance(e, slice) and any(isinstance(b, fx.Node)
                                                                    for b in (e.start, e.stop, e.step)))
           for e in entries):
        return None
    return getitem_dims(src, src[index], index)


def getitem_dims(src: torch.Tensor, out: torch.Tensor, index: Any) -> Optional[dict[int, Optional[tuple[int, bool]]]]:
    """For ``src[index]``: input dim -> (output dim, whole dim kept) or None when the dim is removed.

    Returns None when the index holds a tensor (advanced indexing).
    """
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, fx.Node) and tensor_value(e) is not None for e in entries):
        return None
    consumed = sum(1 for e in entries if e is not None and e is not Ellipsis)
    mapping: dict[int, Optional[tuple[int, bool]]] = {}
    i = o = 0
    for e in entries:
        if e is None:
            o += 1
        elif e is Ellipsis:
            for _ in range(src.dim() - consumed):
                mapping[i] = (o, True)
                i, o = i + 1, o + 1
        elif isinstance(e, slice):
            mapping[i] = (o, same_size(src.shape[i], out.shape[o]))
            i, o = i + 1, o + 1
        else:  # an integer (or SymInt) index removes the dim
            mapping[i] = None
            i += 1
    while i < src.dim():
        mapping[i] = (o, True)
        i, o = i + 1, o + 1
    return mapping


def _kept_dims(node: fx.Node, dims: set) -> Optional[list[int]]:
    """For each output dim of a reduction over ``dims``, the input dim it is (None where the output is not a
    tensor)."""
    value, out = tensor_value(node.args[0]), example_value(node)
    first = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(first, torch.Tensor):
        return None
    if first.dim() == value.dim():  # keepdim
        return list(range(value.dim()))
    return [d for d in range(value.dim()) if d not in dims]
