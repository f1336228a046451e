"""The ``dyllm`` torch.compile backend.

Dynamo resolves ``backend="dyllm"`` through the ``torch_dynamo_backends`` entry point, which points at
:func:`dyllm_backend`, so ``torch.compile(model, backend="dyllm")`` works without importing this package.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import fx

from .config import DISABLE_ENV, DyllmConfig, disabled_by_env
from .explain import Report
from .lowering import lower
from .passes.analysis import analyze

log = logging.getLogger("dyllm_compile")
_graph_ids = itertools.count()


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
    graph_id = f"g{next(_graph_ids)}"
    try:
        analysis = analyze(gm, graph_id, config.debug_dir)
    except Exception as err:  # the analysis must never break a user's compile
        log.warning("dyllm: graph %s: analysis failed (%s: %s); compiling it unchanged", graph_id,
                    type(err).__name__, err)
    else:
        log.info("%s", analysis.summary())
        if config.debug_dir is not None:
            with open(os.path.join(config.debug_dir, graph_id, "explain.txt"), "w") as f:
                f.write(Report([analysis]).table() + "\n")
    log.info("dyllm: saliency rewrite not implemented yet; lowering graph %s unchanged with %s",
             graph_id, config.lowering)
    return lower(gm, example_inputs, config.lowering, mode)
