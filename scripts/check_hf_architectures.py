"""Threshold 1 against dense on Hugging Face language model architectures the test suite does not build.

Each architecture is built tiny (random weights, 2 layers, width 64, SDPA attention; a causal LM called with a full
4-d mask as a diffusion LM runs its layers, and positions 0, 1, ... where its forward takes them), compiled with
``backend="dyllm"`` at threshold 1 (``aot_eager`` lowering, or ``--lowering inductor``: generated code, whose
layout checks and input handling the fast lowering does not exercise) and decoded with ``dyllm_compile.generate``; every
call's logits are compared with the eager model's (``torch.testing``'s fp32 tolerances; beyond them, dyllm's must be
as close to a float64 copy of the model as eager's, within 2x: a model that amplifies rounding). Printed per
architecture: the largest difference, whether the tokens equal the eager decode's, the sparse calls, any fallback to
the graph without the rewrite, the share of matmul FLOPs gated (``explain``) and the dense reasons. A model that
fails eagerly (a config these defaults do not fit) is reported and skipped. Exits 1 if any architecture differs from
dense or fails under dyllm.

    .venv/bin/python scripts/check_hf_architectures.py Mistral Qwen3 Gemma3Text:Gemma3 Bamba attn_layer_indices=[1]
    .venv/bin/python scripts/check_hf_architectures.py @scripts/hf_architectures.txt --csv out.csv

NAME is the prefix of transformers' classes (NAME + "Config"; NAME + "ForMaskedLM" where there is one, called as it
is, bidirectional; else NAME + "ForCausalLM", given the full mask); CONFIG:MODEL where the two prefixes differ.
KEY=VALUE after a name sets that config field (a Python literal: a hybrid's layer pattern, so that its two layers hold
an attention layer; ``attn_implementation='eager'`` for a model without SDPA attention). @FILE reads arguments from a
file, shell-quoted, any number a line, ``#`` comments: ``scripts/hf_architectures.txt`` lists every architecture the
sweeps ran, with the configs they needed. ``--csv PATH`` also writes a row per architecture (the table in
docs/architectures.md is made from one). Needs transformers 5 for most names.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import datetime
import inspect
import logging
import shlex
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

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
    """The tiny config of ``name`` with ``settings``, and its masked LM class (bidirectional as it is: an encoder
    such as BERT), else its causal LM class."""
    config_name, _, model_name = name.partition(":")
    config = getattr(transformers, f"{config_name}Config")(**{**SIZE, **settings})
    config._attn_implementation = settings.get("attn_implementation", "sdpa")  # eager for hand-written attention
    config.use_cache = False
    prefix = model_name or config_name
    return config, getattr(transformers, f"{prefix}ForMaskedLM", None) or getattr(transformers, f"{prefix}ForCausalLM")


@dataclass
class Result:
    """One architecture's check: ``status`` is "equal" (to dense), "DIFFERS", "FAILED" (under dyllm) or "skipped"
    (the model fails eagerly)."""

    name: str
    status: str
    difference: float = float("nan")  # the largest logit difference from eager over the decode's calls
    tokens: str = ""  # "equal", near-ties, or "DIFFER"
    sparse_calls: int = 0
    gated: float = float("nan")  # percent of matmul FLOPs gated (explain)
    detail: str = ""  # the error, the fp64 comparison, any fallback
    reasons: list[str] = field(default_factory=list)  # why parts stay dense
    model: str = ""  # the class checked

    def line(self) -> str:
        if self.status in ("skipped", "FAILED"):
            return f"{self.name}: {self.status} ({self.detail})"
        return (f"{self.name}: largest difference {self.difference:.1e}, tokens {self.tokens}, {self.sparse_calls} "
                f"sparse calls, {self.gated:.0f}% of FLOPs gated" + (f", {self.detail}" if self.detail else "")
                + (f"; dense: {'; '.join(self.reasons)}" if self.reasons else "") + ("" if self.status == "equal"
                                                                                      else " -- DIFFERS"))


def build(name: str, settings: dict[str, Any]) -> torch.nn.Module:
    config, model_class = configure(name, settings)
    torch.manual_seed(0)
    return model_class(config).eval()


def check(name: str, settings: dict[str, Any], lowering: str = "aot_eager") -> Result:
    """``name`` built with the config fields ``settings``, compiled (``lowering``) and decoded against eager."""
    try:
        model = build(name, settings)
        forward = _forward(model)
        prompt = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            dense = generate(forward, prompt, mask_token_id=MASK, gen_length=16, steps=8)
    except Exception as err:  # the model itself, before dyllm: not a finding of this check
        return Result(name, "skipped", detail=f"the model fails eagerly: {type(err).__name__}: {str(err)[:120]}")
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": lowering, "threshold": 1.0})
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
        return Result(name, "FAILED", detail=f"{type(err).__name__}: {str(err)[:200]}", model=type(model).__name__)
    stats = [r.stats for r in runtimes(before)]
    details = []
    if not close:  # beyond fp32 tolerances: as close to the fp64 model as eager fp32 is (2x), or not close
        eager_error, dyllm_error = _errors_against_fp64(model, calls)
        close = dyllm_error <= 2 * eager_error
        details.append(f"eager fp32 is {eager_error:.1e} off the fp64 model, dyllm {dyllm_error:.1e}"
                       + ("" if close else ": NOT CLOSE"))
    gated, total = report.gated_flops()
    same = torch.equal(sparse.tokens, dense.tokens)
    # Tokens that differ while every call's logits match: near-ties (a model without positions, whose runs of mask
    # tokens have nearly equal confidences), if eager's own decode changes under noise of the size of the difference
    tie = not same and close and not torch.equal(_perturbed(forward, prompt, worst).tokens, dense.tokens)
    fallback = [s.fallback for s in stats if s.fallback]
    reasons = [reason for graph in report.graphs for reason in graph.dense_reasons]
    tokens = "equal" if same else f"differ as eager's do with noise of {worst:.0e} (near-ties)" if tie else "DIFFER"
    if fallback:
        details.append(f"FALLBACK {fallback}")
    return Result(name, "equal" if close and (same or tie) and not fallback else "DIFFERS", worst, tokens,
                  sum(s.sparse_calls for s in stats), 100 * gated / max(1, total), "; ".join(details), reasons,
                  type(model).__name__)


def _forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of ``model`` for token ids, every position attending to every other: a masked LM as it is; a
    causal LM given a full 4-d mask, at positions 0, 1, ... given as such where it takes them (OPT would count them
    from a 2-d mask)."""
    if type(model).__name__.endswith("ForMaskedLM"):
        return lambda ids: model(input_ids=ids).logits
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


def parse(argv: list[str] | None = None) -> tuple[list[tuple[str, dict[str, Any]]], Optional[str], str]:
    """(NAME, its settings) for each architecture the command line (or an @FILE in it) names; the --csv path; the
    lowering."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)
    parser.add_argument("names", nargs="+", metavar="NAME [KEY=VALUE ...]",
                        help="class prefix, or CONFIG:MODEL; then config fields to set")
    parser.add_argument("--csv", metavar="PATH", help="also write one row per architecture to PATH")
    parser.add_argument("--lowering", choices=("aot_eager", "inductor"), default="aot_eager",
                        help="how the rewritten graphs are lowered (default aot_eager: fast compiles)")
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
    return architectures, args.csv, args.lowering


def main(argv: list[str] | None = None) -> int:
    architectures, csv_path, lowering = parse(argv)
    logging.disable(logging.WARNING)  # the dense reasons are printed; Dynamo's and transformers' notes are not
    warnings.filterwarnings("ignore")
    results = []
    for name, settings in architectures:
        results.append(check(name, settings, lowering))
        print(results[-1].line(), flush=True)
    if csv_path is not None:
        _write_csv(csv_path, results, lowering)
    return 0 if all(r.status in ("equal", "skipped") for r in results) else 1


def _write_csv(path: str, results: list[Result], lowering: str = "aot_eager") -> None:
    """One row per architecture, with the versions, lowering and date of the run."""
    versions = dict(transformers=transformers.__version__, torch=torch.__version__, lowering=lowering,
                    date=datetime.date.today().isoformat())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*(x.name for x in fields(Result)), *versions])
        writer.writeheader()
        for result in results:
            row = {x.name: getattr(result, x.name) for x in fields(Result)}
            row["reasons"] = "\n".join(result.reasons)  # a reason may hold "; "
            writer.writerow({**row, **versions})


if __name__ == "__main__":
    sys.exit(main())
