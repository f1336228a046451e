"""Saliency-gated rewrite: from one planned graph (``rewrite_plan``), a dense (cache-filling) and a sparse
(cache-using) variant.

Pattern: each attention site whose k and v chains are row-wise and whose attention is plain SDPA becomes
``dyllm::cached_attention``; its k/v chains run only on the rows of S_in and are scattered into the K/V caches.
Every gated region (FFN, MoE FFN, lm_head) runs only on the rows of the most recent salient set (S_out of its
layer's attention) and is scattered into its output cache. S_out comes from the caching policy's hook, traced
in after each site (default DyLLM: S_in | cos(c, c_old) < threshold). Other attention kinds (hand-written
attention that is not SDPA's function, flex, causal) stay dense but still produce S_out from their context. A
policy's optional hooks before attention (on the site's values, then computed for every row) and at a gated
region's input (cached per region) refine the salient set at those points.

Invariants: the dense variant computes exactly the analysed graph (Dynamo's, or its copy with hand-written
attention as SDPA; plus cache outputs); the sparse variant reads
caches as extra inputs and returns their new values (never aliasing a user-visible output), with the token count of
every gathered region replaced by the static capacity K (or, unbacked, the number of salient rows plus a constant
pad); rows outside the union of salient rows keep their cached values. With threshold 1 every row is salient and
both variants equal the original graph.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import fx

from ..ops.attention_sinks import with_sinks
from ..ops.cached_attention import cached_attention_or_dense  # registers dyllm::cached_attention
from ..policies import PolicyHook
from ..runtime import rows
from .attention_sites import AttentionSite
from .graph_edit import drop_unbacked_bindings
from .graph_utils import is_impure, size_checks, tensor_value
from .layer_cuts import PIECE_END
from .linear_order import as_weight_first
from .region_graph import retarget_rows
from .regions import Region
from .rewrite_plan import RewritePlan, SitePlan

#: Key of a sparse variant's ``gm.meta``: per entry of its row counts output, the row selection it counts, as
#: (per element, index): whether it counts one batch element's rows (a per-element selection, against the element
#: capacity) or the batch's union (against the capacity), and its index among the selections of that kind (into a
#: per-selection capacity).
COUNT_SELECTIONS = "dyllm_count_selections"

#: A row capacity: one for every selection of a kind, or one per selection in the order the graph makes them
#: (layer by layer: a deeper layer's salient set is larger, and so is its capacity).
Capacity = Union[int, Sequence[int]]


def _slots(capacity: Optional[Capacity]) -> list[int]:
    return [] if capacity is None else [capacity] if isinstance(capacity, int) else list(capacity)


def capacity_sizes(capacity: Optional[Capacity], element_capacity: Optional[Capacity] = None,
                   query_capacity: Optional[int] = None) -> list[int]:
    """The sizes of a variant's capacity inputs (``build_sparse(..., symbolic=True)``), in their input order: each
    union capacity, each per-element capacity, the queried rows' capacity."""
    return [*_slots(capacity), *_slots(element_capacity), *_slots(query_capacity)]


@dataclass(frozen=True)
class _Rows:
    """A row selection in the new graph: a region runs on the ``size`` rows ``gather`` (an int capacity, or a
    node: the unbacked gather's length). Capacity buckets scatter the results back to rows ``gather`` where
    ``valid [B, K]``; an unbacked gather's results are placed into the cache by ``position [N]`` where ``valid``
    (then the salient set itself, [B, N]). ``count``: the number of union salient rows (0-d), for overflow
    detection and the row counters."""

    gather: fx.Node
    size: Any
    valid: fx.Node
    count: fx.Node
    position: Optional[fx.Node] = None  # unbacked only
    per_element: bool = False  # gather [B, K]: each batch element's own rows (capacity buckets only)


class _Builder:
    """Copies the analysed graph into a new one, letting the variants replace sites and regions.

    :meth:`enter`, called with each node of the analysed graph in order, marks the node emitted last before
    each of the plan's layer cuts (``node.meta[PIECE_END]``) for piecewise lowering; ``segment`` counts the cuts
    passed: a variant keeps what it derives from a salient set (its row selection) within one segment, so that
    no data-dependent size crosses from one layer's piece into the next."""

    def __init__(self, plan: RewritePlan) -> None:
        self.plan = plan
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.outputs: Any = None
        self.segment = 0
        # (node, row index, per element, table rank) -> its value on those rows: regions run on the same rows
        # share what they have in common (their gathered inputs; a fused q/k/v projection in all three chains).
        self.on_rows: dict[tuple[fx.Node, fx.Node, bool, Optional[int]], fx.Node] = {}
        self._cuts = list(reversed(plan.cuts))
        self.salient_in: Optional[fx.Node] = None  # the sparse variant's [B, N] input: the batch and token counts
        self._order = {n: i for i, n in enumerate(plan.analysis.gm.graph.nodes)} if plan.cuts else {}

    def enter(self, node: fx.Node) -> None:
        while self._cuts and self._order[node] >= self._order[self._cuts[-1]]:
            self._cuts.pop()
            last = next(iter(reversed(self.graph.nodes)), None)
            if last is not None and last.op != "placeholder":
                last.meta[PIECE_END] = True
            self.segment += 1

    def call(self, fn: Callable, *args: Any) -> fx.Node:
        return self.graph.call_function(fn, args)

    def unfolded(self, value: fx.Node, trail: int) -> fx.Node:
        """``value`` with the batch folded into its rows (``plan.folded_rows``) as ``[B, R, ...]``."""
        return self.call(rows.unfold_rows, value, self.salient_in, trail)

    def item(self, node: fx.Node, index: int) -> fx.Node:
        return self.graph.call_function(operator.getitem, (node, index))

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])

    def finish(self, extra: list[Any]) -> fx.GraphModule:
        cached = {id(c) for c in extra}
        # A returned value that is also a cache is cloned: the caller may modify what it gets back.
        user = [self.call(torch.clone, self.env[n]) if isinstance(n, fx.Node) and id(self.env[n]) in cached
                else fx.map_arg(n, lambda a: self.env[a]) for n in self.outputs]
        # One layout for every cache (contiguous): a variant traced with one stride layout must accept the
        # caches the other variant returns.
        extra = [self.graph.call_method("contiguous", (e,)) for e in extra]
        self.graph.output((*user, *extra))
        gm = fx.GraphModule(self.plan.analysis.gm, self.graph)
        drop_unbacked_bindings(gm.graph)  # a variant is lowered in fake modes of its own
        gm.graph.eliminate_dead_code(is_impure)  # after owning: call_module purity checks need the module
        gm.graph.lint()
        gm.recompile()
        return gm


def build_dense(plan: RewritePlan) -> fx.GraphModule:
    """The original graph, returning the cache values too (exact mode: attention through the op, for m and l)."""
    b = _Builder(plan)
    exact = plan.config.attention_mode == "exact"
    by_node = {s.site.node: s for s in plan.sites}
    stats: dict[int, fx.Node] = {}
    for node in plan.analysis.gm.graph.nodes:
        b.enter(node)
        if node.op == "output":
            b.outputs = node.args[0]
            continue
        site = by_node.get(node)
        if site is not None and site.cached and (exact or site.site.sinks is not None):
            s = site.site
            q, k, v = b.env[s.q], b.env[site.kv["k"].exit], b.env[site.kv["v"].exit]
            everyone = b.call(rows.all_rows, q, 2)
            zero = b.call(rows.zero_stats, q)
            (k, v, k_old, v_old, flags, mask), positions = _attention_operands(
                b, s, [k, v, k, v, everyone, _operand(b, s.mask)])
            out = b.call(cached_attention_or_dense, q, k, v, k_old, v_old, q, zero, zero, flags, mask,
                         _operand(b, site.scale), "exact", plan.config.recompute_share, *(positions or [None]),
                         _operand(b, s.softcap))
            context, m, l = (b.item(out, i) for i in range(3))
            stats[site.caches["m"]], stats[site.caches["l"]] = m, l
            if s.sinks is not None:  # the cache holds the sink-free context, which the cached attention updates
                stats[site.caches["c"]] = context
                context = b.call(with_sinks, context, m, l, b.env[s.sinks])
            b.env[node] = context
            continue
        b.env[node] = b.copy(node)
    extra = [stats[i] if i in stats else b.env[spec.node] for i, spec in enumerate(plan.caches)]
    return b.finish(extra)


def scalar_inputs(plan: RewritePlan) -> list[int]:
    """Positions of 0-d inputs read with ``.item()`` (float attributes Dynamo made dynamic, e.g. norm eps)."""
    return [i for i, p in enumerate(plan.placeholders)
            if tensor_value(p) is not None and tensor_value(p).dim() == 0
            and any(u.op == "call_method" and u.target == "item" for u in p.users)]


def build_sparse(plan: RewritePlan, capacity: Optional[Capacity], scalars: Optional[dict[int, Any]] = None,
                 query_capacity: Optional[int] = None, element_capacity: Optional[Capacity] = None,
                 symbolic: bool = False) -> fx.GraphModule:
    """The sparse variant for row capacity K = ``capacity`` (query pruning: ``query_capacity`` queried rows; the
    regions of ``plan.element_regions``, when ``element_capacity`` is given: that many rows of each batch element).
    A capacity is one for every row selection of its kind, or one per selection (``gm.meta[COUNT_SELECTIONS]``
    says which selection each count belongs to).

    ``capacity=None``: unbacked row counts; each gated region runs on exactly its salient rows (``nonzero``, a
    data-dependent size: lower it from fake inputs whose ShapeEnv allows dynamic output shapes).

    ``scalars`` (input position -> value) bakes the values of ``scalar_inputs`` in as constants: the variant
    is compiled outside Dynamo's ShapeEnv, where ``.item()`` of an input is data-dependent. The runtime keys
    its compiled variants by these values.

    Inputs: the original inputs, then one per cache, then ``salient_in [B, N]`` (rows whose input changed), then
    (force_salient only) ``forced [layers, B, N]``, then (policies with a row hint) ``row_hint [B, N]``, then
    (query pruning) ``queried [B, N]``: pruned sites run their q chain (exact mode: on S_in, into the q cache),
    attention and output projection on those rows only, the other rows keep their cached context and projection;
    last ``dense_call [B, 1]``: True recomputes every row (a dense call through this variant, from any caches),
    however the policy's hooks narrow the set. Each site's S_out comes from the policy's in-graph hook (a
    submodule the lowering traces). Outputs: the original outputs, the new caches, the number of union rows each
    gathered region needed (for overflow detection and the row counters), the salient fraction per site
    [layers, B] and the last salient set [B, N] (the next graph's S_in after a graph break). Which selection each
    count counts, per element (the most rows of one element, against ``element_capacity``) or of the union, is
    ``gm.meta[COUNT_SELECTIONS]``.
    A graph without attention gates its regions on ``salient_in``.

    ``symbolic``: the capacities are not baked in but read from the sizes of inputs after ``dense_call``, one 1-d
    tensor per capacity (:func:`capacity_sizes` lists them): lowered with those sizes symbolic, one compiled
    variant serves every bucket its guards admit. The ints given only say how many capacities of each kind there
    are.
    """
    config = plan.config
    b = _Builder(plan)
    graph_nodes = list(plan.analysis.gm.graph.nodes)
    constants = {plan.placeholders[i]: v for i, v in (scalars or {}).items()}
    for node in graph_nodes:
        if node.op == "placeholder":
            b.env[node] = b.copy(node)
    cache_in = [b.graph.placeholder(f"cache_{spec.name.replace('.', '_')}") for spec in plan.caches]
    salient = b.salient_in = b.graph.placeholder("salient_in")
    forced = b.graph.placeholder("forced_salient") if config.force_salient is not None else None
    policy = plan.policy
    hint = b.graph.placeholder("row_hint") if policy.uses_row_hint else None
    queried = b.graph.placeholder("queried") if plan.prunes_queries else None
    everyone = b.graph.placeholder("dense_call")
    # Each layer's forced rows, taken at the start: a layer's piece then reads them as an input, and the layers'
    # pieces are the same code (indexed in each layer, they differed by the index, and nothing was shared)
    layers = sorted({s.site.layer for s in plan.sites}) if forced is not None else []
    forced_rows = {layer: b.call(operator.getitem, forced, layer) for layer in layers}
    sizes: dict[tuple[str, int], Any] = {}  # (kind, index) -> a capacity: an int, or the size of an input
    for kind, slots in (("union", _slots(capacity)), ("element", _slots(element_capacity)),
                        ("query", _slots(query_capacity))):
        for index, size in enumerate(slots):
            sizes[kind, index] = b.graph.placeholder(f"capacity_{kind}_{index}") if symbolic else size

    def size_of(kind: str, index: int) -> Any:
        size = sizes[kind, index]
        return b.graph.call_method("size", (size, 0)) if isinstance(size, fx.Node) else size
    new_cache: dict[int, Any] = {}
    counts, fractions, count_selections = [], [], []
    selections: dict[tuple[fx.Node, int, bool], _Rows] = {}  # by salient set, segment and per element or not
    made = {False: 0, True: 0}  # gated-region selections made so far, union and per element
    selection_index: dict[tuple[fx.Node, int, bool], int] = {}
    region_by_exit = {x: r for r in plan.regions for x in r.exits}
    query_chains = {s.queries.exit: s.queries for s in plan.sites if s.queries is not None and not s.gated_q}
    skipped = _skipped(graph_nodes, [*plan.regions, *query_chains.values()])
    by_node = {s.site.node: s for s in plan.sites}
    # Sites whose policy reads values: both chain exits lead to the site; its values for every row, once run.
    value_sites = {s.kv[w].exit: s for s in plan.sites if s.values is not None for w in ("k", "v")}
    dense_values: dict[fx.Node, fx.Node] = {}

    def select(current: fx.Node, per_element: bool = False) -> _Rows:
        key = (current, b.segment, per_element)
        if key not in selections:
            # Bucketed queried rows have their own static capacity: the runtime sizes it from this very mask (no
            # overflow). Unbacked, both selections count their rows.
            if current is queried:
                size = None if query_capacity is None else size_of("query", 0)
            else:  # a gated region's selection: the next capacity of its kind
                selection_index[key] = made[per_element]
                made[per_element] += 1
                kind, given = ("element", element_capacity) if per_element else ("union", capacity)
                slot = 0 if isinstance(given, int) else selection_index[key]
                size = None if given is None else size_of(kind, slot)
            if per_element:
                picked = b.call(rows.select_rows_per_element, current, size)
                selections[key] = _Rows(b.item(picked, 0), size, b.item(picked, 1), b.item(picked, 2),
                                        per_element=True)
            elif size is None:
                picked = b.call(rows.select_rows_unbacked, current)
                gather = b.item(picked, 0)
                selections[key] = _Rows(gather, b.graph.call_method("size", (gather, 0)), valid=current,
                                        count=b.item(picked, 2), position=b.item(picked, 1))
            else:
                picked = b.call(rows.select_rows, current, size)
                selections[key] = _Rows(b.item(picked, 0), size, b.item(picked, 1), b.item(picked, 2))
        return selections[key]

    hook_count = itertools.count()

    def hook(point: str, layer: int, axis: int, current: fx.Node, fresh: fx.Node, cached: fx.Node) -> fx.Node:
        name = f"dyllm_{point}_{next(hook_count)}"
        plan.analysis.gm.add_submodule(name, PolicyHook(policy, point, axis, layer, config.threshold))
        # A policy may drop rows that came in salient (ES-dLLM does): a dense call keeps every row all the same.
        return b.call(operator.or_, b.graph.call_module(name, (current, fresh, cached, hint)), everyone)

    for node in graph_nodes:
        b.enter(node)
        if node.op == "placeholder" or node in skipped:
            continue
        if node.op == "output":
            b.outputs = node.args[0]
            continue
        if node in query_chains:  # the queried rows of q, for the site to attend with
            picked = select(queried)
            b.env[node] = _emit_rows(b, query_chains[node], picked.gather, picked.size)[node]
            continue
        if node in region_by_exit and node in b.env:  # a side exit, emitted with its region at its first exit
            continue
        if node in region_by_exit and id(region_by_exit[node]) in plan.queried_regions:
            _emit_gathered(b, region_by_exit[node], select(queried), cache_in, new_cache)
            continue
        if node in region_by_exit:
            region = region_by_exit[node]
            cache = plan.exit_caches[node]
            owner = value_sites.get(node)
            if owner is not None and owner.values.exit not in dense_values:  # the site's first chain exit
                values = dense_values[owner.values.exit] = _emit_rows(b, owner.values)[owner.values.exit]
                salient = hook("before_attention", owner.site.layer, 2, salient, values,
                               cache_in[owner.caches["v"]])
            if node in dense_values:  # already computed for every row: keep the hook's rows of it
                new_cache[cache] = b.call(rows.merge_rows, salient, dense_values[node], cache_in[cache], 2)
                b.env[node] = new_cache[cache]
                continue
            if id(region) in plan.input_caches:
                salient = _emit_branch_hook(b, region, salient, cache_in, new_cache, hook)
            own = element_capacity is not None and id(region) in plan.element_regions
            picked = select(salient, own)
            counts.append(picked.count)
            count_selections.append((own, selection_index[(salient, b.segment, own)]))
            _emit_gathered(b, region, picked, cache_in, new_cache)
            continue
        site = by_node.get(node)
        if node.op == "call_method" and node.target == "item" and node.args[0] in constants:
            b.env[node] = constants[node.args[0]]
            continue
        if site is None:
            b.env[node] = b.copy(node)
            if node in plan.mixing:  # the rows this token mixing moved are salient from here on
                axis, cache = plan.mixing[node]
                keys = salient if node in plan.old_masks else None  # their columns: the op's with the old mask
                salient = b.call(rows.moved_rows, salient, b.env[node], cache_in[cache], axis, config.threshold,
                                 keys)
                new_cache[cache] = b.env[node]
            continue
        c_old = cache_in[site.caches["c"]]
        if site.cached:
            picked = select(queried) if site.queries is not None else None
            context = _emit_cached_attention(b, plan, site, salient, cache_in, new_cache, picked)
        else:
            context = b.env[node] = b.copy(node)
        new_cache[site.caches["c"]] = context
        if forced is not None:
            salient = b.call(operator.or_, salient, forced_rows[site.site.layer])
        elif "after_attention" in policy.hooks():
            salient = hook("after_attention", site.site.layer, 2, salient, context, c_old)
        if site.cached and site.site.sinks is not None:  # saliency compared the sink-free contexts, as cached
            context = b.call(with_sinks, context, new_cache[site.caches["m"]], new_cache[site.caches["l"]],
                             b.env[site.site.sinks])
        b.env[node] = context
        fractions.append(b.call(rows.salient_fraction, salient))
    extra = [new_cache[i] for i in range(len(plan.caches))]
    extra.append(b.call(rows.stack_counts, *counts))
    extra.append(b.call(torch.stack, fractions) if fractions else b.call(rows.no_fractions, salient))
    extra.append(salient)
    gm = b.finish(extra)
    gm.meta[COUNT_SELECTIONS] = count_selections
    return gm


def _skipped(graph_nodes: list[fx.Node], regions: list[Region]) -> set[fx.Node]:
    """Nodes the sparse graph does not compute for every row: those inside a region that runs on rows (its exit
    is emitted from the region's inputs), unless something computed for every row reads them (a fused q/k/v
    projection is in the gated k and v chains and in paper mode's dense q chain)."""
    exits = {x: r for r in regions for x in r.exits}
    skipped = {n for r in regions for n in r.nodes if n not in exits}
    for node in list(skipped):  # checks of sizes inside a region (an MoE's selections) go with it
        for user in node.users:
            checks = size_checks(user) if user not in skipped else None
            if checks is not None:
                skipped |= {user} | checks
    for node in reversed(graph_nodes):
        if node in skipped:
            continue
        region = exits.get(node)
        reads = region.token_inputs + region.other_inputs if region is not None else node.all_input_nodes
        skipped.difference_update(reads)
    return skipped


def _emit_rows(b: _Builder, region: Region, index: Optional[fx.Node] = None, capacity: Any = None,
               per_element: bool = False) -> dict[fx.Node, fx.Node]:
    """The region's nodes on the ``capacity`` rows ``index`` of its token inputs (None: on every row, its
    inputs already in the new graph; a node: an unbacked count; ``per_element``: index [B, K], each batch
    element's own rows); returns its exits' values."""
    infos = b.plan.analysis.infos
    local: dict[fx.Node, Any] = {n: b.env[n] for n in region.token_inputs + region.other_inputs}
    if index is None:
        for node in region.nodes:
            local[node] = b.graph.node_copy(node, lambda n: local[n])
        return {x: local[x] for x in region.exits}
    for node in region.token_inputs:
        # per element: a table's rows as [B, 1, ..., K, D] of the rank it meets in this region
        # (rewrite_plan._element_gathers)
        rank = b.plan.element_regions[id(region)][node] if per_element else None
        key = (node, index, per_element, rank)
        if key not in b.on_rows:
            b.on_rows[key] = _gathered(b, node, index, per_element, rank)
        local[node] = b.on_rows[key]
    for node in region.nodes:
        key = (node, index, per_element, None)
        if key not in b.on_rows:
            copy = b.on_rows[key] = b.graph.node_copy(node, lambda n: local[n])
            retarget_rows(node, copy, infos, capacity)
            if node in b.plan.weight_first:
                as_weight_first(copy)
        local[node] = b.on_rows[key]
    return {x: local[x] for x in region.exits}


def _gathered(b: _Builder, node: fx.Node, index: fx.Node, per_element: bool, rank: Optional[int]) -> fx.Node:
    """The token input ``node`` on the rows ``index`` (:func:`_emit_rows`)."""
    axis = b.plan.analysis.infos[node].axis.dim
    if per_element:
        return b.call(rows.gather_rows_per_element, b.env[node], index, axis, rank)
    trail = b.plan.folded_rows.get(node)
    if trail is None:
        return b.call(rows.gather_rows, b.env[node], index, axis)
    return b.call(rows.fold_rows, b.call(rows.gather_rows, b.unfolded(b.env[node], trail), index, 1), trail)


def _emit_gathered(b: _Builder, region: Region, picked: _Rows, cache_in: list[fx.Node],
                   new_cache: dict[int, Any]) -> None:
    """The region on the gathered rows, each exit scattered into (an out-of-place copy of) its cache: the new
    cache is the exit's value from here on."""
    fresh = _emit_rows(b, region, picked.gather, picked.size, picked.per_element)
    for exit, value in fresh.items():
        cache = b.plan.exit_caches[exit]
        trail = b.plan.folded_rows.get(exit)
        if trail is None:
            axis = b.plan.analysis.infos[exit].axis.dim
            b.env[exit] = new_cache[cache] = _scatter(b, cache_in[cache], value, picked, axis)
            continue
        unfolded = [b.unfolded(v, trail) for v in (cache_in[cache], value)]
        b.env[exit] = new_cache[cache] = b.call(rows.fold_rows, _scatter(b, *unfolded, picked, 1), trail)


def _scatter(b: _Builder, cache: fx.Node, fresh: fx.Node, picked: _Rows, axis: int) -> fx.Node:
    """``fresh``, computed on the rows ``picked.gather``, written into (an out-of-place copy of) ``cache``."""
    if picked.position is not None:
        return b.call(rows.place_rows, cache, fresh, picked.position, picked.valid, axis)
    scatter = rows.scatter_rows_per_element if picked.per_element else rows.scatter_rows
    return b.call(scatter, cache, fresh, picked.gather, picked.valid, axis)


def _emit_branch_hook(b: _Builder, region: Region, salient: fx.Node, cache_in: list[fx.Node],
                      new_cache: dict[int, Any], hook: Callable) -> fx.Node:
    """The policy's at_branch hook on the region's input (for a pre-norm FFN the residual stream it reads, its
    norm being part of the region); a row's cached input is the one it last ran with."""
    source = region.token_inputs[0]
    axis = b.plan.analysis.infos[source].axis.dim
    cache = b.plan.input_caches[id(region)]
    fresh, cached, trail = b.env[source], cache_in[cache], b.plan.folded_rows.get(source)
    if trail is not None:  # compared and merged per row as [B, N, ...]
        fresh, cached, axis = b.unfolded(fresh, trail), b.unfolded(cached, trail), 1
    picked = hook("at_branch", region.layer, axis, salient, fresh, cached)
    merged = b.call(rows.merge_rows, picked, fresh, cached, axis)
    new_cache[cache] = merged if trail is None else b.call(rows.fold_rows, merged, trail)
    return picked


def _operand(b: _Builder, value: Any) -> Any:
    """A site's mask, scale or soft cap as the op reads it: the variant's copy of a node, else the value itself (a
    number, or None)."""
    return b.env[value] if isinstance(value, fx.Node) else value


def _attention_operands(b: _Builder, site: AttentionSite, operands: list) -> tuple[list, list]:
    """The op's (k, v, k_old, v_old, changed-key flags, mask) from the site's own ones, and the query rows'
    positions among the keys (the op's ``queried``, none for self-attention): with a prefix, the keys are the own
    rows then the prefix (``rows.prefix_operands``)."""
    if site.prefix_k is None:
        return operands, []
    k, v, k_old, v_old, salient, mask = operands
    prepared = b.call(rows.prefix_operands, k, v, k_old, v_old, b.env[site.prefix_k], b.env[site.prefix_v],
                      salient, mask, site.prefix_first)
    return [b.item(prepared, i) for i in range(6)], [b.item(prepared, 6)]


def _emit_cached_attention(b: _Builder, plan: RewritePlan, site: SitePlan, salient: fx.Node,
                           cache_in: list[fx.Node], new_cache: dict[int, Any],
                           queried: Optional[_Rows] = None) -> fx.Node:
    """The op on every query row, or (query pruning) on the rows ``queried``: their q is already gathered; their
    cached context and statistics are gathered, the results written back."""
    s = site.site
    exact = plan.config.attention_mode == "exact"
    q = b.env[s.q]
    salient_q, extra = salient, []
    if queried is not None:
        salient_q, extra = b.call(rows.gather_rows, salient, queried.gather, 1), [queried.gather]

    def take(cached: fx.Node) -> fx.Node:
        return cached if queried is None else b.call(rows.gather_rows, cached, queried.gather, 2)

    def put(cached: fx.Node, fresh: fx.Node) -> fx.Node:
        return fresh if queried is None else _scatter(b, cached, fresh, queried, 2)

    if exact and not site.gated_q:  # unchanged rows keep their cached query: the incremental update is exact
        q_cache = cache_in[site.caches["q"]]
        q = b.call(rows.merge_rows, salient_q, q, take(q_cache), 2)
        new_cache[site.caches["q"]] = put(q_cache, q)
    elif site.gated_q:  # q is the updated q cache, every row: the queried rows' part of it
        q = take(q)
    if exact:
        m_old, l_old = take(cache_in[site.caches["m"]]), take(cache_in[site.caches["l"]])
    else:
        m_old = l_old = b.call(rows.zero_stats, q)
    c_cache = cache_in[site.caches["c"]]
    (k, v, k_old, v_old, flags, mask), positions = _attention_operands(
        b, s, [b.env[site.kv["k"].exit], b.env[site.kv["v"].exit], cache_in[site.caches["k"]],
               cache_in[site.caches["v"]], salient, _operand(b, s.mask)])
    extra = extra or positions  # query pruning's rows sit at their own positions with a prefix too
    mask_old = cache_in[plan.old_masks[s.mask]] if isinstance(s.mask, fx.Node) and s.mask in plan.old_masks else None
    out = b.call(cached_attention_or_dense, q, k, v, k_old, v_old, take(c_cache), m_old, l_old, flags, mask,
                 _operand(b, site.scale), plan.config.attention_mode, plan.config.recompute_share, *(extra or [None]),
                 _operand(b, s.softcap), mask_old)
    if "m" in site.caches:  # exact mode's running statistics, or what a sink gates every row's context with
        for which, position in (("m", 1), ("l", 2)):
            new_cache[site.caches[which]] = put(cache_in[site.caches[which]], b.item(out, position))
    return put(c_cache, b.item(out, 0))
