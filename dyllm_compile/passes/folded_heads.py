"""Unfolds attention heads that a model folded into the batch dim, so that its attention is found as a site.

Pattern: attention written on heads folded into the batch (fairseq's and DeBERTa's): q, k and v viewed from
``[B, H, N, D]`` to ``[B * H, N, D]``, the scores ``bmm(q, k^T)`` viewed back to ``[B, H, N, N]`` to be masked, the
probabilities folded again for ``bmm(p, v)``. A *fold* is a view or reshape of a 4-D value to 3-D whose first dim
is the product of the value's first two and whose other dims are its last two. Folded, the products do not read
[..., N, D] operands with the heads apart and a view stands between the scores and the softmax: the site search
(:mod:`~dyllm_compile.passes.attention_sites`) finds no attention there.

Replacement: each fold is sunk into its readers, to a fixed point. A reader that commutes with it is emitted on the
4-D value and the result folded again (``flatten(0, 1)``):

- elementwise ops and casts whose other tensor operands are numbers, 0-d tensors, tensors that broadcast over the
  folded dim (2-d, or a 3-d one of leading size 1), folds of the same leading dims, or other 3-d tensors of the
  fold's leading size (unflattened like it: DeBERTa adds its relative-position scores so); eval-mode dropout;
- a transpose of the last two dims, a softmax over one of them;
- ``bmm`` of two folds with the same leading dims, as ``matmul`` of the two 4-D values;

and a view of a fold back to the shape it was folded from is that value. The folds around an attention then meet
their unfolding views and vanish: the site reads ``softmax(matmul(q, k^T) ...) @ v`` on ``[B, H, N, D]``.

Invariant: the same function of the graph's inputs up to floating-point rounding (a batched product or an
elementwise op over ``[B * H, ...]`` is the same over ``[B, H, ...]``); a reader that does not commute keeps
reading the fold, which stays. The graph Dynamo handed over is never edited: a copy is, kept only where some
``bmm`` of two folds became a ``matmul``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from .graph_edit import Emitter, copy_graph, erase_unused, module_of
from .graph_utils import arg, is_impure, normalize_dim, op_name, same_shape, same_size, tensor_value
from .op_rules import ELEMENTWISE, VIEWS

#: Readers that keep their operand's shape and read nothing but its values (dropout: in eval mode only)
_CASTS = frozenset("to float half bfloat16 double type_as contiguous clone detach dropout".split())
_SOFTMAXES = frozenset(("softmax", "log_softmax"))


def unfold_heads(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it in which folds of heads into the batch are sunk through their readers (above)
    where that turns some ``bmm`` of folded operands into a ``matmul`` of unfolded ones."""
    if not any(op_name(n) == "matmul" and _is_3d(n) for n in gm.graph.nodes):
        return gm
    graph, _ = copy_graph(gm)
    sources = {n: n.args[0] for n in graph.nodes if _is_fold(n)}  # fold -> the 4-D value it folds
    work, touched, products = list(sources), [], 0
    while work:
        fold = work.pop()
        for reader in list(fold.users):
            if not reader.users:  # replaced already, as the reader of another fold
                continue
            unfolded = _unfolded(graph, reader, sources)
            if unfolded is None:
                continue
            touched.append(reader)
            if same_shape(tensor_value(unfolded).shape, tensor_value(reader).shape):  # a view back: the value
                reader.replace_all_uses_with(unfolded)
                continue
            products += op_name(reader) == "matmul"
            refold = Emitter(graph, reader)(torch.flatten, unfolded, 0, 1)
            reader.replace_all_uses_with(refold)
            sources[refold] = unfolded
            work.append(refold)
    if not products:
        return gm
    # the readers replaced, then the folds and the values that only they read
    candidates = set(touched) | set(sources) | set(sources.values())
    while dead := {n for n in candidates
                   if not n.users and n.op in ("call_function", "call_method") and not is_impure(n)}:
        erase_unused(graph, dead)
        candidates -= dead
    return module_of(gm, graph)


def _is_3d(node: fx.Node) -> bool:
    value = tensor_value(node)
    return value is not None and value.dim() == 3


def _is_fold(node: fx.Node) -> bool:
    """A view or reshape of a 4-D ``[B, H, X, Y]`` value to ``[B * H, X, Y]``."""
    if op_name(node) not in ("view", "reshape") or not _is_3d(node) or not isinstance(node.args[0], fx.Node):
        return False
    source, folded = tensor_value(node.args[0]), tensor_value(node)
    return (source is not None and source.dim() == 4 and same_size(folded.shape[0], source.shape[0] * source.shape[1])
            and same_shape(folded.shape[1:], source.shape[2:]))


def _unfolded(graph: fx.Graph, reader: fx.Node, sources: dict[fx.Node, fx.Node]) -> Optional[fx.Node]:
    """``reader`` of a fold computed on the unfolded values (a new node), the fold's own 4-D value where ``reader``
    views the fold back to it, or None where it does not commute with the fold."""
    name, value = op_name(reader), tensor_value(reader)
    folds = [a for a in reader.all_input_nodes if a in sources]
    if value is None or not folds:
        return None
    lead = tuple(tensor_value(sources[folds[0]]).shape[:2])
    first = reader.args[0] if reader.args and isinstance(reader.args[0], fx.Node) else None  # the op's self
    if name in VIEWS and first in sources and len(folds) == 1:
        source = sources[first]
        if not same_shape(value.shape, tensor_value(source).shape):
            return None
        return source if tensor_value(source).is_contiguous() else Emitter(graph, reader)(torch.Tensor.contiguous,
                                                                                           source)
    if value.dim() != 3 or not same_size(value.shape[0], lead[0] * lead[1]):
        return None
    emit = Emitter(graph, reader)
    if name == "matmul":
        if len(reader.args) != 2 or not all(a in sources for a in reader.args):
            return None
        a, b = reader.args
        if not _same_lead(sources[b], lead):
            return None
        return _checked(graph, emit(torch.matmul, sources[a], sources[b]), lead, value)
    if name == "transpose" and first in sources and len(reader.args) == 3:
        if not all(isinstance(d, int) for d in reader.args[1:]):
            return None
        dims = {normalize_dim(d, 3) for d in reader.args[1:]}
        return emit(torch.transpose, sources[first], 2, 3) if dims == {1, 2} else None
    if name in _SOFTMAXES and first in sources:
        dim = arg(reader, 1, "dim")
        dim = normalize_dim(dim, 3) if isinstance(dim, int) else 0
        kwargs = {k: v for k, v in reader.kwargs.items() if k != "dim"}
        node = emit.like(reader, (sources[first], dim + 1, *reader.args[2:]), kwargs) if dim else None
        return node and _checked(graph, node, lead, value)
    if name == "dropout" and arg(reader, 2, "training", True):
        return None
    if name not in ELEMENTWISE and name not in _CASTS:
        return None
    return _elementwise(graph, emit, reader, sources, lead)


def _elementwise(graph: fx.Graph, emit: Emitter, reader: fx.Node, sources: dict[fx.Node, fx.Node], lead: tuple
                 ) -> Optional[fx.Node]:
    """An elementwise ``reader`` of folds emitted on their values, its other tensor operands read as
    :func:`_operand` says; None where one cannot be."""
    unfolded = [sources[a] for a in reader.all_input_nodes if a in sources]
    if not all(_same_lead(u, lead) for u in unfolded):
        return None
    operands, emitted = {}, []
    for operand in reader.all_input_nodes:
        operands[operand] = sources.get(operand) or _operand(emit, operand, unfolded, lead, emitted)
        if operands[operand] is None:
            erase_unused(graph, emitted)
            return None
    args, kwargs = fx.node.map_arg((reader.args, reader.kwargs), operands.__getitem__)
    node = _checked(graph, emit.like(reader, args, kwargs), lead, tensor_value(reader))
    if node is None:
        erase_unused(graph, emitted)
    return node


def _same_lead(node: fx.Node, lead: tuple) -> bool:
    return same_shape(tensor_value(node).shape[:2], lead)


def _operand(emit: Emitter, operand: fx.Node, unfolded: list[fx.Node], lead: tuple, emitted: list[fx.Node]
             ) -> Optional[fx.Node]:
    """What an elementwise reader of folds reads for ``operand``, not a fold, once emitted on their values: the
    operand where it broadcasts the same either way (at most 2-d, or 3-d of leading size 1), a 3-d operand of the
    folds' leading size unflattened to their two leading dims (appended to ``emitted``); None for anything else."""
    value = tensor_value(operand)
    if value is None or value.dim() <= 2 or (value.dim() == 3 and same_size(value.shape[0], 1)):
        return operand
    if value.dim() != 3 or not same_size(value.shape[0], lead[0] * lead[1]):
        return None
    heads = lead[1].node.maybe_as_int() if isinstance(lead[1], torch.SymInt) else lead[1]
    if isinstance(heads, int):  # not reshape_as(a fold's value): that would read the scores outside the attention
        emitted.append(emit(torch.unflatten, operand, 0, (-1, heads)))
        return emitted[-1]
    like = next((u for u in unfolded if same_shape(tensor_value(u).shape[2:], value.shape[1:])), None)
    if like is None:
        return None
    emitted.append(emit(torch.Tensor.reshape_as, operand, like))
    return emitted[-1]


def _checked(graph: fx.Graph, node: fx.Node, lead: tuple, folded: torch.Tensor) -> Optional[fx.Node]:
    """``node`` if its value is ``folded`` unfolded to ``lead``; else None, ``node`` erased."""
    if same_shape(tensor_value(node).shape, lead + tuple(folded.shape[1:])):
        return node
    graph.erase_node(node)
    return None
