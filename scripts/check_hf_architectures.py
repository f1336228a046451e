"""Threshold 1 against dense on Hugging Face decoder architectures the test suite does not build.

Each architecture is built tiny (random weights, 2 layers, width 64, SDPA attention, called with a full 4-d mask as
a diffusion LM runs its layers, and positions 0, 1, ... where its forward takes them), compiled with
``backend="dyllm"`` at threshold 1 (``aot_eager`` lowering) and decoded with ``dyllm_compile.generate``; every
call's logits are compared with the eager model's (``torch.testing``'s fp32 tolerances; beyond them, dyllm's must be
as close to a float64 copy of the model as eager's, within 2x: a model that amplifies rounding). Printed per
architecture: the largest difference, whether the tokens equal the eager decode's, the sparse calls, any fallback to
the graph without the rewrite, the share of matmul FLOPs gated (``explain``) and the dense reasons. A model that
fails eagerly (a config these defaults do not fit) is reported and skipped. Exits 1 if any architecture differs from
dense.

    .venv/bin/python scripts/check_hf_architectures.py Mistral Qwen3 Gemma3Text:Gemma3 Bamba attn_layer_indices=[1]
    .venv/bin/python scripts/check_hf_architectures.py @scripts/hf_architecture_configs.txt

NAME is the prefix of transformers' classes (NAME + "Config", NAME + "ForCausalLM"); CONFIG:MODEL where the two
differ. KEY=VALUE after a name sets that config field (a Python literal: a hybrid's layer pattern, so that its two
layers hold an attention layer; ``attn_implementation='eager'`` for a model without SDPA attention). @FILE reads
arguments from a file, shell-quoted, any number a line, ``#`` comments: the configs the sweeps needed. Needs
transformers 5 for most names.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import logging
import shlex
import sys
import warnings
from typing import Any, Callable

import torch
import transformers

import dyllm_compile
from dyllm_compile.generate import generate
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

MASK = 127
SIZE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# torch.testing.assert_close's fp32 tolerances (MiniCPM3's logits reach 20: 1.1e-5 there is rounding noise)
RTOL, ATOL = 1.3e-6, 1e-5


def configure(name: str, settings: dict[str, Any]) -> tuple[Any, type]:
    """The tiny config of ``name`` with ``settings``, and its causal LM class."""
    config_name, _, model_name = name.partition(":")
    config = getattr(transformers, f"{config_name}Config")(**{**SIZE, **settings})
    config._attn_implementation = settings.get("attn_implementation", "sdpa")  # eager for hand-written attention
    config.use_cache = False
    return config, getattr(transformers, f"{model_name or config_name}ForCausalLM")


def build(name: str, settings: dict[str, Any]) -> torch.nn.Module:
    config, model_class = configure(name, settings)
    torch.manual_seed(0)
    return model_class(config).eval()


def check(name: str, settings: dict[str, Any]) -> bool:
    """Prints one line for ``name`` built with the config fields ``settings``; False where dyllm differs from dense
    (or fails)."""
    try:
        model = build(name, settings)
        forward = _forward(model)
        prompt = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            dense = generate(forward, prompt, mask_token_id=MASK, gen_length=16, steps=8)
    except Exception as err:  # the model itself, before dyllm: not a finding of this check
        print(f"{name}: skipped, the model fails eagerly ({type(err).__name__}: {str(err)[:120]})")
        return True
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    worst, close, calls = 0.0, True, []

    def compared(ids: torch.Tensor) -> torch.Tensor:
        nonlocal worst, close
        got = compiled(ids)
        expected = forward(ids)
        worst = max(worst, (got - expected).abs().max().item())
        close = close and torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
        calls.append((ids.clone(), got.clone(), expected.clone()))
        return got

    try:
        with torch.inference_mode():
            sparse = generate(compared, prompt, mask_token_id=MASK, gen_length=16, steps=8)
        report = dyllm_compile.explain(forward, prompt, verbose=False)
    except Exception as err:
        print(f"{name}: FAILED under dyllm ({type(err).__name__}: {str(err)[:200]})")
        return False
    stats = [r.stats for r in runtimes(before)]
    noise = ""
    if not close:  # beyond fp32 tolerances: as close to the fp64 model as eager fp32 is (2x), or not close
        eager_error, dyllm_error = _errors_against_fp64(model, calls)
        close = dyllm_error <= 2 * eager_error
        noise = f" (eager fp32 is {eager_error:.1e} off the fp64 model, dyllm {dyllm_error:.1e})"
    gated, total = report.gated_flops()
    same = torch.equal(sparse.tokens, dense.tokens)
    # Tokens that differ while every call's logits match: near-ties (a model without positions, whose runs of mask
    # tokens have nearly equal confidences), if eager's own decode changes under noise of the size of the difference
    tie = not same and close and not torch.equal(_perturbed(forward, prompt, worst).tokens, dense.tokens)
    fallback = [s.fallback for s in stats if s.fallback]
    reasons = [reason for graph in report.graphs for reason in graph.dense_reasons]
    tokens = "equal" if same else f"differ as eager's do with noise of {worst:.0e} (near-ties)" if tie else "DIFFER"
    print(f"{name}: largest difference {worst:.1e}{noise}{'' if close else ' (NOT CLOSE)'}, tokens {tokens}, "
          f"{sum(s.sparse_calls for s in stats)} sparse calls, {100 * gated / max(1, total):.0f}% of FLOPs gated"
          + (f", FALLBACK {fallback}" if fallback else "") + (f"; dense: {'; '.join(reasons)}" if reasons else ""))
    return close and (same or tie) and not fallback


def _forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of ``model`` for token ids, every position attending to every other (a full 4-d mask), at
    positions 0, 1, ... given as such where the model takes them (OPT would count them from a 2-d mask)."""
    dtype = next(model.parameters()).dtype
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        positions = {"position_ids": torch.arange(length).expand(batch, length)} if takes_positions else {}
        mask = torch.zeros(batch, 1, length, length, dtype=dtype)
        return model(input_ids=ids, attention_mask=mask, **positions).logits

    return forward


def _errors_against_fp64(model: torch.nn.Module, calls: list) -> tuple[float, float]:
    """The largest difference from a float64 copy of ``model`` over the decode's calls (ids, dyllm's logits,
    eager's logits), of eager's logits and of dyllm's."""
    exact = _forward(copy.deepcopy(model).double())
    eager = dyllm = 0.0
    with torch.inference_mode():
        for ids, got, expected in calls:
            reference = exact(ids)
            eager = max(eager, (expected.double() - reference).abs().max().item())
            dyllm = max(dyllm, (got.double() - reference).abs().max().item())
    return eager, dyllm


def _perturbed(forward: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, size: float) -> Any:
    """The eager decode with uniform noise of at most ``size`` added to every logit of every call."""
    noise = torch.Generator().manual_seed(2)

    def noisy(ids: torch.Tensor) -> torch.Tensor:
        logits = forward(ids)
        return logits + size * (2 * torch.rand(logits.shape, generator=noise) - 1)

    with torch.inference_mode():
        return generate(noisy, prompt, mask_token_id=MASK, gen_length=16, steps=8)


def parse(argv: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(NAME, its settings) for each architecture the command line (or an @FILE in it) names."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)
    parser.add_argument("names", nargs="+", metavar="NAME [KEY=VALUE ...]",
                        help="class prefix, or CONFIG:MODEL; then config fields to set")
    args = parser.parse_args(argv)
    if "=" in args.names[0]:
        parser.error(f"'{args.names[0]}' sets a config field before any architecture is named")
    architectures: list[tuple[str, dict[str, Any]]] = []
    for item in args.names:
        key, is_setting, value = item.partition("=")
        if not is_setting:
            architectures.append((item, {}))
            continue
        try:
            architectures[-1][1][key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"'{item}': the value is not a Python literal")
    return architectures


def main(argv: list[str] | None = None) -> int:
    architectures = parse(argv)
    logging.disable(logging.WARNING)  # the dense reasons are printed; Dynamo's and transformers' notes are not
    warnings.filterwarnings("ignore")
    results = [check(name, settings) for name, settings in architectures]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
