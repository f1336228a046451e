"""Turns in-place writes into data flow, so that the passes after this one, which follow a value's readers, see them.

Pattern: a node that writes into its first operand ``x``: ``x += y``, ``x.add_(y)``, ``x.index_add_(0, i, y)``,
``x.masked_fill_(m, v)``, ``x[i] = y``, ``relu(x, inplace=True)``. Dynamo's graph keeps them as written, so a
reader of ``x`` after the write has ``x`` as its operand, not the write: Hugging Face's MoE blocks accumulate the
experts' outputs with ``final.index_add_(...)`` as a statement and return ``final``, whose node is the
``zeros`` it started as. The analysis would take that value for zeros, and dead-code elimination would drop the
writes (nothing reads their results). Each write becomes its out-of-place form (``add``, ``index_add``, a copy
written into for ``x[i] = y``), cast back to ``x``'s dtype where the out-of-place op would promote it, and every
later reader of ``x``, or of the write's own result, reads the new node instead.

Invariant: the same function, computed without writes (the lowering reinstates them where it pays). A write
whose effect the new node cannot carry is reported instead and the graph left as it is: a write into a graph
input or module attribute (a side effect outside the graph), or into storage that another value made before the
write still reads after it (a view of ``x``, or the value ``x`` is a view of, would need the view replayed).
The analysis then keeps the whole graph dense, naming the write. The graph Dynamo handed over is never edited:
writes are replaced on a copy.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .graph_edit import Emitter, copy_graph, module_of
from .graph_utils import tensor_value

_OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                           operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                           operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_}
_OPERATOR_FUNCTIONS = {f for f in vars(operator).values() if callable(f) and not isinstance(f, type)}
# Methods named like writes that change no value: they set autograd's flag or move storage (MRA's
# ``zeros_like(q).requires_grad_()``), and return the tensor itself
_FLAG_SETTERS = frozenset(("requires_grad_", "share_memory_"))


def writes_first_operand(node: fx.Node) -> bool:
    """``node`` writes into its first operand: ``x += y``, ``x[i] = y``, ``x.add_(y)``, ``relu(x, inplace=True)``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_function" and (node.target in _OUT_OF_PLACE_OPERATORS or node.target is operator.setitem):
        return True
    if node.op == "call_function" and node.target in _OPERATOR_FUNCTIONS:
        return False  # operator.and_, or_, not_: the underscore only avoids a keyword (transformers 5's `mask & m`)
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _FLAG_SETTERS:
        return False
    return (name.endswith("_") and not name.startswith("_")) or node.kwargs.get("inplace") is True


def set_items(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``x[index] = value`` out of place: a copy of ``x`` written into."""
    out = x.clone()
    out[index] = value
    return out


# In-place methods whose out-of-place form has another name (the others drop the trailing underscore)
_RENAMED: dict[str, Callable] = {"copy_": torch.ops.aten.copy.default, "zero_": torch.zeros_like,
                                 "fill_": torch.fill}


def functionalize_writes(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """``gm``, or a copy of it with every in-place write made out of place; and the writes that could not be (then
    ``gm`` itself, unchanged), each described."""
    if not any(writes_first_operand(n) for n in gm.graph.nodes):
        return gm, []
    graph, _ = copy_graph(gm)
    memory = _Memory(list(graph.nodes))
    latest: dict[fx.Node, fx.Node] = {}  # a written value (or an earlier write's result) -> its newest version
    origin: dict[fx.Node, fx.Node] = {}  # a version made here -> the written value it is a version of
    # a write's out-of-place result -> the write Dynamo recorded: ``h += y`` rebinds h to the write's result, so a
    # second write into h names the first one's node, by now replaced by its result
    recorded: dict[fx.Node, fx.Node] = {}
    problems = []
    for node in memory.order:
        if not writes_first_operand(node):
            node.args, node.kwargs = fx.map_arg((node.args, node.kwargs), lambda a: latest.get(a, a))
            continue
        # as Dynamo recorded it, for its memory; its newest version is what the write reads
        written = recorded.get(node.args[0], node.args[0])
        view = _basic_view(written)
        # A write into a view x[index] writes x: x's newest version is followed (the view's, if read, is x[index]).
        # The view was made after earlier writes: its x is a version made here, which stands for Dynamo's value.
        owner = written if view is None else origin.get(view[0], view[0])
        current = latest.get(owner, owner)
        carried = {owner, written, node} | {n for n, v in latest.items() if v is current}
        node.args, node.kwargs = fx.map_arg((node.args, node.kwargs), lambda a: latest.get(a, a))
        new = memory.unfollowed(node, owner, carried, None if view is None else written) or _out_of_place(graph, node)
        if isinstance(new, str):
            problems.append(new)
            continue
        result = new
        if view is not None:
            new = Emitter(graph, node)(set_items, current, view[1], result)
            latest[written] = result
        for old in carried - {written} if view is not None else carried:
            latest[old] = new
        origin[new] = owner
        recorded[result] = node
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    if problems:
        return gm, problems
    return module_of(gm, graph), []


class _Memory:
    """Which values share memory, from Dynamo's fake values (they share storage where the values do), and who reads
    them when (``order``: the graph's nodes as they were before any write was replaced)."""

    def __init__(self, nodes: list[fx.Node]) -> None:
        self.order = {n: i for i, n in enumerate(nodes)}
        self.storage = {n: s for n in nodes if (s := _storage(tensor_value(n))) is not None}
        self.sharing: dict[StorageWeakRef, list[fx.Node]] = {}
        for node, storage in self.storage.items():
            self.sharing.setdefault(storage, []).append(node)
        self.outside = {self.storage[n] for n in nodes if n.op in ("placeholder", "get_attr") and n in self.storage}

    def unfollowed(self, write: fx.Node, written: Any, carried: set[fx.Node], view: Optional[fx.Node] = None
                   ) -> Optional[str]:
        """Why ``write`` into ``written`` (through its ``view``) cannot become data flow, or None: a value made
        before the write on the memory it writes, other than those the new node replaces (``carried``), read
        after it would miss the write."""
        what = f"in-place '{_label(write)}' into '{getattr(written, 'name', written)}'"
        if view is not None:
            what += f" (through its view '{view.name}')"
        storage = self.storage.get(written)
        if storage is None:
            return f"{what}: no recorded value to follow"
        if storage in self.outside:
            return f"{what}: writes into a graph input or module attribute"
        at = self.order[write]
        for other in self.sharing[storage]:
            late = [u for u in other.users if self.order.get(u, -1) > at]
            if other not in carried and self.order[other] < at and late:
                return (f"{what}: '{other.name}' shares its memory and is read after the write (by "
                        f"'{late[0].name}'), which would need it replayed")
        return None


def _basic_view(node: Any) -> Optional[tuple[fx.Node, Any]]:
    """``(x, index)`` when ``node`` is ``x[index]`` with a basic index (ints, slices, None, ``...``: a view of
    ``x``, which ``set_items(x, index, value)`` writes); None otherwise."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and tensor_value(node.args[0]) is not None):
        return None
    index = node.args[1]
    parts = index if isinstance(index, tuple) else (index,)
    tensors = [p for p in parts if isinstance(p, fx.Node) and tensor_value(p) is not None]
    if tensors or not all(p is None or p is Ellipsis or isinstance(p, (int, slice, fx.Node)) for p in parts):
        return None
    return node.args[0], index


def _storage(value: Optional[torch.Tensor]) -> Optional[StorageWeakRef]:
    try:
        return None if value is None else StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):  # vmap's batched values (HF's mask functions) have no storage
        return None


def _out_of_place(graph: fx.Graph, write: fx.Node) -> fx.Node | str:
    """The node computing ``write``'s result without writing, emitted before it; or why there is none."""
    written, rest, kwargs = write.args[0], write.args[1:], dict(write.kwargs)
    target: Optional[Callable] = None
    if write.op == "call_function" and write.target is operator.setitem:
        target = set_items
    elif write.op == "call_function" and write.target in _OUT_OF_PLACE_OPERATORS:
        target = _OUT_OF_PLACE_OPERATORS[write.target]
    elif kwargs.get("inplace") is True:
        target, kwargs["inplace"] = write.target, False
    elif write.op == "call_method":
        plain = getattr(torch.Tensor, write.target[:-1], None)
        target = _RENAMED.get(write.target) or (plain if callable(plain) else None)
    else:  # torch.relu_ and the like: the function of the same name without the underscore, where it lives
        name = getattr(write.target, "__name__", "")
        target = next((getattr(ns, name[:-1]) for ns in _NAMESPACES
                       if getattr(ns, name, None) is write.target and callable(getattr(ns, name[:-1], None))), None)
    if target is None:
        return f"in-place '{_label(write)}' into '{written.name}': no out-of-place form known"
    emit = Emitter(graph, write)
    new = emit(target, written, *rest, **kwargs)
    dtype = tensor_value(written).dtype
    if tensor_value(new).dtype != dtype:  # in place, the result keeps x's dtype; out of place it may promote
        new = emit(torch.Tensor.to, new, dtype)
    return new


_NAMESPACES = (torch.Tensor, torch, torch.nn.functional, torch._C._nn)


def _label(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))
