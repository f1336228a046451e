import logging
import re

import pytest
import torch

import dyllm_compile.backend as backend_mod
from dyllm_compile.config import DyllmConfig, option_docs, option_names
from dyllm_compile.lowering import lower, variant_options
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


def _spy_lowering(monkeypatch, record: str = "lowering") -> list:
    """Replaces the backend's lowering by running the graph as it is; each call appends its ``lowering`` (or, with
    ``record="mode"``, its Inductor options) to the list returned."""
    seen = []

    def fake_lower(gm, example_inputs, lowering, mode=None, **kwargs):
        seen.append(mode if record == "mode" else lowering)
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


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_rewritten_graph_gets_the_modes_options_without_cuda_graphs_or_input_assertions(monkeypatch, caplog, mode):
    """A mode with CUDA graphs would replay the variants into the memory of their last outputs, the caches a
    sequence keeps: the rewritten graph's variants get the mode's options with CUDA graphs off, and a warning; and
    without Inductor's input size and alignment assertions (their inputs' layouts are checked elsewhere)."""
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_ALIGNMENT_ASSERTS", raising=False)
    seen = _spy_lowering(monkeypatch, record="mode")
    torch._dynamo.reset()
    compiled = torch.compile(llada_like("tiny"), backend="dyllm", mode=mode)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="dyllm_compile"):
        compiled(torch.randint(0, 100, (1, 12)))
    cuda_graphs = mode in ("reduce-overhead", "max-autotune")
    assert seen and all(m == variant_options(mode) for m in seen)
    assert seen[0]["size_asserts"] is False and seen[0]["alignment_asserts"] is False
    assert seen[0].get("triton.cudagraphs") in (None, False)
    assert bool(seen[0].get("max_autotune")) == (mode in ("max-autotune", "max-autotune-no-cudagraphs"))
    assert ("CUDA graphs are off" in caplog.text) == cuda_graphs


def test_explicit_environment_keeps_inductors_input_assertions(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_SIZE_ASSERTS", "1")
    monkeypatch.delenv("TORCHINDUCTOR_ALIGNMENT_ASSERTS", raising=False)
    assert "size_asserts" not in variant_options(None) and variant_options(None)["alignment_asserts"] is False


def _lowered_code(options: dict) -> str:
    """The code Inductor generates for ``relu(x @ w) + 1`` lowered with ``options``, after checking its result."""
    from torch._inductor.utils import run_and_get_code

    gm = torch.fx.symbolic_trace(lambda x, w: torch.relu(x @ w) + 1)
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    out, code = run_and_get_code(lambda: lower(gm, [x, w], "inductor", options)(x, w))
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, torch.relu(x @ w) + 1)
    return "".join(code)


@pytest.mark.inductor
def test_variants_compile_without_input_assertions(monkeypatch):
    """The options reach Inductor: code compiled with the variants' options checks no input's size or stride,
    the same graph compiled with Inductor's defaults does (one call per input, or from torch 2.14 one call for them
    all: ``assert_size_stride_grouped((arg0_1, arg1_1), ...)``)."""
    monkeypatch.delenv("TORCHINDUCTOR_SIZE_ASSERTS", raising=False)
    for options, checked in ((variant_options(None), False), ({}, True)):
        assert bool(re.search(r"assert_size_stride(_grouped)?\(\(?arg", _lowered_code(options))) == checked


@pytest.mark.parametrize("wrapper, cpp", [(None, False), ("cpp", True), ("python", False)])
def test_wrapper_option_reaches_the_variants(monkeypatch, wrapper, cpp):
    """``cpp`` compiles the variants (dense and sparse) with Inductor's C++ wrapper; ``python``, the default, keeps
    Inductor's."""
    seen = _spy_lowering(monkeypatch, record="mode")
    torch._dynamo.reset()
    options = {} if wrapper is None else {"wrapper": wrapper}
    compiled = torch.compile(llada_like("tiny"), backend="dyllm", options=options)
    with torch.inference_mode():
        compiled(torch.randint(0, 100, (1, 12)))
    assert seen and all(bool(m.get("cpp_wrapper")) == cpp for m in seen)
    assert "cpp_wrapper" not in variant_options(None)


@pytest.mark.inductor
def test_cpp_wrapper_compiles_and_a_graph_it_fails_on_gets_the_python_one(monkeypatch, caplog):
    """The variants' options with ``cpp_wrapper`` reach Inductor (the generated code is C++ with its entry point,
    no Python ``call``); where compiling with the C++ wrapper raises, the graph is compiled again with the Python
    wrapper, with a warning naming the error, and computes the same."""
    from torch._inductor import compile_fx as compile_fx_mod

    options = variant_options(None, cpp_wrapper=True)
    code = _lowered_code(options)
    assert "inductor_entry_impl" in code and "def call(" not in code

    real = compile_fx_mod.compile_fx

    def no_cpp_wrapper(gm, example_inputs, config_patches=None, **kwargs):
        if (config_patches or {}).get("cpp_wrapper"):
            raise RuntimeError("C++ wrapper unavailable here")
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_mod, "compile_fx", no_cpp_wrapper)
    with caplog.at_level(logging.WARNING, logger="dyllm_compile"):
        code = _lowered_code(options)
    assert "def call(" in code
    assert "C++ wrapper failed" in caplog.text and "C++ wrapper unavailable here" in caplog.text
