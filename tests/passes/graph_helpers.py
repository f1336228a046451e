"""Test backend that captures Dynamo graphs and analyses them (no Inductor), plus region checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from dyllm_compile.passes.analysis import GraphAnalysis, analyze
from dyllm_compile.passes.graph_utils import hint, op_name
from dyllm_compile.passes.region_graph import (SIZES_SYMBOLIC_FOLDS, RegionNotRelocatable, check_relocatable,
                                               extract_region)
from dyllm_compile.passes.regions import Region


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list
    analysis: GraphAnalysis

    def values(self) -> dict:
        """Every node's value as computed (the analysed graph writes nothing in place: the in_place_writes pass)."""
        values = {}

        class Record(fx.Interpreter):
            def run_node(self, n):
                values[n] = super().run_node(n)
                return values[n]

        with torch.inference_mode():
            Record(self.gm).run(*[hint(x) if isinstance(x, torch.SymInt) else x for x in self.example_inputs])
        return values

    def ops(self, nodes) -> list:
        return [op_name(n) or n.op for n in nodes]


def traced(fn, *inputs) -> tuple[fx.GraphModule, list]:
    """Dynamo's graph of ``fn`` (static shapes, one graph, under ``inference_mode`` as a decode runs) and its
    inputs as a backend receives them, not analysed: what a pass is handed."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.inference_mode():
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    return graphs[0]


def ops(gm: fx.GraphModule) -> list:
    """The canonical names of ``gm``'s calls, in order."""
    return [op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def capture(model, inputs: tuple, dynamic: Optional[bool] = None) -> list[Captured]:
    torch._dynamo.reset()
    captured = []

    def backend(gm, example_inputs):
        analysis = analyze(gm)  # its graph: Dynamo's, or a copy with hand-written attention as SDPA
        captured.append(Captured(analysis.gm, list(example_inputs), analysis))
        return gm.forward

    with torch.inference_mode():
        torch.compile(model, backend=backend, dynamic=dynamic)(*inputs)
    return captured


def assert_region_runs_on_rows(cap: Captured, region: Region, rows: int = 3, seed: int = 0) -> None:
    """The region re-emitted for K gathered rows equals the dense values on those rows, at each of its exits; on a
    torch that cannot size rows with a symbolic batch folded in (< 2.13), such a region is refused, with that reason,
    as the rewrite keeps it dense."""
    infos = cap.analysis.infos
    try:
        for node in region.nodes:
            check_relocatable(node, infos)
    except RegionNotRelocatable as err:
        assert not SIZES_SYMBOLIC_FOLDS and "materialize_symint" in str(err), err
        return
    env = cap.values()
    sub = extract_region(cap.gm, region, infos, gathered=True)
    n = hint(cap.analysis.sites[0].token_count)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
    args = []
    for node in region.token_inputs:
        axis = infos[node].axis
        assert axis.lead == 1, "tests use unfolded token axes"
        args.append(env[node].index_select(axis.dim, index))
    args += [env[node] for node in region.other_inputs]
    with torch.inference_mode():
        got = sub(*args, rows)
    expected = tuple(env[x].index_select(infos[x].axis.dim, index) for x in region.exits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
