"""Drives a model through a diffusion-like sequence of calls: all response rows masked, then a few unmasked
per call, deterministically, so a compiled model and a reference see exactly the same inputs."""

from __future__ import annotations

import torch

from dyllm_compile.runtime.graph_runtime import last_serial, runtimes


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


#: Below 1 by less than float32 resolves: every row whose value moved at all is recomputed (a row that did not move
#: has cosine 1, or one rounding below it, which makes it salient too: harmless)
NEARLY_ONE = 1 - 1e-12


def band(n: int) -> torch.Tensor:
    """SDPA's additive mask where each token attends to itself and its neighbours: a changed token moves only the
    rows near it."""
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    return torch.zeros(1, 1, n, n).masked_fill(distance > 1, float("-inf"))


def banded_decode(model, mode: str, threshold: float, mask_id: int = 127):
    """``model(ids, mask)`` compiled (aot_eager) vs eager over six unmasking calls of two sequences of 24 tokens
    with a banded mask, equal at every call; the runtime that made sparse calls."""
    torch._dynamo.reset()
    before = last_serial()
    mask = band(24)
    compiled = torch.compile(lambda x: model(x, mask), backend="dyllm",
                             options={"lowering": "aot_eager", "threshold": threshold, "attention_mode": mode})
    ids = torch.randint(0, mask_id - 7, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for x in unmasking(ids, 6, mask_id, 6):
            torch.testing.assert_close(compiled(x.clone()), model(x.clone(), mask), rtol=1e-5, atol=1e-5)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.fallback is None
    return runtime
