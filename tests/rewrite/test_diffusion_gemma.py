"""DiffusionGemma (transformers 5.25), a diffusion LM the compiler was not written for, unmodified: its decoder
denoises a canvas attending to the prompt's KV cache (an attention site with a prefix: passes/attention_sites.py)
and to itself, and runs MoE layers (Hugging Face's ``batched_mm`` experts: per-row weight gathers and a batched
product, row-wise: passes/op_rules.py; its default, ``grouped_mm``: rows sorted by expert, passes/sorted_rows.py).
Before, no attention site was found in its graph and nothing was gated."""

import pytest
import torch

from decode_driver import NEARLY_ONE, unmasking
from dyllm_compile.explain import explain
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no DiffusionGemma (5.25 has)", allow_module_level=True)

from dyllm_compile.models.diffusion_gemma import diffusion_gemma_like as diffusion_gemma  # noqa: E402

MASK = 127


def test_decoder_sites_have_the_prompt_cache_as_prefix_and_moe_is_gated():
    model, step = diffusion_gemma()
    with torch.inference_mode():
        report = explain(step, torch.randint(0, MASK, (1, 8)), None, verbose=False, lowering="aot_eager")
    (graph,) = report.graphs
    assert len(graph.sites) == 2 and all(s.prefix_k is not None and s.prefix_first for s in graph.sites)
    for site in graph.sites:  # the encoder's cached keys and values, inputs of the graph
        assert site.prefix_k.op == site.prefix_v.op == "placeholder"
    roles = sorted((r.role, r.layer) for r in graph.gated_regions)
    assert ("moe", 0) in roles and ("moe", 1) in roles and ("lm_head", 1) in roles
    assert all(chains["k"].gated and chains["v"].gated for chains in graph.chains)


def _decode(step, calls, options, self_conditioning=False):
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(step, backend="dyllm", options={"lowering": "aot_eager", **options})
    canvas = torch.randint(0, MASK, (1, 8), generator=torch.Generator().manual_seed(3))
    logits = None
    with torch.inference_mode():
        for x in unmasking(canvas, 0, MASK, calls):
            expected = step(x, logits)
            torch.testing.assert_close(compiled(x, logits), expected, rtol=1e-5, atol=1e-5)
            logits = expected if self_conditioning else None
    return [r for r in runtimes(before) if r.stats.dense_calls or r.stats.sparse_calls]


def test_denoising_steps_equal_dense():
    """The canvas unmasked a few tokens a call, at a threshold that recomputes every row that moved: every call
    dense-equal, through the sparse variant with every site cached."""
    _, step = diffusion_gemma()
    (runtime,) = _decode(step, 6, {"threshold": NEARLY_ONE})
    assert runtime.stats.sparse_calls == 5 and all(s.cached for s in runtime.plan.sites)
    assert {r.role for r in runtime.plan.regions} >= {"k", "v", "q", "moe", "lm_head"}


def test_self_conditioned_steps_equal_dense():
    """The generation loop's own inputs: the last step's logits condition every canvas row (an input that moves
    on every row)."""
    _, step = diffusion_gemma()
    runtimes_ = _decode(step, 5, {"threshold": NEARLY_ONE}, self_conditioning=True)
    assert sum(r.stats.dense_calls + r.stats.sparse_calls for r in runtimes_) == 5


def test_renoised_steps_equal_dense_with_token_changes_any():
    """Its sampler re-noises rows with random tokens (no mask id): with ``token_changes="any"`` the steps continue
    the sequence, sparse, and equal dense at a threshold that recomputes every row that moved."""
    _, step = diffusion_gemma()
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(step, backend="dyllm", options={
        "lowering": "aot_eager", "threshold": NEARLY_ONE, "token_changes": "any"})
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        canvas = torch.randint(0, MASK, (1, 8), generator=gen)
        for _ in range(4):
            torch.testing.assert_close(compiled(canvas, None), step(canvas, None), rtol=1e-5, atol=1e-5)
            canvas = canvas.clone()
            canvas[0, torch.randint(0, 8, (1,), generator=gen)] = torch.randint(0, MASK, (1,), generator=gen)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3


@pytest.mark.parametrize("threshold", [NEARLY_ONE, 1.0])
def test_grouped_mm_experts_are_gated_and_equal_dense(threshold):
    """transformers 5's default experts (on CPU under compile: a sort by expert, its custom grouped product over
    offsets from a histogram of the sorted ids, the inverse permutation): a gated MoE, run on the rows that moved
    (passes/sorted_rows.py; before, it stayed dense: "'sort' along the token axis"), every call dense-equal."""
    _, step = diffusion_gemma(experts="grouped_mm")
    (runtime,) = _decode(step, 6, {"threshold": threshold})
    moe = [r for r in runtime.plan.regions if r.role == "moe"]
    assert [r.layer for r in moe] == [0, 1] and all("grouped_mm_fallback" in r.ops() for r in moe)
    assert runtime.stats.sparse_calls == 5
    assert all("no matmul work" in reason for reason in runtime.plan.analysis.dense_reasons)  # (the norms alone)
