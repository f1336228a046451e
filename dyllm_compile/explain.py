"""``dyllm_compile.explain``: what the backend would gate in a model, and why anything stays dense.

"Gated" is what the rewrite plan for the given options runs on salient rows only (exact mode adds the q
projection; output_projection="salient" the o projection; query pruning the o projection, on the queried rows),
not just what the analysis found row-wise. A chain two sites share (DiffLlama's two attentions read one q and one
k) runs once, with the first site's rows: the second site's row names it with that layer, ``q proj (layer 0's)``,
and its FLOPs count in the first's."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import fx

from .config import DyllmConfig
from .passes.analysis import GraphAnalysis, analyze
from .passes.graph_utils import tensor_value
from .passes.op_rules import Kind
from .passes.regions import Region, distinct_flops, node_flops
from .passes.rewrite_plan import NotRewritable, RewritePlan, plan_rewrite

# The frame's variable that a recorded module path starts with: a local ("L['self'].") or a global ("G['model'].")
_FRAME_LOCAL = re.compile(r"^\w+\[[^]]*\]\.?")
# Every graph break makes one more graph; tracing many shapes of one model class shares Dynamo's cache.
_RECOMPILE_LIMIT = 64


@dataclass
class LayerRow:
    layer: int
    attention: str
    heads: int
    kv_heads: int
    gated: list[str]
    dense: list[str]
    flops: int
    gated_flops: int

    @property
    def share(self) -> float:
        return self.gated_flops / self.flops if self.flops else 0.0


@dataclass
class Report:
    graphs: list[GraphAnalysis]
    config: DyllmConfig = field(default_factory=DyllmConfig)
    _plans: dict[str, Union[RewritePlan, NotRewritable]] = field(default_factory=dict, init=False, repr=False)

    def plan(self, graph: GraphAnalysis) -> Union[RewritePlan, NotRewritable]:
        """The rewrite plan for these options, or why the backend lowers the graph unchanged; made once a graph."""
        if graph.graph_id not in self._plans:
            try:
                self._plans[graph.graph_id] = plan_rewrite(graph, self.config)
            except NotRewritable as refusal:
                self._plans[graph.graph_id] = refusal
        return self._plans[graph.graph_id]

    def layers(self, graph: GraphAnalysis) -> list[LayerRow]:
        runs = _planned(self.plan(graph))

        def gated(region: Region) -> bool:
            return runs.get(region.exit) == region.layer

        rows = []
        for site, chains in zip(graph.sites, graph.chains):
            regions = [r for r in graph.regions if r.layer == site.layer and r.role != "lm_head"]
            # A chain another layer's plan runs (two sites that read one value share its chain): named with that
            # layer, its FLOPs counted there
            shared = {id(c) for c in chains.values() if runs.get(c.exit, site.layer) != site.layer}
            every = [*chains.values(), *regions]
            parts = [p for p in every if id(p) not in shared]
            attention_flops = node_flops(site.node) + sum(node_flops(n) for n in site.internal)
            # KV heads as cached: the k chain ends before any repeat_kv expansion ([B, heads, ...]).
            kv_heads = int(tensor_value(chains["k"].exit).shape[1])
            rows.append(LayerRow(
                layer=site.layer,
                attention=site.label + (" (dense)" if site.dense_reason else ""),
                heads=site.heads,
                kv_heads=kv_heads,
                gated=[f"{_label(p)} (layer {runs[p.exit]}'s)" if id(p) in shared else _label(p)
                       for p in every if id(p) in shared or gated(p)],
                dense=[_label(p) for p in parts if not gated(p) and p.flops],
                flops=attention_flops + distinct_flops(parts),
                gated_flops=distinct_flops([p for p in parts if gated(p)]),
            ))
        # A graph without attention (after a graph break): its branches, each a row of the layer it belongs to.
        rows += [_branch_row(r.layer, "none", r, gated(r)) for r in graph.regions
                 if not graph.sites and r.role != "lm_head"]
        rows += [_branch_row(-1, "-", r, gated(r)) for r in graph.regions if r.role == "lm_head"]
        return rows

    def outside(self, graph: GraphAnalysis) -> list[fx.Node]:
        """The matrix products no region or chain holds, attention's own aside, that are not token mixing (named
        among the dense reasons): work computed on every row at every call that the table's columns do not show (a
        projection whose result both a chain and the residual stream read, a hyper-connection's weights, a
        convolution's input projection)."""
        if not graph.regions:
            return []  # nothing found at all: the dense reasons say why
        held = {n for r in graph.regions for n in r.nodes} | {n for chains in graph.chains for c in chains.values()
                                                               for n in c.nodes}
        held |= {s.node for s in graph.sites} | {n for s in graph.sites for n in s.internal}
        return [n for n in graph.gm.graph.nodes if node_flops(n) and n not in held
                and not (n in graph.infos and graph.infos[n].kind is Kind.MIXING)]

    def with_options(self, **options: Any) -> "Report":
        """The report of the same graphs for these options changed (validated as the backend's)."""
        return Report(self.graphs, dataclasses.replace(self.config, **options))

    def gated_flops(self) -> tuple[int, int]:
        """(gated, total) matmul FLOPs over every graph, for the rewrite plan of these options."""
        gated = sum(row.gated_flops for graph in self.graphs for row in self.layers(graph))
        return gated, sum(graph.total_flops for graph in self.graphs)

    def table(self) -> str:
        lines = []
        # what the opt-in would gate besides, with the o projection dense (MobileBERT's stacked FFNs lie on its
        # attention's output branch); one report for every graph, so each is planned once more at most
        salient_o = (self.with_options(output_projection="salient", linear_order="input_first")
                     if self.config.output_projection == "dense" else None)
        for graph in self.graphs:
            shape = "x".join(str(s) for s in graph.token_shape) if graph.token_shape else "-"
            total, rows = graph.total_flops, self.layers(graph)
            gated = sum(row.gated_flops for row in rows)
            lines.append(f"graph {graph.graph_id}: {len(graph.sites)} attention sites, q shape {shape}, "
                         f"{100 * gated / max(1, total):.1f}% of {total / 1e6:.2f} MFLOP gated "
                         f"({self.config.attention_mode} mode)")
            # columns as wide as their longest entry (an LFM2 layer gates three branches besides q, k, v)
            wide_gated = max([34] + [len(", ".join(row.gated)) + 2 for row in rows])
            wide_dense = max([24] + [len(", ".join(row.dense)) + 2 for row in rows])
            wide_attention = max([12] + [len(row.attention) + 1 for row in rows])
            lines.append(f"{'layer':<7}{'attention':<{wide_attention}}{'heads':>6}{'kv':>4}  {'gated':<{wide_gated}}"
                         f"{'dense':<{wide_dense}}{'share':>9}")
            for row in rows:
                name = "head" if row.layer < 0 else str(row.layer)
                lines.append(f"{name:<7}{row.attention:<{wide_attention}}"
                             f"{row.heads or '-':>6}{row.kv_heads or '-':>4}  "
                             f"{', '.join(row.gated):<{wide_gated}}{', '.join(row.dense):<{wide_dense}}"
                             f"{100 * row.share:>8.1f}%")
            outside = self.outside(graph)
            if outside:
                share = sum(node_flops(n) for n in outside) / max(1, total)
                lines.append(f"  dense, in no region or chain ({100 * share:.1f}% of the FLOPs): "
                             + ", ".join(f"'{n.name}'{_module_path(n)}" for n in outside))
            for reason in graph.dense_reasons:
                lines.append(f"  dense: {reason}")
            # What the options leave dense of what the analysis found (the backend warns the same at compile time)
            plan = self.plan(graph)
            if isinstance(plan, NotRewritable):
                why = str(plan)
                lines.append("  lowered unchanged" + ("" if why == "; ".join(graph.dense_reasons) else f": {why}"))
            else:
                lines += [f"  dense for these options: {reason}" for reason in plan.reasons]
                if salient_o is not None:
                    more = sum(row.gated_flops for row in salient_o.layers(graph)) - gated
                    if more > 0:
                        lines.append(f"  output_projection=\"salient\" would also gate {100 * more / max(1, total):.1f}"
                                     "% of the FLOPs: the attention output branches (opt-in, docs/rewrite.md)")
            for point in graph.mixing:
                how = "per row" if point.axis is not None else "as a whole: any change makes every row salient"
                lines.append(f"  tested each call (token mixing other than attention): '{point.node.name}', {how}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _branch_row(layer: int, attention: str, region: Region, is_gated: bool) -> LayerRow:
    gated = [_label(region)] if is_gated else []
    return LayerRow(layer, attention, 0, 0, gated, [] if gated else [_label(region)], region.flops,
                    region.flops if is_gated else 0)


def _planned(plan: Union[RewritePlan, NotRewritable]) -> dict[fx.Node, int]:
    """The exits of every chain and region ``plan`` runs on salient (or queried) rows, each with the layer whose
    chain or region runs it."""
    if isinstance(plan, NotRewritable):
        return {}
    queried = {s.queries.exit: s.site.layer for s in plan.sites if s.queries is not None}
    return {**queried, **{x: r.layer for r in plan.regions for x in r.exits}}


def _module_path(node: fx.Node) -> str:
    """`` (in layers.0.attn.q_proj)``: the module that called ``node`` as Dynamo recorded it, without the frame's
    local name; '' where none is."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return f" (in {_FRAME_LOCAL.sub('', path)})"


def _label(region) -> str:
    return {"k": "k proj", "v": "v proj", "q": "q proj", "attn_out": "o proj", "mixer_in": "mixer in",
            "shared_proj": "shared proj"}.get(
        region.role, region.role)


def explain(model: Any, *example_inputs: Any, dynamic: Optional[bool] = None, verbose: bool = True,
            **options: Any) -> Report:
    """Traces ``model(*example_inputs)`` with Dynamo, runs the analysis on every graph, prints the table.

    ``options`` are the backend's options (validated the same way); ``dynamic`` is torch.compile's.
    """
    config = DyllmConfig.from_options(options)
    graphs: list[GraphAnalysis] = []

    def capture(gm, inputs):
        graphs.append(analyze(gm, f"g{len(graphs)}", config.debug_dir))
        return gm.forward

    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), torch.inference_mode():
        torch.compile(model, backend=capture, dynamic=dynamic)(*example_inputs)
    if not graphs:
        raise RuntimeError("explain: Dynamo produced no graph for this model and these inputs")
    report = Report(graphs, config)
    if verbose:
        print(report.table())
    return report
