"""Mixer inputs: the row-wise projections that feed token mixing other than attention, as gated regions.

Pattern: a token-mixing node that is not an attention site (a convolution over the tokens, a selective scan, a
shift) reads a row-wise value off the residual stream; the region grown backward from that value as any region is
(row-wise, every node used only inside it), except that a split (``chunk``, ``split``) of which the region holds one
result joins with all its results, and a matrix product joins whoever else reads it: LFM2's short convolution
projects once and splits the projection into the convolution's two inputs and the gate applied after it; a Mamba
layer's projection splits into the convolution's input, the scan's step sizes and the output gate; Zaya's q and k
projections feed a convolution and, beside it, the queries' and keys' residual paths. Regions that share a node
(two mixers fed by one projection) are one. Every value of the region read outside it is an exit
(``Region.side_exits``), cached like a gated FFN's output.

Invariant: every node is row-wise and only the exits are read outside, so running the region on the current salient
rows and scattering each exit into its cache is exactly the dense computation on those rows; the mixer then runs on
every row of the cached input, as attention runs on every row of its K/V caches, and its output is tested as a
mixing point (mixing_points.py). Before, these projections ran on every row at every call (60% of Falcon-H1's
FLOPs, 14% of LFM2's at test size).
"""

from __future__ import annotations

from torch import fx

from .attention_sites import AttentionSite
from .mixing_points import CALLS
from .op_rules import Info, Kind
from .regions import Region, Spine, build_region, grow, layer_numbering, tensor_users, token_inputs_of


def find_mixer_inputs(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite], spine: Spine,
                      taken: set[fx.Node]) -> list[Region]:
    """The mixer-input regions with matmul work, in graph order, none sharing a node with ``taken`` (the nodes of
    the regions and chains found before: a value two analyses claim stays where it was)."""
    attention = {s.node for s in sites} | {n for s in sites for n in s.internal}
    blocked = set(spine.nodes)
    components: list[set[fx.Node]] = []
    for node in graph.nodes:
        info = infos.get(node)
        if node.op not in CALLS or node in attention or info is None or info.kind is not Kind.MIXING:
            continue
        for seed in token_inputs_of(node, infos):
            if infos[seed].kind is not Kind.ROW or seed in blocked or seed in taken or seed.op == "placeholder":
                continue
            members = set(grow(seed, infos, blocked, side_exits=True))
            for other in [c for c in components if not c.isdisjoint(members)]:
                components.remove(other)
                members |= other
            components.append(members)
    order = {n: i for i, n in enumerate(graph.nodes)}
    layer_of = layer_numbering(graph, sites, spine)
    regions = []
    for members in sorted(components, key=lambda c: min(order[n] for n in c)):
        if not members.isdisjoint(taken):
            continue
        nodes = [n for n in graph.nodes if n in members]
        exits = [n for n in nodes if any(u not in members for u in tensor_users(n))]
        region = build_region("mixer_in", exits[-1], nodes, infos)
        region.side_exits, region.layer, region.gated = exits[:-1], layer_of(exits[-1]), True
        if region.flops:
            regions.append(region)
    return regions
