"""Caching policies: selection on constructed inputs, everything-selected equals dense, oracle step by step."""

import pytest
import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.policies import BlockFreeze, CallState, DyllmPolicy, Policy
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from test_oracle import _run


def test_block_freeze_selects_exactly_the_active_block():
    policy = BlockFreeze(block_length=3)
    masked_at_dense = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    active = policy.active_rows(masked_at_dense)
    assert active.int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]
    # Mid-block: rows of the block still masked -> sparse; the hint is the block whatever got unmasked.
    now = masked_at_dense.clone()
    now[0, 2] = now[1, 6] = False
    state = CallState(3, now, now, masked_at_dense, masked_at_dense)
    assert not policy.dense_call(state) and torch.equal(policy.row_hint(state), active)
    # Block finished in every sequence -> dense (the next block opens there).
    done = masked_at_dense & ~active
    assert policy.dense_call(CallState(4, done, done, masked_at_dense, masked_at_dense))
    # In the graph: S_in plus the block; nothing else (frozen), whatever the contexts say.
    salient_in = torch.zeros(2, 8, dtype=torch.bool)
    salient_in[0, 7] = True
    context, cached = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    out = policy.after_attention(salient_in, context, cached, 2, 0, active, 0.99)
    assert torch.equal(out, salient_in | active)


def test_dyllm_policy_selects_rows_whose_context_turned():
    context = torch.randn(1, 2, 5, 8)
    cached = context.clone()
    cached[:, :, 3] = -cached[:, :, 3]  # row 3 points the other way
    salient_in = torch.zeros(1, 5, dtype=torch.bool)
    salient_in[0, 0] = True
    out = DyllmPolicy().after_attention(salient_in, context, cached, 2, 0, None, 0.99)
    assert out.int().tolist() == [[1, 0, 0, 1, 0]]


@pytest.mark.parametrize("bad", ["lru", 3, object(), Policy()])
def test_invalid_policies_are_rejected_at_compile_time(bad):
    with pytest.raises(ValueError, match="policy"):
        DyllmConfig.from_options({"policy": bad})


def test_block_freeze_with_everything_selected_equals_dense():
    # Everything masked at the dense call and one block over the whole sequence: every row is in the block.
    from dyllm_compile.models.zoo import ZOO
    from decode_driver import decode_inputs

    entry = ZOO["llada"]
    model = entry.build()
    torch._dynamo.reset()
    since = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={
        "lowering": "aot_eager", "policy": BlockFreeze(block_length=64), "threshold": 0.3})
    with torch.inference_mode():
        for args in decode_inputs(entry, batch=2, prompt=0, response=16, calls=6):
            torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
    (runtime,) = runtimes(since)
    assert runtime.stats.sparse_calls == 5


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("batch", [1, 3])
def test_block_freeze_matches_oracle(mode, batch):
    # The decoder's blocks are 8 wide: two blocks, so one dense call opens the second.
    lock, oracle = _run("llada", batch, {"policy": "block_freeze", "attention_mode": mode, "mask_token_id": 127},
                        dict(mode=mode, block_freeze=32))
    stats = lock.runtimes[0].stats
    assert stats.dense_calls == 1 and stats.sparse_calls == 15  # 32 >= 16 generated rows: one block
    lock, oracle = _run("llada", batch, {"policy": BlockFreeze(block_length=8), "attention_mode": mode},
                        dict(mode=mode, block_freeze=8))
    stats = lock.runtimes[0].stats
    assert stats.dense_calls == 2 and stats.sparse_calls == 14
    assert 0 < torch.tensor(oracle.fractions).mean() < 1  # really frozen rows


def _guide_example():
    """Executes the worked example of docs/policies.md and returns its policy class."""
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "policies.md")
    (code,) = re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
    namespace = {}
    exec(compile(code, path, "exec"), namespace)
    return namespace["EveryOtherLayer"]


def test_guide_example_policy_is_traced_into_the_graph():
    lock_serial = last_serial()
    from dyllm_compile.models import llada_like

    torch._dynamo.reset()
    model = llada_like("tiny", init_std=0.2)
    policy = _guide_example()()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "policy": policy})
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = 127
    with torch.inference_mode():
        compiled(ids)
        ids[:, 7] = 3
        compiled(ids)
    (runtime,) = runtimes(lock_serial)
    fractions = runtime.stats.salient_fraction
    assert fractions[1] == 1.0 and fractions[0] < 1.0


def test_lowest_fraction_ranks_within_allowed_rows_per_batch_element():
    from dyllm_compile.policies import lowest_fraction

    score = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.8], [0.3, 0.2, 0.1, 0.9, 0.0]])
    allowed = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    # ceil(0.5 * 4) = 2 of row 0's allowed rows, ceil(0.5 * 3) = 2 of row 1's.
    assert lowest_fraction(score, 0.5, allowed).int().tolist() == [[0, 1, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert lowest_fraction(score, 1.0).all() and not lowest_fraction(score, 0.0).any()


def test_dllm_cache_and_es_dllm_plans_on_constructed_states():
    from dyllm_compile.policies import DllmCache, EsDllm

    response = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    changed = torch.tensor([[0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    policy = DllmCache(prompt_interval=6, response_interval=3, update_fraction=0.5)
    state = lambda calls: CallState(calls, changed, response, response, response)  # noqa: E731
    assert [policy.dense_call(state(c)) for c in range(1, 8)] == [False] * 5 + [True, False]
    assert torch.equal(policy.first_rows(state(3)), changed | response)
    assert torch.equal(policy.first_rows(state(4)), changed)
    context, cached = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    cached[:, :, :2] = context[:, :, :2] * -1  # prompt rows changed most, but they are not response rows
    out = policy.after_attention(changed, context, cached, 2, 0, response, 0.99)
    assert not out[0, :2].any() and int(out[0, 2:].sum()) >= 2
    es = EsDllm(early_layers=2, keep_fraction=0.5)
    assert es.first_rows(state(1)).all()
    assert es.after_attention(changed, context, cached, 2, 0, changed, 0.99).all()
    picked = es.after_attention(torch.ones_like(changed), context, cached, 2, 1, changed, 0.99)
    assert picked[0, 3] and int(picked.sum()) <= 4  # changed row + ceil(0.5 * 6) ranked rows
    later = es.after_attention(picked, context, cached, 2, 2, changed, 0.99)
    assert torch.equal(later, picked)


def _cosine(c, c_old):
    return torch.nn.functional.cosine_similarity(c.transpose(1, 2).flatten(2), c_old.transpose(1, 2).flatten(2),
                                                 dim=-1)


def _lowest(score, fraction, allowed):
    """Independent of the policy code: per row of the batch, sort the allowed scores and take the first ones."""
    out = torch.zeros_like(allowed)
    for b in range(score.shape[0]):
        idx = allowed[b].nonzero().flatten()
        count = int(torch.ceil(torch.tensor(fraction * idx.numel())))
        order = idx[torch.sort(score[b, idx], stable=True).indices]
        out[b, order[:count]] = True
    return out


class DllmCacheRules:
    def __init__(self, prompt_interval, response_interval, fraction):
        self.p, self.r, self.f = prompt_interval, response_interval, fraction

    def dense(self, calls):
        return calls % self.p == 0

    def first(self, changed, calls, response):
        return changed | response if calls % self.r == 0 else changed

    def after(self, layer, salient, changed, response, c, c_old):
        return salient | _lowest(_cosine(c, c_old), self.f, response)


class EsDllmRules:
    def __init__(self, early, fraction):
        self.early, self.f = early, fraction

    def dense(self, calls):
        return False

    def first(self, changed, calls, response):
        return torch.ones_like(changed)

    def after(self, layer, salient, changed, response, c, c_old):
        if layer < self.early - 1:
            return torch.ones_like(salient)
        if layer == self.early - 1:
            return changed | _lowest(_cosine(c, c_old), self.f, torch.ones_like(salient))
        return salient


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("name, options, rules", [
    ("dllm_cache", {"policy": "dllm_cache"}, DllmCacheRules(50, 8, 0.25)),
    ("dllm_cache_short", {"policy": __import__("dyllm_compile.policies").policies.DllmCache(5, 3, 0.25)},
     DllmCacheRules(5, 3, 0.25)),
    ("es_dllm", {"policy": "es_dllm"}, EsDllmRules(1, 0.25)),
])
def test_dllm_cache_and_es_dllm_match_oracle(mode, name, options, rules):
    lock, oracle = _run("llada", 3, {**options, "attention_mode": mode, "mask_token_id": 127},
                        dict(mode=mode, rules=rules))
    assert lock.steps == 16
    assert 0 < torch.tensor(oracle.fractions).mean() < 1


@pytest.mark.parametrize("policy", ["dllm_cache", "es_dllm"])
def test_everything_selected_equals_dense(policy):
    from dyllm_compile.models.zoo import ZOO
    from dyllm_compile.policies import DllmCache, EsDllm
    from decode_driver import decode_inputs

    chosen = DllmCache(50, 1, 1.0) if policy == "dllm_cache" else EsDllm(1, 1.0)
    entry = ZOO["llada"]
    model = entry.build()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "policy": chosen})
    with torch.inference_mode():
        # No prompt: every row is a response row, so dllm_cache's response refresh covers the sequence.
        for args in decode_inputs(entry, batch=2, prompt=0, response=16, calls=6):
            torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)
