import logging

import pytest
import torch

import dyllm_compile.backend as backend_mod
from dyllm_compile.config import DyllmConfig, option_docs, option_names
from dyllm_compile.lowering import without_cuda_graphs
from dyllm_compile.models import llada_like


def test_defaults_are_documented():
    cfg = DyllmConfig.from_options(None)
    assert cfg.lowering == "inductor" and cfg.debug_dir is None
    assert [name for name, _, _ in option_docs()] == list(option_names())
    assert all(doc for _, _, doc in option_docs())


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ValueError) as err:
        DyllmConfig.from_options({"treshold": 0.9})
    assert "treshold" in str(err.value)
    for name in option_names():
        assert name in str(err.value)


def test_bad_value_names_valid_choices():
    with pytest.raises(ValueError, match=r"'lowering' must be one of \['inductor', 'aot_eager', 'eager'\]"):
        DyllmConfig.from_options({"lowering": "tvm"})
    with pytest.raises(ValueError, match=r"'row_counts' must be one of \['auto', 'buckets', 'unbacked'\]"):
        DyllmConfig.from_options({"row_counts": "nonzero"})
    with pytest.raises(ValueError, match=r"'output_projection' must be one of \['dense', 'salient'\]"):
        DyllmConfig.from_options({"output_projection": True})


def test_non_mapping_options_rejected():
    with pytest.raises(ValueError, match="must be a dict"):
        DyllmConfig.from_options(["lowering"])
    with pytest.raises(ValueError, match="debug_dir"):
        DyllmConfig.from_options({"debug_dir": 3})


def test_bad_option_surfaces_through_torch_compile():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2, backend="dyllm", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown dyllm option"):
        fn(torch.ones(3))


def _spy_lowering(monkeypatch) -> list:
    seen = []

    def fake_lower(gm, example_inputs, lowering, mode=None):
        seen.append(lowering)
        return gm.forward

    monkeypatch.setattr(backend_mod, "lower", fake_lower)
    return seen


def test_kill_switch_gives_plain_inductor(monkeypatch):
    seen = _spy_lowering(monkeypatch)
    monkeypatch.setenv("DYLLM_DISABLE", "1")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="dyllm", options={"lowering": "eager"})
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == ["inductor"]


def test_lowering_option_is_honoured(monkeypatch):
    seen = _spy_lowering(monkeypatch)
    monkeypatch.delenv("DYLLM_DISABLE", raising=False)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x - 1, backend="dyllm", options={"lowering": "aot_eager"})
    fn(torch.ones(2))
    assert seen == ["aot_eager"]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_cuda_graphs_of_a_mode_are_off_for_the_rewritten_graph(monkeypatch, caplog, mode):
    """A mode with CUDA graphs would replay the variants into the memory of their last outputs, the caches a
    sequence keeps: the rewritten graph's variants get the mode's options with CUDA graphs off, and a warning."""
    seen = []

    def fake_lower(gm, example_inputs, lowering, mode=None, **kwargs):
        seen.append(mode)
        return gm.forward

    monkeypatch.setattr(backend_mod, "lower", fake_lower)
    torch._dynamo.reset()
    compiled = torch.compile(llada_like("tiny"), backend="dyllm", mode=mode)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="dyllm_compile"):
        compiled(torch.randint(0, 100, (1, 12)))
    cuda_graphs = mode != "max-autotune-no-cudagraphs"
    assert seen and all(m == (without_cuda_graphs(mode) if cuda_graphs else mode) for m in seen)
    if cuda_graphs:
        assert seen[0]["triton.cudagraphs"] is False and bool(seen[0].get("max_autotune")) == (mode == "max-autotune")
    assert ("CUDA graphs are off" in caplog.text) == cuda_graphs
