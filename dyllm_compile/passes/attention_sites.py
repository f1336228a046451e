"""Finds attention sites in a Dynamo graph.

Patterns matched:
- ``scaled_dot_product_attention(q, k, v, attn_mask=..., scale=..., enable_gqa=...)`` (one node);
- hand-written ``softmax(q @ k^T * scale [+ mask]) [.to(dtype)] @ v``: a softmax over the last dim whose input
  reaches, through elementwise scaling/masking/casts only, a matmul (or an einsum over q's and k's last dims),
  and whose output reaches, through casts and dropout only, the left operand of a second matmul (or einsum).
  The analysis first replaces those that are SDPA by an SDPA node
  (:mod:`~dyllm_compile.passes.hand_written_attention`); the others carry the reason they are not;
- ``flex_attention`` (a higher-order op): the analysis first replaces one that only masks by SDPA with its mask
  (:mod:`~dyllm_compile.passes.flex_attention`); the others are recorded as sites that stay dense, with the reason
  (a score_mod that changes the scores, a read of the log-sum-exp).

Before the softmax, hand-written sites may shift the logits by their row max (``x - x.max(-1, keepdim=True)``: the
softmax does not see it) and append an **attention sink**: ``softmax(cat([scores, s], dim=-1))[..., :-1] @ v``
(or the sink first and ``[..., 1:]``), ``s`` a logit per query row and head that attends to nothing (GPT-OSS).
Granite-SWA writes the same function after the softmax, ``(softmax(scores) @ v) * sigmoid(logsumexp(scores, -1) -
s)[..., None]``: the site's context is then that product. The site records ``s`` as its ``sinks``; the pass turns
it into ``dyllm::sdpa_with_sinks``
(:mod:`~dyllm_compile.ops.attention_sinks`), which ``find_attention_sites`` reads like SDPA.

Keys and values may extend the site's own rows by a **prefix**: ``k = cat([P_k, K], dim=tokens)`` (or ``[K, P_k]``),
possibly head-repeated after (``repeat_kv``), likewise ``v``, where ``K`` holds q's token count and ``P_k`` is
computed from none of the graph inputs q is computed from: a block-diffusion decoder attending to the prompt's
cached keys and values (DiffusionGemma's decoder, a prefix KV cache). The site's k and v are then ``K`` and ``V``,
its prefix ``P_k`` and ``P_v``; the concatenations and repeats become the site's internal nodes.

Invariant: a site is only recorded when q, k and v are tensors with the token count on the expected dim (after
a prefix is split off); the graph is never modified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import fx

from .graph_utils import (arg, example_value, index_position, normalize_dim, op_name, reduced_dims, same_shape,
                          same_size, tensor_value)
from .head_repeat import repeated_heads_source

#: ``node.meta`` key of a hand-written site's context node: why it stays as written
#: (:mod:`~dyllm_compile.passes.hand_written_attention`).
HAND_WRITTEN_REASON = "dyllm_hand_written_reason"
#: ``node.meta`` key of a flex_attention node: why it stays as written (:mod:`~dyllm_compile.passes.flex_attention`).
FLEX_REASON = "dyllm_flex_reason"
#: ``node.meta`` key of an SDPA node that replaced hand-written attention.
FROM_HAND_WRITTEN = "dyllm_from_hand_written"
#: ``node.meta`` key of an SDPA node that replaced flex_attention.
FROM_FLEX = "dyllm_from_flex"

# Ops allowed between the scores matmul and the softmax (scale, mask, casts), and after the softmax.
# tanh: Gemma-2's soft-capping, s -> c * tanh(s / c) (found, so that the rest of the layer is still gated).
CASTS = frozenset("to float half bfloat16 type_as".split())
_SCORE_OPS = CASTS | frozenset("mul div add sub masked_fill where tanh".split())
_PROB_OPS = CASTS | frozenset("dropout contiguous".split())


@dataclass
class AttentionSite:
    node: fx.Node  # the node whose output is the attention context (before the output projection)
    kind: str  # "sdpa" | "manual" | "flex"
    q: fx.Node
    k: fx.Node  # for "manual": the key operand of the scores' product (transposed for a matmul)
    v: fx.Node
    k_transposed: bool = False
    mask: Optional[fx.Node] = None
    internal: list[fx.Node] = field(default_factory=list)  # scores/softmax nodes of a manual site
    dense_reason: str = ""  # non-empty: the site is recognised but must stay dense
    layer: int = -1
    hand_written: bool = False  # an SDPA node that replaced hand-written attention
    from_flex: bool = False  # an SDPA node that replaced flex_attention
    # keys and values beyond the site's own rows (module docstring): the prefix's k and v, and whether it comes
    # before the own rows in the keys' order
    prefix_k: Optional[fx.Node] = None
    prefix_v: Optional[fx.Node] = None
    prefix_first: bool = True
    # an attention sink: one more logit per query row (broadcastable to [B, H, R, 1]) that attends to nothing
    sinks: Optional[fx.Node] = None
    # "manual": the scores as the softmax reads them, without a sink column or a row-max shift
    scores: Optional[fx.Node] = None
    # the sinks come from ``context * sigmoid(logsumexp(scores) - s)``: broadcastable to [B, H, R], no last dim of 1
    sinks_lse: bool = False
    # soft-capped scores, ``softcap * tanh(s / softcap)`` (``dyllm::sdpa_softcap``); 0: none. A node where the cap is
    # read from an input (``.item()``: a float attribute Dynamo made dynamic)
    softcap: Union[float, fx.Node] = 0.0

    @property
    def label(self) -> str:
        """How reports name the site's attention: its kind, or what SDPA replaced (hand-written, flex), with sinks or
        soft-capped scores or neither."""
        origin = "hand-written" if self.hand_written else "flex" if self.from_flex else self.kind
        return origin + ("+sinks" if self.sinks is not None else "") + ("+softcap" if self.softcap else "")

    @property
    def heads(self) -> int:
        return int(tensor_value(self.q).shape[-3]) if tensor_value(self.q).dim() >= 3 else 1

    @property
    def head_dim(self) -> int:
        return int(tensor_value(self.q).shape[-1])

    @property
    def token_count(self):
        return tensor_value(self.q).shape[-2]


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    sites = []
    for node in graph.nodes:
        name = op_name(node)
        if name == "sdpa":
            sites.append(_sdpa_site(node))
        elif name == "hop.flex_attention":
            site = _flex_site(node)
            if site is not None:
                sites.append(site)
        elif name == "softmax":
            site = _manual_site(node)
            if site is not None:
                sites.append(site)
    sites = [s for s in sites if _token_dims_agree(s) or (_split_prefix(s) and _token_dims_agree(s))]
    for layer, site in enumerate(sites):
        site.layer = layer
    return sites


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    site = AttentionSite(node, "sdpa", q, k, v, mask=arg(node, 3, "attn_mask"),
                         hand_written=node.meta.get(FROM_HAND_WRITTEN, False), sinks=node.kwargs.get("sinks"),
                         from_flex=node.meta.get(FROM_FLEX, False), softcap=node.kwargs.get("softcap", 0.0))
    if arg(node, 5, "is_causal", False):
        site.dense_reason = "causal attention: a diffusion LM is bidirectional"
    return site


def _flex_site(node: fx.Node) -> Optional[AttentionSite]:
    """flex_attention returns (out, logsumexp, ...): the context is its first element."""
    results = {u.args[1]: u for u in node.users if op_name(u) == "getitem"}
    if 0 not in results:
        return None
    internal = [node] + [u for i, u in results.items() if i != 0]
    return AttentionSite(results[0], "flex", node.args[0], node.args[1], node.args[2], internal=internal,
                         dense_reason=node.meta.get(FLEX_REASON, "flex_attention: not replaced by SDPA"))


def _manual_site(softmax: fx.Node) -> Optional[AttentionSite]:
    dim = arg(softmax, 1, "dim")
    value = tensor_value(softmax)
    if value is None or dim not in (-1, value.dim() - 1):
        return None
    internal = [softmax]
    node = _unshifted(softmax.args[0], internal)
    sinks = None
    if op_name(node) == "cat":
        found = _sink_column(node)
        if found is None:
            return None
        internal.append(node)
        node, sinks, sink_first = found
    scores_read = node
    mask = None
    while isinstance(node, fx.Node) and op_name(node) in _SCORE_OPS:
        internal.append(node)
        operands = [a for a in node.args if isinstance(a, fx.Node) and tensor_value(a) is not None]
        main = [a for a in operands if same_shape(tensor_value(a).shape, tensor_value(node).shape)]
        if not main:
            return None
        mask = next((a for a in operands if a is not main[0]), mask)
        node = main[0]
    scores = _product(node, "ij", "id", "jd")  # q k^T: einsum("...id,...jd->...ij"), or matmul(q, kT)
    if scores is None:
        return None
    internal.append(node)
    probs = softmax
    if sinks is not None:  # the sink's column is dropped right after the softmax
        probs = _only_user(softmax)
        if probs is None or not _drops_sink(probs, softmax, sink_first):
            return None
        internal.append(probs)
    while (user := _only_user(probs)) is not None and op_name(user) in _PROB_OPS:
        probs = user
        internal.append(probs)
    context = v = None
    for user in probs.users:  # P V: matmul(probs, v) or einsum("...ij,...je->...ie")
        found = _product(user, "ie", "ij", "je")
        if found is not None and found[0] is probs:
            context, v = user, found[1]
            break
    if context is None:
        return None
    sinks_lse = False
    if sinks is None:  # a sink applied after the softmax, from the logsumexp of the logits it reads
        gated = _lse_gate(softmax.args[0], context)
        if gated is not None:
            internal.append(context)
            context, sinks, gate_nodes = gated
            internal += gate_nodes
            sinks_lse = True
    (q, k), einsum = scores, op_name(node) == "einsum"
    return AttentionSite(context, "manual", q, k, v, k_transposed=not einsum, mask=mask, internal=internal,
                         dense_reason=context.meta.get(HAND_WRITTEN_REASON, ""), sinks=sinks, scores=scores_read,
                         sinks_lse=sinks_lse)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _lse_gate(logits: Any, context: fx.Node) -> Optional[tuple[fx.Node, Any, list[fx.Node]]]:
    """(the gated context, the sink, the gate's nodes) where ``context`` is multiplied by the share of the mass a
    sink ``s`` leaves, computed from the logits the softmax reads:
    ``context * sigmoid(logsumexp(logits, -1) - s)[..., None]`` (Granite-SWA's form of attention sinks; casts
    anywhere, the singleton dim by ``unsqueeze`` or indexing); None when the graph does not do that."""
    if not isinstance(logits, fx.Node):
        return None
    lse = next((u for u in logits.users if op_name(u) == "logsumexp"), None)
    ndim = tensor_value(logits).dim() if tensor_value(logits) is not None else 0
    if lse is None or arg(lse, 2, "keepdim", False) or reduced_dims(lse) != {ndim - 1}:
        return None
    chain, node = [lse], lse
    steps = iter(("sub", "sigmoid", "unsqueeze", "mul"))
    step = next(steps)
    sink = None
    while (user := _only_user(node)) is not None:
        name = op_name(user)
        if name in CASTS:
            chain.append(user)
            node = user
            continue
        if name != step and not (step == "unsqueeze" and _indexes_new_last_dim(user, node)):
            return None
        if step == "sub":
            if len(user.args) != 2 or user.args[0] is not node or not isinstance(user.args[1], fx.Node):
                return None
            sink = user.args[1]
        elif step == "unsqueeze" and name == "unsqueeze" and arg(user, 1, "dim") not in (-1, ndim - 1):
            return None
        elif step == "mul":
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is not context or _only_user(context) is not user:
                return None
            return user, sink, chain
        chain.append(user)
        node, step = user, next(steps)
    return None


def _indexes_new_last_dim(node: fx.Node, source: fx.Node) -> bool:
    """``source[..., None]``: a singleton dim appended by indexing."""
    return (op_name(node) == "getitem" and node.args[0] is source and isinstance(node.args[1], tuple)
            and node.args[1][-1] is None and all(e is Ellipsis for e in node.args[1][:-1]))


def _unshifted(node: Any, internal: list[fx.Node]) -> Any:
    """The softmax's input without casts and without a shift by its own row max (``x - x.max(-1,
    keepdim=True).values`` or ``amax``: the softmax does not see it); the stripped nodes go to ``internal``."""
    while isinstance(node, fx.Node):
        if op_name(node) in CASTS:
            internal.append(node)
            node = node.args[0]
            continue
        if op_name(node) != "sub" or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            return node  # (a shift by a number is the hand-written pass's to read)
        x, shift = node.args
        reduced = shift.args[0] if op_name(shift) == "getitem" and shift.args[1] == 0 else shift
        value = tensor_value(x)
        if (op_name(reduced) not in ("max", "amax") or reduced.args[0] is not x or value is None
                or not arg(reduced, 2, "keepdim", False) or reduced_dims(reduced) != {value.dim() - 1}):
            return node
        internal.extend(dict.fromkeys((node, shift, reduced)))
        node = x
    return node


def _sink_column(cat: fx.Node) -> Optional[tuple[fx.Node, fx.Node, bool]]:
    """(the scores, the sink, whether the sink comes first) of ``cat([scores, sink], dim=-1)`` whose sink part
    has a last dim of 1; None for any other concatenation."""
    parts, value = arg(cat, 0, "tensors"), tensor_value(cat)
    if (value is None or not isinstance(parts, (list, tuple)) or len(parts) != 2
            or not all(isinstance(p, fx.Node) and tensor_value(p) is not None for p in parts)
            or normalize_dim(arg(cat, 1, "dim", 0), value.dim()) != value.dim() - 1):
        return None
    single = [same_size(tensor_value(p).shape[-1], 1) for p in parts]
    if single == [False, True]:
        return parts[0], parts[1], False
    if single == [True, False]:
        return parts[1], parts[0], True
    return None


def _drops_sink(node: fx.Node, softmax: fx.Node, sink_first: bool) -> bool:
    """Whether ``node`` is ``softmax[..., :-1]`` (``[..., 1:]`` when the sink comes first): the probabilities
    without the sink's column, every other dim whole."""
    if op_name(node) != "getitem" or node.args[0] is not softmax or not isinstance(node.args[1], tuple):
        return False
    index, ndim = node.args[1], tensor_value(softmax).dim()
    last = index_position(list(index), ndim, ndim - 1)
    full = slice(None, None, None)
    if last is None or any(e is not Ellipsis and e != full for i, e in enumerate(index) if i != last):
        return False
    cut, scores = index[last], tensor_value(softmax).shape[-1] - 1
    if not isinstance(cut, slice) or cut.step not in (None, 1):
        return False
    start, stop = (example_value(e) if isinstance(e, fx.Node) else e for e in (cut.start, cut.stop))
    if sink_first:
        return start == 1 and stop is None
    return start in (None, 0) and (stop == -1 or (stop is not None and same_size(stop, scores)))


def _product(node: Any, out: str, left: str, right: str) -> Optional[tuple[Any, Any]]:
    """The two operands of ``node`` if it is a product of two tensors over their last two dims: ``matmul(a, b)``,
    or an einsum whose subscripts, after the same leading ones on both operands and the output, are ``left``,
    ``right`` -> ``out`` up to renaming (x-transformers' ``einsum('b h i d, b h j d -> b h i j', q, k)``)."""
    name = op_name(node) if isinstance(node, fx.Node) else None
    if name == "matmul":
        return node.args[0], node.args[1]
    if name != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1:] if len(node.args) > 2 else tuple(node.args[1]) if len(node.args) == 2 else ()
    equation = node.args[0].replace(" ", "")
    if len(operands) != 2 or equation.count("->") != 1 or equation.count(",") != 1:
        return None
    inputs, result = equation.split("->")
    subscripts = [re.findall(r"\.\.\.|[a-zA-Z]", x) for x in (*inputs.split(","), result)]
    lead = subscripts[2][:-2]
    if any(len(x) != len(lead) + 2 or x[:-2] != lead for x in subscripts):
        return None
    names = {}  # pattern letter -> the equation's
    for pattern, found in zip((left, right, out), subscripts):
        for letter, actual in zip(pattern, found[-2:]):
            if names.setdefault(letter, actual) != actual:
                return None
    if len(set(names.values())) != 3 or set(names.values()) & set(lead):
        return None
    return operands[0], operands[1]


def _token_dims_agree(site: AttentionSite) -> bool:
    """Self-attention only: q, k and v hold the same token count (cross-attention is not rewritten)."""
    q, k, v = tensor_value(site.q), tensor_value(site.k), tensor_value(site.v)
    if q is None or k is None or v is None or q.dim() < 2:
        return False
    k_tokens = k.shape[-1] if site.k_transposed else k.shape[-2]
    return same_size(q.shape[-2], k_tokens) and same_size(q.shape[-2], v.shape[-2])


def _computed_from(node: fx.Node) -> set[fx.Node]:
    """The calls ``node``'s value is computed from (itself included), through tensor values only: a size read
    from a tensor carries none of its values (RoPE positions counted from the length of a KV cache)."""
    stack, seen = [node], {node}
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen and a.op in ("call_function", "call_method") and tensor_value(a) is not None:
                seen.add(a)
                stack.append(a)
    return seen


def _split_prefix(site: AttentionSite) -> bool:
    """Splits keys and values that extend the site's own rows by a prefix (module docstring): of the two parts
    each concatenates, the own one is computed from some computation q is computed from (the layer's normed
    input), the prefix from none (graph inputs: the weights, another layer's slice of a stacked cache). False,
    the site unchanged, when they do not split so."""
    if site.kind != "sdpa":
        return False
    q_calls = _computed_from(site.q)
    found = []
    for operand in (site.k, site.v):
        internal, node = [], operand
        repeated = repeated_heads_source(node)
        while repeated is not None and node is not repeated:  # repeat_kv after the concatenation
            internal.append(node)
            node = node.args[0]
        if op_name(node) != "cat" or not isinstance(node.args[0], (list, tuple)) or len(node.args[0]) != 2:
            return False
        value = tensor_value(node)
        dim = arg(node, 1, "dim", 0)
        if value is None or dim not in (value.dim() - 2, -2):
            return False
        parts = node.args[0]
        if not all(isinstance(p, fx.Node) for p in parts):
            return False
        own = [p for p in parts if _computed_from(p) & q_calls]
        if len(own) != 1 or repeated_heads_source(own[0]) is not None:
            return False
        (own,) = own
        prefix = parts[0] if parts[1] is own else parts[1]
        found.append((own, prefix, parts[0] is prefix, internal + [node]))
    (k, prefix_k, k_first, k_internal), (v, prefix_v, v_first, v_internal) = found
    if k_first != v_first:
        return False
    site.k, site.v, site.prefix_k, site.prefix_v, site.prefix_first = k, v, prefix_k, prefix_v, k_first
    site.internal += [n for n in k_internal + v_internal if n not in site.internal]
    return True
