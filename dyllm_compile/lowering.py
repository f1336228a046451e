"""Lowering of a (rewritten) FX graph to executable code: Inductor, aot_eager or eager."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from .piecewise import lower_piecewise


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    lowering: str,
    mode: Optional[str] = None,
    dynamic_output_shapes: bool = False,
    piecewise: bool = False,
) -> Callable:
    """Compiles ``gm`` with the chosen lowering; ``mode`` is torch.compile's Inductor mode.

    ``piecewise``: where ``gm`` marks layer cuts and a layer repeats, compile it piece by piece, each distinct
    piece once (:mod:`dyllm_compile.piecewise`); otherwise, and always for the eager lowering, whole.

    ``dynamic_output_shapes``: ``gm`` has ops whose output size depends on data (``nonzero``). Tracing them
    from real inputs raises DynamicOutputShapeException, so the lowering gets fake copies of the inputs whose
    ShapeEnv allows such ops (what Dynamo's ``capture_dynamic_output_shape_ops`` does for user code): the size
    becomes an unbacked symbol and one compiled graph serves every count."""
    if piecewise and lowering != "eager":  # each piece gets fake inputs of its own, which allow such ops
        split = lower_piecewise(gm, example_inputs, lambda piece, inputs: _lower_whole(piece, inputs, lowering, mode))
        if split is not None:
            return split
    if dynamic_output_shapes and lowering != "eager":
        example_inputs = fake_inputs(example_inputs)
    return _lower_whole(gm, example_inputs, lowering, mode)


def _lower_whole(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str, mode: Optional[str]
                 ) -> Callable:
    if lowering == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode) if mode else {}
        return compile_fx(gm, example_inputs, config_patches=patches)
    if lowering == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    if lowering == "eager":
        return gm.forward
    raise ValueError(f"unknown lowering {lowering!r}")


def fake_inputs(inputs: Sequence[Any]) -> list[Any]:
    """Fake copies of ``inputs`` (same shapes, no data) in one FakeTensorMode whose ShapeEnv allows
    data-dependent sizes and scalars."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True))
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]


def output_layouts(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Optional[tuple[torch.Size, torch.dtype,
                                                                                   torch.device]]]:
    """Shape, dtype and device of each of ``gm``'s outputs for ``inputs`` (None for a non-tensor), from a run on
    fake copies (no compute, nothing compiled)."""
    fakes = fake_inputs(inputs)
    mode = next((x.fake_mode for x in fakes if isinstance(x, torch.Tensor)), None)
    with mode if mode is not None else contextlib.nullcontext():
        outputs = gm(*fakes)
    return [(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None for x in outputs]
