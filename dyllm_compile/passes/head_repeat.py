"""GQA's head repetition between a site and its keys or values, so caches can hold the kv heads only.

Pattern: a site's k or v that repeats each of ``x [B, G, N, D]``'s heads r times consecutively along dim 1
(Hugging Face ``repeat_kv``: ``x[:, :, None].expand(B, G, r, N, D).reshape(B, G * r, N, D)``, or
``x.unsqueeze(2)`` / a view inserting the singleton dim; or ``x.repeat_interleave(r, dim=1)``). The site's k/v
chain starts at ``x`` (``regions.find_chains``): its exit is ``x``, the cache holds G heads instead of G * r, and
``dyllm::cached_attention`` repeats them itself (its contract takes G kv heads). Two sites that repeat one ``x``
(DiffLlama's two attentions on one key) then share its chain and its cache.

Invariant: ``x`` is taken only when the shapes prove the site's k/v is exactly that repetition of it (a singleton
dim inserted right after the heads, expanded, merged back into the heads); anything else starts at the k/v itself.
"""

from __future__ import annotations

import operator
from typing import Optional

from torch import fx

from .graph_utils import arg, op_name, same_size, tensor_value

_FULL = slice(None, None, None)


def repeated_heads_source(node: fx.Node) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``x [B, G, N, D]`` with each head repeated r times consecutively along dim 1."""
    if node.op not in ("call_function", "call_method"):
        return None
    if op_name(node) == "repeat_interleave":
        x = node.args[0]
        dim = arg(node, 2, "dim")
        if isinstance(x, fx.Node) and isinstance(arg(node, 1, "repeats"), int) and dim in (1, -3) \
                and _dims(x) == 4:
            return x
        return None
    if op_name(node) not in ("reshape", "view") or not isinstance(node.args[0], fx.Node):
        return None
    expanded = node.args[0]
    if op_name(expanded) != "expand" or not isinstance(expanded.args[0], fx.Node):
        return None
    inserted = expanded.args[0]
    x = inserted.args[0] if inserted.op in ("call_function", "call_method") and inserted.args else None
    if not isinstance(x, fx.Node) or _dims(x) != 4 or not _inserts_dim_2(inserted):
        return None
    b, g, n, d = tensor_value(x).shape
    r = tensor_value(expanded).shape[2]
    if same_size(r, 0):  # no head at all (HF's repeat_kv of a config with more kv heads than heads): not a repeat
        return None
    shapes = ((tensor_value(inserted).shape, (b, g, 1, n, d)), (tensor_value(expanded).shape, (b, g, r, n, d)),
              (tensor_value(node).shape, (b, g * r, n, d)))
    if all(len(got) == len(want) and all(same_size(a, w) for a, w in zip(got, want)) for got, want in shapes):
        return x
    return None


def _dims(node: fx.Node) -> int:
    value = tensor_value(node)
    return value.dim() if value is not None else -1


def _inserts_dim_2(node: fx.Node) -> bool:
    """The op only inserts a singleton dim at position 2 of a 4-d tensor (shapes are checked by the caller)."""
    name = op_name(node)
    if name == "unsqueeze":
        return arg(node, 1, "dim") in (2, -3)
    if name in ("view", "reshape"):  # [B, G, N, D] -> [B, G, 1, N, D]: no element moves
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        rest = [i for i in index[3:] if i is not Ellipsis]
        return index[:3] == (_FULL, _FULL, None) and all(i == _FULL for i in rest)
    return False
