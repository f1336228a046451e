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
    torch._dynamo.reset()
    before = graph_runtime.last_serial()
    compiled = torch.compile(tiny_llada, backend="dyllm", options={"lowering": "aot_eager", "row_counts": row_counts})
    prompt = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="dyllm_compile"):
        got, expected = (generate(m, prompt, mask_token_id=127, gen_length=6, steps=3, block_length=6).generated
                         for m in (compiled, tiny_llada))
    assert torch.equal(got, expected)
    (runtime,) = graph_runtime.runtimes(before)
    assert runtime.stats.fallback == "compiling the sparse variant failed (RuntimeError: a bug)"
    assert runtime.stats.sparse_calls == 0 and not runtime.states
    assert sum("compiling the sparse variant failed (RuntimeError: a bug); it runs as compiled without the rewrite"
               in m for m in caplog.messages) == 1
