"""Lowering of a (rewritten) FX graph to executable code: Inductor, aot_eager or eager."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import fx


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    lowering: str,
    mode: Optional[str] = None,
) -> Callable:
    """Compiles ``gm`` with the chosen lowering; ``mode`` is torch.compile's Inductor mode."""
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
