"""Extracts a region (or chain) as a standalone GraphModule that runs on any number of rows.

The extracted module takes the region's token-carrying inputs, then its other inputs, then (when re-emitted for
gathered rows) the row count K, and returns the values of its exits (``Region.exits``) as a tuple. Sizes that spell
the token count inside the region (view/reshape/expand sizes, full slices of the token axis) are replaced by K, so
the same ops run on K gathered rows; with K = N it is the dense computation. Running it on rows gathered along each
token input's axis gives the dense exits' rows: the property the rewrite relies on and the tests check.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

from .graph_utils import arg, example_value, index_position, listed_args, op_name, tensor_value
from .in_place_writes import set_items
from .op_rules import CONVOLUTIONS, FACTORIES, LIKE_FACTORIES, Info
from .regions import Region

_SIZED = frozenset(("view", "reshape", "expand"))

#: Whether a rewritten graph can compute a row count with a symbolic batch folded in (``rows * s0``) from the
#: graph's input sizes: ``fx.Graph.materialize_symint``, torch >= 2.13. Without it such a region stays dense.
SIZES_SYMBOLIC_FOLDS = hasattr(fx.Graph, "materialize_symint")


class RegionNotRelocatable(ValueError):
    """The region holds an op whose token-count argument cannot be re-targeted to K rows."""


def extract_region(
    gm: fx.GraphModule, region: Region, infos: dict[fx.Node, Info], gathered: bool = False
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in region.token_inputs + region.other_inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    rows: Optional[fx.Node] = graph.placeholder("rows") if gathered else None
    for node in region.nodes:
        copy = graph.node_copy(node, lambda n: env[n])
        if rows is not None:
            retarget_rows(node, copy, infos, rows)
        env[node] = copy
    graph.output(tuple(env[x] for x in region.exits))
    return fx.GraphModule(gm, graph)


def retarget_rows(original: fx.Node, node: fx.Node, infos: dict[fx.Node, Info], rows: Any) -> None:
    """Rewrites the token-count size of ``node``, a copy of ``original``, to ``rows`` (an int or a node)."""
    name = op_name(node)
    axis = infos[original].axis
    if axis.selected:  # a data-dependent selection of rows: its sizes are its own count, not N's
        return
    if name == "arange":  # the inverse of a sort's permutation, as long as the rows (op_rules: Axis.order)
        node.args = (_times(node.graph, rows, axis.fold, node) if axis.folded else rows,)
        return
    if name in FACTORIES or name in LIKE_FACTORIES:  # an accumulator of per-token rows (op_rules): as many rows
        sizes = _spelled_out(node)                      # as the region has
        sizes[axis.dim] = _times(node.graph, rows, axis.fold, node) if axis.folded else rows
        like = node.args[:1] if name in LIKE_FACTORIES else ()
        # a whole size node's dims go back as one list, so that what follows it (full's value) keeps its place
        listed = isinstance(node.args[len(like)], (list, tuple)) or _whole_size(node) is not None
        node.args = (*like, tuple(sizes), *node.args[len(like) + 1:]) if listed else (*like, *sizes)
    elif name in _SIZED:
        sizes = _spelled_out(node)
        if sizes[axis.dim] != -1:
            sizes[axis.dim] = _times(node.graph, rows, axis.fold, node) if axis.folded else rows
        node.args = (node.args[0], tuple(sizes))  # one argument: as Tensor.view takes it, and torch.reshape must
    elif name in CONVOLUTIONS:  # of kernel 1 (op_rules: any other mixes tokens); Inductor cannot lower a
        # convolution over a data-dependent length, so it runs as the product it is
        node.target = channel_product
        node.args = (node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1))
        node.kwargs = {}
    elif (name == "getitem" or node.target is set_items) and tensor_value(original.args[0]) is not None \
            and infos[original.args[0]].axis:  # (a table read at token-carrying indices: nothing to rewrite)
        # The analysis proved a slice of the token axis keeps all of it ("x[..., :n]"): make it a plain ':'.
        src = original.args[0]
        index = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
        position = index_position(index, tensor_value(src).dim(), infos[src].axis.dim)
        if position is not None and isinstance(index[position], slice):
            index[position] = slice(None)
        node.args = (node.args[0], tuple(index), *node.args[2:])
    else:
        check_relocatable(original, infos)


def channel_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, groups: int = 1
                    ) -> torch.Tensor:
    """A convolution of kernel 1 in every spatial dim, at stride 1 without padding (``conv1d(x, weight, bias,
    groups=groups)`` and its 2-d and 3-d forms), computed as what it is: at each position, the channels times the
    kernel (per group: a block-diagonal product)."""
    batched = x.dim() == weight.dim()
    rows = (x if batched else x.unsqueeze(0)).movedim(1, -1)  # [B, *positions, C_in]
    kernel = weight.flatten(1)  # [C_out, C_in / groups]
    if groups == 1:
        out = torch.nn.functional.linear(rows, kernel, bias)
    else:
        out = torch.einsum("...gi,goi->...go", rows.unflatten(-1, (groups, -1)), kernel.unflatten(0, (groups, -1)))
        out = out.flatten(-2) if bias is None else out.flatten(-2) + bias
    out = out.movedim(-1, 1)
    return out if batched else out.squeeze(0)


def check_relocatable(node: fx.Node, infos: dict[fx.Node, Info]) -> None:
    """Raises :class:`RegionNotRelocatable` where :func:`retarget_rows` cannot re-target ``node``."""
    name = op_name(node)
    axis = infos[node].axis
    if (name == "arange" and (axis is None or not axis.order)) or (name in LIKE_FACTORIES and axis is None):
        raise RegionNotRelocatable(f"'{name}' builds a token-sized tensor inside the region")
    if axis is None or axis.selected or not isinstance(axis.fold, torch.SymInt) or SIZES_SYMBOLIC_FOLDS:
        return
    if name == "arange" or name in FACTORIES or name in LIKE_FACTORIES or (
            name in _SIZED and _whole_size(node) is None and _sizes(node)[axis.dim] != -1):
        raise RegionNotRelocatable(f"'{name}' sizes rows with a symbolic batch folded in (computing that size "
                                   "in the rewritten graph needs torch.fx.Graph.materialize_symint, torch >= 2.13)")


def _sizes(node: fx.Node) -> list[Any]:
    """The sizes a factory (``zeros(sizes)``, ``zeros(*sizes)``) or a view / reshape / expand node asks for."""
    if op_name(node) in FACTORIES:
        return list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else list(node.args)
    if op_name(node) in LIKE_FACTORIES:  # x.new_empty(sizes) or x.new_empty(*sizes)
        return list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    return listed_args(node)


def _whole_size(node: fx.Node) -> Optional[fx.Node]:
    """The size node of ``x.reshape(y.shape)`` / ``zeros(y.shape)`` (one node, a whole ``torch.Size``), if so."""
    sizes = _sizes(node)
    whole = len(sizes) == 1 and isinstance(example_value(sizes[0]), (tuple, list))
    return sizes[0] if whole else None


def _spelled_out(node: fx.Node) -> list[Any]:
    """:func:`_sizes`, a whole size node read dim by dim (before ``node``), so that one entry can be replaced: a
    dynamic graph spells ``x.reshape(y.shape)`` with the size node of ``y``, computed outside the region."""
    whole = _whole_size(node)
    if whole is None:
        return _sizes(node)
    with node.graph.inserting_before(node):
        return [node.graph.call_function(operator.getitem, (whole, d)) for d in range(len(example_value(whole)))]


def _times(graph: fx.Graph, rows: fx.Node, fold: Any, anchor: fx.Node) -> fx.Node:
    """``rows * fold`` as a node before ``anchor``; a symbolic ``fold`` (a dynamic batch folded into the rows) is
    computed from the sizes of the graph's inputs that hold its symbols."""
    with graph.inserting_before(anchor):
        if isinstance(fold, torch.SymInt):
            fold = graph.materialize_symint(fold)
        return graph.call_function(operator.mul, (rows, fold))
