"""Piecewise lowering: a variant compiled a few layers at a time, each distinct piece once.

A rewritten variant repeats one layer's code per layer (its weights and caches are inputs), and compiling it whole
lowers every copy again: on a 2-core CPU, most of a 4-layer sparse variant's compile time. Here the graph is split
at the layer cuts its builder marked (:mod:`dyllm_compile.passes.layer_cuts`) with ``torch.fx``'s
``split_module``, the layers of a deep model several to a piece (:func:`auto_layers_per_piece`: each piece call
costs the host time); fake inputs are propagated through the pieces (a piece that is the same code on the very same
input layouts as one before is not run again: it has that piece's outputs); pieces that are the same code on
inputs of the same layouts are compiled once and share the compiled function. What runs is the split module:
plain Python calling the compiled pieces in order (a few calls per step), as vLLM runs its piecewise graphs.

What the pieces must keep:

- A piece's compiled code is reused only for a piece with the same nodes (same ops, same constants, the same
  submodules by structure or by a ``piece_key`` that says the behaviour is the same) on inputs of the same sizes,
  strides, dtypes and devices: anything else compiles a piece of its own.
- No data-dependent (unbacked) size crosses from one piece into another: a compiled piece reads its input sizes
  at run time, but an unbacked size has no example to trace with. The builders keep each row selection within
  its layer; a graph where one still crosses is compiled whole.
- Inductor keeps each output's strides as in eager (``keep_output_stride``), so the fake layouts propagated
  between pieces are the layouts the compiled pieces exchange; not always (a dense attention's context at batch
  1 came back transposed on torch 2.11), so a piece compiled for a contiguous input copies one that is not.

The cost: no fusion across a cut (the residual add that ends a layer and the next layer's norm run as two
kernels), measured in benchmarks/bench_decode.py (``piecewise`` option).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._prims_common import is_contiguous_or_false
from torch.fx.passes.split_module import split_module

from .passes.layer_cuts import PIECE_END
from .size_guards import SizeGuards

log = logging.getLogger("dyllm_compile")

CompilePiece = Callable[[fx.GraphModule, list], Callable]


class _Compiled(torch.nn.Module):
    """A compiled piece in the split module's place of the piece's graph.

    ``layouts``: the positions of the inputs an earlier piece computed, each with the strides it was compiled for
    (None: a symbolic layout, compiled contiguous). An earlier piece's output can come back from Inductor in
    another layout than its fake one (measured on torch 2.11: at batch 1 a dense hand-written site's context as
    [B, N, H, D] memory viewed as [B, H, N, D]), and the compiled code does not check its inputs (the variants are
    compiled without Inductor's size assertions, :func:`dyllm_compile.lowering.variant_options`): such an input
    is copied into the layout the piece was compiled for, logged once."""

    def __init__(self, fn: Callable, layouts: Sequence[tuple[int, Optional[tuple[int, ...]]]] = ()) -> None:
        super().__init__()
        self.fn, self.layouts, self.copied = fn, tuple(layouts), False

    def forward(self, *args: Any) -> Any:
        if any(not _has_layout(args[i], stride) for i, stride in self.layouts):
            if not self.copied:
                self.copied = True
                log.info("dyllm: a piece's input came in another layout than it was compiled for: copied")
            args = list(args)
            for i, stride in self.layouts:
                if not _has_layout(args[i], stride):
                    args[i] = _restrided(args[i], stride)
        return self.fn(*args)


def _has_layout(x: torch.Tensor, stride: Optional[tuple[int, ...]]) -> bool:
    """``x`` has the strides ``stride`` (those of dims of size 1 aside, as Inductor's assertion reads them), or
    with None is contiguous."""
    if stride is None:
        return x.is_contiguous()
    return x.stride() == stride or all(s == t or n == 1 for n, s, t in zip(x.shape, x.stride(), stride))


def _restrided(x: torch.Tensor, stride: Optional[tuple[int, ...]]) -> torch.Tensor:
    if stride is None:
        return x.contiguous()
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)


def _input_layouts(call: fx.Node, args: Sequence[Any]) -> list[tuple[int, Optional[tuple[int, ...]]]]:
    """Positions and compiled strides (:class:`_Compiled`) of the tensor inputs of the piece ``call`` calls that
    an earlier piece computed (the graph's own inputs, weights and caches, have theirs checked before the graph
    runs): the example ``args``' strides where they are static, else None where the example is contiguous
    (decided without a guard); a symbolic layout that is not (none is made so) goes unchecked, and so does a
    tensor of one element (a layer's row count), whose every layout is the same."""
    layouts: list[tuple[int, Optional[tuple[int, ...]]]] = []
    for i, (node, a) in enumerate(zip(call.args, args)):
        if not isinstance(node, fx.Node) or node.op == "placeholder" or not isinstance(a, torch.Tensor):
            continue
        if not any(isinstance(s, torch.SymInt) for s in (*a.shape, *a.stride())):
            if any(n > 1 for n in a.shape):  # (one element, a row count: any strides are its layout)
                layouts.append((i, tuple(a.stride())))
        elif is_contiguous_or_false(a):
            layouts.append((i, None))
    return layouts


class _Ref:
    """A node argument in a structure key: the position of the node it names within its graph."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def split_pieces(gm: fx.GraphModule, layers_per_piece: int = 1) -> Optional[fx.GraphModule]:
    """``gm`` split after each node marked ``PIECE_END`` (None when nothing is marked): a module whose graph
    calls ``submod_0``, ``submod_1``, ... in order, each returning a tuple. ``layers_per_piece``: the pieces
    between the first cut and the last (the layers) go ``layers_per_piece`` to a piece (the last one shorter where
    that does not divide them); the piece before the first cut and the one after the last stay as they are."""
    ends = [n for n in gm.graph.nodes if n.meta.get(PIECE_END)]
    if not ends:
        return None
    kept = {end for i, end in enumerate(ends) if i % layers_per_piece == 0 or i == len(ends) - 1}
    piece, pieces = 0, {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        pieces[node] = piece
        piece += node in kept
    split = _split_module(gm, pieces.__getitem__)
    for call in split.graph.nodes:
        if call.op == "call_module":
            _order_outputs(split.get_submodule(call.target), call)
    split.recompile()
    return split


#: With layers grouped automatically, about how many pieces the layers make (:func:`auto_layers_per_piece`)
LAYER_PIECES = 8


def auto_layers_per_piece(layer_keys: Sequence[str]) -> int:
    """How many layers go to a piece, given each layer piece's :func:`structure_key`: the most, up to an
    (``LAYER_PIECES``)th of the layers and dividing their count, for which the distinct pieces to compile hold no
    more layers in all than an (``LAYER_PIECES``)th of the layers or than the distinct layers. A piece call costs
    the host more than a small layer's code, and the host is a GPU step's bottleneck at batch 1 (docs/rewrite.md,
    "Piecewise lowering": on 32 small layers a sparse call took 8.5 ms as 32 one-layer pieces, 6.9 as 8 of four
    layers, 5.3 as one graph), while compile time grows with the layers compiled. Alike layers of a deep model: a
    few to a piece; a model of under 2 x ``LAYER_PIECES`` layers: one; a repeating pattern of layers
    (sliding-window and global attention in turn): whole within a piece where the count allows."""
    n = len(layer_keys)
    budget = max(n // LAYER_PIECES, len(set(layer_keys)))
    for k in range(n // LAYER_PIECES, 1, -1):
        if n % k == 0 and len({tuple(layer_keys[i : i + k]) for i in range(0, n, k)}) * k <= budget:
            return k
    return 1


# split_module's tuple_return (every piece returns a tuple, even of one value) arrived after torch 2.11
_HAS_TUPLE_RETURN = "tuple_return" in inspect.signature(split_module).parameters


def _split_module(gm: fx.GraphModule, piece_of: Callable[[fx.Node], int]) -> fx.GraphModule:
    """split_module with every piece returning a tuple, on every supported torch."""
    if _HAS_TUPLE_RETURN:
        return split_module(gm, gm, piece_of, keep_original_order=True, tuple_return=True)
    split = split_module(gm, gm, piece_of, keep_original_order=True)
    for call in list(split.graph.nodes):
        if call.op != "call_module":
            continue
        piece = split.get_submodule(call.target)
        output = piece.graph.output_node()
        if isinstance(output.args[0], (tuple, list)):
            continue
        output.args = ((output.args[0],),)  # a piece of one value returns it bare there
        piece.recompile()
        with split.graph.inserting_after(call):
            item = split.graph.call_function(operator.getitem, (call, 0))
        call.replace_all_uses_with(item, delete_user_cb=lambda user: user is not item)
    return split


def _order_outputs(piece: fx.GraphModule, call: fx.Node) -> None:
    """Returns ``piece``'s values in the order it computes them. split_module orders them by where later pieces
    first read them, which differs between alike layers when the pieces after them differ (the head reads the
    last layer's values in another order than a layer does)."""
    position = {node: i for i, node in enumerate(piece.graph.nodes)}
    output = piece.graph.output_node()
    values = output.args[0]
    order = sorted(range(len(values)), key=lambda i: position[values[i]])
    output.args = (tuple(values[i] for i in order),)
    piece.recompile()
    for user in list(call.users):  # getitem(call, i): the value that moved to order.index(i)
        user.args = (call, order.index(user.args[1]))


def structure_key(gm: fx.GraphModule) -> str:
    """``gm``'s nodes with names replaced by positions: equal for two graphs that compute the same function of
    their inputs in the same way. Functions, attributes and modules without a ``piece_key`` count by identity."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target: Any = _module_key(gm.get_submodule(node.target))
        elif node.op == "get_attr":
            target = ("attr", id(operator.attrgetter(node.target)(gm)))
        elif node.op in ("placeholder", "output"):
            target = node.op
        else:
            target = (getattr(node.target, "__module__", None), getattr(node.target, "__qualname__", None),
                      node.target if isinstance(node.target, str) else id(node.target))
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(index[n]))
        lines.append(f"{node.op} {target!r} {args!r}")
    return "\n".join(lines)


def _module_key(module: torch.nn.Module) -> Any:
    if isinstance(module, fx.GraphModule):
        return ("graph", structure_key(module))
    key = getattr(module, "piece_key", None)
    return ("keyed", type(module).__qualname__, key()) if callable(key) else ("module", id(module))


def layout_key(args: Sequence[Any], same_symbols: bool = False) -> tuple:
    """What a compiled piece assumes of its inputs: sizes, strides, offsets, dtypes, devices, and the value of
    anything else. A symbolic size is its expression with the symbols numbered in order of appearance: two pieces
    with sizes of their own (a capacity per layer, each a symbol of the piece's ShapeEnv) but of the same form
    share one compiled function, whose guards are then checked against each piece's sizes. ``same_symbols``: the
    expressions as they are, equal only for the very same sizes."""
    symbols: dict[sympy.Symbol, sympy.Symbol] = {}

    def form(value: Any) -> str:
        if not isinstance(value, torch.SymInt) or same_symbols:
            return str(value)
        expr = value.node.expr
        for symbol in sorted(expr.free_symbols, key=str):
            symbols.setdefault(symbol, sympy.Symbol(f"size{len(symbols)}"))
        return str(expr.xreplace(symbols))

    return tuple((tuple(map(form, a.shape)), tuple(map(form, a.stride())), form(a.storage_offset()), a.dtype,
                  a.device) if isinstance(a, torch.Tensor) else repr(a) for a in args)


class NotPiecewise(Exception):
    """The split cannot be compiled piece by piece (the reason says why): the graph is compiled whole."""


class _Propagate(fx.Interpreter):
    """Runs the split module on fake inputs and records each piece's example inputs: fresh fake tensors of the
    same layouts, one FakeTensorMode per piece, so that each piece compiles like a graph of its own (the fake run
    leaves its row selections' unbacked sizes unbound in its ShapeEnv, which a trace from there would trip on)."""

    def __init__(self, split: fx.GraphModule, guards: SizeGuards) -> None:
        super().__init__(split)
        self.examples: dict[str, list] = {}
        self.structures: dict[str, str] = {}
        self.guards = guards
        self._outputs: dict[tuple, Any] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        self.examples[target] = _fresh(target, args, self.guards)
        self.structures[target] = structure_key(self.module.get_submodule(target))
        # A piece with the code and the very input layouts (the same symbols, not only the same form) of one run
        # before has that piece's outputs: running each repeated layer on fake tensors again was most of a deep
        # model's propagation, and fake outputs depend on nothing but the layouts (a data-dependent size is a new
        # symbol at each run, but one crossing into the next piece stops the split either way)
        key = (self.structures[target], layout_key(args, same_symbols=True), repr(kwargs))
        if key not in self._outputs:
            self._outputs[key] = super().call_module(target, args, kwargs)
        return self._outputs[key]


def _fresh(target: str, args: Sequence[Any], guards: SizeGuards) -> list:
    """``args`` as fake inputs of a mode of their own, whose ShapeEnv ``guards`` keeps; a symbolic size of the
    lowering's inputs (a capacity) becomes a fresh symbol of that mode."""
    mode = guards.mode()
    fresh = []
    for a in args:
        if isinstance(a, torch.SymInt):
            raise NotPiecewise(f"{target} reads the size {a}")
        if isinstance(a, torch.Tensor):
            try:
                a = guards.fresh(mode, a)
            except ValueError as err:
                # unbacked: a data-dependent size from an earlier piece; a size of Dynamo's: a dynamic graph,
                # whose sizes the whole-graph lowering keeps symbolic in Dynamo's ShapeEnv
                raise NotPiecewise(f"{target} reads {err}") from None
        fresh.append(a)
    return fresh


def lower_piecewise(gm: fx.GraphModule, example_args: Sequence[Any], compile_piece: CompilePiece,
                    guards: Optional[SizeGuards] = None, layers_per_piece: Optional[int] = None
                    ) -> Optional[Callable]:
    """``gm`` compiled piece by piece from the layouts of ``example_args`` (real or fake), each distinct piece
    once with ``compile_piece(piece, example_inputs)``; None where splitting would gain nothing (no cuts, no piece
    repeated) or cannot work (a data-dependent size at a piece's input): then compile ``gm`` whole. Symbolic
    sizes of ``example_args`` must be ``guards``' inputs: the pieces' ShapeEnvs join it. ``layers_per_piece``:
    layers to a piece (:func:`split_pieces`); None: :func:`auto_layers_per_piece`."""
    split = split_pieces(gm)
    if split is None:
        return None
    if layers_per_piece is None:
        layers = [split.get_submodule(n.target) for n in split.graph.nodes if n.op == "call_module"][1:-1]
        layers_per_piece = auto_layers_per_piece([structure_key(p) for p in layers])
    if layers_per_piece > 1:
        split = split_pieces(gm, layers_per_piece)
    guards = SizeGuards() if guards is None else guards
    propagate = _Propagate(split, guards)
    try:
        inputs = _fresh("the graph", example_args, guards)  # a mode of its own: the caller's ShapeEnv stays
        # The Python dispatcher, as in tracing: its decompositions take symbolic sizes where some C++ composites
        # do not (torch 2.11's linear on rows of a data-dependent count calls numel())
        with next((a.fake_mode for a in inputs if isinstance(a, torch.Tensor)), contextlib.nullcontext()), \
                enable_python_dispatcher():
            propagate.run(*inputs)
    except NotPiecewise as err:
        log.info("dyllm: compiled whole, not piecewise: %s", err)
        return None
    keys = {target: (propagate.structures[target], layout_key(args)) for target, args in propagate.examples.items()}
    if len(set(keys.values())) == len(keys):
        log.info("dyllm: compiled whole, not piecewise: no piece of %d repeats", len(keys))
        return None
    compiled: dict[tuple, tuple[Callable, list]] = {}
    calls = {n.target: n for n in split.graph.nodes if n.op == "call_module"}
    for target, args in propagate.examples.items():
        if keys[target] not in compiled:
            compiled[keys[target]] = compile_piece(split.get_submodule(target), args), args
        else:  # the guards of the first piece's compile hold for this piece's sizes too
            guards.alias(compiled[keys[target]][1], args)
        setattr(split, target, _Compiled(compiled[keys[target]][0], _input_layouts(calls[target], args)))
    log.info("dyllm: compiled %d pieces (%d layers to a piece) as %d distinct ones", len(keys), layers_per_piece,
             len(compiled))
    return split
