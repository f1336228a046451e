"""``token_changes``: which changes of token ids continue a sequence. A uniform-noise diffusion sampler
(DiffusionGemma's) re-noises rows with random tokens instead of unmasking them: by default (``unmask``) every such
call starts a new sequence and runs dense; with ``any`` the calls continue it, each changed row recomputed, and
equal dense at a threshold that recomputes every row that moved."""

import pytest
import torch

from dyllm_compile.models import llada_like
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

NEARLY_ONE = 1 - 1e-12


def _renoising(calls: int, n: int = 32, per_call: int = 3):
    """Token ids whose ``per_call`` rows a call get new random tokens (no mask id anywhere)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (1, n), generator=gen)
    for _ in range(calls):
        yield ids.clone()
        ids[0, torch.randperm(n, generator=gen)[:per_call]] = torch.randint(0, 100, (per_call,), generator=gen)


@pytest.mark.parametrize("token_changes, sparse", [("unmask", False), ("any", True)])
def test_renoised_rows_continue_the_sequence_only_with_any(token_changes, sparse):
    torch._dynamo.reset()
    model = llada_like("tiny", init_std=0.2)
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={
        "lowering": "aot_eager", "threshold": NEARLY_ONE, "token_changes": token_changes})
    with torch.inference_mode():
        for ids in _renoising(6):
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == (5 if sparse else 0)
    assert runtime.stats.dense_calls == (1 if sparse else 6)
