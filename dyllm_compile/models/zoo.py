"""A zoo of small architectures for the graph analysis, the correctness matrix and benchmarks.

Each entry is a tiny :class:`TransformerConfig` plus how its inputs look. None of them is known to the compiler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .presets import dream_config, llada_config
from .transformer import DiffusionTransformer, TransformerConfig


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config: TransformerConfig
    mask: Optional[str] = None  # None | "additive": the model is called with an additive attention mask
    description: str = ""

    def build(self) -> DiffusionTransformer:
        return DiffusionTransformer(self.config).eval()

    def inputs(self, batch: int, length: int, seed: int = 0) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.config.mask_token_id, (batch, length), generator=gen)
        if self.mask != "additive":
            return (ids,)
        keep = torch.ones(batch, length, dtype=torch.bool)
        keep[0, : length // 4] = False  # left padding on the first row
        additive = torch.zeros(batch, 1, 1, length).masked_fill(~keep[:, None, None, :], float("-inf"))
        return ids, additive


def _entries() -> list[ZooEntry]:
    tiny = dict(n_layers=2)
    return [
        ZooEntry("llada", llada_config("tiny", **tiny), description="MHA, SwiGLU, RMSNorm, cached RoPE"),
        ZooEntry("dream", dream_config("tiny", **tiny), description="GQA (repeat_kv), QKV bias, computed RoPE"),
        ZooEntry("qwen3", llada_config("tiny", n_kv_heads=2, qk_norm=True, gqa="enable_gqa", **tiny),
                 description="QK-norm, GQA through SDPA enable_gqa"),
        ZooEntry("neox", llada_config("tiny", parallel_residual=True, rotary_fraction=0.5, norm="layer",
                                      ffn="gelu", qkv_bias=True, mlp_bias=True, **tiny),
                 description="parallel residual, partial rotary, LayerNorm, GELU MLP"),
        ZooEntry("bert", llada_config("tiny", norm_position="post", norm="layer", ffn="gelu", positions="learned",
                                      qkv_bias=True, mlp_bias=True, **tiny),
                 description="post-LN, GELU, learned absolute positions"),
        ZooEntry("moe", llada_config("tiny", ffn="moe", n_experts=4, moe_top_k=2, **tiny),
                 description="top-2 of 4 routed SwiGLU experts"),
        ZooEntry("moe_grouped", llada_config("tiny", ffn="moe", n_experts=4, moe_top_k=2, moe_routing="grouped",
                                             mlp_bias=True, **tiny),
                 description="experts on rows sorted by expert, grouped products (transformers 5's grouped_mm)"),
        ZooEntry("manual_attention", llada_config("tiny", attention="manual", n_kv_heads=2, **tiny),
                 description="softmax(q k^T / sqrt(d)) v written by hand, GQA"),
        ZooEntry("sinks", llada_config("tiny", attention="manual", n_kv_heads=2, sinks="head", **tiny),
                 description="a learned attention sink per head (GPT-OSS), hand-written attention, GQA"),
        ZooEntry("row_sinks", llada_config("tiny", attention="einsum", sinks="row", **tiny),
                 description="attention sinks projected from each row, einsum attention"),
        ZooEntry("flex", llada_config("tiny", attention="flex", n_kv_heads=2, **tiny),
                 description="flex_attention, its full mask built in the graph, GQA"),
        ZooEntry("softcap", llada_config("tiny", attention="manual", n_kv_heads=2, softcap=0.5, **tiny),
                 description="scores soft-capped before the mask (Gemma-2), hand-written attention, GQA"),
        ZooEntry("hyper_connections", llada_config("tiny", hyper_connections=4, **tiny),
                 description="four residual streams mixed per row into each branch and written back (DeepSeek-V4)"),
        ZooEntry("additive_mask", llada_config("tiny", **tiny), mask="additive",
                 description="additive attention mask input"),
        ZooEntry("fused_qkv", llada_config("tiny", fused_qkv=True, n_kv_heads=2, **tiny),
                 description="one q/k/v projection split three ways (LLaDA's att_proj), GQA"),
        ZooEntry("token_conv", llada_config("tiny", token_conv=3, **tiny),
                 description="depthwise conv over tokens at the start of the FFN branch"),
    ]


ZOO: dict[str, ZooEntry] = {e.name: e for e in _entries()}
