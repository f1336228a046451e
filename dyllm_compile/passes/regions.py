"""Residual spine, gated regions and q/k/v producer chains.

The *spine* is the residual stream: the values every path from the token input (input ids, plus per-position
tables that feed the first value projection) to the graph's output passes through, i.e. the chain of
post-dominators of that source in the token-carrying dataflow graph. Spine nodes with two or more
token-carrying inputs are *merges* (residual adds).

A *branch* is grown backward from each non-spine operand of a merge (and from each token-carrying graph
output): a producer joins while it is row-wise, is not a merge, and every one of its users is already in the
branch. What stops the growth becomes the branch's input: the residual stream read, a shared norm output, an
attention context, a token-mixing op (e.g. a conv over tokens), a per-position table.

Roles: a branch fed by an attention context is the attention output projection (recorded, not gated); one that
produces a graph output is the lm_head; one with top-k routing or a grouped product is an MoE FFN; any other with
matmul FLOPs is an FFN. q/k/v chains are grown the same way from each site's q, k and v.

Invariant: every node of a branch or chain is row-wise, and only the branch exit is used outside it, so
running it on gathered rows and scattering the exit is exactly the dense computation on those rows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from torch import fx

from .graph_utils import arg, example_value, hint, op_name, prod, same_shape, size_checks, tensor_value
from .head_repeat import repeated_heads_source
from .op_rules import UNARY, Info, Kind
from .sorted_rows import GROUPED_MM

if TYPE_CHECKING:  # attention_sites reads this module
    from .attention_sites import AttentionSite

GATED_ROLES = ("ffn", "moe", "lm_head")


@dataclass
class Region:
    role: str  # "ffn" | "moe" | "lm_head" | "attn_out" | "mixer_in" | "shared_proj" | "light" | "q" | "k" | "v"
    exit: fx.Node  # the last in graph order of the values read outside it
    nodes: list[fx.Node]  # in graph order
    token_inputs: list[fx.Node]
    other_inputs: list[fx.Node]
    flops: int
    layer: int = -1
    gated: bool = False
    reason: str = ""  # why a candidate region stays dense
    # the other values read outside it, in graph order: the results of a split it holds that other ops read (a
    # mixer input projection's gate); each is cached like the exit
    side_exits: list[fx.Node] = field(default_factory=list)

    @property
    def exits(self) -> list[fx.Node]:
        return [*self.side_exits, self.exit]

    def ops(self) -> list[str]:
        return [op_name(n) or n.op for n in self.nodes]


@dataclass
class Spine:
    nodes: list[fx.Node]
    merges: set[fx.Node] = field(default_factory=set)

    @property
    def hidden_states(self) -> set[fx.Node]:
        """The stream's floating-point values: not the token ids it may start from."""
        return {n for n in self.nodes if tensor_value(n) is not None and tensor_value(n).is_floating_point()}


def node_flops(node: fx.Node) -> int:
    """Multiply-add FLOPs (x2) of matmul-like ops, from example sizes; 0 for everything else."""
    name = op_name(node)
    out = tensor_value(node)
    if out is None:
        return 0
    numel = hint(prod(out.shape))
    # operands by position or keyword (transformers 5 calls conv1d(x, weight=...))
    if name in ("linear", "matmul") or name in GROUPED_MM:  # (a grouped product: each row times one group's weight)
        return 2 * numel * hint(tensor_value(arg(node, 0, "input")).shape[-1])
    if name == "addmm":
        return 2 * numel * hint(tensor_value(arg(node, 1, "mat1")).shape[-1])
    if name == "sdpa":
        k = tensor_value(arg(node, 1, "key"))
        q = tensor_value(arg(node, 0, "query"))
        return 2 * hint(prod(q.shape)) * hint(k.shape[-2]) + 2 * numel * hint(k.shape[-2])
    if name in ("conv1d", "conv2d"):
        weight = tensor_value(arg(node, 1, "weight"))
        return 2 * numel * hint(prod(weight.shape[1:]))
    return 0


def distinct_flops(regions: Sequence[Region]) -> int:
    """FLOPs of the nodes of ``regions``, each node once (a fused q/k/v projection is in every chain it feeds)."""
    return sum(node_flops(n) for n in {n for r in regions for n in r.nodes})


def token_inputs_of(node: fx.Node, infos: dict[fx.Node, Info]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a in infos and infos[a].axis is not None]


def tensor_users(node: fx.Node) -> list[fx.Node]:
    """The users that read ``node``'s values (not only checks of its sizes)."""
    return [u for u in node.users
            if u.op == "output" or isinstance(example_value(u), (tuple, list))
            or (tensor_value(u) is not None and size_checks(u) is None)]


def main_output(graph: fx.Graph, infos: dict[fx.Node, Info]) -> Optional[fx.Node]:
    """The last token-carrying value the graph returns (the logits); side outputs (KV caches, hidden states)
    are not on the residual stream's path."""
    output = next(n for n in graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(graph.nodes)}
    returned = [a for a in token_inputs_of(output, infos)]
    return max(returned, key=order.__getitem__, default=None)


def find_spine(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite],
               hidden: Sequence[fx.Node] = ()) -> Spine:
    """The residual stream from the token source (upstream of the first value projection; without attention,
    the ``hidden`` state inputs) to the main output: the post-dominators of the source, found again without the
    side states carried past attention sites (:func:`_side_states`) where there are any."""
    sink = main_output(graph, infos)
    if sink is None:
        return Spine([])
    leaves = _source_leaves(sites[0].v, infos) if sites else list(hidden)
    spine = _post_dominators(graph, infos, sink, leaves, set())
    side_states = _side_states(graph, infos, sites, spine)
    return _post_dominators(graph, infos, sink, leaves, side_states) if side_states else spine


def _post_dominators(graph: fx.Graph, infos: dict[fx.Node, Info], sink: fx.Node, leaves: list[fx.Node],
                     cut: set[tuple[fx.Node, fx.Node]]) -> Spine:
    """The chain of post-dominators of ``leaves`` in the token-carrying dataflow graph to ``sink``, without the
    reads in ``cut``."""
    ipdom: dict[fx.Node, Optional[fx.Node]] = {sink: None}
    depth = {sink: 0}

    def meet(a: fx.Node, b: fx.Node) -> fx.Node:
        while a is not b:
            while depth[a] > depth[b]:
                a = ipdom[a]
            while depth[b] > depth[a]:
                b = ipdom[b]
            if a is not b:
                a, b = ipdom[a], ipdom[b]
        return a

    for node in reversed(list(graph.nodes)):
        if node is sink or infos.get(node, Info(Kind.NONE)).axis is None:
            continue
        succ = [u for u in node.users if u in ipdom and (node, u) not in cut]
        if not succ:
            continue
        cur = succ[0]
        for u in succ[1:]:
            cur = meet(cur, u)
        ipdom[node], depth[node] = cur, depth[cur] + 1

    leaves = [leaf for leaf in leaves if leaf in ipdom]
    if not leaves:
        return Spine([])
    start = leaves[0]
    for leaf in leaves[1:]:
        start = meet(start, leaf)
    nodes = []
    while start is not None:
        nodes.append(start)
        start = ipdom[start]
    return Spine(nodes, {n for n in nodes if _is_merge(n, infos)})


def _side_states(graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite],
                 spine: Spine) -> set[tuple[fx.Node, fx.Node]]:
    """The token-carrying reads ``(value, reader)`` that pass an attention site the value does not feed, of values
    not shaped as the residual stream's merges: a state one layer's branch hands to a later layer's beside the
    stream (Zaya's router adds the previous layer's router state to its own), keys a later layer reads again.
    Every path through such a read goes around the stream values between, which then do not post-dominate the
    source: the spine jumped from the value before the first such read to the merge after the last (Zaya, 40
    layers: from layer 0's attention to layer 39's MoE), and the layers between had no merges, so no branches.
    The spine is found without them; regions and chains read them as they read any value. A value shaped as the
    stream is not one: a residual connection computed before a site and added after it (``h + gate +
    attention``)."""
    stream_shapes: list = []  # the merges' distinct shapes (symbolic sizes are compared, not hashed)
    for merge in spine.merges:
        if not any(same_shape(tensor_value(merge).shape, shape) for shape in stream_shapes):
            stream_shapes.append(tensor_value(merge).shape)
    order = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted(sites, key=lambda s: order[s.node])
    positions = [order[s.node] for s in ordered]
    # per site in graph order, the token-carrying values it is computed from (no stream to stop at)
    fed_by = [_off_stream(s.node, infos, set(), lambda n: True)[0] for s in ordered]
    side = set()
    for node in graph.nodes:
        if infos.get(node, Info(Kind.NONE)).axis is None or tensor_value(node) is None:
            continue
        first = bisect.bisect_right(positions, order[node])  # the first site after the value
        readers = [u for u in node.users
                   if any(node not in fed for fed in fed_by[first:bisect.bisect_left(positions, order[u])])]
        if readers and not any(same_shape(tensor_value(node).shape, shape) for shape in stream_shapes):
            side.update((node, u) for u in readers)
    return side


def _is_merge(node: fx.Node, infos: dict[fx.Node, Info]) -> bool:
    """Two or more full-width token-carrying operands: a residual add (not a norm's row statistic)."""
    out = tensor_value(node)
    full = [a for a in token_inputs_of(node, infos) if out is not None and tensor_value(a) is not None
            and same_shape(tensor_value(a).shape, out.shape)]
    return len(full) >= 2


def _source_leaves(v: fx.Node, infos: dict[fx.Node, Info]) -> list[fx.Node]:
    """Token-carrying values with no token-carrying inputs, upstream of the first value projection."""
    leaves, seen, work = [], set(), [v]
    while work:
        node = work.pop()
        if node in seen:
            continue
        seen.add(node)
        parents = token_inputs_of(node, infos)
        if not parents:
            leaves.append(node)
        work.extend(parents)
    return leaves


def grow(exit: fx.Node, infos: dict[fx.Node, Info], blocked: set[fx.Node],
         shared: frozenset = frozenset(), side_exits: bool = False) -> list[fx.Node]:
    """The largest row-wise region ending at ``exit`` whose nodes are used only inside it (see module doc), or,
    for the nodes in ``shared``, also outside it. ``side_exits``: a matrix product read outside joins too, and a
    split (``chunk``, ``split``) one of whose results is in the region joins with all its results; those read
    outside are the region's side exits (each cached: the work above them is what caching saves)."""
    region = {exit}
    changed = True
    while changed:
        changed = False
        for node in list(region):
            for p in token_inputs_of(node, infos):
                if p in region or p in blocked or p.op == "placeholder" or infos[p].kind is not Kind.ROW:
                    continue
                if p in shared or all(u in region for u in tensor_users(p)) or (side_exits and node_flops(p)):
                    region.add(p)
                    changed = True
                elif side_exits and _is_row_split(p, infos):
                    region |= {p, *p.users}
                    changed = True
    return [n for n in exit.graph.nodes if n in region]


def _is_row_split(node: fx.Node, infos: dict[fx.Node, Info]) -> bool:
    """A tuple of tensors whose every user takes one of them (``getitem``), row-wise."""
    return (isinstance(example_value(node), (tuple, list)) and bool(node.users)
            and all(op_name(u) == "getitem" and tensor_value(u) is not None and u in infos
                    and infos[u].kind is Kind.ROW for u in node.users))


def whole_tuples(nodes: list[fx.Node], exit: fx.Node) -> list[fx.Node]:
    """``nodes`` (a grown region) without the results of a tuple op (``chunk``, ``split``, ``max`` with a dim)
    whose op is not in it: where the op's other results are used outside, the result becomes the region's input,
    a tensor computed for every row as a gathered input must be, not the tuple. So a hyper-connection's mixing
    weights, split into those that read the streams and those that write a branch back, leave the attention's
    chains and the FFN their own part."""
    members = set(nodes)
    return [n for n in nodes if n is exit or op_name(n) != "getitem" or n.args[0] in members
            or not isinstance(example_value(n.args[0]), (tuple, list))]


def build_region(role: str, exit: fx.Node, nodes: list[fx.Node], infos: dict[fx.Node, Info]) -> Region:
    members = set(nodes)
    token_inputs, other_inputs = [], []
    for node in nodes:
        for a in node.all_input_nodes:
            if a in members or a in token_inputs or a in other_inputs:
                continue
            (token_inputs if infos.get(a, Info(Kind.NONE)).axis is not None else other_inputs).append(a)
    return Region(role, exit, nodes, token_inputs, other_inputs, sum(node_flops(n) for n in nodes))


def layer_numbering(graph: fx.Graph, sites: list[AttentionSite], spine: Spine) -> Callable[[fx.Node], int]:
    """The layer a node of ``graph`` belongs to: that of the last attention site whose layer began before it (the
    first layer for what comes before). A layer begins after the last residual-stream value before its site, the
    one it reads: what a layer computes before its attention (a parallel branch, a projection that feeds the site's
    chains through a convolution) is that layer's, as ``layer_cuts`` cuts the pieces."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    stream = [order[n] for n in spine.nodes]
    starts = [max((p for p in stream if p < order[s.node]), default=order[s.node]) for s in sites]
    return lambda node: max(0, sum(1 for p in starts if p < order[node]) - 1)


def find_regions(
    graph: fx.Graph, infos: dict[fx.Node, Info], sites: list[AttentionSite], spine: Spine
) -> list[Region]:
    attention_nodes = {site.node for site in sites}
    exits: list[tuple[fx.Node, bool]] = []  # (exit, is the main output)
    for merge in spine.merges:
        exits += [(x, False) for operand in token_inputs_of(merge, infos) if operand not in spine.nodes
                  for x in _summed_branches(operand, infos, attention_nodes, set(spine.nodes))]
    if spine.nodes[-1] not in spine.merges:  # else the graph ends on the residual stream (a graph break)
        exits.append((spine.nodes[-1], True))
    order = {n: i for i, n in enumerate(graph.nodes)}
    layer_of = layer_numbering(graph, sites, spine)
    regions = []
    for exit, is_output in sorted(set(exits), key=lambda e: order[e[0]]):
        if infos[exit].kind is not Kind.ROW:
            continue
        blocked = spine.merges if is_output else spine.merges | set(spine.nodes)
        nodes = whole_tuples(grow(exit, infos, blocked), exit)
        region = build_region("ffn", exit, nodes, infos)
        region.layer = layer_of(exit)
        _assign_role(region, attention_nodes, is_output)
        regions.append(region)
    return regions


def _off_stream(node: fx.Node, infos: dict[fx.Node, Info], spine: set[fx.Node],
               through: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], bool]:
    """The values ``node`` is computed from without passing the residual stream (the walk goes on past a value
    only where ``through`` holds), and whether it reached the stream."""
    work, seen, reached = [node], set(), False
    while work:
        current = work.pop()
        if current in spine:
            reached = True
        elif current not in seen:
            seen.add(current)
            if through(current):
                work.extend(token_inputs_of(current, infos))
    return seen, reached


def _projected_from_stream(node: fx.Node, infos: dict[fx.Node, Info], spine: set[fx.Node]) -> bool:
    """``node`` is computed from the residual stream through a matrix product (a projection's output, or a view
    or split of it), not a per-position table and not a norm of the stream."""
    seen, reached = _off_stream(node, infos, spine, lambda n: True)
    return reached and any(node_flops(n) > 0 for n in seen)


def _summed_branches(node: fx.Node, infos: dict[fx.Node, Info], attention: set[fx.Node],
                     spine: set[fx.Node]) -> list[fx.Node]:
    """The branches a residual operand sums: parallel attention and MLP added before the residual
    (``x + (attn(ln1(x)) + mlp(ln2(x)))``, GPT-NeoX; Falcon adds a dropout after the sum) are two branches, each
    its own region; the sum (and what only reads it up to the residual add) stays dense. Only a sum with an
    attention output in it (reached without passing the residual stream) is split: an MoE's sum of its experts is
    one branch."""
    sum_node = node
    while infos[sum_node].kind is Kind.ROW and op_name(sum_node) in UNARY:  # dropout(attn + mlp): Falcon
        sum_node = sum_node.args[0]
    if (op_name(sum_node) == "add" and infos[sum_node].kind is Kind.ROW and _is_merge(sum_node, infos)
            and _reads(sum_node, attention, infos, spine)):
        return [x for operand in token_inputs_of(sum_node, infos)
                for x in _summed_branches(operand, infos, attention, spine)]
    return [node]


def _reads(node: fx.Node, targets: set[fx.Node], infos: dict[fx.Node, Info], spine: set[fx.Node]) -> bool:
    """Whether ``node`` is computed from one of ``targets`` through row-wise ops off the residual stream."""
    seen, _ = _off_stream(node, infos, spine, lambda n: infos[n].kind is Kind.ROW)
    return not seen.isdisjoint(targets)


def reads_attention_output(region: Region, attention_nodes: set[fx.Node]) -> bool:
    """Whether ``region`` is an attention's output projection: the attention's output is one of its inputs. It
    stays dense (every row's context moves, so does every row's projection) unless the ``output_projection`` option
    or query pruning gates it with the site (``rewrite_plan._output_projection``)."""
    return any(t in attention_nodes for t in region.token_inputs)


ATTN_OUT_REASON = "attention output projection stays dense (every row's residual moves)"


def _assign_role(region: Region, attention_nodes: set[fx.Node], is_output: bool) -> None:
    if reads_attention_output(region, attention_nodes):
        region.role, region.reason = "attn_out", ATTN_OUT_REASON
    elif is_output:
        region.role = "lm_head"
    elif any(op_name(n) == "topk" or op_name(n) in GROUPED_MM for n in region.nodes):  # routed, or grouped by expert
        region.role = "moe"
    if region.flops == 0 and region.role != "attn_out":
        region.role, region.reason = "light", "no matmul work to save"
    region.gated = region.role in GATED_ROLES


def _kv_heads(node: fx.Node, infos: dict[fx.Node, Info]) -> fx.Node:
    """The row-wise value whose kv heads ``node`` repeats, else ``node``."""
    source = repeated_heads_source(node)
    return source if source is not None and infos[source].kind is Kind.ROW else node


def find_chains(site: AttentionSite, infos: dict[fx.Node, Info], spine: Spine) -> dict[str, Region]:
    """q/k/v producer chains of ``site``: row-wise, used only by the attention, back to the shared input.

    A fused projection (one linear for q, k and v, then split by ``split`` / ``chunk`` / ``unbind`` or sliced)
    feeds the three chains through a value every user of which is in one of them: that value and what only it
    reads join every chain that reads it, so each chain is still its exit computed whole from the chain's inputs
    (the rewrite emits a node once per row selection, so chains run on the same rows compute the shared part
    once). Only a value projected from the residual stream is shared this way: the normed input of separate
    projections, and per-position tables (RoPE's cos and sin), stay chain inputs. A k or v that repeats its kv
    heads (GQA's ``repeat_kv``) of a row-wise value is not in its chain: the chain ends at the kv heads
    (head_repeat).
    """
    blocked = set(spine.nodes)
    starts = (("q", site.q), ("k", _kv_heads(site.k, infos)), ("v", _kv_heads(site.v, infos)))
    shared: frozenset = frozenset()
    while True:  # sharing a value lets the chains grow past it, to the next one they share (MLA, below)
        grown = {which: grow(start, infos, blocked, shared) for which, start in starts
                 if infos[start].kind is Kind.ROW}
        members = {n for nodes in grown.values() for n in nodes}
        # A chain's input inside another chain is shared too (MLA: one projection split into the latent, which
        # k and v are both projected from, and k's rotary part: k's chain holds the split, v's stops at it).
        more = shared | {t for nodes in grown.values() for node in nodes for t in token_inputs_of(node, infos)
                         if t not in nodes and all(u in members for u in tensor_users(t))
                         and _projected_from_stream(t, infos, blocked)}
        if more == shared:
            break
        shared = frozenset(more)
    chains = {}
    for which, start in starts:
        if which not in grown:
            chains[which] = build_region(which, start, [], infos)
            continue
        chain = build_region(which, start, whole_tuples(grown[which], start), infos)
        chain.layer = site.layer
        chain.gated = which in ("k", "v") and chain.flops > 0 and not site.dense_reason
        chains[which] = chain
    return chains
