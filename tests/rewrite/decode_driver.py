"""Drives a model through a diffusion-like sequence of calls: all response rows masked, then a few unmasked
per call, deterministically, so a compiled model and a reference see exactly the same inputs."""

from __future__ import annotations

import torch


def decode_inputs(entry, batch: int, prompt: int, response: int, calls: int, seed: int = 0):
    """Yields the argument tuples of successive calls (each a fresh tensor, as decoding loops make)."""
    (ids, *rest) = entry.inputs(batch, prompt + response, seed)
    for step in unmasking(ids, prompt, entry.config.mask_token_id, calls, seed):
        yield (step, *rest)


def unmasking(ids: torch.Tensor, prompt: int, mask_id: int, calls: int, seed: int = 0):
    """Yields ``ids`` with every row after ``prompt`` masked, then with a few more unmasked at each call (each a
    fresh tensor)."""
    ids = ids.clone()
    response = ids.shape[1] - prompt
    ids[:, prompt:] = mask_id
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(response, generator=gen) + prompt
    per_call = max(1, response // calls)
    for call in range(calls):
        yield ids.clone()
        ids[:, order[call * per_call : (call + 1) * per_call]] = torch.randint(
            0, mask_id, (ids.shape[0], min(per_call, response - call * per_call)), generator=gen)
