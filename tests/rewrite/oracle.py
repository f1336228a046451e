"""Plain-torch eager implementation of the DyLLM algorithm for the reference models (pre-LN, SDPA).

Written against the model's modules, independently of the compiler: rows are selected with masks (every row
computed, then ``where(salient, fresh, cached)``), attention per DESIGN.md section 2: paper mode
``c_old + softmax(q K^T)(V - V_old)`` for rows outside S_in; exact mode dense attention with the cached query
for rows outside S_in. With attention sinks, the context cached and compared is the sink-free one; the layer's
output scales it by ``sigmoid(logsumexp(q K^T) - sink)``, the share of the mass the sink leaves (docs/rewrite.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from dyllm_compile.config import DyllmConfig
from dyllm_compile.models.transformer import DiffusionTransformer, apply_rotary, repeat_kv
from dyllm_compile.runtime.graph_runtime import forced_masks


def _context_cosine(c: torch.Tensor, c_old: torch.Tensor) -> torch.Tensor:
    """[B, N]: the cosine of each row's context [B, H, N, D] (heads together) with its previous value; a row that
    is zero at both calls (it saw no key) is unchanged, 1."""
    new, old = c.transpose(1, 2).flatten(2), c_old.transpose(1, 2).flatten(2)
    unchanged = (new == 0).all(-1) & (old == 0).all(-1)
    return F.cosine_similarity(new, old, dim=-1).masked_fill(unchanged, 1.0)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float) -> torch.Tensor:
    """Attention over every key; with ``softcap``, the scores capped first: ``softcap * tanh(s / softcap)``."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v)
    scores = softcap * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) / softcap)
    return scores.softmax(-1) @ v


def _rows(s: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[0], shape[axis] = s.shape
    return s.view(shape)


@dataclass
class Oracle:
    model: DiffusionTransformer
    threshold: float = 0.99
    mode: str = DyllmConfig().attention_mode  # the library's default, like the compiled model it checks
    force_salient: Optional[float] = None
    seed: int = 0
    # Block freezing (Fast-dLLM dual cache): rows [first masked at the last dense call, + block_freeze) are
    # recomputed in every layer; the call after the block is fully unmasked is dense.
    block_freeze: Optional[int] = None
    mask_id: int = 127
    block: Optional[torch.Tensor] = None
    # Any other policy, as plain functions: dense(calls) -> bool, first(changed, calls, response) -> S_in,
    # after(layer, salient, changed, response, c, c_old) -> S_out, and optionally before(layer, salient, changed,
    # response, v, v_cached) -> rows whose k/v are recomputed, branch(layer, salient, changed, response, x,
    # x_cached) -> rows a branch (FFN, lm_head) runs on. ``response``: rows masked at the first call.
    rules: Optional[object] = None
    # Query pruning: on sparse calls whose count is not a multiple of this, rows outside the response keep their
    # cached context (so their attention output, K/V and FFN output stay as cached too).
    query_pruning_period: int = 0
    # "salient": the attention output projection of rows outside S_out keeps its cached value, like the FFN's.
    output_projection: str = "dense"
    max_changed_fraction: float = DyllmConfig().max_changed_fraction
    last_queried: Optional[torch.Tensor] = None
    response: Optional[torch.Tensor] = None
    caches: Optional[dict] = None
    ids: Optional[torch.Tensor] = None
    calls: int = 0
    fractions: list = field(default_factory=list)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.block_freeze is not None and self.block is not None:
            if not (self.block & (ids == self.mask_id)).any():
                self.caches = None  # the block is done: this call is dense
        if self.rules is not None and self.caches is not None and self.rules.dense(self.calls):
            self.caches = None
        dense = self.caches is None
        queried = None
        if not dense:
            salient = ids != self.ids
            if self.block_freeze is not None:
                salient = salient | self.block
            self.changed = salient
            if self.rules is not None:
                salient = self.rules.first(salient, self.calls, self.response)
            new_rows = ids != self.ids  # changed since the last call: tokens, then rows queried again
            if self.query_pruning_period:
                queried = self.response if self.calls % self.query_pruning_period else torch.ones_like(salient)
                if self.last_queried is not None:  # queried again after skipped calls: an old context, recomputed
                    again = queried & ~self.last_queried
                    salient, new_rows = salient | again, new_rows | again
            # more new rows (over the batch) than max_changed_fraction allows: a dense call
            dense = int(new_rows.any(0).sum()) > math.ceil(self.max_changed_fraction * ids.shape[1])
        if dense:
            if (self.rules is not None or self.query_pruning_period) and self.response is None:
                self.response = ids == self.mask_id
            self.caches = {}  # calls keep counting across refreshes, as the runtime counts them
            salient, queried = torch.ones_like(ids, dtype=torch.bool), None
            if self.block_freeze is not None:
                self.block = torch.zeros_like(salient)
                for row, masked in enumerate(ids == self.mask_id):
                    where = masked.nonzero().flatten()
                    if where.numel():
                        self.block[row, where[0] : where[0] + self.block_freeze] = True
        elif self.threshold >= 1.0:
            salient = torch.ones_like(salient)
        forced = None
        if self.force_salient is not None and not dense:
            forced = forced_masks(self.seed, self.calls, len(self.model.layers), *ids.shape, self.force_salient)
        logits = self._forward(ids, salient, dense, forced, queried)
        self.last_queried = None if queried is None or bool(queried.all()) else queried
        self.ids, self.calls = ids.clone(), self.calls + 1
        return logits

    def _keep(self, name, fresh, salient, axis, dense):
        value = fresh if dense else torch.where(_rows(salient, fresh.dim(), axis), fresh, self.caches[name])
        old = None if dense else self.caches[name]
        self.caches[name] = value
        return value, old

    def _branch(self, layer, name, x, salient, dense):
        """The rules' branch hook on a branch input; the cached input is the one each row last ran with."""
        if not hasattr(self.rules, "branch"):
            return salient
        if not dense:
            salient = self.rules.branch(layer, salient, self.changed, self.response, x, self.caches[f"{name}.in"])
        self._keep(f"{name}.in", x, salient, 1, dense)
        return salient

    def _forward(self, ids, salient, dense, forced, queried=None):
        m, cfg = self.model, self.model.cfg
        b, n = ids.shape
        h = m.embed(ids)
        rope = m.rotary(n, h.dtype)
        rep = cfg.n_heads // cfg.n_kv_heads
        layer_fractions = []
        streams = cfg.hyper_connections
        if streams:  # h: the residual streams, each branch reading a mix of them and writing into each
            h = h.unsqueeze(2).expand(-1, -1, streams, -1).contiguous()
        for i, layer in enumerate(m.layers):
            a = layer.attn
            branch_input, weights = layer.attn_hc(h) if streams else (h, None)
            x = layer.attn_norm(branch_input)
            q, k, v = (t.transpose(1, 2) for t in a.project(x))
            q, k = apply_rotary(q, *rope, cfg.rotary_dim), apply_rotary(k, *rope, cfg.rotary_dim)
            # K/V cached per kv head (GQA: before the repetition), as the policies see the values.
            if not dense and hasattr(self.rules, "before"):
                salient = self.rules.before(i, salient, self.changed, self.response, v, self.caches[f"{i}.v"])
            k, _ = self._keep(f"{i}.k", k, salient, 2, dense)
            v, v_old = self._keep(f"{i}.v", v, salient, 2, dense)
            k, v = repeat_kv(k, rep), repeat_kv(v, rep)
            v_old = None if v_old is None else repeat_kv(v_old, rep)
            if self.mode == "exact":
                q, _ = self._keep(f"{i}.q", q, salient, 2, dense)
            c = _attention(q, k, v, cfg.softcap)
            if not dense and self.mode == "paper":
                c_prev = self.caches[f"{i}.c"]
                delta = c - _attention(q, k, v_old, cfg.softcap)  # softmax(q K^T)(V - V_old)
                c = torch.where(_rows(salient, 4, 2), c, c_prev + delta)
            c_old = self.caches.get(f"{i}.c")
            if queried is not None:
                c = torch.where(_rows(queried, 4, 2), c, c_old)
            self.caches[f"{i}.c"] = c
            if not dense:
                if forced is not None:
                    salient = salient | forced[i]
                elif self.block_freeze is not None:
                    salient = salient | self.block
                elif self.rules is not None:
                    salient = self.rules.after(i, salient, self.changed, self.response, c, c_old)
                elif self.threshold >= 1.0:
                    salient = torch.ones_like(salient)
                else:
                    salient = salient | (_context_cosine(c, c_old) < self.threshold)
            layer_fractions.append(salient.float().mean().item())
            if cfg.sinks != "none":  # the sink takes its share of each row's softmax mass from the cached context
                lse = torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(cfg.head_dim), -1)
                if queried is not None:  # rows not queried keep their share too
                    lse = torch.where(_rows(queried, 3, 2), lse, self.caches[f"{i}.lse"])
                self.caches[f"{i}.lse"] = lse
                c = c * torch.sigmoid(lse - a.sink_logits(x, lse[..., None])[..., 0].float())[..., None]
            o = a.o_proj(c.transpose(1, 2).reshape(b, n, cfg.d_model))
            if self.output_projection == "salient":
                o, _ = self._keep(f"{i}.o", o, salient, 1, dense)
            h = h + (weights.unsqueeze(-1) * o.unsqueeze(-2) if streams else o)
            salient = self._branch(i, f"{i}.ffn", h, salient, dense)  # a branch's input: the residual stream read
            if streams:  # the FFN's branch from the streams it reads to what it writes back: its weights too
                branch_input, weights = layer.ffn_hc(h)
                branch = weights.unsqueeze(-1) * layer.ffn(layer.ffn_norm(branch_input)).unsqueeze(-2)
            else:
                branch = layer.ffn(layer.ffn_norm(h))
            f, _ = self._keep(f"{i}.ffn", branch, salient, 1, dense)
            h = h + f
        salient = self._branch(len(m.layers) - 1, "logits", h, salient, dense)
        logits, _ = self._keep("logits", m.lm_head(m.final_norm(m.final_hc(h)[0] if streams else h)), salient, 1,
                               dense)
        if not dense:
            self.fractions.append(layer_fractions)
        return logits.clone()


class Lockstep:
    """Calls the compiled model and the oracle on the same inputs; decoding follows the oracle."""

    def __init__(self, compiled, oracle):
        self.compiled, self.oracle, self.steps = compiled, oracle, 0

    def __call__(self, x):
        expected = self.oracle(x)
        got = self.compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {self.steps}: {m}")
        self.steps += 1
        return expected
