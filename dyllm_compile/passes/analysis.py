"""The analysis pipeline on one Dynamo graph: flex_attention as SDPA -> in-place writes as data flow -> values
nothing reads dropped -> fused layers unfused -> heads folded into the batch unfolded -> hand-written attention as
SDPA -> attention sites -> token axes -> spine, regions, chains and mixer inputs."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx

from .attention_sites import AttentionSite, find_attention_sites
from .graph_utils import op_name, same_size, tensor_value
from .flex_attention import sdpa_from_flex
from .folded_heads import unfold_heads
from .fused_layers import FUSED_REASON, unfuse_layers
from .graph_edit import without_dead_code
from .hand_written_attention import sdpa_from_hand_written
from .in_place_writes import functionalize_writes
from .mixer_inputs import find_mixer_inputs
from .mixing_points import MixingPoint, find_mixing_points
from .op_rules import Info, Kind
from .pass_manager import DyllmPass, PassManager
from .regions import Region, Spine, distinct_flops, find_chains, find_regions, find_spine, node_flops
from .token_axes import hidden_state_inputs, infer_token_axes

log = logging.getLogger("dyllm_compile")


@dataclass
class GraphAnalysis:
    gm: fx.GraphModule
    graph_id: str = "g0"
    sites: list[AttentionSite] = field(default_factory=list)
    infos: dict[fx.Node, Info] = field(default_factory=dict)
    spine: Spine = field(default_factory=lambda: Spine([]))
    regions: list[Region] = field(default_factory=list)
    chains: list[dict[str, Region]] = field(default_factory=list)  # per site: "q", "k", "v"
    hidden_inputs: list[fx.Node] = field(default_factory=list)  # a graph without attention: its seeds
    dense_reasons: list[str] = field(default_factory=list)
    unfollowed_writes: list[str] = field(default_factory=list)  # then nothing is searched: the graph stays dense
    # token mixing other than attention, where the rest of the graph reads it: tested each sparse call
    mixing: list[MixingPoint] = field(default_factory=list)
    untestable_mixing: list[str] = field(default_factory=list)  # mixed non-tensor values read outside: all dense

    @property
    def gated_regions(self) -> list[Region]:
        return [r for r in self.regions if r.gated]

    @property
    def total_flops(self) -> int:
        return sum(node_flops(n) for n in self.gm.graph.nodes)

    @property
    def gated_flops(self) -> int:
        chains = [c for per_site in self.chains for c in per_site.values() if c.gated]
        return distinct_flops(self.gated_regions + chains)

    @property
    def token_shape(self) -> Optional[tuple]:
        if self.sites:
            return tuple(tensor_value(self.sites[0].q).shape)
        return tuple(tensor_value(self.hidden_inputs[0]).shape) if self.hidden_inputs else None

    def summary(self) -> str:
        roles = Counter(r.role for r in self.gated_regions)
        if not self.sites and roles:
            return (f"dyllm: graph {self.graph_id}: no attention; gated regions {dict(roles)} on the rows of its "
                    f"hidden-state input that changed")
        if not self.sites:
            return f"dyllm: graph {self.graph_id}: nothing to gate ({'; '.join(self.dense_reasons)})"
        kinds = Counter(s.label for s in self.sites)
        share = self.gated_flops / max(1, self.total_flops)
        mixing = f", {len(self.mixing)} other token-mixing values tested per call" if self.mixing else ""
        return (
            f"dyllm: graph {self.graph_id}: {len(self.sites)} attention sites "
            f"({', '.join(f'{v} {k}' for k, v in kinds.items())}), gated regions "
            f"{dict(roles)}, k/v chains {sum(1 for c in self.chains if c['k'].gated)}{mixing}; "
            f"{100 * share:.1f}% of matmul FLOPs gateable; {len(self.dense_reasons)} dense reasons"
        )


class _GraphReplacing(DyllmPass):
    """A pass that may replace the graph with an edited copy (Dynamo's graph itself is never edited). The edit
    only lets later passes see more: if it fails, the graph stays as it was, with a warning."""

    what = ""
    #: gm -> gm or an edited copy of it
    edit: Callable[[fx.GraphModule], fx.GraphModule]

    def __call__(self, state: GraphAnalysis) -> None:
        try:
            state.gm = self.edit(state.gm)
        except Exception as err:
            log.warning("dyllm: graph %s: %s failed (%s: %s); left as it was", state.graph_id, self.what,
                        type(err).__name__, err)


class FunctionalizeWrites(DyllmPass):
    """In-place writes become out-of-place ops read by what read the written value after them. A write that cannot
    be (into an input, or into memory another value still reads) keeps the whole graph dense: every pass after
    this one follows data flow only, and would not see it."""

    name = "in_place_writes"

    def __call__(self, state: GraphAnalysis) -> None:
        state.gm, state.unfollowed_writes = functionalize_writes(state.gm)
        state.dense_reasons += state.unfollowed_writes


class DeadCode(_GraphReplacing):
    """Values nothing reads are dropped, once writes are data flow (a write's result has no readers: a graph whose
    writes stayed in place is left whole)."""

    name, what, edit = "dead_code", "dropping values nothing reads", staticmethod(without_dead_code)

    def __call__(self, state: GraphAnalysis) -> None:
        if not state.unfollowed_writes:
            super().__call__(state)


class UnfuseLayers(_GraphReplacing):
    """Fused encoder layers (``nn.TransformerEncoderLayer``'s fast path) become the ops they compute."""

    name, what, edit = "fused_layers", "unfusing fused encoder layers", staticmethod(unfuse_layers)


class UnfoldHeads(_GraphReplacing):
    """Attention written on heads folded into the batch (``bmm`` of ``[B * H, N, D]`` values) becomes attention
    on ``[B, H, N, D]`` values, which the next pass and the site search read."""

    name, what, edit = "folded_heads", "unfolding heads folded into the batch", staticmethod(unfold_heads)


class HandWrittenAttention(_GraphReplacing):
    """Hand-written attention that computes SDPA's function becomes one SDPA node."""

    name, what = "hand_written_attention", "replacing hand-written attention by SDPA"
    edit = staticmethod(sdpa_from_hand_written)


class FlexAttention(_GraphReplacing):
    """flex_attention that only masks becomes one SDPA node with the mask its block mask applies."""

    name, what, edit = "flex_attention", "replacing flex_attention by SDPA", staticmethod(sdpa_from_flex)


class FindAttentionSites(DyllmPass):
    name = "attention_sites"

    def __call__(self, state: GraphAnalysis) -> None:
        if state.unfollowed_writes:
            return
        state.sites = find_attention_sites(state.gm.graph)
        if not state.sites:  # the tail of a layer after a graph break: its hidden-state inputs seed the axes
            state.hidden_inputs = hidden_state_inputs(state.gm.graph)
        if not state.sites and not state.hidden_inputs:
            opaque = sorted({_label(n) for n in state.gm.graph.nodes if _is_opaque(n)})
            hint = f"; opaque ops that may hide attention: {', '.join(opaque)}" if opaque else ""
            state.dense_reasons.append(f"no self-attention site found in this graph{hint}")
        state.dense_reasons += sorted({n.meta[FUSED_REASON] for n in state.gm.graph.nodes if FUSED_REASON in n.meta})
        for site in state.sites:
            if site.dense_reason:
                state.dense_reasons.append(f"layer {site.layer}: {site.dense_reason}")


class InferTokenAxes(DyllmPass):
    name = "token_axes"

    def __call__(self, state: GraphAnalysis) -> None:
        if state.sites or state.hidden_inputs:
            state.infos = infer_token_axes(state.gm.graph, state.sites, state.hidden_inputs)


class FindRegions(DyllmPass):
    name = "regions"

    def __call__(self, state: GraphAnalysis) -> None:
        if not state.infos:
            return
        state.spine = find_spine(state.gm.graph, state.infos, state.sites, state.hidden_inputs)
        if not state.spine.nodes:
            state.dense_reasons.append("no residual stream found from the token input to the output")
            return
        state.regions = find_regions(state.gm.graph, state.infos, state.sites, state.spine)
        state.chains = [find_chains(site, state.infos, state.spine) for site in state.sites]
        found = state.regions + [c for chains in state.chains for c in chains.values()]
        state.regions += find_mixer_inputs(state.gm.graph, state.infos, state.sites, state.spine, found)
        for region in state.regions:
            if not region.gated and region.role != "attn_out":
                state.dense_reasons.append(f"layer {region.layer}: {region.role} region ending at "
                                           f"'{region.exit.name}': {region.reason}")
        attention = {s.node for s in state.sites} | {n for s in state.sites for n in s.internal}
        mixing = Counter(
            (op_name(n) or n.op, info.reason)
            for n, info in state.infos.items()
            if info.kind is Kind.MIXING and n not in attention
        )
        for (name, reason), count in sorted(mixing.items()):
            state.dense_reasons.append(f"'{name}' x{count}: token-mixing ({reason}); computed densely")
        state.mixing, state.untestable_mixing = find_mixing_points(state.gm.graph, state.infos, state.sites,
                                                                    state.spine)
        if state.untestable_mixing:
            state.dense_reasons.append("token-mixed values that are not tensors are read by the graph ("
                                       f"{', '.join(state.untestable_mixing)}): no call can test which rows they "
                                       "change")


# torch's own fused attention calls, as Dynamo records them: one node each (multi_head_attention_forward returns
# a tuple; a fused encoder layer the fused_layers pass left fused carries its reason as well).
_FUSED_ATTENTION = frozenset({"multi_head_attention_forward", "_native_multi_head_attention",
                              "_transformer_encoder_layer_fwd"})


def _is_opaque(node: fx.Node) -> bool:
    """A call the analysis cannot see into (a custom kernel, torch's fused attention), producing a tensor with heads
    or tokens."""
    if op_name(node) in _FUSED_ATTENTION:
        return True
    if node.op != "call_function" or tensor_value(node) is None or tensor_value(node).dim() < 3:
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace not in ("aten", "prims")
    return op_name(node) is None


def _label(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._overloadpacket.__name__}"
    return getattr(target, "__qualname__", str(target))


ANALYSIS_PASSES = (FlexAttention(), FunctionalizeWrites(), DeadCode(), UnfuseLayers(), UnfoldHeads(),
                   HandWrittenAttention(), FindAttentionSites(), InferTokenAxes(), FindRegions())


def analyze(gm: fx.GraphModule, graph_id: str = "g0", debug_dir: Optional[str] = None) -> GraphAnalysis:
    state = GraphAnalysis(gm, graph_id)
    PassManager(ANALYSIS_PASSES, debug_dir, render=render).run(state, graph_id)
    return state


def render(state: GraphAnalysis) -> str:
    """The graph, one node a line, with its token class, axis and site / region / spine membership."""
    tags: dict[fx.Node, list[str]] = {}
    for site in state.sites:
        for which in ("q", "k", "v"):
            tags.setdefault(getattr(site, which), []).append(f"L{site.layer}.{which}")
        tags.setdefault(site.node, []).append(f"L{site.layer}.attention({site.kind})")
    for region in state.regions + [c for per_site in state.chains for c in per_site.values()]:
        for node in region.nodes:
            tags.setdefault(node, []).append(f"L{region.layer}.{region.role}{'*' if region.gated else ''}")
    for node in state.spine.nodes:
        tags.setdefault(node, []).append("merge" if node in state.spine.merges else "spine")
    lines = [f"# {state.summary()}",
             "# * = gated region; axis = token dim (x folded leading rows, / folded trailing rows per token)"]
    for node in state.gm.graph.nodes:
        info = state.infos.get(node)
        axis = "" if info is None or info.axis is None else f"axis={info.axis.dim}" + (
            "" if same_size(info.axis.lead, 1) else f"x{info.axis.lead}") + (
            "" if same_size(info.axis.trail, 1) else f"/{info.axis.trail}")
        kind = "" if info is None else info.kind.value
        shape = tuple(tensor_value(node).shape) if tensor_value(node) is not None else ""
        lines.append(f"{node.name:<40} {str(op_name(node) or node.op):<18} {kind:<13} {axis:<8} "
                     f"{str(shape):<24} {' '.join(tags.get(node, []))}")
    return "\n".join(lines) + "\n"
