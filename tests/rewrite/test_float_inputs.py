"""Float token inputs (soft embeddings, a self-conditioning signal such as DiffusionGemma's last logits) that move a
little on every row each call: below threshold 1 a row is changed when its cosine with the row its caches were
computed from falls below the threshold, as an attention context's test; at threshold 1, when it changed at all.

Before, any change made a row changed: a call whose every row moved a little was a dense call, and such a model
never ran a sparse one."""

import torch

from dyllm_compile.models import llada_like
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes


class FromEmbeddings(torch.nn.Module):
    """The reference model's layers and head, called on input embeddings [B, N, D]."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, h):
        rope = self.model.rotary(h.shape[1], h.dtype)
        for layer in self.model.layers:
            h = layer(h, rope, None)
        return self.model.lm_head(self.model.final_norm(h))


def _calls(n_calls, drift, jump_rows):
    """Embeddings [1, 24, D]: every row moved by ``drift`` (relative) a call, and ``jump_rows`` new rows a call."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 24, 64, generator=gen)
    for call in range(n_calls):
        yield h.clone()
        h = h + drift * h.norm(dim=-1, keepdim=True) * torch.randn(h.shape, generator=gen) / 8
        rows = torch.arange(call * jump_rows, (call + 1) * jump_rows) % 24
        h[:, rows] = torch.randn(1, len(rows), 64, generator=gen)


def _run(threshold, drift, calls=6, jump_rows=2):
    torch._dynamo.reset()
    before = last_serial()
    model = FromEmbeddings(llada_like("tiny", n_layers=2)).eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": threshold})
    errors = []
    with torch.inference_mode():
        for h in _calls(calls, drift, jump_rows):
            errors.append(float((compiled(h) - model(h)).abs().max()))
    (runtime,) = runtimes(before)
    return runtime, errors, model  # the runtime keeps a sequence while its weights live


def test_rows_that_moved_less_than_the_threshold_are_not_changed():
    """Every row moves by 1e-3 a call and two rows are new: at threshold 0.99 the calls are sparse, the new rows
    changed; before, every call after the first was dense."""
    runtime, _, _ = _run(0.99, 1e-3)
    assert runtime.stats.sparse_calls == 5
    assert runtime.stats.rows_computed < runtime.stats.rows_dense


def test_at_threshold_one_every_moved_row_is_changed():
    runtime, errors, _ = _run(1.0, 1e-3)
    assert runtime.stats.sparse_calls == 0 and max(errors) < 1e-5  # every row moved: dense calls


def test_small_moves_add_up_to_a_recompute():
    """A row is compared with the input its caches were computed from, not with the last call's: moves of 4% a
    call (cosine about 0.9992 each) pass the threshold 0.995 one at a time, not ten at a time."""
    runtime, _, model = _run(0.995, 4e-2, calls=12, jump_rows=0)
    (states,) = runtime.states.values()
    (h,) = states[-1].tokens
    last = list(_calls(12, 4e-2, 0))[-1]
    cosine = torch.nn.functional.cosine_similarity(h, last, dim=-1)
    assert runtime.stats.sparse_calls > 0 and float(cosine.min()) >= 0.995 - 1e-6
    assert not torch.equal(h, last)  # some rows kept the value they were computed from
