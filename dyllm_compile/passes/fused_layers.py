"""Unfuses PyTorch's fused encoder layer into the ops it computes, so that its attention is a site.

Pattern: ``torch._transformer_encoder_layer_fwd(src, E, H, in_proj_weight, in_proj_bias, out_proj_weight,
out_proj_bias, use_gelu, norm_first, eps, norm1_weight, norm1_bias, norm2_weight, norm2_bias, linear1_weight,
linear1_bias, linear2_weight, linear2_bias, mask, mask_type)``: ``nn.TransformerEncoderLayer``'s fast path, which
it takes in eval mode without grad (under ``inference_mode``, as a decode runs) for batch-first inputs. One opaque
op per layer: no attention site, nothing gated, the whole graph dense.

Replaced by the layer's own slow path (``nn.TransformerEncoderLayer._sa_block`` / ``_ff_block`` in eval mode): the
fused q/k/v projection chunked three ways, heads unflattened, SDPA, the output projection, the FFN with ReLU or
GELU, residual adds and layer norms before (``norm_first``) or after them; a key-padding mask (``mask_type`` 1:
[B, N]; boolean, True where a token is padding, or additive, as ``nn.TransformerEncoderLayer`` makes it) as SDPA's
mask over the keys. Nothing in it names a size, so one decomposition
serves static and dynamic shapes.

Invariant: the same function as the fused op up to floating-point rounding (the slow path is what the layer runs
in training); the graph Dynamo handed over is never edited (a copy is). A layer with another mask (an attention
mask, or both merged) stays fused, with its reason on the node (``FUSED_REASON``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .graph_edit import Emitter, copy_graph, module_of
from .graph_utils import arg, op_name, tensor_value

#: ``node.meta`` key of a fused layer left fused: why.
FUSED_REASON = "dyllm_fused_reason"
_ENCODER_LAYER = "_transformer_encoder_layer_fwd"


def unfuse_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy of it in which each fused encoder layer with no mask or a key-padding one is its ops."""
    layers = [n for n in gm.graph.nodes if op_name(n) == _ENCODER_LAYER]
    for node in layers:
        mask, mask_type = arg(node, 18, "mask"), arg(node, 19, "mask_type")
        if len(node.args) < 18:
            node.meta[FUSED_REASON] = "a fused encoder layer called with keyword arguments"
        elif mask is not None and mask_type != 1:
            node.meta[FUSED_REASON] = f"a fused encoder layer with mask type {mask_type} (only key padding is unfused)"
    ready = [n for n in layers if FUSED_REASON not in n.meta]
    if not ready:
        return gm
    graph, copies = copy_graph(gm)
    for node in ready:
        _unfuse(graph, copies[node])
    return module_of(gm, graph)


def _unfuse(graph: fx.Graph, node: fx.Node) -> None:
    (src, embed_dim, heads, in_w, in_b, out_w, out_b, use_gelu, norm_first, eps, n1_w, n1_b, n2_w, n2_b,
     w1, b1, w2, b2) = node.args[:18]
    mask = arg(node, 18, "mask")
    emit = Emitter(graph, node)
    if mask is not None:  # key padding [B, N], broadcast over heads and query rows
        if tensor_value(mask).dtype == torch.bool:  # True = padding: SDPA's boolean mask says where to attend
            mask = emit(torch.logical_not, mask)
        mask = emit(torch.Tensor.unsqueeze, emit(torch.Tensor.unsqueeze, mask, 1), 1)  # a float one is added

    def attention(x: fx.Node) -> fx.Node:
        qkv = emit(torch.chunk, emit(F.linear, x, in_w, in_b), 3, -1)
        q, k, v = (emit(torch.transpose, emit(torch.Tensor.unflatten, emit(operator.getitem, qkv, i), -1,
                                              (heads, embed_dim // heads)), 1, 2) for i in range(3))
        context = emit(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
        return emit(F.linear, emit(torch.flatten, emit(torch.transpose, context, 1, 2), -2), out_w, out_b)

    def feed_forward(x: fx.Node) -> fx.Node:
        hidden = emit(F.gelu if use_gelu else F.relu, emit(F.linear, x, w1, b1))
        return emit(F.linear, hidden, w2, b2)

    def norm(x: fx.Node, weight: fx.Node, bias: fx.Node) -> fx.Node:
        return emit(F.layer_norm, x, (embed_dim,), weight, bias, eps)

    x = src
    if norm_first:
        x = emit(operator.add, x, attention(norm(x, n1_w, n1_b)))
        x = emit(operator.add, x, feed_forward(norm(x, n2_w, n2_b)))
    else:
        x = norm(emit(operator.add, x, attention(x)), n1_w, n1_b)
        x = norm(emit(operator.add, x, feed_forward(x)), n2_w, n2_b)
    node.replace_all_uses_with(x)
    graph.erase_node(node)
