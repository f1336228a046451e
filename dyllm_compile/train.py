"""Trains the in-repo default model: the LLaDA-like reference transformer, masked-diffusion objective.

    python -m dyllm_compile.train --out dyllm_compile/models/default [--steps 3000] [--batch 96]

Objective (LLaDA, SFT form): per sequence a mask ratio t ~ U(0, 1]; each answer token is replaced by the mask
token with probability t (prompts are never masked); cross-entropy on the masked positions, weighted 1/t, summed
and divided by the answer length. Problems come from :mod:`dyllm_compile.tasks`, an even mix of all tasks; the
held-out evaluation problems (:data:`dyllm_compile.evaluate.HELD_OUT_SEED`) are never trained on.

Writes ``model.safetensors`` + ``config.json`` (loadable by :func:`dyllm_compile.models.load_default_model`),
``loss.csv`` and ``loss.png``.

The shipped model was trained from scratch in two runs, the second continuing the first (``--init``), with
``--threads 2`` on the 2-core CPU machine:

    python -m dyllm_compile.train --out run1 --steps 4500 --weights reverse=3,recall=3
    python -m dyllm_compile.train --out run2 --init run1 --steps 4000 --lr 1.5e-3 --weights reverse=3,recall=3

8500 steps of 96 sequences: 30.1 min + 27.8 min, each run alone on the machine, 57.9 min in all. The runs are
deterministic: re-running the second gave bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .models import DiffusionTransformer, llada_config
from .tasks import SEQ_LENGTH, TASKS, TOKENIZER, Problem, encode_answers, encode_prompts, sample_problems

#: The default model's shape: ~1.8M parameters, small enough to train on 2 CPU cores within the hour.
DEFAULT_SHAPE = dict(d_model=192, n_layers=4, n_heads=6, d_ffn=512)


def model_config(**shape):
    return llada_config(
        "tiny", vocab_size=TOKENIZER.vocab_size, mask_token_id=TOKENIZER.mask_token_id,
        pad_token_id=TOKENIZER.pad_token_id, max_seq_len=SEQ_LENGTH, **{**DEFAULT_SHAPE, **shape},
    )


def mask_answers(answers: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noised answers, masked positions, t per sequence [B, 1]).

    t is stratified over the batch (each sequence's t is still U(0, 1], the batch covers the range evenly) to cut
    the variance of the 1/t-weighted loss. A sequence that draws no masked position contributes nothing, which
    keeps the estimator unbiased; forcing one masked position there instead would give that single token a
    weight of up to 1/t = 1000 and let it dominate the clipped gradient of the whole batch.
    """
    b, n = answers.shape
    strata = (torch.randperm(b, generator=gen) + torch.rand(b, generator=gen)) / b
    t = (1 - strata).clamp_min(1e-3).unsqueeze(1)  # (0, 1]
    masked = torch.rand(b, n, generator=gen) < t
    return answers.masked_fill(masked, TOKENIZER.mask_token_id), masked, t


def diffusion_loss(model, prompts: torch.Tensor, answers: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noised, masked, t = mask_answers(answers, gen)
    logits = model(torch.cat([prompts, noised], dim=1))[:, prompts.shape[1]:]
    ce = F.cross_entropy(logits.flatten(0, 1), answers.flatten(), reduction="none").view_as(answers)
    return (ce * masked / t).sum() / answers.numel()


class ProblemStream:
    """An endless, seeded mix of the tasks (even, or ``weights[task]`` problems of each per cycle), skipping the
    held-out problems."""

    def __init__(self, seed: int, held_out: set, weights: Optional[dict[str, int]] = None) -> None:
        self.rng = random.Random(seed)
        self.held_out = held_out
        weights = weights or {}
        unknown = set(weights) - set(TASKS)
        if unknown or any(not isinstance(w, int) or w < 0 for w in weights.values()):
            raise ValueError(f"task weights must be non-negative ints for tasks among {TASKS}, got {weights}")
        self.cycle = [t for t in TASKS for _ in range(weights.get(t, 1))]
        if not self.cycle:
            raise ValueError("task weights select no task")

    def problems(self, size: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < size:
            task = self.cycle[len(out) % len(self.cycle)]
            (p,) = sample_problems(task, 1, seed=self.rng.getrandbits(62))
            if (p.task, p.prompt) not in self.held_out:
                out.append(p)
        return out

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        problems = self.problems(size)
        return encode_prompts(problems), encode_answers(problems)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: DiffusionTransformer, out: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=1)


def plot_loss(rows: list[tuple[int, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*rows)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="masked-diffusion loss", yscale="log", title="training loss (default model)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(out: str, steps: int, batch: int, lr: float, warmup: int, seed: int, log_every: int = 25,
          threads: Optional[int] = None, shape: Optional[dict] = None, init: Optional[str] = None,
          weights: Optional[dict[str, int]] = None) -> DiffusionTransformer:
    """Trains a model of ``DEFAULT_SHAPE`` (updated by ``shape``), fresh or continued from the checkpoint
    directory ``init``, on a task mix (``weights``: problems per task per cycle, default one each), and writes
    the checkpoint to ``out``."""
    from tqdm import tqdm

    from .evaluate import held_out_prompts

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if init:
        from .models import load_checkpoint

        model = load_checkpoint(init).train()
    else:
        model = DiffusionTransformer(model_config(seed=seed, **(shape or {}))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream = ProblemStream(seed, held_out_prompts(), weights)
    gen = torch.Generator().manual_seed(seed)
    rows: list[tuple[int, float]] = []
    history = os.path.join(init, "loss.csv") if init else ""
    if os.path.isfile(history):  # a continued run extends its parent's curve
        with open(history) as f:
            rows = [(int(a), float(b)) for a, b in (line.strip().split(",") for line in f.readlines()[1:])]
    offset = rows[-1][0] + 1 if rows else 0
    running, start = None, time.perf_counter()
    bar = tqdm(range(steps), desc="train", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        prompts, answers = stream.batch(batch)
        loss = diffusion_loss(model, prompts, answers, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            rows.append((offset + step, running))
            bar.set_postfix(loss=f"{running:.3f}")
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    save_checkpoint(model, out)
    with open(os.path.join(out, "loss.csv"), "w") as f:
        f.write("step,loss_ema\n" + "".join(f"{s},{v:.5f}\n" for s, v in rows))
    plot_loss(rows, os.path.join(out, "loss.png"))
    print(f"trained {steps} steps x {batch} sequences in {minutes:.1f} min; final loss {running:.4f}; saved to {out}")
    return model


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--init", default=None, help="continue from this checkpoint directory")
    parser.add_argument("--weights", default="", type=_weights,
                        help="task mix, problems per task per cycle, e.g. reverse=3,recall=3 (others: 1)")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch, args.lr, args.warmup, args.seed, threads=args.threads, init=args.init,
          weights=args.weights)


def _weights(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task=int[,task=int...], got {text!r}") from None


if __name__ == "__main__":
    main()
