"""Turns hand-written attention into ``scaled_dot_product_attention`` where the two compute the same function.

Pattern: a hand-written site of :func:`~dyllm_compile.passes.attention_sites.find_attention_sites`,
``softmax(scores, dim=-1) [casts, eval-mode dropout] @ v`` with ``scores`` built from ``q @ kT`` (or an einsum over
q's and k's last dims) by, in this order,

- scaling: products and quotients by Python numbers (into SDPA's ``scale``) or by tensors that are the same for
  every key (applied to ``q``: GPT-J divides by a 0-d tensor attribute), and shifts by Python numbers (a softmax
  ignores them);
- masking: adding a tensor that does not depend on the scores (HF's additive mask, ALiBi's bias),
  ``masked_fill(m, fill)`` and ``where(m, scores, fill)`` with an absorbing ``fill`` (-inf, or a value below -1e30
  such as HF's ``finfo.min``, which absorbs any score it is added to; fp16 masks have no such value);
- casts anywhere;
- soft-capping before the masks, ``c * tanh(scores * a)`` (Gemma-2: ``tanh(scores / c) * c``), numbers on both
  sides of the ``tanh``;

and ``kT`` the keys transposed over their last two dims (any other operand of a matmul is transposed back). It
becomes ``sdpa(q', k, v, attn_mask=the masks' sum in additive form, scale=the numbers' product)``, ``q'`` being
``q`` times the tensor factors, with casts of q and k stripped where they only made them differ from v's dtype
(SDPA accumulates in fp32 either way). Soft-capped scores become ``dyllm::sdpa_softcap`` with ``softcap=c`` and
``scale=a * c`` (:mod:`~dyllm_compile.ops.soft_capping`). A site with an attention sink
(``softmax(cat([scores, s], -1))[..., :-1]``, :mod:`~dyllm_compile.passes.attention_sites`) becomes
``dyllm::sdpa_with_sinks`` with the same operands and ``sinks=s`` (taken before an ``expand`` that only broadcasts
it). A shift of the logits by their row max before the softmax is dropped like a shift by a number.

Invariant: the result is the same function of the graph's inputs up to floating-point rounding, including rows
whose every key is masked by a finite fill (an absorbing fill makes ``score + fill`` equal ``fill`` exactly; a
row filled with -inf throughout has no defined result in either: NaN as written, NaN or 0 from SDPA). Anything
else stays as written and the site dense, with the reason recorded on its context node (``HAND_WRITTEN_REASON``):
a finite fill that does not absorb (``-1e9``: a fully masked row would average the values uniformly in one and
not the other), scaling after masking, scores or probabilities read elsewhere (as a mask computed from the
scores reads them), training-mode dropout, any other op on the scores, a soft-cap after masking, of shifted
scores, by a tensor or with a sink. The graph Dynamo handed over is never edited: a graph with a site to replace
is copied first. Inductor's ``fuse_attention`` patterns make the same replacement in its dense lowering; here it
comes first, so that the rewrite sees one attention op and caches hand-written attention like SDPA.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx

from ..ops.attention_sinks import sdpa_with_sinks
from ..ops.soft_capping import sdpa_softcap
from .attention_sites import CASTS, FROM_HAND_WRITTEN, HAND_WRITTEN_REASON, AttentionSite, find_attention_sites
from .graph_edit import Emitter, copy_graph, erase_unused, module_of
from .graph_utils import arg, example_value, is_number, listed_args, normalize_dim, op_name, same_size, tensor_value

#: A finite fill at least this large absorbs every score below 1e22 (half an ulp of 1e30 in fp32, the widest dtype
#: SDPA computes scores in): ``score + fill`` equals the fill, so filling and adding agree on every row, a row
#: whose every key is masked included (uniform either way). HF fills with its dtype's ``finfo.min`` (3.4e38).
_ABSORBING = 1e30
_TRANSPOSES = frozenset("transpose swapaxes".split())


@dataclass
class _Recipe:
    """What replaces one site: the SDPA operands, all nodes of the original graph."""

    site: AttentionSite
    q: fx.Node
    k: fx.Node
    k_transposed_back: bool  # k is ``kT`` itself: transpose it back
    v: fx.Node
    scale: float
    # (operator.mul | truediv, a tensor or a number node): applied to q
    q_factors: list[tuple[Callable, fx.Node]] = field(default_factory=list)
    added: list[fx.Node] = field(default_factory=list)  # tensors added to the scores
    filled: list[tuple[fx.Node, bool]] = field(default_factory=list)  # (m, the scores are filled where m holds)
    fill: Optional[float] = None  # what they are filled with: -inf, or a finite absorbing value
    sinks: Optional[fx.Node] = None  # the sink logits, before any broadcast to the scores' shape
    softcap: Optional[float] = None  # soft-capped scores: the numbers after the tanh (before it: into ``scale``)
    # a cap read from a 0-d input (``.item()``: a float attribute Dynamo made dynamic), by which the scores are
    # divided before the tanh (a q factor) and multiplied after it
    cap_node: Optional[fx.Node] = None
    dropped: list[fx.Node] = field(default_factory=list)  # the pattern's nodes, erased once unused


def sdpa_from_hand_written(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it with every hand-written attention site that is SDPA replaced by one SDPA node.
    Sites that are not keep a reason on their context node (``HAND_WRITTEN_REASON``)."""
    recipes = []
    for site in find_attention_sites(gm.graph):
        if site.kind != "manual" or site.dense_reason:
            continue
        found = _recipe(site)
        if isinstance(found, str):
            site.node.meta[HAND_WRITTEN_REASON] = found
        else:
            recipes.append(found)
    if not recipes:
        return gm
    graph, copies = copy_graph(gm)
    for recipe in recipes:
        _replace(graph, recipe, copies)
    return module_of(gm, graph)


def _recipe(site: AttentionSite) -> Union[_Recipe, str]:
    """The replacement of ``site``, or why there is none."""
    context = site.node
    pattern = set(site.internal) | {context}
    outside = next((n for n in site.internal for u in n.users if u not in pattern), None)
    if outside is not None:  # also what keeps any mask from being computed from the scores
        return f"'{outside.name}' (scores or probabilities) is also used outside the attention"
    dropout = next((n for n in site.internal if op_name(n) == "dropout"), None)
    if dropout is not None and arg(dropout, 2, "training", True) and arg(dropout, 1, "p", 0.5) != 0:
        return "attention dropout in training mode"
    recipe = _Recipe(site, site.q, site.k, site.k_transposed, site.v, 1.0, dropped=[context, *site.internal])
    if site.sinks is not None:
        recipe.sinks = _unbroadcast(site.sinks, recipe.dropped)
    return _read_scores(recipe, pattern) or _read_operands(recipe) or recipe


def _unbroadcast(node: fx.Node, dropped: list[fx.Node]) -> fx.Node:
    """``node`` before the ``expand`` calls that only broadcast it (GPT-OSS expands its per-head sinks to the scores'
    shape), and casts among them: the op broadcasts the sinks and casts them to the scores' dtype itself."""
    while op_name(node) in CASTS | {"expand"} and len(node.users) == 1 and isinstance(node.args[0], fx.Node):
        source, value = tensor_value(node.args[0]), tensor_value(node)
        if source is None or source.dim() != value.dim():
            break
        dropped.append(node)
        node = node.args[0]
    return node


def _read_scores(recipe: _Recipe, pattern: set[fx.Node]) -> str:
    """Reads the ops from the scores' product to the softmax into ``recipe``'s scale, factors and masks; or says
    why they are not a scale followed by additive masks."""
    scores = next(n for n in recipe.site.internal if op_name(n) in ("matmul", "einsum"))
    chain = []  # (op, its operand on the chain, its other operands), from the softmax back to the product
    node = recipe.site.scores
    while node is not scores:
        on_chain = next((a for a in node.args if a is scores or a in pattern), None)
        if on_chain is None:
            return f"'{node.name}' takes the scores as a keyword argument"
        chain.append((node, on_chain, [a for a in node.args if a is not on_chain]))
        node = on_chain
    masking = shifted = False
    for node, on_chain, others in reversed(chain):  # from the product towards the softmax
        name = op_name(node)
        if name in CASTS:
            continue
        (other,) = others if len(others) == 1 else (None,)
        if name == "tanh":
            problem = _softcap_problem(node, recipe, masking, shifted)
            if problem:
                return problem
            recipe.softcap = 1.0  # the numbers after it multiply into the cap
            continue
        if name in ("mul", "div") and recipe.softcap is not None and not masking:
            if name == "mul" and recipe.cap_node is None and isinstance(example_value(other), torch.SymFloat):
                recipe.cap_node = other
                continue
            if not is_number(other) or (name == "div" and node.args[0] is not on_chain):
                return f"'{node.name}' scales soft-capped scores by other than a number"
            recipe.softcap *= other if name == "mul" else 1.0 / other
            continue
        if name in ("mul", "div") and len(others) == 1 and not masking:
            if name == "div" and node.args[0] is not on_chain:
                return f"'{node.name}' divides by the scores"
            if is_number(other):
                recipe.scale *= other if name == "mul" else 1.0 / other
                continue
            if _moves_to_queries(other, recipe.q):
                recipe.q_factors.append((operator.mul if name == "mul" else operator.truediv, other))
                continue
            return f"'{node.name}' scales the scores by a tensor that varies along the keys"
        if name in ("add", "sub") and is_number(other):
            shifted = shifted or recipe.softcap is None  # the softmax does not see it; a tanh after it would
            continue
        if name in ("mul", "div"):
            return f"'{node.name}' scales the scores after masking them"
        masking = True
        if name == "add" and isinstance(other, fx.Node) and tensor_value(other) is not None:
            if tensor_value(other).dtype == torch.bool:
                return f"'{node.name}' adds a boolean tensor to the scores"
            recipe.added.append(other)
            continue
        if name == "masked_fill" and node.args[0] is on_chain:
            mask, fill, where_true = arg(node, 1, "mask"), arg(node, 2, "value"), True
        elif name == "where" and len(node.args) == 3 and on_chain in node.args[1:]:
            # where(c, scores, fill) keeps the scores where c holds; where(c, fill, scores) fills there
            mask, where_true = node.args[0], node.args[2] is on_chain
            fill = node.args[1] if where_true else node.args[2]
        else:
            return f"'{node.name}' ({name}) on the scores is not a scale or an additive mask"
        problem = _fill_problem(node, mask, fill, recipe.fill, tensor_value(recipe.v).dtype)
        if problem:
            return problem
        recipe.filled.append((mask, where_true))
        recipe.fill = -math.inf if fill == -math.inf else _ABSORBING
    if recipe.cap_node is not None:  # c * tanh(s * a / c) with c an input: softcap c, scale a
        inside = (operator.truediv, recipe.cap_node)
        if inside not in recipe.q_factors or recipe.softcap != 1.0:
            return f"the scores are soft-capped by '{recipe.cap_node.name}' without being divided by it first"
        recipe.q_factors.remove(inside)
    elif recipe.softcap is not None:
        if recipe.softcap <= 0:
            return f"the scores are soft-capped at {recipe.softcap:g}, not a positive cap"
        recipe.scale *= recipe.softcap  # c * tanh(s * a) = c * tanh(s * (a * c) / c)
    return ""


def _softcap_problem(node: fx.Node, recipe: _Recipe, masking: bool, shifted: bool) -> str:
    """Why the ``tanh`` at ``node`` is not a soft-cap of the scores ``dyllm::sdpa_softcap`` computes."""
    if shifted:
        return f"'{node.name}' (tanh) soft-caps shifted scores"
    if masking:
        return f"'{node.name}' (tanh) soft-caps the scores after masking them"
    if recipe.softcap is not None:
        return f"'{node.name}' (tanh) caps the scores a second time"
    if recipe.sinks is not None:
        return f"'{node.name}' (tanh) soft-caps scores that have an attention sink"
    return ""


def _read_operands(recipe: _Recipe) -> str:
    """Takes ``recipe``'s k from before its transpose and q and k from before casts that only made them differ
    from v's dtype; or says why q, k, v and the output still differ in dtype."""
    k = recipe.k
    ndim = tensor_value(k).dim()
    if recipe.k_transposed_back and ((op_name(k) in _TRANSPOSES and _swaps_last_two(k, ndim))
                                     or (op_name(k) == "permute" and _permutes_last_two(k, ndim))):
        recipe.k, recipe.k_transposed_back = k.args[0], False
        recipe.dropped.append(k)
    dtype = tensor_value(recipe.v).dtype
    for which in ("q", "k"):
        node = getattr(recipe, which)
        while (tensor_value(node).dtype != dtype and op_name(node) in CASTS
               and tensor_value(node.args[0]) is not None):
            recipe.dropped.append(node)
            node = node.args[0]
        setattr(recipe, which, node)
    if {tensor_value(recipe.q).dtype, tensor_value(recipe.k).dtype, tensor_value(recipe.site.node).dtype} != {dtype}:
        return "q, k, v and the attention output do not share one dtype"
    return ""


def _moves_to_queries(factor: Any, q: fx.Node) -> bool:
    """Scaling the scores by ``factor`` is scaling ``q`` by it: it is the same for every key (its last dim is 1 or
    absent) and broadcasting it against q keeps q's shape (a scalar, a per-head or a per-query-row factor)."""
    if isinstance(example_value(factor), (torch.SymFloat, torch.SymInt)):
        return True  # a number read from a 0-d input (``.item()``: Dynamo's unspecialised float attribute)
    value, query = tensor_value(factor), tensor_value(q)
    if value is None or query is None or value.dim() > query.dim():
        return False
    if value.dim() and not same_size(value.shape[-1], 1):
        return False
    return all(same_size(f, 1) or same_size(f, s) for f, s in zip(reversed(value.shape), reversed(query.shape)))


def _fill_problem(node: fx.Node, mask: Any, fill: Any, before: Optional[float], dtype: torch.dtype) -> str:
    """Why ``node`` (filling the scores with ``fill`` where ``mask`` says; ``before``: the earlier fills' kind) is
    not an absorbing additive mask for an SDPA in ``dtype``. (A mask computed from the scores reads a node of the
    pattern from outside it: refused before this.)"""
    if not isinstance(mask, fx.Node) or tensor_value(mask) is None or tensor_value(mask).dtype != torch.bool:
        return f"'{node.name}' fills the scores where a non-boolean tensor says"
    if not isinstance(fill, (int, float)) or not (fill == -math.inf or fill <= -_ABSORBING):
        shown = f"{fill:g}" if isinstance(fill, (int, float)) else repr(fill)
        return (f"'{node.name}' fills the scores with {shown}, which is neither -inf nor below -{_ABSORBING:g}: "
                "a row whose every key is masked would differ from an additive mask")
    if fill != -math.inf and torch.finfo(dtype).min > -_ABSORBING:
        return f"'{node.name}' fills the scores with a finite value, which no {dtype} mask can absorb"
    if before is not None and (before == -math.inf) != (fill == -math.inf):
        return f"'{node.name}' fills the scores with {fill:g} after another fill with {before:g}"
    return ""


def _swaps_last_two(node: fx.Node, ndim: int) -> bool:
    dims = {normalize_dim(d, ndim) for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")) if isinstance(d, int)}
    return dims == {ndim - 2, ndim - 1}


def _permutes_last_two(node: fx.Node, ndim: int) -> bool:
    dims = listed_args(node)
    if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
        return False
    dims = [normalize_dim(d, ndim) for d in dims]
    return dims == [*range(ndim - 2), ndim - 1, ndim - 2]


def _replace(graph: fx.Graph, recipe: _Recipe, copies: dict[fx.Node, fx.Node]) -> None:
    """Emits ``recipe``'s SDPA in ``graph`` (the copy; ``copies`` maps the original's nodes into it) in place of its
    context, then erases the pattern's nodes that nothing reads any more."""
    context = copies[recipe.site.node]
    mapped = lambda x: copies[x] if isinstance(x, fx.Node) else x  # noqa: E731
    emit = Emitter(graph, context)
    q, k = mapped(recipe.q), mapped(recipe.k)
    dtype = tensor_value(q).dtype
    for op, factor in recipe.q_factors:
        q = emit(op, q, mapped(factor))
    if tensor_value(q).dtype != dtype:  # a factor of a wider dtype (not 0-d) promoted q
        q = emit(torch.Tensor.to, q, dtype)
    if recipe.k_transposed_back:
        k = emit(torch.transpose, k, -2, -1)
    # One additive mask: the added tensors, plus the fill where any fill's condition holds (one term, not one per
    # fill: two of fp32's lowest would sum to -inf). SDPA's kernels take a float mask in q's dtype; a finite fill
    # becomes that dtype's lowest value, which absorbs the scores as the fill did (fp32's would overflow in bf16).
    terms = [mapped(t) for t in recipe.added]
    if recipe.filled:
        conditions = [mapped(m) if where_true else emit(operator.invert, mapped(m)) for m, where_true in recipe.filled]
        condition = functools.reduce(lambda a, b: emit(operator.or_, a, b), conditions)
        fill = recipe.fill if recipe.fill == -math.inf else torch.finfo(dtype).min
        terms.append(emit(torch.where, condition, fill, 0.0))
    mask = functools.reduce(lambda a, b: emit(operator.add, a, b), terms) if terms else None
    if mask is not None and tensor_value(mask).dtype != dtype:
        mask = emit(torch.Tensor.to, mask, dtype)
    if recipe.softcap is not None:
        cap = recipe.softcap if recipe.cap_node is None else mapped(recipe.cap_node)
        out = emit(sdpa_softcap, q, k, mapped(recipe.v), softcap=cap, attn_mask=mask, scale=recipe.scale)
    elif recipe.sinks is None:
        out = emit(F.scaled_dot_product_attention, q, k, mapped(recipe.v), attn_mask=mask, scale=recipe.scale)
    else:
        sinks = mapped(recipe.sinks)
        if recipe.site.sinks_lse:  # a logit per row of the context, not per score column: give it the key dim
            sinks = emit(torch.unsqueeze, sinks, -1)
        out = emit(sdpa_with_sinks, q, k, mapped(recipe.v), sinks=sinks, attn_mask=mask, scale=recipe.scale)
    out.meta[FROM_HAND_WRITTEN] = True
    context.replace_all_uses_with(out)
    erase_unused(graph, (copies[n] for n in recipe.dropped))
