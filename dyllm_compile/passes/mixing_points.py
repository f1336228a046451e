"""Where token mixing other than attention meets the rest of the graph: the values a sparse call must test.

Pattern: a token-mixing node that is not an attention site (a convolution or a scan over the tokens, a mean over
them, an attention kernel the analysis cannot see into), and every value computed from it without a row-wise rule
of its own (a slice of it, arithmetic on it: no token axis, or a token axis only from the backward seeding, as a
per-position value gets one): the *mixed* values. The *mixing points* are the mixed tensors that a value outside
them reads (a row-wise op, a gated region, an attention site's q/k/v chain).

Invariant the rewrite keeps with them: a row outside a call's salient set has, in every gated region, the value it
had at its last computation, up to the threshold's approximation. Row-wise ops keep that by construction, and an
attention site tests its context (cosine against the cached one). A mixing point can change any row, so the sparse
variant tests it too, against its value at the last call, before anything reads it: where it carries the tokens
batch first, the rows whose cosine falls below the threshold become salient (the attention context's test); where
it does not, any change makes every row salient. Before this pass a convolution over the tokens (LFM2's short
convolution) was taken for a per-position value: the rows it changed next to a salient row kept stale cached values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import fx

from .attention_sites import AttentionSite
from .graph_utils import computed_from, tensor_value, vmap_batched
from .op_rules import Info, Kind
from .regions import Spine, layer_numbering

CALLS = ("call_function", "call_method")


@dataclass(frozen=True)
class MixingPoint:
    node: fx.Node
    axis: Optional[int]  # the token dim, batch first and one row per token; None: tested as a whole
    layer: int  # numbered like the regions (regions.layer_numbering)


def find_mixing_points(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite],
                       spine: Spine) -> tuple[list[MixingPoint], list[str]]:
    """The mixing points in graph order, and the mixed values read outside that are not tensors (which no test
    can watch: the caller keeps the graph dense)."""
    attention = {s.node for s in sites} | {n for s in sites for n in s.internal}
    batched = vmap_batched(graph)
    mixed: set[fx.Node] = set()
    for node in graph.nodes:
        info = infos.get(node)
        if node.op not in CALLS or node in attention or info is None:
            continue
        # a mixed value under vmap cannot be tested where it is read: even row-wise ops on it stay mixed up to the
        # level's end, whose result, a plain tensor, is the point tested
        if info.kind is Kind.MIXING or any(a in mixed and (info.kind is not Kind.ROW or a in batched)
                                           for a in node.all_input_nodes):
            mixed.add(node)
    layer_of = layer_numbering(graph, sites, spine)
    points, untestable = [], []
    for node in graph.nodes:
        if node not in mixed or all(u in mixed or u.op == "output" for u in node.users):
            continue
        value = tensor_value(node)
        if value is None:
            untestable.append(node.name)
            continue
        axis = infos[node].axis
        per_row = axis is not None and axis.dim != 0 and axis.by is None and not axis.folded
        points.append(MixingPoint(node, axis.dim if per_row else None, layer_of(node)))
    return points + _id_masks(graph, infos, sites, spine, mixed, layer_of), untestable


def _id_masks(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite], spine: Spine,
              mixed: set[fx.Node], layer_of: Callable[[fx.Node], int]) -> list[MixingPoint]:
    """Attention masks computed row by row from the token inputs (a padding mask of the keys, ``[B, 1, 1, N]``),
    as mixing points tested as a whole. Such a mask changes only where the tokens do, but a cached site would remove
    a changed key's old scores under its new mask: any change makes every row salient, but for those at the changed
    keys' columns and the salient rows where the op gets the mask's last value (rewrite_plan's ``_old_masks``). (A
    mask mixed over the tokens is a mixing point already; one computed from the hidden states keeps its site dense,
    rewrite_plan.py.)"""
    inputs = {n for n in graph.nodes if n.op == "placeholder" and n in infos and infos[n].kind is Kind.SOURCE}
    stream = spine.hidden_states
    masks = {s.mask for s in sites if isinstance(s.mask, fx.Node) and s.mask not in mixed
             and tensor_value(s.mask) is not None}
    return [MixingPoint(mask, None, layer_of(mask)) for mask in graph.nodes if mask in masks
            and computed_from(mask, inputs) and not computed_from(mask, stream)]
