"""Token axes of every value in the graph, and the row-wise / token-mixing class of every op.

Seeds: the token axis of each attention site's q, k, v (dim -2; -1 for a transposed key) is known from the
attention's definition. It is propagated backward through row-wise ops to the graph's leaves (input ids,
hidden-state inputs, per-position tables such as ``rope_cache[:N]`` or ``arange(N)``), then forward over the
whole graph with the rules of :mod:`op_rules`. A graph without attention (the tail of a layer after a graph
break: FFN, final norm, lm_head) is seeded from its hidden-state inputs instead, ``[batch, tokens, features]``
as the graph before the break returned them. This works on static graphs, where sizes are plain integers and a
head dim may equal the sequence length, and on dynamic ones; on dynamic graphs every token axis found is also
checked against the sequence-length symbol through the ShapeEnv.

Invariant: a node is classified row-wise only when a rule proves it; attention nodes are token-mixing and keep
their query's token axis on their output.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import fx

from .attention_sites import AttentionSite
from .graph_utils import is_symbolic, is_weight, same_size, tensor_value
from .op_rules import Axis, Info, Kind, Rules

META_KEY = "dyllm"


def infer_token_axes(graph: fx.Graph, sites: list[AttentionSite],
                     hidden: Sequence[fx.Node] = ()) -> dict[fx.Node, Info]:
    """Classifies every node; returns node -> Info and stores it in ``node.meta['dyllm']``. Seeds come from
    ``sites``, or when there are none from the ``hidden`` state inputs (token axis 1)."""
    n = sites[0].token_count if sites else tensor_value(hidden[0]).shape[1]
    infos: dict[fx.Node, Info] = {}

    def info_of(node: Any) -> Optional[Info]:
        return infos.get(node) if isinstance(node, fx.Node) else None

    rules = Rules(n, info_of)
    seeds = _seed_backward(sites, rules) if sites else {node: Axis(1) for node in hidden}
    attention = {}
    for site in sites:
        q = tensor_value(site.q)
        attention[site.node] = Axis(q.dim() - 2)
        for node in site.internal:
            attention.setdefault(node, None)

    for node in graph.nodes:
        if node.op == "placeholder":
            info = Info(Kind.SOURCE, seeds[node]) if node in seeds else Info(Kind.NONE)
        elif node.op in ("call_function", "call_method"):
            if node in attention:
                info = Info(Kind.MIXING, attention[node], "attention")
            else:
                info = rules.forward(node)
                info = _reconcile(node, info, seeds.get(node))
        else:
            info = Info(Kind.NONE)
        if info.axis is not None and info.axis.by is None and info.kind is not Kind.MIXING and is_symbolic(n):
            info = _check_symbolic(node, info, n)
        infos[node] = info
        node.meta[META_KEY] = info
    return infos


def hidden_state_inputs(graph: fx.Graph) -> list[fx.Node]:
    """Floating-point ``[batch, tokens, features]`` inputs that are not weights, with one (batch, tokens) size:
    the residual stream a graph receives from the graph before a break."""
    found = [n for n in graph.nodes if n.op == "placeholder" and not is_weight(n) and tensor_value(n) is not None
             and tensor_value(n).dim() == 3 and tensor_value(n).is_floating_point()]
    if not found:
        return []
    lead = tuple(tensor_value(found[0]).shape[:2])
    return [n for n in found if all(same_size(a, b) for a, b in zip(tensor_value(n).shape[:2], lead))]


def _seed_backward(sites: list[AttentionSite], rules: Rules) -> dict[fx.Node, Axis]:
    seeds: dict[fx.Node, Axis] = {}
    work: list[tuple[fx.Node, Axis]] = []
    for site in sites:
        for node, from_end in ((site.q, 2), (site.k, 1 if site.k_transposed else 2), (site.v, 2)):
            work.append((node, Axis(tensor_value(node).dim() - from_end)))
    stops = {site.node for site in sites}
    while work:
        node, axis = work.pop()
        if node in seeds or node in stops:
            continue
        seeds[node] = axis
        if node.op in ("call_function", "call_method"):
            work.extend(rules.backward(node, axis))
    return seeds


def _reconcile(node: fx.Node, info: Info, seed: Optional[Axis]) -> Info:
    """Combines the forward result with the backward seed of the same node."""
    if seed is None or info.kind is Kind.MIXING:
        return info
    if info.kind is Kind.NONE:
        return Info(Kind.SOURCE, seed, "per-position value")  # e.g. rope_cache[:N], arange(N) products
    if info.axis != seed:
        return Info(Kind.MIXING, None, f"token axis conflict: forward {info.axis}, from attention {seed}")
    return info


def _check_symbolic(node: fx.Node, info: Info, n: Any) -> Info:
    value = tensor_value(node)
    if value is None:
        return info
    if not same_size(value.shape[info.axis.dim], n * info.axis.fold):
        return Info(Kind.MIXING, None, "token axis size is not the sequence length")
    return info
