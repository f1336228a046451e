import pytest
import torch

import dyllm_compile.backend as backend_mod
from dyllm_compile.config import DyllmConfig, option_docs, option_names


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
