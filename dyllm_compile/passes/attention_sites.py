"""Finds attention sites in a Dynamo graph.

Patterns matched:
- ``scaled_dot_product_attention(q, k, v, attn_mask=..., scale=..., enable_gqa=...)`` (one node);
- hand-written ``softmax(q @ k^T * scale [+ mask]) [.to(dtype)] @ v``: a softmax over the last dim whose input
  reaches, through elementwise scaling/masking/casts only, a matmul (or an einsum over q's and k's last dims),
  and whose output reaches, through casts and dropout only, the left operand of a second matmul (or einsum).
  The analysis first replaces those that are SDPA by an SDPA node
  (:mod:`~dyllm_compile.passes.hand_written_attention`); the others carry the reason they are not;
- ``flex_attention`` (a higher-order op): recorded as a site that stays dense, since its score_mod and
  block_mask may mix tokens in ways the cached-attention op does not model.

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
from typing import Any, Optional

from torch import fx

from .graph_utils import arg, op_name, same_size, tensor_value
from .head_repeat import repeated_heads_source

#: ``node.meta`` key of a hand-written site's context node: why it stays as written
#: (:mod:`~dyllm_compile.passes.hand_written_attention`).
HAND_WRITTEN_REASON = "dyllm_hand_written_reason"
#: ``node.meta`` key of an SDPA node that replaced hand-written attention.
FROM_HAND_WRITTEN = "dyllm_from_hand_written"

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
    # keys and values beyond the site's own rows (module docstring): the prefix's k and v, and whether it comes
    # before the own rows in the keys' order
    prefix_k: Optional[fx.Node] = None
    prefix_v: Optional[fx.Node] = None
    prefix_first: bool = True

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
                         hand_written=node.meta.get(FROM_HAND_WRITTEN, False))
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
                         dense_reason="flex_attention: score_mod / block_mask are opaque to the rewrite")


def _manual_site(softmax: fx.Node) -> Optional[AttentionSite]:
    dim = arg(softmax, 1, "dim")
    value = tensor_value(softmax)
    if value is None or dim not in (-1, value.dim() - 1):
        return None
    internal = [softmax]
    node = softmax.args[0]
    mask = None
    while isinstance(node, fx.Node) and op_name(node) in _SCORE_OPS:
        internal.append(node)
        operands = [a for a in node.args if isinstance(a, fx.Node) and tensor_value(a) is not None]
        main = [a for a in operands if tensor_value(a).shape == tensor_value(node).shape]
        if not main:
            return None
        mask = next((a for a in operands if a is not main[0]), mask)
        node = main[0]
    scores = _product(node, "ij", "id", "jd")  # q k^T: einsum("...id,...jd->...ij"), or matmul(q, kT)
    if scores is None:
        return None
    internal.append(node)
    probs = softmax
    while len(probs.users) == 1 and op_name(next(iter(probs.users))) in _PROB_OPS:
        probs = next(iter(probs.users))
        internal.append(probs)
    context = v = None
    for user in probs.users:  # P V: matmul(probs, v) or einsum("...ij,...je->...ie")
        found = _product(user, "ie", "ij", "je")
        if found is not None and found[0] is probs:
            context, v = user, found[1]
            break
    if context is None:
        return None
    (q, k), einsum = scores, op_name(node) == "einsum"
    return AttentionSite(context, "manual", q, k, v, k_transposed=not einsum, mask=mask, internal=internal,
                         dense_reason=context.meta.get(HAND_WRITTEN_REASON, ""))


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
