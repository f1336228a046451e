"""Caching policies: selection on constructed inputs, everything-selected equals dense, oracle step by step."""

import pytest
import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.policies import BlockFreeze, CallState, DyllmPolicy, Policy
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from test_oracle import _run, in_both_modes


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


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_block_freeze_with_everything_selected_equals_dense(arch):
    # Everything masked at the dense call and one block over the whole sequence: every row is in the block.
    from dyllm_compile.models.zoo import ZOO
    from decode_driver import decode_inputs

    entry = ZOO[arch]
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
@pytest.mark.parametrize("arch, batch", [("llada", 1), ("llada", 3), ("dream", 3)])
def test_block_freeze_matches_oracle(mode, arch, batch):
    # The decoder's blocks are 8 wide: two blocks, so one dense call opens the second.
    lock, oracle = _run(arch, batch, {"policy": "block_freeze", "attention_mode": mode, "mask_token_id": 127},
                        dict(mode=mode, block_freeze=32))
    stats = lock.runtimes[0].stats
    assert stats.dense_calls == 1 and stats.sparse_calls == 15  # 32 >= 16 generated rows: one block
    lock, oracle = _run(arch, batch, {"policy": BlockFreeze(block_length=8), "attention_mode": mode},
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
    values = torch.randn(1, 2, 6, 4)
    cached = values.clone()
    cached[:, :, :2] *= -1  # prompt rows changed most, but they are not response rows
    cached[:, :, 4] *= -1  # the response row whose values turned
    out = policy.before_attention(changed, values, cached, 2, 0, response, 0.99)
    # changed row 3, plus ceil(0.5 * 4) = 2 lowest-cosine response rows: row 4 (turned), row 3 or another
    assert out[0, 3] and out[0, 4] and not out[0, :2].any() and 2 <= int(out.sum()) <= 3
    assert DllmCache.hooks() == {"before_attention"}
    context = torch.randn(1, 2, 6, 4)
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

    def before(self, layer, salient, changed, response, v, v_old):
        return salient | _lowest(_cosine(v, v_old), self.f, response)

    def after(self, layer, salient, changed, response, c, c_old):
        return salient


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


_POLICY_RULES = [
    ("dllm_cache", {"policy": "dllm_cache"}, DllmCacheRules(50, 8, 0.25)),
    ("dllm_cache_short", {"policy": __import__("dyllm_compile.policies").policies.DllmCache(5, 3, 0.25)},
     DllmCacheRules(5, 3, 0.25)),
    ("es_dllm", {"policy": "es_dllm"}, EsDllmRules(1, 0.25)),
]


# Each policy in both modes, on the two architectures in turn: every pair of policy, mode and architecture runs,
# not every triple (6 decodes, not 12).
@pytest.mark.parametrize("mode, name, options, rules, arch", [
    pytest.param(mode, *policy, arch, id=f"{arch}-{policy[0]}-{mode}")
    for policy, mode, arch in in_both_modes(_POLICY_RULES, ("llada", "dream"))])
def test_dllm_cache_and_es_dllm_match_oracle(mode, name, options, rules, arch):
    lock, oracle = _run(arch, 3, {**options, "attention_mode": mode, "mask_token_id": 127},
                        dict(mode=mode, rules=rules))
    assert lock.steps == 16
    assert 0 < torch.tensor(oracle.fractions).mean() < 1


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("policy", ["dllm_cache", "es_dllm"])
def test_everything_selected_equals_dense(policy, arch):
    from dyllm_compile.models.zoo import ZOO
    from dyllm_compile.policies import DllmCache, EsDllm
    from decode_driver import decode_inputs

    chosen = DllmCache(50, 1, 1.0) if policy == "dllm_cache" else EsDllm(1, 1.0)
    entry = ZOO[arch]
    model = entry.build()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "policy": chosen})
    with torch.inference_mode():
        # No prompt: every row is a response row, so dllm_cache's response refresh covers the sequence.
        for args in decode_inputs(entry, batch=2, prompt=0, response=16, calls=6):
            torch.testing.assert_close(compiled(*args), model(*args), atol=1e-5, rtol=1e-5)


class AllHooks(Policy):
    """A policy at every hook point: values before attention, contexts after, branch inputs at each branch."""

    def before_attention(self, salient_in, values, cached, axis, layer, hint, threshold):
        from dyllm_compile.policies import lowest_fraction, row_cosine

        return salient_in | lowest_fraction(row_cosine(values, cached, axis), 0.125)

    def after_attention(self, salient_in, context, cached, axis, layer, hint, threshold):
        return salient_in

    def at_branch(self, salient_in, inputs, cached, axis, layer, hint, threshold):
        from dyllm_compile.policies import lowest_fraction, row_cosine

        return salient_in | lowest_fraction(row_cosine(inputs, cached, axis), 0.125)


class AllHooksRules:
    def dense(self, calls):
        return False

    def first(self, changed, calls, response):
        return changed

    def before(self, layer, salient, changed, response, v, v_old):
        return salient | _lowest(_cosine(v, v_old), 0.125, torch.ones_like(salient))

    def after(self, layer, salient, changed, response, c, c_old):
        return salient

    def branch(self, layer, salient, changed, response, x, x_old):
        cos = torch.nn.functional.cosine_similarity(x, x_old, dim=-1)
        return salient | _lowest(cos, 0.125, torch.ones_like(salient))


@pytest.mark.parametrize("mode, arch", [("paper", "llada"), ("exact", "llada"), ("exact", "folded_ffn")])
def test_every_hook_point_matches_oracle(mode, arch):
    """folded_ffn: the FFN's input has the batch folded into its rows ([B * N, D]); the hook compares it, and its
    cache merges it, as [B, N, D]."""
    assert AllHooks.hooks() == {"before_attention", "after_attention", "at_branch"}
    lock, oracle = _run(arch, 3, {"policy": AllHooks(), "attention_mode": mode},
                        dict(mode=mode, rules=AllHooksRules()))
    assert lock.steps == 16
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    names = [c.name for c in runtime.plan.caches]
    assert "L0.ffn.in" in names and "head.lm_head.in" in names  # branch inputs cached only for this policy
    assert 0 < torch.tensor(oracle.fractions).mean() < 1


def test_hooks_are_traced_only_where_overridden():
    from dyllm_compile.policies import DllmCache, EsDllm

    assert DyllmPolicy.hooks() == {"after_attention"} and EsDllm.hooks() == {"after_attention"}
    assert BlockFreeze.hooks() == {"after_attention"} and DllmCache.hooks() == {"before_attention"}


def test_values_hook_needs_the_v_chain_inputs_before_the_k_chain_ends():
    """Graph order k_proj(x) -> k ends -> y = mix(x) -> v_proj(y): a values hook cannot run before k is cached."""
    from torch import fx

    from dyllm_compile.passes.regions import Region
    from dyllm_compile.passes.rewrite_plan import SitePlan, _plan_values

    graph = fx.Graph()
    x = graph.placeholder("x")
    k = graph.call_function(torch.neg, (x,))
    y = graph.call_function(torch.cumsum, (x, 1))  # a token-mixing op: not part of any chain
    v = graph.call_function(torch.neg, (y,))
    site = type("Site", (), {"layer": 0})()
    early = {"k": Region("k", k, [k], [x], [], 1), "v": Region("v", v, [v], [x], [], 1)}
    assert _plan_values(SitePlan(site, True), early, graph).values is early["v"]
    late = {"k": early["k"], "v": Region("v", v, [v], [y], [], 1)}
    plan = _plan_values(SitePlan(site, True), late, graph)
    assert not plan.cached and "v chain's inputs come after the k chain" in plan.reason
