"""A grouped matrix product as an opaque custom op, for the in-repo MoE's ``grouped`` routing: the form transformers
5's default experts take on CPU under ``torch.compile`` (torch's ``_grouped_mm`` compiles only for bfloat16, so
transformers registers a loop over the groups as a custom op; this is the same contract, not its code)."""

from __future__ import annotations

import torch


@torch.library.custom_op("dyllm_models::grouped_mm", mutates_args=())
def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``input [M, K]`` rows ``offs[g - 1]:offs[g]`` times ``weight[g] [K, N]``; rows past ``offs[-1]`` are 0."""
    out = input.new_zeros(input.shape[0], weight.shape[2])
    start = 0
    for group, end in enumerate(offs.tolist()):  # one host sync per call, as transformers' fallback
        out[start:end] = input[start:end] @ weight[group]
        start = end
    return out


@grouped_mm.register_fake
def _(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return input.new_empty(input.shape[0], weight.shape[2])
