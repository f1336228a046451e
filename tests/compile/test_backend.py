import pytest
import torch

from dyllm_compile.generate import generate


def _compile_and_compare(model, lowering):
    torch._dynamo.reset()
    x = torch.randint(0, 127, (2, 12))
    compiled = torch.compile(model, backend="dyllm", options={"lowering": lowering})
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_aot_eager_lowering_matches_eager(tiny_dream):
    _compile_and_compare(tiny_dream, "aot_eager")


@pytest.mark.inductor
def test_inductor_lowering_matches_eager(tiny_llada):
    _compile_and_compare(tiny_llada, "inductor")


@pytest.mark.parametrize("row_counts", ["unbacked", "buckets"])  # dense calls through the sparse variant, or not
def test_a_variant_that_fails_to_compile_leaves_the_graph_unrewritten(tiny_llada, monkeypatch, caplog, row_counts):
    """A bug of the rewrite (or of a compiler on its graph) must not fail the model: the graph runs as compiled
    without the rewrite from then on, with a warning naming the error, and ``stats.fallback`` says why."""
    from dyllm_compile.runtime import graph_runtime

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(graph_runtime, "build_sparse", broken)
    _assert_decode_falls_back(tiny_llada, row_counts, caplog,
                              "compiling the sparse variant failed (RuntimeError: a bug)")


def _assert_decode_falls_back(model, row_counts, caplog, why):
    """A decode equal to eager, the graph run without the rewrite from its first sparse call on, ``why`` the
    runtime's fallback reason, warned once."""
    from dyllm_compile.runtime import graph_runtime

    torch._dynamo.reset()
    before = graph_runtime.last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "row_counts": row_counts})
    prompt = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="dyllm_compile"):
        got, expected = (generate(m, prompt, mask_token_id=127, gen_length=6, steps=3, block_length=6).generated
                         for m in (compiled, model))
    assert torch.equal(got, expected)
    (runtime,) = graph_runtime.runtimes(before)
    assert runtime.stats.fallback == why
    assert runtime.stats.sparse_calls == 0 and not runtime.states
    assert sum(f"{why}; it runs as compiled without the rewrite" in m for m in caplog.messages) == 1


def _failing_when_run(real_lower):
    """``lower`` whose sparse variants compile but raise when called: a bug of the rewrite that only running shows."""

    def lower(gm, *args, **kwargs):
        fn = real_lower(gm, *args, **kwargs)
        if not any(n.op == "placeholder" and n.name == "salient_in" for n in gm.graph.nodes):
            return fn

        def failing(*inputs):
            raise RuntimeError("a runtime bug")
        return failing
    return lower


@pytest.mark.parametrize("row_counts", ["unbacked", "buckets"])
def test_a_variant_that_fails_when_run_leaves_the_graph_unrewritten(tiny_llada, monkeypatch, caplog, row_counts):
    """A compiled variant that raises when called (before, the error reached the model's caller) is the rewrite's
    when the graph as Dynamo handed it over runs on the same inputs: from then on the graph runs without the rewrite,
    warned once, and the decode equals eager."""
    from dyllm_compile import backend

    monkeypatch.setattr(backend, "lower", _failing_when_run(backend.lower))
    _assert_decode_falls_back(tiny_llada, row_counts, caplog, "running a variant failed (RuntimeError: a runtime bug)")


def test_an_input_the_model_itself_fails_on_raises_its_own_error_and_keeps_the_rewrite(tiny_llada):
    """A token id outside the embedding fails the sparse variant and the graph as handed over alike: the caller gets
    the model's own error, and the next calls run sparse as before (no fallback)."""
    from dyllm_compile.runtime import graph_runtime

    torch._dynamo.reset()
    before = graph_runtime.last_serial()
    compiled = torch.compile(tiny_llada, backend="dyllm", options={"lowering": "aot_eager"})
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = 127  # the response, masked
    with torch.inference_mode():
        compiled(ids.clone())
        bad = ids.clone()
        bad[0, 8] = 10_000
        with pytest.raises(IndexError, match="index out of range"):
            compiled(bad)
        ids[1, 9] = 7
        torch.testing.assert_close(compiled(ids.clone()), tiny_llada(ids), rtol=1e-4, atol=1e-4)
    (runtime,) = graph_runtime.runtimes(before)
    assert runtime.stats.fallback is None and runtime.stats.sparse_calls == 1
