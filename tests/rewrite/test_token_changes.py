"""``token_changes``: which changes of token ids continue a sequence. A uniform-noise diffusion sampler
(DiffusionGemma's) re-noises rows with random tokens instead of unmasking them: by default (``unmask``) every such
call starts a new sequence and runs dense; with ``any`` the calls continue it, each changed row recomputed, and
equal dense at a threshold that recomputes every row that moved."""

import pytest
import torch

from decode_driver import NEARLY_ONE
from dyllm_compile.models import llada_like
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes


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


class _TwoIdInputs(torch.nn.Module):
    """Two token-id inputs, each through the same model: a call continues a sequence only if both continue it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = llada_like("tiny", init_std=0.2)

    def forward(self, ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.model(ids) + self.model(other)


def test_a_mask_id_inferred_by_a_call_that_starts_a_new_sequence_is_not_kept():
    """The mask id is inferred from a sequence's first change. A call whose first input changes only rows that held
    one id (7) but whose second input changes a row that did not hold it starts a new sequence: the state it was
    tested against must not keep 7 as its mask id, or its true continuation (the mask id 99 unmasked) would start a
    new sequence too and run dense."""
    torch._dynamo.reset()
    model = _TwoIdInputs()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": NEARLY_ONE})
    ids, other = torch.full((1, 16), 99), torch.arange(16)[None]
    ids[0, :4] = 7
    not_continued = ids.clone(), other.clone()
    not_continued[0][0, 0], not_continued[1][0, 5] = 8, 50
    continued = ids.clone(), other
    continued[0][0, 10] = 3
    with torch.inference_mode():
        for args in [(ids, other), not_continued, continued]:
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    assert (runtime.stats.dense_calls, runtime.stats.sparse_calls) == (2, 1)
