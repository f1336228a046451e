"""Bidirectional transformer for masked diffusion LMs, in plain PyTorch.

One configurable model covers the reference architectures (LLaDA-like, Dream-like) and the zoo the graph
analysis is tested on (QK-norm, parallel residual with partial rotary, post-LN with learned positions,
MoE FFN, hand-written attention, a token-mixing conv). The flags change the traced graph, never the
compiler: dyllm-compile does not know this module exists.

This file imports nothing but torch: it is also copied verbatim into remote-code checkpoints
(see :mod:`dyllm_compile.models.hf`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .grouped_mm import grouped_mm


@dataclass
class TransformerConfig:
    vocab_size: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: MHA
    d_ffn: int = 128
    max_seq_len: int = 512
    mask_token_id: int = 127
    pad_token_id: int = 0
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" | "post"
    ffn: str = "swiglu"  # "swiglu" | "gelu" | "moe"
    n_experts: int = 4
    moe_top_k: int = 2
    moe_capacity: Optional[int] = None  # per-expert token capacity: routing then depends on other tokens
    # "dense": every expert on every row, weighted by its gate; "dispatch": each expert on the rows routed to it
    # (torch.where), added back with index_add_, as OLMoE's and LLaDA-MoE's blocks (traced whole by Dynamo only
    # with torch._dynamo.config.capture_dynamic_output_shape_ops); "grouped": the (token, slot) rows sorted by expert,
    # each projection one grouped product over the experts' stacked weights, the rows put back by the inverse
    # permutation (transformers 5's default experts)
    moe_routing: str = "dense"
    # "sdpa" | "manual" (matmul, softmax, matmul) | "einsum" (the products as einsums) | "folded" (the products as
    # bmm's of the heads folded into the batch, fairseq's and DeBERTa's form) | "flex" (flex_attention; a
    # key-padding mask becomes its block mask)
    attention: str = "sdpa"
    gqa: str = "repeat_kv"  # "repeat_kv" | "enable_gqa" (how SDPA sees grouped K/V)
    # attention sinks, with hand-written attention: one more softmax logit per row and head that attends to nothing,
    # concatenated to the scores and dropped after the softmax (GPT-OSS): "none" | "head" (a learned logit per
    # head) | "row" (projected from each row's attention input)
    sinks: str = "none"
    # > 0: the scores soft-capped before the mask, softcap * tanh(scores / softcap) (Gemma-2's attention; with
    # attention in (manual, einsum) as it writes it, or flex as a score_mod)
    softcap: float = 0.0
    qkv_bias: bool = False
    fused_qkv: bool = False  # one projection for q, k and v, split three ways (LLaDA's att_proj)
    mlp_bias: bool = False
    qk_norm: bool = False
    # "heads": the q/k norms on [B, N, heads, head_dim]; "rows": on the heads folded into the rows,
    # q.reshape(-1, head_dim), as LLaDA-MoE's modeling code writes it
    qk_norm_layout: str = "heads"
    positions: str = "rope"  # "rope" | "learned"
    rope_table: str = "cached"  # "cached" (buffer sliced to the length) | "computed" (from positions)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    parallel_residual: bool = False
    token_conv: int = 0  # >0: depthwise conv over tokens of this width at the start of the FFN branch
    # "tokens": the FFN branch on [B, N, D]; "folded": it and its residual add on the rows with the batch folded in,
    # x.reshape(-1, D), viewed back to [B, N, D] after (OPT's decoder layer); "channels": it (after its norm) and its
    # residual add on [B, D, N], the tokens last, its products kernel-1 convolutions (SqueezeBERT's layout)
    ffn_rows: str = "tokens"
    # >0: hyper-connections, this many residual streams per row ([B, N, streams, D]); each branch reads its input as
    # a learned per-row mix of the streams and writes its output back into each with a per-row weight
    # (DeepSeek-V4's form without the Sinkhorn projection, as HunYuan-V4 writes it)
    hyper_connections: int = 0
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = {
            "d_model % n_heads == 0": self.d_model % self.n_heads == 0,
            "n_heads % n_kv_heads == 0": self.n_heads % self.n_kv_heads == 0,
            "norm in (rms, layer)": self.norm in ("rms", "layer"),
            "norm_position in (pre, post)": self.norm_position in ("pre", "post"),
            "ffn in (swiglu, gelu, moe)": self.ffn in ("swiglu", "gelu", "moe"),
            "moe_routing in (dense, dispatch, grouped)": self.moe_routing in ("dense", "dispatch", "grouped"),
            "qk_norm_layout in (heads, rows)": self.qk_norm_layout in ("heads", "rows"),
            "moe_capacity only with dense routing": self.moe_capacity is None or self.moe_routing == "dense",
            "attention in (sdpa, manual, einsum, folded, flex)": self.attention in ("sdpa", "manual", "einsum",
                                                                                  "folded", "flex"),
            "gqa in (repeat_kv, enable_gqa)": self.gqa in ("repeat_kv", "enable_gqa"),
            "sinks in (none, head, row)": self.sinks in ("none", "head", "row"),
            "sinks only with attention in (manual, einsum, folded)": self.sinks == "none" or self.attention in (
                "manual", "einsum", "folded"),
            "softcap >= 0, only with attention in (manual, einsum, folded, flex), not with sinks": (
                self.softcap >= 0 and (not self.softcap or (self.attention != "sdpa" and self.sinks == "none"))),
            "positions in (rope, learned)": self.positions in ("rope", "learned"),
            "rope_table in (cached, computed)": self.rope_table in ("cached", "computed"),
            "0 < rotary_fraction <= 1": 0 < self.rotary_fraction <= 1,
            "not (parallel_residual and norm_position == post)": not (
                self.parallel_residual and self.norm_position == "post"
            ),
            "hyper_connections only pre-LN, sequential": not self.hyper_connections or (
                self.norm_position == "pre" and not self.parallel_residual),
            "ffn_rows in (tokens, folded, channels); folded and channels only pre-LN, sequential, without "
            "hyper_connections or token_conv; channels only with ffn in (swiglu, gelu)": self.ffn_rows == "tokens" or (
                self.ffn_rows in ("folded", "channels") and self.norm_position == "pre" and not (
                    self.parallel_residual or self.hyper_connections or self.token_conv)
                and (self.ffn_rows == "folded" or self.ffn != "moe")),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid TransformerConfig: {failed}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.head_dim * self.rotary_fraction / 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 like LLaDA and Qwen: the graph holds the casts real checkpoints produce.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: TransformerConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(dim, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """RoPE tables, either a cached buffer sliced to the sequence length or computed per call."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.table, self.theta, self.dim = cfg.rope_table, cfg.rope_theta, cfg.rotary_dim
        self.max_seq_len = cfg.max_seq_len
        half = len(range(0, self.dim, 2))
        self.register_buffer("inv_freq", torch.empty(half), persistent=False)
        self.register_buffer("cos_cached", torch.empty(cfg.max_seq_len, 2 * half), persistent=False)
        self.register_buffer("sin_cached", torch.empty(cfg.max_seq_len, 2 * half), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Computes the tables in place. Also for a loader that builds the module on the meta device and
        materializes it without these buffers, which no checkpoint holds (transformers 5's ``from_pretrained``)."""
        dim, device = self.dim, self.inv_freq.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        for buffer, value in ((self.inv_freq, inv_freq), (self.cos_cached, emb.cos()), (self.sin_cached, emb.sin())):
            buffer.copy_(value)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table == "cached":
            return self.cos_cached[:seq_len].to(dtype), self.sin_cached[:seq_len].to(dtype)
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = t[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KV, N, D] -> [B, KV * n_rep, N, D] by expand + reshape, as Hugging Face models do."""
    if n_rep == 1:
        return x
    b, kv, n, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, n, d).reshape(b, kv * n_rep, n, d)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.widths = [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.d_model, self.widths[0], bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.d_model, self.widths[1], bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.d_model, self.widths[2], bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.qkv_bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, hd)
            self.k_norm = make_norm(cfg, hd)
        if cfg.sinks == "head":  # spread, so that heads differ in how much mass their sink takes
            self.sinks = nn.Parameter(torch.linspace(-1.0, 2.0, cfg.n_heads))
        elif cfg.sinks == "row":
            self.sink_proj = nn.Linear(cfg.d_model, cfg.n_heads)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, N, heads, head_dim], k and v [B, N, kv_heads, head_dim]; q and k normed with ``qk_norm``."""
        cfg = self.cfg
        b, n, _ = x.shape
        if cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        heads = (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
        q, k, v = (t.view(b, n, h, cfg.head_dim) for t, h in zip((q, k, v), heads))
        if cfg.qk_norm and cfg.qk_norm_layout == "rows":
            q, k = (norm(t.reshape(-1, cfg.head_dim)).reshape(t.shape)
                    for norm, t in ((self.q_norm, q), (self.k_norm, k)))
        elif cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]],
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        cfg = self.cfg
        b, n, _ = x.shape
        q, k, v = self.project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q = apply_rotary(q, *rope, cfg.rotary_dim)
            k = apply_rotary(k, *rope, cfg.rotary_dim)
        n_rep = cfg.n_heads // cfg.n_kv_heads
        if cfg.attention in ("manual", "einsum", "folded"):
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            if cfg.attention == "manual":
                scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(cfg.head_dim)
            elif cfg.attention == "einsum":
                scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) / math.sqrt(cfg.head_dim)
            else:
                q, k, v = (t.reshape(-1, n, cfg.head_dim) for t in (q, k, v))
                scores = torch.bmm(q, k.transpose(1, 2)).view(b, -1, n, n) / math.sqrt(cfg.head_dim)
            if cfg.softcap:
                scores = torch.tanh(scores / cfg.softcap) * cfg.softcap
            if mask is not None:
                scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
            if cfg.sinks == "none":
                probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
            else:  # as GPT-OSS writes it: the sink's column concatenated, the row max subtracted, the column dropped
                logits = torch.cat([scores, self.sink_logits(x, scores)], dim=-1).float()
                logits = logits - logits.max(dim=-1, keepdim=True).values
                probs = F.softmax(logits, dim=-1)[..., :-1].to(q.dtype)
            if cfg.attention == "manual":
                out = torch.matmul(probs, v)
            elif cfg.attention == "einsum":
                out = torch.einsum("bhij,bhjd->bhid", probs, v)
            else:
                out = torch.bmm(probs.reshape(-1, n, n), v).view(b, -1, n, cfg.head_dim)
        elif cfg.attention == "flex":
            cap = cfg.softcap
            score_mod = (lambda s, b, h, qi, ki: cap * torch.tanh(s / cap)) if cap else None
            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=n_rep > 1)
        elif cfg.gqa == "enable_gqa" and n_rep > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, cfg.d_model))


    def sink_logits(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, 1]: each row's sink logit per head."""
        if self.cfg.sinks == "head":
            return self.sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        return self.sink_proj(x).transpose(1, 2).unsqueeze(-1).to(scores.dtype)


#: How an FFN applies one of its linear layers: to the features of [..., D] (``on_features``), or as a kernel-1
#: convolution over channels-first [B, D, N] (``on_channels``: SqueezeBERT's layout)
Project = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def on_features(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def on_channels(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x, layer.weight.unsqueeze(-1), layer.bias)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, project: Project = on_features) -> torch.Tensor:
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, project: Project = on_features) -> torch.Tensor:
        return project(self.fc_out, F.gelu(project(self.fc_in, x)))


class StackedExperts(nn.Module):
    """The experts' SwiGLU weights stacked, ``[experts, in, out]`` (gate and up side by side), as transformers 5's
    experts modules hold them: what a grouped product takes."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ffn
        self.gate_up = nn.Parameter(torch.empty(e, d, 2 * f))
        self.down = nn.Parameter(torch.empty(e, f, d))
        self.gate_up_bias = nn.Parameter(torch.empty(e, 2 * f)) if cfg.mlp_bias else None
        self.down_bias = nn.Parameter(torch.empty(e, d)) if cfg.mlp_bias else None


class MoE(nn.Module):
    """Top-k routed SwiGLU experts combined with the routing gates: computed densely (every expert on every row),
    or with ``moe_routing="dispatch"`` each on the rows routed to it.

    With ``moe_capacity`` each expert keeps only its first ``capacity`` tokens (a cumsum over tokens), so a
    token's output depends on the other tokens: routing is then token-mixing.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        if cfg.moe_routing == "grouped":
            self.experts = StackedExperts(cfg)
        else:
            self.experts = nn.ModuleList(SwiGLU(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.cfg.moe_top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        if self.cfg.moe_routing == "dispatch":
            return self._dispatch(x, top_p, top_i)
        if self.cfg.moe_routing == "grouped":
            return self._grouped(x, top_p, top_i)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        if self.cfg.moe_capacity is not None:
            routed = (gates > 0).to(gates.dtype)
            slot = torch.cumsum(routed, dim=1)  # position of each token in its expert's queue
            gates = gates * (slot <= self.cfg.moe_capacity).to(gates.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e : e + 1].to(x.dtype) * expert(x)
        return out


    def _dispatch(self, x: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """OLMoE's form: each expert on the rows routed to it, its weighted output added back with index_add_."""
        flat = x.reshape(-1, x.shape[-1])
        weights = top_p.reshape(-1, top_p.shape[-1]).to(x.dtype)
        routed = top_i.reshape(-1, top_i.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(routed == e)
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.view_as(x)

    def _grouped(self, x: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """transformers 5's ``grouped_mm`` form: rows sorted by expert, one grouped product per projection (offsets
        counted from the sorted ids), the weighted rows put back by the inverse permutation and summed per token."""
        flat = x.reshape(-1, x.shape[-1])
        k, experts = top_i.shape[-1], self.cfg.n_experts
        ids, perm = torch.sort(top_i.reshape(-1))
        rows = flat[perm // k]
        counts = torch.histc(ids.float(), bins=experts, min=0, max=experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

        def project(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
            out = grouped_mm(rows, weight, offsets)  # each row by its expert's weight
            return out if bias is None else out + bias[ids]  # the biases read at the sorted ids
        gate, up = project(rows, self.experts.gate_up, self.experts.gate_up_bias).chunk(2, dim=-1)
        out = project(F.silu(gate) * up, self.experts.down, self.experts.down_bias) * top_p.reshape(-1)[perm, None]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
        return out[inverse].view(-1, k, x.shape[-1]).sum(dim=1).to(x.dtype).view_as(x)


class HyperConnection(nn.Module):
    """Per-row weights over the residual streams ``[B, N, streams, D]``, from all of them: ``read`` mixes the
    streams into one branch input, ``write`` adds a branch output back into each stream with a weight of its own
    (with ``writes=False``, a final read only)."""

    def __init__(self, cfg: TransformerConfig, writes: bool = True) -> None:
        super().__init__()
        self.streams = cfg.hyper_connections
        self.fn = nn.Linear(self.streams * cfg.d_model, (2 if writes else 1) * self.streams)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the branch input [B, N, D], the write weights [B, N, streams] or None)"""
        # one split into the read and the write weights, as HunYuan-V4 writes it
        read, *write = torch.sigmoid(self.fn(streams.flatten(2))).split(self.streams, dim=-1)
        return (read.unsqueeze(-1) * streams).sum(dim=2), (write[0] if write else None)

    @staticmethod
    def write(streams: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return streams + weights.unsqueeze(-1) * out.unsqueeze(-2)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg, cfg.d_model)
        self.ffn = {"swiglu": SwiGLU, "gelu": GeluMLP, "moe": MoE}[cfg.ffn](cfg)
        if cfg.hyper_connections:
            self.attn_hc, self.ffn_hc = HyperConnection(cfg), HyperConnection(cfg)
        if cfg.token_conv:
            self.conv = nn.Conv1d(
                cfg.d_model, cfg.d_model, cfg.token_conv, padding=cfg.token_conv // 2, groups=cfg.d_model
            )

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.token_conv:
            x = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.ffn(x)

    def forward(self, x, rope, mask) -> torch.Tensor:
        if self.cfg.hyper_connections:  # x: the streams
            branch_input, weights = self.attn_hc(x)
            x = HyperConnection.write(x, weights, self.attn(self.attn_norm(branch_input), rope, mask))
            branch_input, weights = self.ffn_hc(x)
            return HyperConnection.write(x, weights, self.ffn_branch(self.ffn_norm(branch_input)))
        if self.cfg.norm_position == "post":
            x = self.attn_norm(x + self.attn(x, rope, mask))
            return self.ffn_norm(x + self.ffn_branch(x))
        if self.cfg.parallel_residual:
            return x + self.attn(self.attn_norm(x), rope, mask) + self.ffn_branch(self.ffn_norm(x))
        x = x + self.attn(self.attn_norm(x), rope, mask)
        if self.cfg.ffn_rows == "folded":
            rows = x.reshape(-1, x.shape[-1])
            return (rows + self.ffn_branch(self.ffn_norm(rows))).view(x.shape)
        if self.cfg.ffn_rows == "channels":
            return (x.transpose(1, 2) + self.ffn(self.ffn_norm(x).transpose(1, 2), on_channels)).transpose(1, 2)
        return x + self.ffn_branch(self.ffn_norm(x))


class DiffusionTransformer(nn.Module):
    """``forward(input_ids, attention_mask=None) -> logits [B, N, vocab]``.

    ``attention_mask`` is either a key-padding mask ``[B, N]`` (bool or 0/1: 1 = real token) or an additive
    float mask broadcastable to ``[B, heads, N, N]``.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.hyper_connections:
            self.final_hc = HyperConnection(cfg, writes=False)
        self.final_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(cfg.seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * self.cfg.init_std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * self.cfg.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = input_ids.shape[1]
        h = self.embed(input_ids)
        rope = None
        if self.cfg.positions == "learned":
            h = h + self.pos_embed(torch.arange(n, device=input_ids.device))
        else:
            rope = self.rotary(n, h.dtype)
        mask = None
        if attention_mask is not None:
            if self.cfg.attention == "flex":
                mask = _key_block_mask(attention_mask, n)
            elif attention_mask.is_floating_point():
                mask = attention_mask.to(h.dtype)
            else:
                mask = attention_mask.bool()[:, None, None, :]
        if self.cfg.hyper_connections:
            h = h.unsqueeze(2).expand(-1, -1, self.cfg.hyper_connections, -1).contiguous()
        for layer in self.layers:
            h = layer(h, rope, mask)
        if self.cfg.hyper_connections:
            h, _ = self.final_hc(h)
        return self.lm_head(self.final_norm(h))


def _key_block_mask(attention_mask: torch.Tensor, n: int):
    """flex_attention's block mask for a key-padding mask [B, N] (1 = real token); an additive mask has no such form."""
    if attention_mask.is_floating_point() or attention_mask.dim() != 2:
        raise ValueError("attention='flex' takes a key-padding mask [batch, tokens] of 0/1 or bool")
    keep = attention_mask.bool()
    return create_block_mask(lambda b, h, q, kv: keep[b, kv], keep.shape[0], None, n, n, device=keep.device)
