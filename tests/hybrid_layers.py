"""A small hybrid LM whose token mixing besides attention is fed by split projections, as in LFM2 and Mamba layers:
the projections are regions with several outputs (passes/mixer_inputs.py)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """LFM2's gated short convolution: one projection split into B, C and x; a depthwise convolution over the tokens
    of B * x, gated by C after it. ``late_gate``: B * x and the layer's output also times sigmoid(h), computed after
    the split."""

    def __init__(self, d: int, width: int = 3, late_gate: bool = False) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1)
        self.out_proj = nn.Linear(d, d)
        self.late_gate = late_gate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, x = self.in_proj(h).chunk(3, dim=-1)
        bx = b * x
        g = torch.sigmoid(h) if self.late_gate else 1.0
        y = self.conv((bx * g).transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        return self.out_proj(c * y) * g


class ScanMixer(nn.Module):
    """A Mamba layer's shape: one projection split into the output gate, the convolution's input and the step sizes;
    a causal convolution, then a two-token recurrence weighted by the steps (the scan's stand-in)."""

    def __init__(self, d: int, width: int = 2) -> None:
        super().__init__()
        self.d = d
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1)
        self.out_proj = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, xs, dt = self.in_proj(h).split([self.d, self.d, self.d], dim=-1)
        xs = F.silu(self.conv(xs.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2))
        z = xs * F.softplus(dt)
        y = z + F.pad(z, (0, 0, 1, 0))[:, :-1]
        return self.out_proj(y * F.silu(gate))


class HybridLM(nn.Module):
    """Embedding; a pre-norm attention layer with its FFN; a short-convolution layer; a Mamba-like layer; lm_head.
    ``forward(ids, mask=None)``: ``mask`` is SDPA's additive mask. ``conv_after_o``: a convolution over the tokens
    after the attention's output projection, or after a projection of it."""

    def __init__(self, d: int = 32, vocab: int = 128, late_gate: bool = False,
                 conv_after_o: Optional[str] = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        # conv_after_o: a causal depthwise convolution over the tokens of the attention's output projection
        # ("direct": Inkling's), or of a projection of it ("projected": Zamba's attention output, a Mamba's input)
        self.o_conv = nn.Conv1d(d, d, 3, groups=d, padding=2) if conv_after_o else None
        self.o_in = nn.Linear(d, d) if conv_after_o == "projected" else nn.Identity()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.conv_norm, self.short = nn.LayerNorm(d), ShortConv(d, late_gate=late_gate)
        self.scan_norm, self.scan = nn.LayerNorm(d), ScanMixer(d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(ids)
        b, n, d = h.shape
        x = self.attn_norm(h)
        q, k, v = (p(x).view(b, n, 2, d // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d))
        if self.o_conv is not None:
            o = self.o_conv(self.o_in(F.gelu(o)).transpose(1, 2))[..., :n].transpose(1, 2)
        h = h + o
        h = h + self.down(F.gelu(self.up(self.ffn_norm(h))))
        h = h + self.short(self.conv_norm(h))
        h = h + self.scan(self.scan_norm(h))
        return self.head(self.norm(h))
