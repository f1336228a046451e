"""Mixer inputs and shared projections: the row-wise projections that feed token mixing other than attention, or
that several regions and chains read, as gated regions.

Pattern: a token-mixing node that is not an attention site (a convolution over the tokens, a selective scan, a
shift) reads a row-wise value off the residual stream; the region grown backward from that value as any region is
(row-wise, every node used only inside it), except that a split (``chunk``, ``split``) of which the region holds one
result joins with all its results, and a matrix product joins whoever else reads it: LFM2's short convolution
projects once and splits the projection into the convolution's two inputs and the gate applied after it; a Mamba
layer's projection splits into the convolution's input, the scan's step sizes and the output gate; Zaya's q and k
projections feed a convolution and, beside it, the queries' and keys' residual paths. Regions that share a node
(two mixers fed by one projection) are one. Every value of the region read outside it is an exit
(``Region.side_exits``), cached like a gated FFN's output. An attention's output projection that a mixer reads,
directly or through row-wise work (Inkling's convolution after it; Zamba's Mamba input after its shared attention)
is no part of the mixer's region, which starts after it: it is the attention's (role ``attn_out``), dense as every
output projection is, unless the ``output_projection`` option gates it with the site.

A **shared projection** is grown the same way from a value a region or chain found before reads and none holds
(role ``shared_proj``), apart from the mixers' regions: one result of a split whose other results are read
elsewhere (``regions.whole_tuples`` starts a chain there), or a projection that something else reads too.
DiffLlama's value projection, split between its two attentions; a query projection that two sites read through
views of their own (DiffLlama's, in a dynamic graph); a gated query (Qwen3-Next's) split from its projection, the
gate read after the attention; a hyper-connection's read and write weights, one projection split between the
branch and the residual stream. The rewrite plan runs one on the salient rows only where every reader is a q, k
or v chain it runs on S_in (``rewrite_plan._read_on_s_in_only``): the last two, read by work on every row (the output
projection, the residual stream), stay dense as those readers are, and paper mode's q, computed for every row,
keeps its projection dense.

Invariant: every node is row-wise and only the exits are read outside, so running the region on the current salient
rows and scattering each exit into its cache is exactly the dense computation on those rows; the mixer then runs on
every row of the cached input, as attention runs on every row of its K/V caches, and its output is tested as a
mixing point (mixing_points.py); a chain that reads a shared projection's exit gathers its rows (S_in, those
the projection ran on) from the cache. Before, these projections ran on every row at every call (60% of
Falcon-H1's FLOPs, 14% of LFM2's at test size; shared ones until 2026-12-06: DiffLlama's 13.6% in a dynamic
graph, 4.5% in a static one).
"""

from __future__ import annotations

from torch import fx

from .attention_sites import AttentionSite
from .mixing_points import CALLS
from .op_rules import Info, Kind
from .regions import (ATTN_OUT_REASON, Region, Spine, build_region, grow, layer_numbering, node_flops,
                      reads_attention_output, tensor_users, token_inputs_of)


def find_mixer_inputs(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite], spine: Spine,
                      found: list[Region]) -> list[Region]:
    """The mixer-input and shared-projection regions with matmul work, in graph order, none sharing a node with the
    regions and chains ``found`` before (a value two analyses claim stays where it was)."""
    attention = {s.node for s in sites} | {n for s in sites for n in s.internal}
    taken = {n for r in found for n in r.nodes}
    projections = _output_projections(sites, infos)
    blocked = set(spine.nodes) | set(projections)  # a mixer's region starts after an attention's projection
    mixing = {node for node in graph.nodes if node.op in CALLS and node not in attention and node in infos
              and infos[node].kind is Kind.MIXING}
    mixed = [seed for node in graph.nodes if node in mixing for seed in token_inputs_of(node, infos)]
    mixers = [m for m in _components(mixed, infos, blocked, taken) if m.isdisjoint(taken)]
    # What a region or chain reads that no region holds, computed on every row: one result of a split whose other
    # results are read elsewhere (regions.whole_tuples), a projection read through values of its readers' own.
    # Grown after the mixers' regions, and apart from them: a mixer's region keeps its exits.
    claimed = taken.union(*mixers)
    shared = [m for m in _components([t for r in found for t in r.token_inputs], infos, blocked, claimed)
              if m.isdisjoint(claimed)]
    order = {n: i for i, n in enumerate(graph.nodes)}
    layer_of = layer_numbering(graph, sites, spine)
    regions = []
    # An output projection no branch holds (find_regions' attn_out) that a mixer or a mixer's region reads is the
    # site's own region (one the residual stream reads in no branch, Gemma-3n's stacked streams, stays in none)
    mixer_nodes = mixing.union(*mixers)
    for projection, nodes in projections.items():
        if projection not in taken and not mixer_nodes.isdisjoint(projection.users):
            region = build_region("attn_out", projection, nodes, infos)
            region.layer, region.reason, region.gated = layer_of(projection), ATTN_OUT_REASON, False
            regions.append(region)
    for members, role in sorted([(m, "mixer_in") for m in mixers] + [(m, "shared_proj") for m in shared],
                                key=lambda c: min(order[n] for n in c[0])):
        nodes = [n for n in graph.nodes if n in members]
        exits = [n for n in nodes if any(u not in members for u in tensor_users(n))]
        region = build_region(role, exits[-1], nodes, infos)
        region.side_exits, region.layer, region.gated = exits[:-1], layer_of(exits[-1]), True
        if reads_attention_output(region, attention):  # a context read twice, so its projection was not split off
            region.role, region.reason, region.gated = "attn_out", ATTN_OUT_REASON, False
        if region.flops:
            regions.append(region)
    return sorted(regions, key=lambda r: order[r.exit])


def _output_projections(sites: list[AttentionSite], infos: dict[fx.Node, Info]) -> dict[fx.Node, list[fx.Node]]:
    """Each site's output projection where its context reaches one through row-wise ops with no work, each the
    only reader of the one before (heads merged, then the product): the product's node -> the nodes from the
    context's first reader to it."""
    projections = {}
    for site in sites:
        chain, node = [], site.node
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node not in infos or infos[node].kind is not Kind.ROW:
                break
            chain.append(node)
            if node_flops(node):
                projections[node] = chain
                break
    return projections


def _components(seeds: list[fx.Node], infos: dict[fx.Node, Info], blocked: set[fx.Node],
                taken: set[fx.Node]) -> list[set[fx.Node]]:
    """The regions grown from ``seeds`` (with side exits) that are not in ``taken``, those that share a node
    merged."""
    components: list[set[fx.Node]] = []
    for seed in seeds:
        if infos[seed].kind is not Kind.ROW or seed in blocked or seed in taken or seed.op == "placeholder":
            continue
        members = set(grow(seed, infos, blocked, side_exits=True))
        for other in [c for c in components if not c.isdisjoint(members)]:
            components.remove(other)
            members |= other
        components.append(members)
    return components
