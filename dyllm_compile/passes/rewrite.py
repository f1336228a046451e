"""Saliency-gated rewrite: from one analysed graph, a dense (cache-filling) and a sparse (cache-using) variant.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import DyllmConfig
from ..ops.attention_sinks import with_sinks
from ..ops.cached_attention import cached_attention_or_dense, default_scale  # registers dyllm::cached_attention
from ..policies import Policy, PolicyHook, resolve
from ..runtime import rows
from .analysis import GraphAnalysis
from .attention_sites import AttentionSite
from .graph_edit import drop_unbacked_bindings
from .graph_utils import arg, hint, is_impure, op_name, same_size, size_checks, tensor_value
from .layer_cuts import PIECE_END, layer_cuts
from .linear_order import as_weight_first, choose as choose_linear_order
from .op_rules import Axis, Kind
from .region_graph import RegionNotRelocatable, check_relocatable, retarget_rows
from .regions import Region, tensor_users


@dataclass
class CacheSpec:
    name: str  # e.g. "L0.k", "L1.ffn", "head.lm_head"
    node: Optional[fx.Node]  # the original node whose value is cached (None: produced by the attention op)


@dataclass
class SitePlan:
    site: AttentionSite
    cached: bool  # rewritten to dyllm::cached_attention (else dense attention, saliency only)
    reason: str = ""
    scale: Union[float, fx.Node] = 1.0  # a node: a float attribute Dynamo made an input (``x.item()``)
    caches: dict[str, int] = field(default_factory=dict)  # "k" | "v" | "c" | "q" | "m" | "l" -> cache index
    values: Optional[Region] = None  # the v chain, run on every row for a policy's before_attention hook
    queries: Optional[Region] = None  # query pruning: the q chain (on the queried rows; gated_q: on S_in)
    kv: dict[str, Region] = field(default_factory=dict)  # the k and v chains as cached (GQA: kv heads only)
    gated_q: bool = False  # exact mode: the q chain is a region on S_in whose cache is the q cache


@dataclass
class RewritePlan:
    analysis: GraphAnalysis
    config: DyllmConfig
    sites: list[SitePlan]
    regions: list[Region]  # gated regions and k/v chains that run on salient rows
    exit_caches: dict[fx.Node, int]  # each exit of a region in ``regions`` (side exits too) -> its cache index
    input_caches: dict[int, int]  # id(gated region) -> cache index of its input (a policy's at_branch hook)
    caches: list[CacheSpec]
    token_inputs: list[int]  # placeholder positions whose changed rows form layer 0's S_in
    input_axes: list[int]  # their token axes
    reasons: list[str]
    policy: Policy  # resolved once from config.policy: the graph hooks and the runtime share the instance
    row_outputs: list[tuple[int, int]]  # (position, token axis) of returned hidden states (row_tags)
    queried_regions: set[int] = field(default_factory=set)  # ids of regions run on the queried rows (o proj)
    weight_first: frozenset = frozenset()  # linear nodes emitted weight first on gathered rows (linear_order)
    cuts: list = field(default_factory=list)  # the node each piece after the first starts with (layer_cuts.py)
    # id of each gathered region whose rows capacity buckets pick per batch element -> how each of its token
    # inputs is gathered (_element_gathers)
    element_regions: dict = field(default_factory=dict)
    # each mixing point (passes/mixing_points.py) -> (its token dim or None, the cache of its last value)
    mixing: dict = field(default_factory=dict)
    # token inputs and exits of gathered regions with the batch folded into their rows (_batch_folded) -> the rows
    # each token has (trail)
    folded_rows: dict = field(default_factory=dict)

    @property
    def prunes_queries(self) -> bool:
        return any(s.queries is not None for s in self.sites)

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.analysis.gm.graph.nodes if n.op == "placeholder"]


class NotRewritable(Exception):
    """The graph as a whole cannot be rewritten: it is lowered unchanged, and the reason is logged."""


def plan_rewrite(analysis: GraphAnalysis, config: DyllmConfig) -> RewritePlan:
    if not analysis.spine.nodes or not (analysis.sites or analysis.gated_regions):
        raise NotRewritable("; ".join(analysis.dense_reasons) or "nothing to gate")
    if analysis.untestable_mixing:
        raise NotRewritable(f"token-mixed values that are not tensors ({', '.join(analysis.untestable_mixing)})")
    infos = analysis.infos
    placeholders = [n for n in analysis.gm.graph.nodes if n.op == "placeholder"]
    # Inputs whose changed rows start layer 0's salient set: token ids or hidden states, batch first, one row per
    # token. Inputs with the token axis first are per-position tables (RoPE cos/sin after a graph break), and
    # longer ones are tables the graph slices (BERT's token_type_ids buffer in transformers 5): compared whole.
    tokens = analysis.token_shape[-2]
    sources = [n for n in placeholders
               if infos[n].kind is Kind.SOURCE and infos[n].axis.dim != 0 and not infos[n].axis.folded
               and same_size(tensor_value(n).shape[infos[n].axis.dim], tokens)]
    if not sources:
        raise NotRewritable("no graph input carries the tokens on a batch-first layout")
    # A [1, N] input broadcast over the batch (position ids a graph break made an input, ahead of the hidden
    # states) is a table, compared whole: the batch is that of the inputs with more than one row, if any.
    batch = next((b for b in (tensor_value(n).shape[0] for n in sources) if not statically_known_true(b == 1)),
                 tensor_value(sources[0]).shape[0])
    sources = [n for n in sources if same_size(tensor_value(n).shape[0], batch)]
    policy = resolve(config.policy)
    hooks = policy.hooks()
    reasons: list[str] = []
    caches: list[CacheSpec] = []
    regions: list[Region] = []
    exit_caches: dict[fx.Node, int] = {}
    input_caches: dict[int, int] = {}
    queried_regions: set[int] = set()

    def add_cache(name: str, node: Optional[fx.Node]) -> int:
        # Names become the variants' input names, one each (a layer may have two regions of one role: DeepSeek-V3's
        # shared and routed experts)
        taken, unique = {spec.name for spec in caches}, name
        for i in itertools.count(1):
            if unique not in taken:
                break
            unique = f"{name}_{i}"
        caches.append(CacheSpec(unique, node))
        return len(caches) - 1

    # The k, v and q caches by the value they hold. Two sites that read one value (DiffLlama's two attentions per
    # layer share their keys and queries) share its cache and its chain, which runs once, on the first site's
    # S_in: a row's value changes only with the input both sites read, and the second site's S_in holds the first's.
    by_value: dict[fx.Node, int] = {}

    def value_cache(name: str, node: fx.Node, chain: Optional[Region]) -> int:
        if node not in by_value:
            by_value[node] = add_cache(name, node)
            if chain is not None:
                regions.append(chain)
                exit_caches[node] = by_value[node]
        return by_value[node]

    sites = []
    for site, chains in zip(analysis.sites, analysis.chains):
        if site.layer in config.dense_layers:
            plan = SitePlan(site, False, "dense_layers option")
        else:
            plan = _plan_site(site, chains, infos, batch)
            if plan.cached:
                plan.kv = {which: chains[which] for which in ("k", "v")}
            if plan.cached and "before_attention" in hooks:
                if any(plan.kv[which].exit in by_value for which in ("k", "v")):
                    # the hook runs where the shared chain does, once, for one site's rows and layer
                    plan = SitePlan(site, False, "the policy reads values before attention, and this site's k/v "
                                    "chain is an earlier site's")
                else:
                    plan = _plan_values(plan, plan.kv, analysis.gm.graph)
        if plan.reason:
            reasons.append(f"layer {site.layer}: attention computed densely ({plan.reason})")
        if plan.cached:
            for which in ("k", "v"):
                plan.caches[which] = value_cache(f"L{site.layer}.{which}", plan.kv[which].exit, plan.kv[which])
            if config.attention_mode == "exact":
                # Rows outside S_in keep their cached q: the q chain runs on S_in only, like k and v (with query
                # pruning too: a pruned site then gathers its queried rows' q from the cache).
                plan.gated_q = bool(chains["q"].nodes and chains["q"].exit is site.q
                                    and not _region_problem(chains["q"], infos, batch))
                plan.caches["q"] = value_cache(f"L{site.layer}.q", site.q, chains["q"] if plan.gated_q else None)
            # The softmax statistics: exact mode's running ones; with a sink, what gates every row's context
            # (ops/attention_sinks.py), the rows outside the queried ones included
            if config.attention_mode == "exact" or site.sinks is not None:
                plan.caches["m"] = add_cache(f"L{site.layer}.m", None)
                plan.caches["l"] = add_cache(f"L{site.layer}.l", None)
        plan.caches["c"] = add_cache(f"L{site.layer}.c", site.node)
        if plan.cached and config.query_pruning_period:
            problem = _region_problem(chains["q"], infos, batch) if chains["q"].nodes else "no q projection chain"
            if problem:
                reasons.append(f"layer {site.layer}: every row queried (q chain: {problem})")
            else:
                plan.queries = chains["q"]
        # The o projection as a region with its own cache: on the queried rows of a pruned site, else (salient
        # option) gated like the FFN: its exit follows the site, so it runs on the site's S_out.
        salient_o = config.output_projection == "salient" and site.layer not in config.dense_layers
        if plan.queries is not None or salient_o:
            out = _output_projection(analysis, site)
            problem = ("no projection branch" if out is None else "values inside it are read outside it"
                       if out.side_exits else _region_problem(out, infos, batch))
            if not problem:
                regions.append(out)
                if plan.queries is not None:
                    queried_regions.add(id(out))
                exit_caches[out.exit] = add_cache(f"L{site.layer}.o", out.exit)
            elif plan.queries is None:
                reasons.append(f"layer {site.layer}: output projection computed densely ({problem})")
        sites.append(plan)
    for region in analysis.gated_regions:
        reason = "dense_layers option" if region.layer in config.dense_layers else _region_problem(
            region, infos, batch)
        if region.role == "shared_proj" and not _read_on_s_in_only(region, regions):
            # computed on every row, as its readers are (like the output projection's region: the algorithm's
            # choice, not a refusal, so no reason is given)
            continue
        if any(x in by_value for x in region.exits):  # one value, one cache (its region is emitted once)
            reason = "its output is an attention's q, k or v, cached with that chain"
        if reason:
            reasons.append(f"layer {region.layer}: {region.role} region computed densely ({reason})")
            continue
        regions.append(region)
        name = "head.lm_head" if region.role == "lm_head" else f"L{region.layer}.{region.role}"
        for x in region.exits:
            exit_caches[x] = add_cache(name, x)
        if "at_branch" in hooks:
            input_caches[id(region)] = add_cache(f"{name}.in", region.token_inputs[0])
    # Token mixing other than attention: its value at the last call, to find the rows a call moves
    mixing = {}
    for point in analysis.mixing:
        # tested per row only where its first dim is the batch (the salient set's); else as a whole
        per_row = point.axis is not None and same_size(tensor_value(point.node).shape[0], batch)
        mixing[point.node] = (point.axis if per_row else None, add_cache(f"L{point.layer}.mixed", point.node))
    gathered = regions + [s.queries for s in sites if s.queries is not None]
    # (a token input in front and not folded is a per-position table, gathered as it is)
    folded_rows = {n: infos[n].axis.trail for r in gathered for n in (*r.token_inputs, *r.exits)
                   if _batch_folded(infos[n].axis, batch) and (infos[n].axis.folded or n in r.exits)}
    element_regions = {id(r): gathers for r in regions if id(r) not in queried_regions
                       and not any(n in folded_rows for n in (*r.token_inputs, *r.exits))
                       and (gathers := _element_gathers(r, infos, batch)) is not None}
    return RewritePlan(analysis, config, sites, regions, exit_caches, input_caches, caches,
                       [placeholders.index(n) for n in sources], [infos[n].axis.dim for n in sources], reasons,
                       policy, _row_outputs(analysis, batch), queried_regions,
                       choose_linear_order(gathered, config.linear_order, hint(batch), hint(tokens)),
                       layer_cuts(analysis.gm.graph, analysis.sites, analysis.spine), element_regions, mixing,
                       folded_rows)


def _read_on_s_in_only(region: Region, planned: list[Region]) -> bool:
    """Whether a shared projection (passes/mixer_inputs.py) can run on the salient rows alone: each of its values
    is read only by the k, v and q chains the plan runs on S_in, the rows the projection runs on. A reader computed
    for other rows (the residual stream, the output projection, paper mode's q on every row) would read the cached
    value of a row whose input moved below the threshold, where the algorithm computes it afresh."""
    on_s_in = {n for r in planned if r.role in ("q", "k", "v") for n in r.nodes}
    return all(u in region.nodes or u in on_s_in for x in region.exits for u in tensor_users(x))


#: Elementwise ops through which a per-position table meets the batch (RoPE's ``q * cos``)
_BROADCASTING = {"mul", "add", "sub", "div", "truediv"}


def _element_gathers(region: Region, infos, batch: Any) -> Optional[dict[fx.Node, Optional[int]]]:
    """How capacity buckets can gather each batch element's own rows for ``region`` (None: they cannot, and it
    gathers the union of the batch's rows), per token input: None for one batch first (its batch, or a batch of
    one that is broadcast), or for a per-position table without a batch dim (RoPE's cos and sin [N, D], token axis
    first) the rank R of what it meets: every use of it in the region is an elementwise op with a batch-first
    result of rank R whose token axis is where right-aligned broadcasting puts the table's, so the element's rows
    of it can stand as [B, 1, ..., K, D] of rank R. Needs a batch of more than one."""
    if not isinstance(batch, int) or batch < 2:
        return None
    gathers: dict[fx.Node, Optional[int]] = {}
    for t in region.token_inputs:
        value, axis = tensor_value(t), infos[t].axis
        if value is None:
            return None
        if axis.dim != 0:
            if value.shape[0] not in (batch, 1):
                return None
            gathers[t] = None
            continue
        ranks = set()
        for user in t.users:
            if user not in region.nodes:
                continue
            out = tensor_value(user)
            if (op_name(user) not in _BROADCASTING or out is None or out.shape[0] != batch
                    or infos[user].axis is None or infos[user].axis.dim != out.dim() - value.dim()
                    or out.dim() - value.dim() < 1):
                return None
            ranks.add(out.dim())
        if len(ranks) != 1:
            return None
        gathers[t] = ranks.pop()
    return gathers


def _output_projection(analysis: GraphAnalysis, site: AttentionSite) -> Optional[Region]:
    """The site's attention output projection (the branch its context feeds), if it is one region."""
    return next((r for r in analysis.regions if r.role == "attn_out" and site.node in r.token_inputs), None)


def _row_outputs(analysis: GraphAnalysis, batch: Any) -> list[tuple[int, int]]:
    """(position, token axis) of the returned values that carry the residual stream to a next graph:
    floating point, batch first, one row per token; not the logits (an lm_head's output), which no graph reads."""
    logits = {r.exit for r in analysis.regions if r.role == "lm_head"}
    found = []
    for position, node in enumerate(analysis.gm.graph.output_node().args[0]):
        info, value = analysis.infos.get(node), tensor_value(node)
        if (info is not None and info.axis is not None and info.axis.dim != 0 and not info.axis.folded
                and node not in logits and value is not None and value.is_floating_point()
                and same_size(value.shape[0], batch)):
            found.append((position, info.axis.dim))
    return found


def _plan_site(site: AttentionSite, chains: dict[str, Region], infos, batch) -> SitePlan:
    q = tensor_value(site.q)
    if site.kind != "sdpa" or site.dense_reason:
        return SitePlan(site, False, site.dense_reason or f"{site.kind} attention is not rewritten")
    if arg(site.node, 4, "dropout_p", 0.0) not in (0, 0.0):
        return SitePlan(site, False, "attention dropout")
    if q.dim() != 4 or any(infos[n].axis != infos[site.q].axis for n in (site.k, site.v, site.node)):
        return SitePlan(site, False, "q/k/v are not [batch, heads, tokens, dim]")
    for which in ("k", "v"):
        problem = _region_problem(chains[which], infos, batch) if chains[which].nodes else "no projection chain"
        if problem:
            return SitePlan(site, False, f"{which} chain: {problem}")
    prefix = [n for n in (site.prefix_k, site.prefix_v) if n is not None]
    if any(infos[n].kind is not Kind.NONE for n in prefix):
        # computed from the tokens after all (through a size, or a table): no proof it is the same each call
        return SitePlan(site, False, "the keys' prefix carries the token axis")
    if any(not same_size(tensor_value(n).shape[0], q.shape[0]) for n in prefix):  # no guard on a symbolic batch
        return SitePlan(site, False, "the keys' prefix is broadcast over the batch")
    problem = _sinks_problem(site, infos)
    if problem:
        return SitePlan(site, False, problem)
    if isinstance(site.softcap, fx.Node) and not _read_from_input(site.softcap):
        return SitePlan(site, False, f"the soft-cap '{site.softcap.name}' is computed in the graph")
    scale = arg(site.node, 6, "scale")
    if isinstance(scale, fx.Node):
        # A float attribute Dynamo made a 0-d input (``dynamic=True``: transformers 5's ``self.scaling``): its
        # ``.item()`` is a constant in each variant, which the runtime keys by its value (scalar_inputs)
        if not _read_from_input(scale):
            return SitePlan(site, False, f"the attention scale '{scale.name}' is computed in the graph")
        return SitePlan(site, True, scale=scale)
    return SitePlan(site, True, scale=float(scale) if scale is not None else default_scale(q.shape[-1]))


def _read_from_input(node: fx.Node) -> bool:
    """``node`` is ``x.item()`` of a graph input: a constant in each variant (``scalar_inputs``)."""
    return node.op == "call_method" and node.target == "item" and node.args[0].op == "placeholder"


def _sinks_problem(site: AttentionSite, infos) -> str:
    """Why the site's attention sinks cannot gate its cached context: they must broadcast to [B, H, N, 1], and where
    they carry the token axis, it must be the queries'."""
    if site.sinks is None:
        return ""
    value, axis = tensor_value(site.sinks), infos[site.sinks].axis
    if value is None or value.dim() != 4 or not same_size(value.shape[-1], 1):
        return "the attention sinks are not [batch, heads, rows, 1]"
    if axis is not None and axis != infos[site.q].axis:
        return "the attention sinks' rows are not the queries' rows"
    return ""


def _plan_values(plan: SitePlan, chains: dict[str, Region], graph: fx.Graph) -> SitePlan:
    """A site whose policy reads values before attention: the whole v chain must be computable before either
    k/v chain ends, since both run on the hook's rows."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_exit = min(order[chains["k"].exit], order[chains["v"].exit])
    values = chains["v"]
    if any(order[n] > first_exit for n in values.token_inputs + values.other_inputs):
        return SitePlan(plan.site, False, "the policy reads values before attention, but the v chain's inputs "
                        "come after the k chain")
    plan.values = values
    return plan


def _batch_folded(axis: Axis, batch: Any) -> bool:
    """The token axis is dim 0 with the batch folded in ahead of the tokens and a static number of rows per token
    after them (``[B * N, D]``: OPT's FFN runs on ``x.reshape(-1, D)``, its residual added there): a region
    gathers and scatters such a value as ``[B, N, ...]`` (rows.unfold_rows). With a batch of one, any token axis
    in front is."""
    return (axis.dim == 0 and axis.by is None and not axis.order and same_size(axis.lead, batch)
            and isinstance(axis.trail, int))


def _region_problem(region: Region, infos, batch) -> str:
    for exit in region.exits:
        axis, value = infos[exit].axis, tensor_value(exit)
        named = f"its output '{exit.name}'" if region.side_exits else "its output"
        if axis is not None and value is not None and _batch_folded(axis, batch):
            continue
        if axis is None or axis.folded or axis.dim == 0 or value is None:
            return f"{named} has no batch-first token axis"
        if not same_size(value.shape[0], batch):
            return f"{named} is not batch-first"
    if region.side_exits:  # emitted where its first exit is: everything it reads must be computed by then
        order = {n: i for i, n in enumerate(region.exit.graph.nodes)}
        late = next((t for t in region.token_inputs + region.other_inputs
                     if order[t] > order[region.exits[0]]), None)
        if late is not None:
            return f"it reads '{late.name}' after its output '{region.exits[0].name}'"
    split = next((t for t in region.token_inputs if tensor_value(t) is None), None)
    if split is not None:  # one result of a split whose other results are read outside the site's chains
        return f"it reads one result of '{split.name}', whose other results are used elsewhere"
    if any(infos[t].axis.folded and not _batch_folded(infos[t].axis, batch) for t in region.token_inputs):
        return "an input folds other rows than the batch's into its token axis"
    if any(infos[t].axis.by is not None for t in region.token_inputs):
        return "it reads rows an MoE selected outside it"
    try:
        for node in region.nodes:
            check_relocatable(node, infos)
    except RegionNotRelocatable as err:
        return str(err)
    return ""


# ---- graph building ------------------------------------------------------------------------------------------

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
                salient = b.call(rows.moved_rows, salient, b.env[node], cache_in[cache], axis, config.threshold)
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
        # per element: a table's rows as [B, 1, ..., K, D] of the rank it meets in this region (_element_gathers)
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
    out = b.call(cached_attention_or_dense, q, k, v, k_old, v_old, take(c_cache), m_old, l_old, flags, mask,
                 _operand(b, site.scale), plan.config.attention_mode, plan.config.recompute_share, *(extra or [None]),
                 _operand(b, s.softcap))
    if "m" in site.caches:  # exact mode's running statistics, or what a sink gates every row's context with
        for which, position in (("m", 1), ("l", 2)):
            new_cache[site.caches[which]] = put(cache_in[site.caches[which]], b.item(out, position))
    return put(c_cache, b.item(out, 0))
