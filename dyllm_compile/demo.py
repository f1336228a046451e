"""Demo: decode with the embedded default model densely in eager, with dense Inductor, and with dyllm.

    python -m dyllm_compile.demo [--batch 5] [--threshold 0.99] [--attention-mode exact|paper]
    python -m dyllm_compile.demo --model llada --size small --gen-length 64   # random-weight reference model

The default model is the in-repo trained one (:func:`dyllm_compile.models.load_default_model`); it answers
held-out problems of the generated tasks (:mod:`dyllm_compile.tasks`), and the demo prints each answer. Prints
tokens/s per mode, the speedup over dense Inductor, whether the decoded tokens agree, and dyllm's salient
fraction per layer.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import ATTENTION_MODES, DyllmConfig
from .evaluate import held_out_mix
from .generate import DecodeResult, dream_generate, generate
from .models import dream_like, llada_like, load_default_model
from .tasks import ANSWER_LENGTH, TOKENIZER, Problem, encode_prompts
from .runtime.graph_runtime import RuntimeStats, last_serial, runtimes


@dataclass
class ModeResult:
    name: str
    compile_seconds: float
    result: DecodeResult
    salient_fraction: Optional[list[float]] = None  # per layer, mean over sparse calls (dyllm only)
    rows_fraction: Optional[float] = None  # share of gated-region rows computed (dyllm only)


def _decode(model, args, prompt, mask_token_id: int) -> DecodeResult:
    decode = dream_generate if args.model == "dream" else generate
    kwargs = dict(mask_token_id=mask_token_id, gen_length=args.gen_length, steps=args.steps)
    if args.model != "dream":
        kwargs["block_length"] = args.block_length
    return decode(model, prompt, **kwargs)


def run_mode(name: str, model, args, prompt, mask_token_id: int) -> ModeResult:
    # The first decode compiles (and warms up); the second one is timed.
    since = last_serial()
    start = time.perf_counter()
    _decode(model, args, prompt, mask_token_id)
    warmup = time.perf_counter() - start
    for runtime in runtimes(since):
        runtime.stats = RuntimeStats()
    result = _decode(model, args, prompt, mask_token_id)
    mode = ModeResult(name, max(0.0, warmup - result.stats.seconds), result)
    used = [r.stats for r in runtimes(since) if r.stats.dense_calls or r.stats.sparse_calls]
    if name == "dyllm" and used:
        mode.salient_fraction = used[0].salient_fraction
        mode.rows_fraction = used[0].rows_fraction
    return mode


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "llada", "dream"), default="default",
                        help="the trained default model, or a random-weight LLaDA-like / Dream-like one")
    parser.add_argument("--size", default="small", help="random-weight model size preset (tiny, small)")
    parser.add_argument("--batch", type=int, default=5, help="problems (default model) or prompts decoded at once")
    parser.add_argument("--prompt-length", type=int, default=32, help="random-weight models only")
    parser.add_argument("--gen-length", type=int, default=64, help="random-weight models only")
    parser.add_argument("--steps", type=int, default=64, help="random-weight models only")
    parser.add_argument("--block-length", type=int, default=32, help="random-weight models only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="eager,inductor,dyllm", help="comma-separated subset")
    parser.add_argument("--threshold", type=float, default=0.99, help="dyllm saliency threshold")
    parser.add_argument("--attention-mode", choices=ATTENTION_MODES, default=DyllmConfig().attention_mode)
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor",
                        help="dyllm's lowering (aot_eager compiles fast and is slow to run)")
    args = parser.parse_args(argv)
    if args.model == "default":
        args.gen_length = args.steps = args.block_length = ANSWER_LENGTH
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[ModeResult]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    problems: list[Problem] = []
    if args.model == "default":
        model = load_default_model()
        problems = held_out_mix(args.batch)
        prompt = encode_prompts(problems)
        weights = "trained in-repo model"
    else:
        model = (dream_like if args.model == "dream" else llada_like)(args.size)
        prompt = torch.randint(0, model.cfg.mask_token_id, (args.batch, args.prompt_length))
        weights = f"{args.model}-like '{args.size}', random weights"
    cfg = model.cfg
    print(
        f"model: {weights}: {cfg.n_layers} layers, d={cfg.d_model}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; batch {args.batch}, "
        f"{prompt.shape[1]} prompt + {args.gen_length} generated tokens, {args.steps} steps"
    )
    compiled = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(model),
        "dyllm": lambda: torch.compile(model, backend="dyllm", options={
            "threshold": args.threshold, "attention_mode": args.attention_mode, "lowering": args.lowering}),
    }
    results = [run_mode(name, compiled[name](), args, prompt, cfg.mask_token_id) for name in args.modes.split(",")]
    print_table(results)
    if problems:
        print_answers(problems, results[-1])
        print(SMALL_MODEL_NOTE)
    return results


#: What the default model's speed column says, and where the speedup shows.
SMALL_MODEL_NOTE = (
    "note: this model is small (48 tokens of width 192; a step is about a millisecond of small ops), so dyllm's "
    "bookkeeping costs about what its skipped rows save, and a skipped row can flip a near-tie token; the speedup "
    "grows with the sequence and the model: `python -m dyllm_compile.demo --model llada --size small --batch 1 "
    "--prompt-length 128 --gen-length 128` (2.2x dense Inductor on a 2-core CPU), `python "
    "benchmarks/bench_decode.py --model reference` (2.8-4.8x over its runs, docs/benchmarks.md)")


def print_answers(problems: list[Problem], mode: ModeResult) -> None:
    print(f"answers ({mode.name}):")
    for problem, row in zip(problems, mode.result.generated):
        answer = TOKENIZER.decode_answer(row.tolist())
        verdict = "right" if answer == problem.answer else f"wrong, expected {problem.answer}"
        print(f"  {problem.task:<8} {problem.prompt:<28} -> {answer:<14} {verdict}")


def print_table(results: list[ModeResult]) -> None:
    reference = results[0].result.tokens
    inductor = next((r for r in results if r.name == "inductor"), None)
    print(f"{'mode':<10}{'tokens/s':>12}{'vs inductor':>14}{'compile s':>12}  tokens equal to {results[0].name}")
    for r in results:
        speed = r.result.stats.tokens_per_second
        ratio = speed / inductor.result.stats.tokens_per_second if inductor else float("nan")
        same = bool(torch.equal(r.result.tokens, reference))
        print(f"{r.name:<10}{speed:>12.1f}{ratio:>13.2f}x{r.compile_seconds:>12.1f}  {same}")
        if r.salient_fraction is not None:
            layers = ", ".join(f"{f:.2f}" for f in r.salient_fraction)
            print(f"  dyllm: salient fraction per layer (sparse calls) [{layers}]; "
                  f"gated-region rows computed {100 * r.rows_fraction:.1f}% of dense")


if __name__ == "__main__":
    main()
