"""Small helpers over Dynamo FX graphs: canonical op names, example values, symbolic size comparison.

Dynamo graphs spell one op many ways (``operator.add``, ``torch.add``, ``x.add(...)``, ``aten.add.Tensor``);
:func:`op_name` folds them into one name so the rule tables stay small.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental import symbolic_shapes
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._sympy.numbers import int_oo

# A size's example value without guarding: optimization_hint on torch 2.13, size_hint on 2.11 (whose hint_int, the
# older name, warns that it is deprecated).
_size_hint = next(getattr(symbolic_shapes, name) for name in ("optimization_hint", "size_hint", "hint_int")
                  if hasattr(symbolic_shapes, name))

_TORCH_NAMESPACES = (torch, F, torch.Tensor, torch._C._nn, torch._C._VariableFunctions, torch.special,
                     torch._C._linalg)  # torch.linalg's functions, named as ATen names them (linalg_vector_norm)
_ALIASES = {
    "truediv": "div",
    "floordiv": "div",
    "divide": "div",
    "multiply": "mul",
    "subtract": "sub",
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "div",
    "_unsafe_view": "view",
    "scaled_dot_product_attention": "sdpa",
    "sdpa_with_sinks": "sdpa",  # dyllm's SDPA with attention sinks (ops/attention_sinks.py): its ``sinks`` kwarg
    "sdpa_softcap": "sdpa",  # dyllm's SDPA with soft-capped scores (ops/soft_capping.py): its ``softcap`` kwarg
    "bmm": "matmul",
    "mm": "matmul",
}


def is_number(value: Any) -> bool:
    """A plain Python int or float as an FX argument (a literal the graph baked in), not a bool: ``x * True``
    is a mask, not a scale."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def op_name(node: fx.Node) -> Optional[str]:
    """Canonical op name of a call node, or None for ops outside torch / operator."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target._overloadpacket.__name__
        elif isinstance(target, torch._ops.OpOverloadPacket):
            name = target.__name__
        elif isinstance(target, torch._ops.HigherOrderOperator):
            name = "hop." + target.name()
        elif getattr(operator, getattr(target, "__name__", ""), None) is target:
            name = target.__name__
        elif any(getattr(ns, getattr(target, "__name__", ""), None) is target for ns in _TORCH_NAMESPACES):
            name = target.__name__
        else:
            return None
    else:
        return None
    if name.startswith("__") and name.endswith("__") and name[2:-2] in _DUNDERS:
        name = name[2:-2]  # torch 2.11's Dynamo records ``t == e`` as Tensor.__eq__
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    return _ALIASES.get(name, name)


# Tensor operator methods that are their op with self first (not the reflected ones: __rsub__ swaps operands)
_DUNDERS = frozenset("eq ne lt le gt ge and or xor invert neg add sub mul truediv floordiv pow matmul".split())


def listed_args(node: fx.Node) -> list:
    """The arguments after a method's tensor, given as one list (``x.view([a, b])``) or spread out
    (``x.view(a, b)``): the sizes of a view or a repeat, the dims of a permute."""
    rest = node.args[1:]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for ``node`` (tensor, SymInt, tuple...), or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_value(node: Any) -> Optional[torch.Tensor]:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def size_checks(node: fx.Node) -> Optional[set[fx.Node]]:
    """What reads ``node``'s value, when that is only checks of its sizes (Dynamo asserts the range of each
    data-dependent size: ``sym_size`` -> comparisons -> ``_assert_scalar``): those nodes; else None. Checks need
    not run where the value is not computed for every row."""
    found, work = set(), list(node.users)
    while work:
        user = work.pop()
        if user in found:
            continue
        if user.op == "output" or (tensor_value(user) is not None
                                   and not (op_name(user) or "").startswith("_assert")):
            return None
        found.add(user)
        work.extend(user.users)
    return found if found else None


def is_weight(node: fx.Node) -> bool:
    """A placeholder Dynamo lifted from a module parameter (its recorded example is an ``nn.Parameter``)."""
    graph_arg = node.meta.get("grapharg")
    try:
        return isinstance(getattr(graph_arg, "example", None), torch.nn.Parameter)
    except Exception:  # the example is held weakly and may be gone
        return False


def tensor_args(node: fx.Node) -> Iterator[fx.Node]:
    """Every graph-node argument of ``node`` that holds a tensor (nested lists included), in order."""
    seen = set()
    for arg in _flatten((node.args, node.kwargs)):
        if isinstance(arg, fx.Node) and arg not in seen and tensor_value(arg) is not None:
            seen.add(arg)
            yield arg


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument lookup (call_method nodes count ``self`` as index 0)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are provably equal under the ShapeEnv; never guards, never compares strings."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Two shapes provably equal size by size (``==`` on symbolic sizes would guard on their example values)."""
    return len(a) == len(b) and all(map(same_size, a, b))


def prod(sizes: Sequence[Any]) -> Any:
    return math.prod(sizes, start=1)


def is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and not isinstance(size.node.maybe_as_int(), int)


#: A data-dependent size's hint where nothing bounds it (Inductor's unbacked_symint_fallback)
_UNBOUNDED_HINT = 8192


def hint(size: Any) -> int:
    """A concrete value for a (possibly symbolic) size: the example input's, for FLOP estimates; for a
    data-dependent size (an MoE's selection), the largest its ShapeEnv allows (torch 2.11's hint raises there)."""
    if isinstance(size, torch.SymInt) and symbolic_shapes.free_unbacked_symbols(size):
        upper = size.node.shape_env.bound_sympy(size.node.expr).upper
        # unbounded: torch's integer infinity (which sympy takes for finite: a size read from data with .tolist()
        # under capture_scalar_outputs, JetMoE's expert counts) or sympy's
        return _UNBOUNDED_HINT if upper == int_oo or not upper.is_finite else int(upper)
    return int(_size_hint(size))


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


#: Reductions whose ``dim`` follows an ``ord`` (the third argument)
NORMS = frozenset(("norm", "linalg_vector_norm", "linalg_norm"))


def reduced_dims(node: fx.Node) -> Optional[set]:
    """The input dims a reduction (``sum``, ``max``, ``logsumexp``, ``norm``, ...) reduces, normalized: None over all
    dims; an empty set when one is not an integer."""
    value = tensor_value(node.args[0])
    dim = arg(node, 2, "dim") if op_name(node) in NORMS else arg(node, 1, "dim", arg(node, 1, "axis"))
    if value is None or dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return {normalize_dim(d, value.dim()) for d in dims} if all(isinstance(d, int) for d in dims) else set()


def index_position(index: list, ndim: int, dim: int) -> Optional[int]:
    """Which entry of an indexing tuple addresses input dim ``dim`` (None: inside an Ellipsis or absent)."""
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    current = 0
    for position, entry in enumerate(index):
        if entry is None:
            continue
        if entry is Ellipsis:
            current += ndim - consumed
            if current > dim:
                return None
            continue
        if current == dim:
            return position
        current += 1
    return None


#: Calls that open and close a ``vmap`` level in a Dynamo graph (``torch.vmap`` in the model, or in flex_attention's
#: mask construction): no users, and not marked side-effectful by torch.fx, so its dead-code elimination drops them
#: and leaves the level's batched tensors outside any level ("escaped from inside a function being vmapped").
VMAP_LEVEL_CALLS = frozenset(("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions"))


def is_impure(node: fx.Node) -> bool:
    """``Node.is_impure``, and the calls that open or close a vmap level: for ``eliminate_dead_code``."""
    return node.is_impure() or getattr(node.target, "__name__", None) in VMAP_LEVEL_CALLS


def computed_from(node: fx.Node, values: set[fx.Node]) -> bool:
    """Whether ``node`` is computed from any of ``values`` (reads one, or a value computed from one)."""
    seen, work = {node}, [node]
    while work:
        for source in work.pop().all_input_nodes:
            if source in values:
                return True
            if source not in seen:
                seen.add(source)
                work.append(source)
    return False


def vmap_batched(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose values are batched tensors of a ``vmap`` level (``torch.vmap`` in the model): what a level's
    ``_add_batch_dim`` made and everything computed from it, until ``_remove_batch_dim`` takes that level off again.
    Such a value exists only inside its level: no graph output can carry it (AOTAutograd refuses one), so no call
    can cache or test it."""
    levels: dict[fx.Node, int] = {}
    for node in graph.nodes:
        level = max((levels.get(a, 0) for a in node.all_input_nodes), default=0)
        name = getattr(node.target, "__name__", None)
        levels[node] = level + 1 if name == "_add_batch_dim" else level - 1 if name == "_remove_batch_dim" else level
    return {n for n, level in levels.items() if level > 0}
