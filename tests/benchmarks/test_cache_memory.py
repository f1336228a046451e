"""roofline.cache_bytes, the cache memory the benchmarks and README quote for the full-size shapes, equals what the
runtime holds after a sparse call, on the reference architectures (MHA and GQA) and in each mode."""

import pytest
import torch
from bench_modules import load

from dyllm_compile.models import dream_like, llada_like
from dyllm_compile.models.presets import llada_config
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

MODELS = {"llada": llada_like, "dream": dream_like}
MASK = 127


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("mode,pruning", [("paper", 0), ("exact", 0), ("exact", 4)], ids=["paper", "exact", "qp"])
def test_cache_bytes_equal_the_runtimes(arch, mode, pruning):
    roofline = load("roofline")
    torch._dynamo.reset()
    serial = last_serial()
    model = MODELS[arch]("tiny")
    compiled = torch.compile(model, backend="dyllm", options={
        "lowering": "aot_eager", "attention_mode": mode, "query_pruning_period": pruning, "mask_token_id": MASK})
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 12:] = MASK
    with torch.inference_mode():
        compiled(ids)
        ids[:, 12] = 7
        compiled(ids)
    held = sum(r.cache_bytes() for r in runtimes(serial))
    cfg = model.cfg
    assert held == roofline.cache_bytes(roofline.Shape.of(cfg), cfg.n_heads, 20, mode, 4, batch=2,
                                        projection_cache=pruning > 0)


def test_llada_8b_cache_is_about_one_and_a_half_gigabytes_in_paper_mode():
    # DEVELOPERS.md's figure: K, V, context and FFN output per layer plus logits, 1150 tokens, bf16.
    roofline = load("roofline")
    cfg = llada_config("8b")
    paper = roofline.cache_bytes(roofline.Shape.of(cfg), cfg.n_heads, 1150, "paper", 2)
    exact = roofline.cache_bytes(roofline.Shape.of(cfg), cfg.n_heads, 1150, "exact", 2)
    assert 1.45e9 < paper < 1.55e9 and 0.3e9 < exact - paper < 0.33e9
