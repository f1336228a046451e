"""Rewrite planning: which attention sites are cached, which regions are gated, on which rows, and the caches.

Pattern: each attention site the analysis gives as SDPA (hand-written and flex attention replaced by it, soft-capped
scores as ``dyllm::sdpa_softcap``) whose k and v chains can run on gathered rows is cached, its k and v chains on
S_in. Every gated region the analysis found (FFN, MoE FFN, lm_head; the output projection on request, query
pruning's regions) runs on its layer's S_out, unless it cannot be moved onto gathered rows: then it stays dense,
with the reason.

Invariant: a plan only names what the builders (``rewrite.build_dense`` / ``build_sparse``) can emit; anything
it cannot prove safe is left dense and explained in ``RewritePlan.reasons``, and a graph with nothing to gate
raises :class:`NotRewritable` (lowered unchanged, the reason logged).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import DyllmConfig
from ..ops.cached_attention import default_scale
from ..policies import Policy, resolve
from .analysis import GraphAnalysis
from .attention_sites import AttentionSite
from .graph_utils import arg, computed_from, hint, op_name, same_size, tensor_value
from .layer_cuts import layer_cuts
from .linear_order import choose as choose_linear_order
from .op_rules import Axis, Kind
from .region_graph import RegionNotRelocatable, check_relocatable
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
    # attention masks the op gets with their last value (exact mode, _old_masks) -> that value's cache (a mixing
    # point's)
    old_masks: dict = field(default_factory=dict)

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
    # what a site's mask may be computed from (the residual stream) and the masks tested each call (mixing points)
    stream, tested = analysis.spine.hidden_states, {point.node for point in analysis.mixing}
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
            plan = _plan_site(site, chains, infos, batch, stream, tested)
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
                       folded_rows, _old_masks(sites, mixing, config, batch, tokens))


def _old_masks(sites: list[SitePlan], mixing: dict, config: DyllmConfig, batch: Any, tokens: Any
               ) -> dict[fx.Node, int]:
    """Attention masks that change with the keys (computed from the tokens), which exact mode's op then gets with
    their last value, to remove a changed key's old scores under it: each a mixing point (its last value cached,
    tested each call: the rows whose mask moved at keys that did not change are salient), batch first with the keys
    last, read by attention sites only, every cached one without a prefix of keys or pruned queries (whose keys or
    statistics the last value does not match). mask -> the mixing point's cache."""
    if config.attention_mode != "exact":
        return {}
    readers: dict[fx.Node, list[SitePlan]] = {}
    for plan in sites:
        if isinstance(plan.site.mask, fx.Node) and plan.site.mask in mixing and plan.cached:
            readers.setdefault(plan.site.mask, []).append(plan)
    sites_at = {p.site.node for p in sites}
    return {mask: mixing[mask][1] for mask, plans in readers.items()
            if all(p.site.prefix_k is None and p.queries is None for p in plans) and set(mask.users) <= sites_at
            and tensor_value(mask).dim() >= 2 and same_size(tensor_value(mask).shape[0], batch)
            and same_size(tensor_value(mask).shape[-1], tokens)}


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


def _plan_site(site: AttentionSite, chains: dict[str, Region], infos, batch, stream: set[fx.Node],
               tested: set[fx.Node]) -> SitePlan:
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
    if isinstance(site.mask, fx.Node) and site.mask not in tested and computed_from(site.mask, stream):
        # A bias of each key from its hidden state: a changed key's mask column changes with it, and the op would
        # remove that key's old scores under the new mask. (A mask mixed over the tokens, DeBERTa's relative scores
        # or an indexer's top-k keys, is tested each call: the rows it moved are salient, mixing_points.py.)
        return SitePlan(site, False, "the attention mask is computed from the hidden states, row by row")
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
