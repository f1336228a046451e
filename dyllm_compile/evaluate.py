"""Exact-match accuracy of a diffusion LM on the held-out problems of :mod:`dyllm_compile.tasks`.

    python -m dyllm_compile.evaluate [--backend dense|inductor|dyllm] [--count 200] [--confidence-threshold 0.9]
                                     [--checkpoint DIR]

Decodes each problem's answer region (``ANSWER_LENGTH`` tokens, one block) with low-confidence remasking, one
token per step, or with confidence-threshold parallel decoding; a problem is right when the text up to the first
EOS equals the answer. Results are per problem, so two decoders can be compared pairwise on the same problems.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .config import ATTENTION_MODES, DyllmConfig
from .generate import generate
from .tasks import ANSWER_LENGTH, TASKS, TOKENIZER, Problem, encode_prompts, sample_problems

#: Seed of the held-out problems; training skips the first :data:`HELD_OUT_COUNT` of each task.
HELD_OUT_SEED = 1_000_003
HELD_OUT_COUNT = 2000


@functools.lru_cache(maxsize=1)
def held_out_prompts() -> frozenset:
    return frozenset((p.task, p.prompt) for t in TASKS for p in sample_problems(t, HELD_OUT_COUNT, HELD_OUT_SEED))


def held_out(task: str, count: int) -> list[Problem]:
    if count > HELD_OUT_COUNT:
        raise ValueError(f"at most {HELD_OUT_COUNT} held-out problems per task, asked for {count}")
    return sample_problems(task, count, HELD_OUT_SEED)


def held_out_mix(count: int) -> list[Problem]:
    """``count`` held-out problems, one task after another (the demo's and the benchmarks' prompts)."""
    per_task = {t: held_out(t, -(-count // len(TASKS))) for t in TASKS}
    return [per_task[TASKS[i % len(TASKS)]][i // len(TASKS)] for i in range(count)]


@dataclass
class TaskResult:
    task: str
    correct: list[bool] = field(default_factory=list)
    forward_calls: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def decode_problems(model: Callable, problems: Sequence[Problem], confidence_threshold: Optional[float] = None):
    prompts = encode_prompts(problems)
    return generate(
        model, prompts, mask_token_id=TOKENIZER.mask_token_id, gen_length=ANSWER_LENGTH, steps=ANSWER_LENGTH,
        confidence_threshold=confidence_threshold, pad_token_id=TOKENIZER.pad_token_id,
    )


def evaluate(model: Callable, tasks: Sequence[str] = TASKS, count: int = 200, batch_size: int = 100,
             confidence_threshold: Optional[float] = None, progress: bool = False) -> dict[str, TaskResult]:
    """Per-task results over the first ``count`` held-out problems, decoded ``batch_size`` at a time."""
    results = {}
    for task in tasks:
        problems = held_out(task, count)
        result = TaskResult(task)
        chunks = range(0, count, batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc=task, leave=False)
        for lo in chunks:
            chunk = problems[lo: lo + batch_size]
            out = decode_problems(model, chunk, confidence_threshold)
            result.forward_calls += out.stats.forward_calls
            result.seconds += out.stats.seconds
            result.correct += [TOKENIZER.decode_answer(row.tolist()) == p.answer
                               for row, p in zip(out.generated, chunk)]
        results[task] = result
    return results


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired problems and the half-width of its 95% confidence interval (normal)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired results need the same, non-zero number of problems")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, 1.96 * math.sqrt(var / len(diffs))


def proportion_interval(correct: Sequence[bool]) -> float:
    """Half-width of the 95% (Wald) confidence interval of an accuracy."""
    p = sum(correct) / len(correct)
    return 1.96 * math.sqrt(p * (1 - p) / len(correct))


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .models import load_checkpoint, load_default_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("dense", "inductor", "dyllm"), default="dense")
    parser.add_argument("--threshold", type=float, default=0.99, help="dyllm saliency threshold")
    parser.add_argument("--attention-mode", choices=ATTENTION_MODES, default=DyllmConfig().attention_mode)
    parser.add_argument("--count", type=int, default=200, help="held-out problems per task")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="threshold parallel decoding instead of one token per step")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint directory written by dyllm_compile.train (default: the shipped model)")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.checkpoint) if args.checkpoint else load_default_model()
    if args.backend == "inductor":
        model = torch.compile(model)
    elif args.backend == "dyllm":
        model = torch.compile(model, backend="dyllm", options={
            "threshold": args.threshold, "attention_mode": args.attention_mode})
    results = evaluate(model, count=args.count, batch_size=args.batch_size,
                       confidence_threshold=args.confidence_threshold, progress=True)
    print(f"{'task':<10}{'accuracy':>10}{'95% CI':>10}{'forwards':>10}")
    for r in results.values():
        print(f"{r.task:<10}{100 * r.accuracy:>9.1f}%{100 * proportion_interval(r.correct):>9.1f}%"
              f"{r.forward_calls:>10}")


if __name__ == "__main__":
    main()
