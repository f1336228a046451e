"""Drives a model through a diffusion-like sequence of calls: all response rows masked, then a few unmasked
per call, deterministically, so a compiled model and a reference see exactly the same inputs."""

from __future__ import annotations

import torch


def decode_inputs(entry, batch: int, prompt: int, response: int, calls: int, seed: int = 0):
    """Yields the argument tuples of successive calls (each a fresh tensor, as decoding loops make)."""
    mask_id = entry.config.mask_token_id
    (ids, *rest) = entry.inputs(batch, prompt + response, seed)
    ids = ids.clone()
    ids[:, prompt:] = mask_id
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(response, generator=gen) + prompt
    per_call = max(1, response // calls)
    for call in range(calls):
        yield (ids.clone(), *rest)
        ids[:, order[call * per_call : (call + 1) * per_call]] = torch.randint(
            0, mask_id, (batch, min(per_call, response - call * per_call)), generator=gen)
