"""Symbolic input sizes of a lowering, and what the compilers assumed of them.

A variant lowered with some input sizes symbolic (capacity buckets read from input sizes: one compiled variant for
every bucket) runs outside Dynamo, so nothing checks the guards the compilers recorded in their ShapeEnvs (a size
at least 2, at most the sequence, or a size specialised to its example). :class:`SizeGuards` keeps those ShapeEnvs
and, for each symbol in them, its expression in the graph's input sizes, so that :meth:`SizeGuards.admits` can
tell, before a call, whether inputs of other sizes satisfy every guard and value range: where they do not, the
caller compiles another variant rather than run code that assumed otherwise.

Piecewise lowering gives every piece fake inputs in a ShapeEnv of its own (:mod:`dyllm_compile.piecewise`): a
piece's symbols are fresh, and are traced back to the graph's input sizes through :meth:`SizeGuards.fresh`.
"""

from __future__ import annotations

from typing import Any, Sequence

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv, StatelessSymbolicContext, free_symbols,
                                                  free_unbacked_symbols)


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _hint(size: Any) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else size


class SizeGuards:
    """The ShapeEnvs of one lowering, and each of their symbols as an expression of the input sizes."""

    def __init__(self) -> None:
        # input position -> its size (dim 0): a symbol, or an int where the ShapeEnv specialised it (0 and 1 are)
        self.inputs: dict[int, sympy.Expr] = {}
        self.origin: dict[sympy.Symbol, sympy.Expr] = {}  # any symbol -> its expression in self.inputs' symbols
        self.envs: list[ShapeEnv] = []
        # a compiled piece serving another piece too: its ShapeEnv, with its symbols as the other piece's sizes
        self.aliases: list[tuple[ShapeEnv, dict[sympy.Symbol, sympy.Expr]]] = []

    def mode(self) -> FakeTensorMode:
        """A FakeTensorMode whose ShapeEnv (allowing data-dependent sizes) is checked by :meth:`admits`."""
        # no duck sizing: capacities that happen to be equal in the example are still separate sizes
        env = ShapeEnv(allow_dynamic_output_shape_ops=True, duck_shape=False)
        self.envs.append(env)
        return FakeTensorMode(shape_env=env)

    def inputs_of(self, inputs: Sequence[Any], symbolic: Sequence[int]) -> list[Any]:
        """Fake copies of ``inputs`` in a mode of their own, the 1-d tensors at positions ``symbolic`` with a
        symbolic size, the others static."""
        mode = self.mode()
        fakes = []
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor) and i in symbolic:
                # a fake of its own even where one tensor is passed for several sizes (the fake mode memoizes
                # tensors): each input's size is a symbol of its own
                x = _symbolic_fake(mode, x.shape, x.stride(), x.dtype, x.device, [DimDynamic.DYNAMIC])
                self.inputs[i] = _expr(x.shape[0])
                if isinstance(self.inputs[i], sympy.Symbol):
                    self.origin[self.inputs[i]] = self.inputs[i]
            elif isinstance(x, torch.Tensor):
                x = mode.from_tensor(x, static_shapes=True)
            fakes.append(x)
        return fakes

    def fresh(self, mode: FakeTensorMode, x: torch.Tensor) -> torch.Tensor:
        """An empty fake tensor in ``mode`` of ``x``'s layout, its symbolic sizes fresh symbols of ``mode``
        traced back to ``x``'s (a backed size only: an unbacked one has no example to trace with)."""
        if free_unbacked_symbols(x):
            raise ValueError(f"a tensor of a data-dependent size {tuple(x.shape)}")
        unknown = free_symbols(x) - set(self.origin)
        if unknown:  # e.g. Dynamo's: its own guards cover them only in its own ShapeEnv
            raise ValueError(f"a tensor of a symbolic size {tuple(x.shape)} not traced to this lowering's inputs")
        dynamic = [DimDynamic.DYNAMIC if isinstance(s, torch.SymInt) else DimDynamic.STATIC for s in x.shape]
        if DimDynamic.DYNAMIC not in dynamic:
            with mode:
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        fake = _symbolic_fake(mode, x.shape, x.stride(), x.dtype, x.device, dynamic)
        for old, new in zip(x.shape, fake.shape):
            if isinstance(new, torch.SymInt):
                self.origin[new.node.expr] = _expr(old).xreplace(self.origin)
        return fake

    def alias(self, compiled: Sequence[Any], other: Sequence[Any]) -> None:
        """The code compiled for the fake inputs ``compiled`` also runs on ``other`` (of the same layouts but
        other symbols): its guards must hold for ``other``'s sizes too."""
        env, mapping = None, {}
        for a, b in zip(compiled, other):
            if isinstance(a, torch.Tensor):
                env = env or (a.fake_mode.shape_env if hasattr(a, "fake_mode") else None)
                for sa, sb in zip(a.shape, b.shape):
                    if isinstance(sa, torch.SymInt):
                        mapping[sa.node.expr] = _expr(sb).xreplace(self.origin)
        if env is not None and mapping:
            self.aliases.append((env, mapping))

    def admits(self, sizes: dict[int, int]) -> bool:
        """Whether inputs whose symbolic sizes are ``sizes`` (input position -> size) satisfy every guard and
        value range the lowering recorded."""
        values = {}
        for i, size in sizes.items():
            expr = self.inputs.get(i)
            if isinstance(expr, sympy.Symbol):
                values[expr] = sympy.Integer(size)
            elif expr is not None and int(expr) != size:  # specialised to its example
                return False
        checks = [(env, {s: e for s, e in self.origin.items() if s in env.var_to_range}) for env in self.envs]
        return all(_holds(env, {s: e.xreplace(values) for s, e in mapping.items()})
                   for env, mapping in [*checks, *self.aliases])


def _symbolic_fake(mode: FakeTensorMode, shape: Sequence[Any], stride: Sequence[Any], dtype: torch.dtype,
                   device: torch.device, dynamic: list[DimDynamic]) -> torch.Tensor:
    """A new fake tensor in ``mode`` of the example layout, with fresh symbols of ``mode`` for its ``dynamic`` dims
    (made from a meta tensor: no memory, nothing shared with another input)."""
    meta = torch.empty_strided([_hint(s) for s in shape], [_hint(s) for s in stride], dtype=dtype, device="meta")
    fake = mode.from_tensor(meta, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
    if fake.device != device:
        with mode:
            fake = fake.to(device)
    return fake


def _holds(env: ShapeEnv, at: dict[sympy.Symbol, sympy.Expr]) -> bool:
    """Whether ``env``'s value ranges and guards hold with its symbols at the values ``at``."""
    for symbol, value in at.items():
        if not value.is_Integer or int(value) not in env.var_to_range[symbol]:
            return False
    return all(guard.expr.xreplace(at) is sympy.true for guard in env.guards)
