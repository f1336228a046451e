"""The ``dyllm`` torch.compile backend.

Dynamo resolves ``backend="dyllm"`` through the ``torch_dynamo_backends`` entry point, which points at
:func:`dyllm_backend`, so ``torch.compile(model, backend="dyllm")`` works without importing this package.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import fx

from .config import DISABLE_ENV, DyllmConfig, disabled_by_env
from .lowering import lower

log = logging.getLogger("dyllm_compile")


def dyllm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    options: Optional[Mapping[str, Any]] = None,
    mode: Optional[str] = None,
) -> Callable:
    """Compiles one Dynamo graph. ``options`` come from ``torch.compile(..., options=...)``."""
    if disabled_by_env():
        log.info("dyllm: %s=1, compiling with plain Inductor", DISABLE_ENV)
        return lower(gm, example_inputs, "inductor", mode)
    config = DyllmConfig.from_options(options)
    log.info(
        "dyllm: saliency rewrite not implemented yet; lowering the graph unchanged with %s",
        config.lowering,
    )
    return lower(gm, example_inputs, config.lowering, mode)
