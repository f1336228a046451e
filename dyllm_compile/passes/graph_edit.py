"""Editing a copy of a Dynamo graph: the copy, and nodes emitted with the example values the analysis reads.

The passes that replace ops (:mod:`hand_written_attention`, :mod:`fused_layers`) never edit the graph Dynamo
handed over (it is the fallback when anything after them fails): they edit a copy, and every node they emit
carries an ``example_value`` computed in the fake mode of the values it reads, as Dynamo records them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from .graph_utils import example_value, is_impure


def copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph (node meta shallow-copied) and the map from ``gm``'s nodes to the copy's; make the
    module with :func:`module_of` once it is edited."""
    copies: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    output = graph.graph_copy(gm.graph, copies)
    graph.output(output).meta.update(gm.graph.output_node().meta)
    graph._codegen = gm.graph._codegen
    return graph, copies


def module_of(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` (a copy of ``gm``'s, edited) as a module sharing ``gm``'s attributes and meta."""
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def without_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it without the values nothing reads (Dynamo keeps some: Zaya's router returns its logits
    reshaped, and the MoE block that calls it drops them), which the passes that follow a value's readers would take
    for readers: a region stops growing at a value read outside it."""
    if all(n.users or is_impure(n) for n in gm.graph.nodes):
        return gm
    graph, _ = copy_graph(gm)
    graph.eliminate_dead_code(is_impure)
    return module_of(gm, graph)


class Emitter:
    """Emits call_function nodes (and copies of call_method ones) before ``anchor``, each with its example value."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor = graph, anchor

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        return self._recorded(node, target)

    def like(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node:
        """A copy of ``node`` (a call_function or call_method) reading ``args`` and ``kwargs``."""
        with self.graph.inserting_before(self.anchor):
            copy = self.graph.create_node(node.op, node.target, args, kwargs)
        if node.op == "call_method":
            return self._recorded(copy, lambda self_, *a, **k: getattr(self_, node.target)(*a, **k))
        return self._recorded(copy, node.target)

    def _recorded(self, node: fx.Node, target: Callable) -> fx.Node:
        """``node`` with its example value, ``target`` applied to its arguments' values."""
        values = fx.node.map_arg((node.args, node.kwargs), example_value)
        # the values' own fake mode, not the ambient one (a backend runs in Dynamo's tracing context)
        fake_mode = next((v.fake_mode for v in pytree.tree_leaves(values) if isinstance(v, FakeTensor)), None)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            node.meta["example_value"] = target(*values[0], **values[1])
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        return node


def erase_unused(graph: fx.Graph, nodes: Any) -> None:
    """Erases those of ``nodes`` that nothing reads, readers first (each node's last reader is gone by the time it
    comes up)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def drop_unbacked_bindings(graph: fx.Graph) -> None:
    """Forgets which data-dependent sizes (``nonzero`` in a model's MoE dispatch) each node bound: they are symbols
    of Dynamo's ShapeEnv, and a graph lowered outside Dynamo's compile is traced in a fake mode of its own, whose
    new symbols can have the same names; retracing would try to rename one to itself ("possible memo disaster")."""
    for node in graph.nodes:
        node.meta.pop("unbacked_bindings", None)
