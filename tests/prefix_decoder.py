"""A block decoder attending to a prefix's keys and values beyond its own rows, ``k = cat([P_k, K])`` (the shape
of DiffusionGemma's decoder over the encoder's KV cache, and of prefix KV caches), for the tests."""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, MASK, WIDTH, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 63, 32, 4, 2, 8, 2


class _Layer(nn.Module):
    def __init__(self, gqa: str) -> None:
        super().__init__()
        self.gqa = gqa
        self.norm1, self.norm2 = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.q = nn.Linear(WIDTH, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(WIDTH, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)
        self.up, self.gate = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x, cos, sin, prefix_k, prefix_v, mask, prefix_first):
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, n, -1, HEAD_DIM).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        parts = lambda own, prefix: [prefix, own] if prefix_first else [own, prefix]  # noqa: E731
        k, v = torch.cat(parts(k, prefix_k), dim=2), torch.cat(parts(v, prefix_v), dim=2)
        if self.gqa == "repeat_kv":  # Hugging Face's repeat_kv after the concatenation (DiffusionGemma with a mask)
            r = HEADS // KV_HEADS
            k, v = (t[:, :, None].expand(b, KV_HEADS, r, *t.shape[2:]).reshape(b, HEADS, *t.shape[2:])
                    for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa == "enable_gqa")
        x = x + self.o(out.transpose(1, 2).reshape(b, n, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PrefixDecoder(nn.Module):
    """A block decoder: token ids of the block, and per layer the prefix's keys and values [B, G, P, D] (the
    prompt's, cached by an encoder), which the block attends to with its own rows, positions after the prefix."""

    def __init__(self, gqa: str = "enable_gqa", prefix_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.prefix_first = prefix_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(_Layer(gqa) for _ in range(LAYERS))
        self.norm, self.head = nn.RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, ids, prefix_k, prefix_v, mask=None):
        p, n = prefix_k.shape[3], ids.shape[1]
        position = torch.arange(p, p + n, dtype=torch.float32)
        freq = position[:, None] / (100.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))[None, :]
        cos, sin = torch.cat([freq, freq], -1).cos(), torch.cat([freq, freq], -1).sin()
        x = self.embed(ids)
        for layer, pk, pv in zip(self.layers, prefix_k, prefix_v):
            x = layer(x, cos, sin, pk, pv, mask, self.prefix_first)
        return self.head(self.norm(x))


def prefix(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (LAYERS, batch, KV_HEADS, length, HEAD_DIM)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def block(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, n), generator=torch.Generator().manual_seed(seed))
