"""Caches never go stale: new prompts, one-token prompt changes, batch / length / dtype changes, weights written in
place (graph breaks: test_graph_breaks.py)."""

import logging

import pytest
import torch

from decode_driver import decode_inputs
from dyllm_compile.generate import generate
from dyllm_compile.models import llada_like
from dyllm_compile.models.zoo import ZOO
from dyllm_compile.passes import analysis
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from oracle import Oracle

MASK = 127
KW = dict(mask_token_id=MASK, gen_length=16, steps=16, block_length=8)


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", **options})


def _prompt(seed, batch=1, length=8):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_prompt_after_prompt_equals_fresh_including_one_token_change():
    model = llada_like("tiny", init_std=0.2)
    a = _prompt(0)
    b = a.clone()
    b[0, 3] = (b[0, 3] + 1) % 100  # differs in one prompt token
    c = _prompt(7)
    fresh = {}
    for name, p in (("b", b), ("c", c)):
        fresh[name] = generate(_compiled(model), p, **KW).tokens
    compiled = _compiled(model)
    generate(compiled, a, **KW)
    assert torch.equal(generate(compiled, b, **KW).tokens, fresh["b"])
    assert torch.equal(generate(compiled, c, **KW).tokens, fresh["c"])


def test_batch_length_and_dtype_changes_start_fresh():
    model = llada_like("tiny", init_std=0.2)
    compiled = _compiled(model)
    for prompt in (_prompt(1), _prompt(2, batch=3), _prompt(3, length=13), _prompt(4)):
        expected = generate(Oracle(model), prompt, **KW).tokens
        assert torch.equal(generate(compiled, prompt, **KW).tokens, expected)
    double = llada_like("tiny", init_std=0.2).double()
    compiled_double = _compiled(double)
    expected = generate(Oracle(double), _prompt(5), **KW).tokens
    assert torch.equal(generate(compiled_double, _prompt(5), **KW).tokens, expected)


def test_weights_written_in_place_start_fresh():
    """Checkpoints loaded in place into one model (``load_state_dict`` copies into the same tensors, so the
    compiled graph and its caches' key stay): the same input again, which would continue its sequence with nothing
    changed and serve every row from the caches, runs dense against the new weights."""
    model = llada_like("tiny", init_std=0.2)
    other = {name: p * 1.5 for name, p in model.named_parameters()}  # another checkpoint's weights
    before = last_serial()
    compiled = _compiled(model)
    x = _prompt(3, length=12)
    with torch.inference_mode():
        compiled(x)
        compiled(x)  # nothing changed: a sparse call from the caches
        model.load_state_dict(other, strict=False)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    assert (runtime.stats.dense_calls, runtime.stats.sparse_calls) == (2, 1)


def test_reset_frees_caches_and_next_call_runs_dense():
    import dyllm_compile
    from dyllm_compile.runtime.graph_runtime import last_serial

    model = llada_like("tiny", init_std=0.2)
    before = last_serial()
    compiled = _compiled(model)
    x = _prompt(3, length=12)
    with torch.inference_mode():
        compiled(x)
        (runtime,) = dyllm_compile.runtimes(before)
        assert runtime.states and runtime.stats.dense_calls == 1
        dyllm_compile.reset()
        assert not runtime.states
        compiled(x)
    assert runtime.stats.dense_calls == 2 and runtime.stats.sparse_calls == 0


def test_a_sequence_in_use_outlives_newer_ones():
    """Sequence states are evicted least recently used first: a decode that goes on while MAX_SEQUENCES other
    prompts start in between keeps its caches (each of its calls runs sparse), and its logits stay the oracle's."""
    import dyllm_compile
    from dyllm_compile.runtime.graph_runtime import MAX_SEQUENCES, last_serial

    model = llada_like("tiny", init_std=0.2)
    before = last_serial()
    compiled = _compiled(model, threshold=1.0)
    with torch.inference_mode():  # every input an inference tensor, as in generate (else Dynamo recompiles)
        x = _prompt(3, length=12)
        x[:, 6:] = MASK
        compiled(x)  # sequence A starts (dense)
        (runtime,) = dyllm_compile.runtimes(before)
        for i in range(MAX_SEQUENCES + 1):
            x = x.clone()
            x[0, 6 + i] = 5  # A goes on: one row unmasked
            logits = compiled(x)
            compiled(_prompt(10 + i, length=12))  # another sequence starts (dense)
        torch.testing.assert_close(logits, model(x))
    assert runtime.stats.sparse_calls == MAX_SEQUENCES + 1
    assert runtime.stats.dense_calls == MAX_SEQUENCES + 2


def test_caches_are_freed_with_the_model_and_never_reach_a_new_one():
    import gc

    import dyllm_compile
    from dyllm_compile.runtime.graph_runtime import last_serial

    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    compiled = _compiled(model)
    x = _prompt(3, length=12)
    x[:, 6:] = MASK
    with torch.inference_mode():
        compiled(x)
    (runtime,) = dyllm_compile.runtimes(before)
    assert runtime.cache_bytes() > 0
    del model, compiled
    gc.collect()
    assert runtime.cache_bytes() == 0 and not runtime.states  # Dynamo keeps the graph, not the caches
    # A new model (whose weights may reuse the freed addresses) starts with a dense call, never old caches.
    other = llada_like("tiny", init_std=0.2, seed=1)
    with torch.inference_mode():
        torch.compile(other, backend="dyllm", options={"lowering": "aot_eager"})(x)
    assert sum(r.stats.dense_calls for r in dyllm_compile.runtimes(before)) == 2


def test_gqa_caches_hold_the_kv_heads_only():
    """The Dream-like model repeats its kv heads (repeat_kv) before attention: K/V caches keep the kv heads."""
    from dyllm_compile.models import dream_like
    from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

    model = dream_like("tiny", init_std=0.2)
    cfg = model.cfg
    assert cfg.n_kv_heads < cfg.n_heads
    before = last_serial()
    compiled = _compiled(model)
    x = _prompt(2, length=12)
    with torch.inference_mode():
        compiled(x)
    (runtime,) = runtimes(before)
    (states,) = runtime.states.values()
    caches = dict(zip((spec.name for spec in runtime.plan.caches), states[0].caches))
    head_dim = cfg.d_model // cfg.n_heads
    for layer in range(cfg.n_layers):
        for which in ("k", "v"):
            assert tuple(caches[f"L{layer}.{which}"].shape) == (1, cfg.n_kv_heads, 12, head_dim)
        assert tuple(caches[f"L{layer}.c"].shape) == (1, cfg.n_heads, 12, head_dim)


@pytest.mark.inductor
@pytest.mark.parametrize("piecewise", [True, False])
def test_caches_and_pieces_get_the_layouts_they_were_compiled_for(piecewise, monkeypatch, caplog):
    """Every variant is compiled for contiguous caches, and each piece for the layouts of its fake inputs. At batch
    1 Inductor returned a dense hand-written site's context as [B, N, H, D] memory viewed as [B, H, N, D]: as a
    cache (torch 2.13, whole graph) or as the next piece's input (torch 2.11 and 2.13, piecewise). Before, the next
    compiled code failed its input stride assertion; now the runtime stores caches contiguous and a piece's input
    that came in another layout is copied, each logged once. (A hand-written site stays dense here because the
    pass that would make it SDPA is switched off, as it was before that pass existed.)"""
    monkeypatch.setattr(analysis.HandWrittenAttention, "edit", staticmethod(lambda gm: gm))
    torch._dynamo.reset()
    before = last_serial()
    entry = ZOO["manual_attention"]
    model = entry.build()
    compiled = torch.compile(model, backend="dyllm", options={"piecewise": piecewise})
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="dyllm_compile"):
        for args in decode_inputs(entry, 1, prompt=6, response=10, calls=4):
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-2, atol=1e-2)
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 3 and not any(site.cached for site in runtime.plan.sites)
    assert all(c.is_contiguous() for states in runtime.states.values() for st in states for c in st.caches)
    copied = [m for m in caplog.messages if "copied" in m]
    assert len(copied) == len(set(copied))  # each said once
