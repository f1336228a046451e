"""Lowering of a (rewritten) FX graph to executable code: Inductor, aot_eager or eager."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import fx

from .piecewise import lower_piecewise
from .size_guards import SizeGuards

log = logging.getLogger("dyllm_compile")


class Guarded:
    """A compiled graph some of whose input sizes are symbolic, with what its compilers assumed of them:
    :meth:`admits` says whether inputs of other sizes may run it."""

    def __init__(self, fn: Callable, guards: SizeGuards) -> None:
        self.fn, self.guards = fn, guards

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def admits(self, sizes: dict[int, int]) -> bool:
        """``sizes``: the symbolic inputs' positions and their dim 0."""
        return self.guards.admits(sizes)


def has_cuda_graphs(mode: Optional[str]) -> bool:
    """Whether torch.compile's ``mode`` turns Inductor's CUDA graphs on."""
    from torch._inductor import list_mode_options

    return bool(mode) and bool(list_mode_options(mode).get("triton.cudagraphs"))


# Inductor's checks of the compiled code's inputs and of its fallback kernels' outputs (``assert_size_stride``,
# ``assert_alignment``), which an explicit TORCHINDUCTOR_SIZE_ASSERTS=1 / TORCHINDUCTOR_ALIGNMENT_ASSERTS=1 keeps.
_ASSERTS = {"size_asserts": "TORCHINDUCTOR_SIZE_ASSERTS", "alignment_asserts": "TORCHINDUCTOR_ALIGNMENT_ASSERTS"}


def variant_options(mode: Optional[str], cpp_wrapper: bool = False) -> dict[str, Any]:
    """Inductor's options for the rewritten graph's variants: those of torch.compile's ``mode``, with CUDA graphs
    and the compiled code's input layout checks off, and Inductor's C++ wrapper where ``cpp_wrapper``.

    CUDA graphs: the variants' caches are outputs that the runtime keeps and passes back into the next call; a CUDA
    graph replay writes its outputs into memory its graph owns, the memory of the last replay's outputs: under
    Inductor's CUDA graphs a sequence's caches would be written over by its next call (not verified on a GPU:
    turned off rather than trusted).

    Layout checks: a variant's inputs get their layouts checked where they can vary, before the compiled code runs:
    the model's inputs and weights by Dynamo's guards, the caches and the runtime's own inputs by the runtime
    (stored contiguous, made alike every call), an earlier piece's outputs by the piece wrapper
    (:mod:`dyllm_compile.piecewise`). Inductor's own assertions check them again at every call, about twenty per
    layer of a sparse variant: 0.4 ms of a 7.5 ms step of 32 layers whose time is the host's on the CPU
    (docs/benchmarks.md, "Host-bound steps"); vLLM compiles its graphs without them too."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode)) if mode else {}
    if patches.get("triton.cudagraphs"):
        patches["triton.cudagraphs"] = False
    patches.update({option: False for option, env in _ASSERTS.items() if os.environ.get(env) != "1"})
    if cpp_wrapper:
        patches["cpp_wrapper"] = True
    return patches


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    lowering: str,
    mode: Optional[Union[str, dict[str, Any]]] = None,
    dynamic_output_shapes: bool = False,
    piecewise: bool = False,
    symbolic_inputs: Sequence[int] = (),
    piece_layers: Optional[int] = None,
) -> Callable:
    """Compiles ``gm`` with the chosen lowering; ``mode`` is torch.compile's Inductor mode, or Inductor's options
    (:func:`variant_options`).

    ``piecewise``: where ``gm`` marks layer cuts and a layer repeats, compile it piece by piece, each distinct
    piece once (:mod:`dyllm_compile.piecewise`), ``piece_layers`` layers to a piece (None: as many as
    :func:`~dyllm_compile.piecewise.auto_layers_per_piece` says); otherwise, and always for the eager lowering,
    whole.

    ``dynamic_output_shapes``: ``gm`` has ops whose output size depends on data (``nonzero``). Tracing them
    from real inputs raises DynamicOutputShapeException, so the lowering gets fake copies of the inputs whose
    ShapeEnv allows such ops (what Dynamo's ``capture_dynamic_output_shape_ops`` does for user code): the size
    becomes an unbacked symbol and one compiled graph serves every count.

    ``symbolic_inputs``: positions of 1-d inputs whose size is lowered as a symbol (a capacity read from an input
    size): the result is :class:`Guarded`, one compiled graph for every size its guards admit."""
    guards = SizeGuards() if symbolic_inputs else None
    if guards is not None and lowering != "eager":  # eager code reads its sizes: no guards to record
        example_inputs = guards.inputs_of(example_inputs, symbolic_inputs)
    if piecewise and lowering != "eager":  # each piece gets fake inputs of its own, which allow such ops
        split = lower_piecewise(gm, example_inputs, lambda piece, inputs: _lower_whole(piece, inputs, lowering, mode),
                                guards, piece_layers)
        if split is not None:
            return split if guards is None else Guarded(split, guards)
    if dynamic_output_shapes and guards is None and lowering != "eager":
        example_inputs = fake_inputs(example_inputs)
    fn = _lower_whole(gm, example_inputs, lowering, mode)
    return fn if guards is None else Guarded(fn, guards)


def _lower_whole(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str,
                 mode: Optional[Union[str, dict[str, Any]]]) -> Callable:
    if lowering == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = mode if isinstance(mode, dict) else list_mode_options(mode) if mode else {}
        try:
            return compile_fx(gm, example_inputs, config_patches=patches)
        except Exception as err:  # a graph the C++ wrapper cannot take still compiles with the Python one
            if not patches.get("cpp_wrapper"):
                raise
            log.warning("dyllm: Inductor's C++ wrapper failed on a graph (%s: %s); compiling it with the Python "
                        "wrapper", type(err).__name__, err)
            return compile_fx(gm, example_inputs, config_patches={**patches, "cpp_wrapper": False})
    if lowering == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    if lowering == "eager":
        return gm.forward
    raise ValueError(f"unknown lowering {lowering!r}")


def fake_inputs(inputs: Sequence[Any]) -> list[Any]:
    """Fake copies of ``inputs`` (same shapes, no data) in one FakeTensorMode whose ShapeEnv allows
    data-dependent sizes and scalars (:meth:`SizeGuards.inputs_of` with no symbolic size)."""
    return SizeGuards().inputs_of(inputs, ())


def output_layouts(gm: fx.GraphModule, inputs: Sequence[Any]) -> list[Optional[tuple[torch.Size, torch.dtype,
                                                                                   torch.device]]]:
    """Shape, dtype and device of each of ``gm``'s outputs for ``inputs`` (None for a non-tensor), from a run on
    fake copies (no compute, nothing compiled)."""
    fakes = fake_inputs(inputs)
    mode = next((x.fake_mode for x in fakes if isinstance(x, torch.Tensor)), None)
    with mode if mode is not None else contextlib.nullcontext():
        outputs = gm(*fakes)
    return [(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None for x in outputs]
