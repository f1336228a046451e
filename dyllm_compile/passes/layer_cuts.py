"""Where the graph splits into layers, for piecewise lowering (:mod:`dyllm_compile.piecewise`).

Pattern: the residual stream (the spine) and the attention sites in graph order. Layer k reads the last spine
value that precedes site k (the embedding for layer 0, the previous layer's last residual add after it) and begins
at that value's first reader; the head begins at the first reader of the spine's last residual add.
Invariant: the cuts are nodes in graph order, one per site plus the head's start; nothing in the graph changes.
Pieces between consecutive cuts then hold one layer each, laid out alike when the layers are alike, so that a
lowering can compile one of them and reuse it for the others. A graph with fewer than two sites has no repeated
piece and gets no cuts.
"""

from __future__ import annotations

from torch import fx

from .attention_sites import AttentionSite
from .regions import Spine

#: ``node.meta`` key a variant's builder sets on the last node it emitted before each cut: a piece's last node.
PIECE_END = "dyllm_piece_end"


def layer_cuts(graph: fx.Graph, sites: list[AttentionSite], spine: Spine) -> list[fx.Node]:
    """The nodes each piece after the first starts with, in graph order (the last piece, the head, ends with
    the output): per layer, the first reader of the stream it reads; then the first reader of the last residual
    add. Starting at a reader, not at the stream value itself, leaves what comes between (position tables sliced
    from graph inputs) before layer 0, where every layer receives it from."""
    if len(sites) < 2:
        return []
    order = {n: i for i, n in enumerate(graph.nodes)}
    stream = sorted((n for n in spine.nodes if n.op != "placeholder"), key=order.__getitem__)
    entries: list[fx.Node] = []
    for site in sites:
        before = [n for n in stream if order[n] < order[site.node]]
        if before and before[-1] not in entries:
            entries.append(before[-1])
    merges = [n for n in stream if n in spine.merges and order[n] > order[sites[-1].node]]
    if merges:
        entries.append(merges[-1])
    starts = [min(e.users, key=order.__getitem__) for e in entries if e.users]
    return starts if len(starts) >= 2 else []
