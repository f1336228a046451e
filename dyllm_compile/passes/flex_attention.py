"""Turns ``flex_attention`` that masks, adds a bias or soft-caps into SDPA (or its soft-capped form) with that mask.

Pattern: the ``flex_attention`` higher-order op Dynamo records, ``flex_attention(q, k, v, score_mod, block_mask,
scale, kernel_options, score_mod_buffers, mask_mod_buffers)``, whose ``score_mod`` returns the score unchanged
(transformers' flex integration without soft-capping, or no ``score_mod`` at all) or the score plus terms that do
not read it (``score + f(b, h, q, kv)``: ALiBi, relative position biases, through any chain of additions and
subtractions), whose block mask covers q's and k's token counts, and whose other results (log-sum-exp, row max)
nothing reads. It becomes ``sdpa(q, k, v, attn_mask=M, scale=scale, enable_gqa=q and k's head counts differ)``,
``M`` the boolean mask the block mask defines (:func:`block_mask_dense`): a (query, key) pair attends where its
tile is one of the block mask's full tiles, or one of its partial tiles and ``mask_mod`` allows it; with a bias,
``M`` is the float mask holding the bias where that mask attends and -inf elsewhere (:func:`score_bias_mask`, in
fp32 as flex computes it). A ``score_mod`` that soft-caps the score, ``a * tanh(score * b)`` (transformers' flex
integration for Gemma-2: ``c * tanh(score / c)``), becomes ``dyllm::sdpa_softcap(q, k, v, softcap=a,
attn_mask=M, scale=scale * a * b)`` (:mod:`~dyllm_compile.ops.soft_capping`). Then the rest of the analysis reads
the site as SDPA, and the rewrite caches it (before, a flex site stayed dense: only the layers' FFNs were gated).

A block mask built inside the graph (``create_block_mask`` in the forward, or flex's own full mask when none is
given) also computes the query tiles' index (for the backward pass) by writing into fresh tensors under ``vmap``,
writes the in_place_writes pass cannot follow (the whole graph would stay dense): once the op is replaced nothing
reads them, and they are erased with what only they read (:func:`_drop_unread`). So this pass runs first.

Invariant: the same function of the graph's inputs up to floating-point rounding, rows whose every key is masked
included (zeros in both). ``M`` is computed from the block mask's tensors and the mods' buffers alone, so the
runtime compares it like any mask input. Anything else stays as written, the site dense, with the reason recorded
on the op node (``FLEX_REASON``): any other score modification (a cap with a bias, a cap by a tensor), a bias over
a dynamic size, a soft-cap under a scale that is not a number, a read of the log-sum-exp, a block mask of other
lengths. The graph Dynamo handed over is never edited: a graph with a site to replace is copied first.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
from torch.nn.attention.flex_attention import _vmap_for_bhqkv, create_mask

from ..ops.soft_capping import sdpa_softcap
from .attention_sites import FLEX_REASON, FROM_FLEX
from .graph_edit import Emitter, copy_graph, erase_unused, module_of
from .graph_utils import example_value, is_impure, is_number, op_name, same_size, tensor_value

# The block mask as the op takes it (``BlockMask.as_tuple()``): the sequence lengths first, then the partial
# tiles' counts and indices and the full tiles', ...; the tile sizes and mask_mod last. The fields between changed
# across torch versions; these did not.
_Q_LEN, _KV_LEN, _KV_COUNT, _KV_INDICES, _FULL_COUNT, _FULL_INDICES = range(6)
_Q_TILE, _KV_TILE, _MASK_MOD = -3, -2, -1
#: Tiles this large are flex's full mask when none is given (one tile, lengths 1 x 1): its one-element dense mask
#: broadcasts over every query and key.
_NO_OP_TILE = 1 << 30
_FACTORIES = frozenset("new_zeros new_ones new_empty new_full zeros ones empty full zeros_like ones_like empty_like "
                       "full_like".split())


def block_mask_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                     full_kv_num_blocks: Optional[torch.Tensor], full_kv_indices: Optional[torch.Tensor],
                     q_len: int, kv_len: int, q_tile: int, kv_tile: int, mask_mod: Callable,
                     *buffers: torch.Tensor) -> torch.Tensor:
    """The boolean mask [B', H', q_len, kv_len] a block mask applies (B', H' its own batch and head dims): full tiles
    attend throughout, partial tiles where ``mask_mod(b, h, q, kv, *buffers)`` allows, other tiles nowhere."""
    rows = torch.arange(q_len, device=kv_indices.device) // q_tile
    cols = torch.arange(kv_len, device=kv_indices.device) // kv_tile

    def tokens(count: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        tiles = _tiles(count, indices)
        return tiles.index_select(-2, rows).index_select(-1, cols)

    b, h = kv_num_blocks.shape[:2]
    allowed = create_mask(lambda bi, hi, qi, ki: mask_mod(bi, hi, qi, ki, *buffers), b, h, q_len, kv_len,
                          kv_indices.device)
    mask = tokens(kv_num_blocks, kv_indices) & allowed
    if full_kv_num_blocks is not None:
        mask = mask | tokens(full_kv_num_blocks, full_kv_indices)
    return mask


def score_bias_mask(mask: torch.Tensor, score_mod: Callable, batch: Optional[int], heads: Optional[int],
                    q_len: int, kv_len: int, *buffers: torch.Tensor) -> torch.Tensor:
    """The float mask [batch, heads, q_len, kv_len] (fp32) of an additive ``score_mod`` under the boolean ``mask``:
    ``score_mod(0, b, h, q, kv, *buffers)`` (its terms without the score) where ``mask`` attends, -inf elsewhere.
    ``batch`` or ``heads`` None: the terms do not read that index (one entry broadcasts)."""
    # As torch's create_mask evaluates a score_mod (which returns only where it is -inf): vmapped over the four
    # indices, a buffer indexed by one of them read through aten.index.
    device = mask.device
    score = torch.zeros(batch or 1, heads or 1, q_len, kv_len, device=device)
    indices = [torch.arange(n, device=device) for n in (batch or 1, heads or 1, q_len, kv_len)]
    with TransformGetItemToIndex():
        bias = _vmap_for_bhqkv(lambda s, b, h, q, kv: score_mod(s, b, h, q, kv, *buffers), prefix=(0,))(
            score, *indices)
    return torch.where(mask, bias.float(), float("-inf"))


def _tiles(count: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[..., query tiles, key tiles] bool from a block mask's ordered form: each query tile's first ``count`` entries
    of ``indices`` are its key tiles (the rest of the row is padding)."""
    key_tiles = indices.shape[-1]
    listed = torch.arange(key_tiles, device=indices.device) < count.unsqueeze(-1)
    # Unlisted entries write into one column past the end, cut off after.
    target = torch.where(listed, indices.long(), key_tiles)
    tiles = torch.zeros(*indices.shape[:-1], key_tiles + 1, dtype=torch.bool, device=indices.device)
    return tiles.scatter(-1, target, True)[..., :key_tiles]


def sdpa_from_flex(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it with every flex_attention that only masks replaced by SDPA with that mask. The others
    keep a reason on their node (``FLEX_REASON``)."""
    found = []
    for node in gm.graph.nodes:
        if op_name(node) == "hop.flex_attention":
            form = _score_form(gm, node.args[3])
            why = _refusal(gm, node, form)
            if why:
                node.meta[FLEX_REASON] = why
            else:
                found.append((node, form))
    if not found:
        return gm
    graph, copies = copy_graph(gm)
    nodes = [(copies[n], form) for n, form in found]
    read = _ancestors([n for n, _ in nodes])  # once for every site: each layer's reaches back through the others
    masks: dict[tuple, fx.Node] = {}  # one mask for the sites that share a block mask (every layer, usually)
    for node, form in nodes:
        _replace(gm, graph, node, form, masks)
    _drop_unread(graph, read)
    return module_of(gm, graph)


def _refusal(gm: fx.GraphModule, node: fx.Node, form: Optional[str]) -> str:
    """Why ``node``, whose score_mod has ``form`` (:func:`_score_form`), cannot become SDPA, or ''."""
    q, k, v, score_mod, block_mask = node.args[:5]
    if form is None:
        return ("flex_attention: its score_mod changes the scores other than by adding terms that do not read them "
                "or soft-capping them by numbers, which SDPA cannot take")
    if form == "softcap" and not is_number(node.args[5]):
        return "flex_attention: it soft-caps scores under a scale that is not a number"
    if any(op_name(u) != "getitem" or (u.args[1] != 0 and u.users) for u in node.users):
        return "flex_attention: its log-sum-exp is read"
    values = [tensor_value(t) for t in (q, k, v)]
    if any(t is None or t.dim() != 4 for t in values):
        return "flex_attention: q, k, v are not [batch, heads, tokens, dim]"
    # symbolic lengths are graph values (their SymInts recorded on them)
    lengths = (same_size(example_value(block_mask[_Q_LEN]), values[0].shape[-2])
               and same_size(example_value(block_mask[_KV_LEN]), values[1].shape[-2]))
    if not lengths and not _full_mask(block_mask):
        return "flex_attention: its block mask covers other lengths than q's and k's"
    if form == "bias" and not all(n is None or isinstance(n, (int, fx.Node)) for n in _bias_sizes(gm, node)):
        return ("flex_attention: its score_mod adds a bias over a dynamic size that no block mask gives (a dynamic "
                "batch its terms read, or no block mask)")
    return ""


def _score_form(gm: fx.GraphModule, score_mod: Any) -> Optional[str]:
    """``"score"`` when ``score_mod`` (a get_attr of its graph) returns its first argument, the score, unchanged;
    ``"bias"`` when it returns the score plus terms that do not read it (a chain of ``add``/``sub`` whose every
    other operand is independent of the score, the score never subtracted); ``"softcap"`` for ``a * tanh(score * b)``
    (:func:`_softcap`); None otherwise."""
    graph = _mod_graph(gm, score_mod)
    if graph is None:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    score = placeholders[0]
    out = _mod_output(graph)
    if _softcap(graph) is not None:
        return "softcap"
    reads_score = _descendants(score)
    node = out
    while node is not score:
        if not isinstance(node, fx.Node) or node.kwargs or op_name(node) not in ("add", "sub") or len(node.args) != 2:
            return None
        through = [a for a in node.args if isinstance(a, fx.Node) and a in reads_score]
        if len(through) != 1 or (op_name(node) == "sub" and through[0] is not node.args[0]):
            return None
        node = through[0]
    return "score" if out is score else "bias"


def _full_mask(block_mask: tuple) -> bool:
    """Whether ``block_mask`` is flex's full mask (:data:`_NO_OP_TILE`), whose lengths are 1 x 1, not q's and k's."""
    return min(block_mask[_Q_TILE], block_mask[_KV_TILE]) >= _NO_OP_TILE


def _mod_output(graph: fx.Graph) -> Any:
    out = graph.output_node().args[0]
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def _softcap(graph: fx.Graph) -> Optional[tuple[float, float]]:
    """``(a, b)`` where the score_mod's ``graph`` returns ``a * tanh(score * b)`` (``b`` also as a division by
    ``1 / b``), both positive numbers; else None."""
    def number_times(node: Any, name: str) -> Optional[tuple[fx.Node, float]]:
        """(x, f) for ``x * f`` / ``f * x`` (and ``x / (1 / f)`` where ``name`` allows a division)."""
        if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2 or op_name(node) not in ("mul", name):
            return None
        x, f = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
        if not is_number(f) or not isinstance(x, fx.Node) or f <= 0:
            return None
        if op_name(node) == "div":
            return (x, 1.0 / f) if node.args[0] is x else None
        return x, float(f)

    score = next(n for n in graph.nodes if n.op == "placeholder")
    outer = number_times(_mod_output(graph), "mul")
    if outer is None or op_name(outer[0]) != "tanh" or len(outer[0].args) != 1:
        return None
    inner = number_times(outer[0].args[0], "div")
    return (outer[1], inner[1]) if inner is not None and inner[0] is score else None


def _mod_graph(gm: fx.GraphModule, mod: Any) -> Optional[fx.Graph]:
    if not isinstance(mod, fx.Node) or mod.op != "get_attr":
        return None
    return getattr(gm.get_submodule(mod.target), "graph", None)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _bias_sizes(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """(batch, heads, q_len, kv_len) of an additive score_mod's bias: batch and heads None where its terms do not
    read that index (the score_mod's second and third arguments), else q's; the lengths the block mask's (graph
    values where they are symbolic) unless it is flex's full mask, else q's and k's."""
    q, k, _, score_mod, block_mask = node.args[:5]
    index_b, index_h = [n for n in _mod_graph(gm, score_mod).nodes if n.op == "placeholder"][1:3]
    b, h, q_len, _ = tensor_value(q).shape
    kv_len = tensor_value(k).shape[-2]
    if not _full_mask(block_mask):
        q_len, kv_len = block_mask[_Q_LEN], block_mask[_KV_LEN]
    return b if index_b.users else None, h if index_h.users else None, q_len, kv_len


def _replace(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, form: str, masks: dict[tuple, fx.Node]) -> None:
    q, k, v, score_mod, block_mask, scale = node.args[:6]
    buffers = tuple(node.args[8]) if len(node.args) > 8 else ()
    context = next(u for u in node.users if u.args[1] == 0)
    emit = Emitter(graph, node)
    operands = (block_mask[_KV_COUNT], block_mask[_KV_INDICES], block_mask[_FULL_COUNT], block_mask[_FULL_INDICES],
                block_mask[_Q_LEN], block_mask[_KV_LEN], block_mask[_Q_TILE], block_mask[_KV_TILE],
                block_mask[_MASK_MOD], *buffers)
    mask = masks.get(operands)
    if mask is None:
        mask = masks[operands] = _emit_mask(gm, graph, node, block_mask_dense, operands)
    if form == "bias":
        score_buffers = tuple(node.args[7]) if len(node.args) > 7 else ()
        operands = (mask, score_mod, *_bias_sizes(gm, node), *score_buffers)
        # score_mods of one source are alike but each layer has its own copy: keyed by their code
        key = (mask, gm.get_submodule(score_mod.target).code, *operands[2:])
        if key not in masks:
            masks[key] = _emit_mask(gm, graph, node, score_bias_mask, operands)
        mask = masks[key]
    gqa = tensor_value(q).shape[1] != tensor_value(k).shape[1]
    if form == "softcap":  # a * tanh(s * b) with s = q k^T * scale: a * tanh(q k^T * (scale * a * b) / a)
        a, b = _softcap(_mod_graph(gm, score_mod))
        out = emit(sdpa_softcap, q, k, v, softcap=a, attn_mask=mask, scale=scale * a * b)
    else:
        out = emit(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=scale,
                   **({"enable_gqa": True} if gqa else {}))
    out.meta[FROM_FLEX] = True
    context.replace_all_uses_with(out)
    erase_unused(graph, [context, *node.users, node, score_mod])


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """Every node ``nodes`` read, directly or through others."""
    seen: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _drop_unread(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erases the nodes among ``candidates`` (what the replaced ops read) that nothing reads now: pure ones, and
    writes into tensors made in the graph by a factory that nothing else reads (a fresh tensor is seen only through
    its readers); then ``vmap`` levels left empty. Nothing else is touched: no node the ops did not read, no write
    into memory that was not made for them."""
    changed = True
    while changed:
        changed = False
        for n in reversed([n for n in graph.nodes if n in candidates]):
            writes = {u for u in n.users if u.target is operator.setitem and u.args[0] is n}
            # read only by the writes into it, or by values made only for those writes (``dense.new_ones(())``)
            if writes and op_name(n) in _FACTORIES and all(u in writes or set(u.users) <= writes for u in n.users):
                for w in writes:
                    candidates.update(w.all_input_nodes)
                    graph.erase_node(w)
            if not n.users and n.op in ("call_function", "call_method") and not is_impure(n):
                candidates.update(n.all_input_nodes)  # what only it read is unread now
                candidates.discard(n)
                graph.erase_node(n)
                changed = True
    _drop_empty_vmap_levels(graph)


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _drop_empty_vmap_levels(graph: fx.Graph) -> None:
    """Erases ``vmap`` levels opened and closed around nothing (and the decompositions' load before them): kept by
    :func:`~dyllm_compile.passes.graph_utils.is_impure` otherwise."""
    changed = True
    while changed:
        changed = False
        nodes = list(graph.nodes)
        for a, b in zip(nodes, nodes[1:]):
            if _name(a) == "_vmap_increment_nesting" and _name(b) == "_vmap_decrement_nesting":
                before = a.prev
                graph.erase_node(b)
                graph.erase_node(a)
                if _name(before) == "lazy_load_decompositions":
                    graph.erase_node(before)
                changed = True
                break


def _emit_mask(gm: fx.GraphModule, graph: fx.Graph, before: fx.Node, build: Callable, operands: tuple) -> fx.Node:
    """A ``build(*operands)`` node (``block_mask_dense``, ``score_bias_mask``); its example value computed with the
    mask_mod's or score_mod's module itself (a get_attr node has no example value of its own)."""
    with graph.inserting_before(before):
        node = graph.call_function(build, operands)
    values = [operator.attrgetter(x.target)(gm) if isinstance(x, fx.Node) and x.op == "get_attr" else example_value(x)
              for x in operands]
    fake_mode = next((t.fake_mode for t in values if hasattr(t, "fake_mode")), None)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["example_value"] = build(*values)
    return node
