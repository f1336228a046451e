"""The ``dyllm`` torch.compile backend.

Dynamo resolves ``backend="dyllm"`` through the ``torch_dynamo_backends`` entry point, which points at
:func:`dyllm_backend`, so ``torch.compile(model, backend="dyllm")`` works without importing this package.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import fx

from .config import DISABLE_ENV, DyllmConfig, disabled_by_env
from .explain import Report
from .lowering import has_cuda_graphs, lower, variant_options
from .passes.analysis import analyze
from .passes.graph_edit import copy_graph, drop_unbacked_bindings
from .passes.rewrite import build_dense, scalar_inputs
from .passes.rewrite_plan import NotRewritable
from .runtime.graph_runtime import GraphRuntime, unbacked_rows

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
    if torch.is_grad_enabled():
        log.info("dyllm: graph %s traced with grad enabled: compiled dense (decode under inference_mode)",
                 graph_id)
        return lower(gm, example_inputs, config.lowering, mode)
    try:
        analysis = analyze(gm, graph_id, config.debug_dir)
        log.info("%s", analysis.summary())
        report = Report([analysis], config)  # plans the graph once, for explain.txt and for the rewrite
        if config.debug_dir is not None:
            with open(os.path.join(config.debug_dir, graph_id, "explain.txt"), "w") as f:
                f.write(report.table() + "\n")
        plan = report.plan(analysis)
    except Exception as err:  # the analysis must never break a user's compile
        log.warning("dyllm: graph %s: analysis failed (%s: %s); compiled dense", graph_id,
                    type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
        return lower(gm, example_inputs, config.lowering, mode)
    if isinstance(plan, NotRewritable):
        log.warning("dyllm: graph %s compiled dense: %s", graph_id, plan)
        return lower(gm, example_inputs, config.lowering, mode)
    if plan.reasons:
        log.warning("dyllm: graph %s: parts stay dense: %s", graph_id, "; ".join(plan.reasons))
    if has_cuda_graphs(mode):
        log.warning("dyllm: graph %s: mode=%r's CUDA graphs are off for the rewritten graph (a replay would "
                    "overwrite the caches kept between calls); the mode's other options apply", graph_id, mode)
    variants = variant_options(mode, cpp_wrapper=config.wrapper == "cpp")
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    # Dense calls run through the sparse variant with every row salient where row counts are unbacked (one compile
    # instead of two), and where the graph reads a float input with .item() (transformers 5's attention scale with
    # dynamic=True): the variants have it as a constant, each keyed by its value; compiled as an input, SDPA
    # guards on it
    dense_fn = None
    if config.shadow or not (unbacked_rows(config, device) or scalar_inputs(plan)):
        dense_fn = lower(build_dense(plan), example_inputs, config.lowering, variants, piecewise=config.piecewise,
                         piece_layers=config.piece_layers)
    return GraphRuntime(plan, dense_fn, functools.partial(lower, lowering=config.lowering, mode=variants,
                                                          piecewise=config.piecewise,
                                                          piece_layers=config.piece_layers), graph_id,
                        functools.partial(_unrewritten, gm, config.lowering, mode))


def _unrewritten(gm: fx.GraphModule, lowering: str, mode: Optional[str], args: tuple) -> Callable:
    """``gm`` compiled as it is, outside Dynamo's compile (for inputs ``args``), on a copy (no caches: the user's
    mode as given)."""
    copy = fx.GraphModule(gm, copy_graph(gm)[0])
    drop_unbacked_bindings(copy.graph)
    return lower(copy, list(args), lowering, mode, dynamic_output_shapes=True)
