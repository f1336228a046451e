"""Diffusion decoding loops for masked diffusion LMs, over any callable model (eager or compiled).

Implements LLaDA's low-confidence remasking with semi-autoregressive blocks, Dream's variant (logits shifted
right by one, timestep schedule, entropy/margin confidence), Fast-dLLM-style confidence-threshold parallel
decoding, classifier-free guidance, and left-padded batches of prompts of different lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "margin", "entropy", "random")
SCHEDULES = ("uniform", "dream")
_DREAM_EPS = 1e-3


@dataclass
class DecodeStats:
    steps: int
    forward_calls: int
    tokens_generated: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, prompt_length + gen_length]
    prompt_length: int  # after left padding
    stats: DecodeStats

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]


def pad_prompts(
    prompts: Union[torch.Tensor, Sequence[torch.Tensor]], pad_token_id: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Left-pads 1-D prompts to one length. Returns ids [B, P] and a key mask (None when nothing is padded)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt must be [batch, length], got shape {tuple(prompts.shape)}")
        return prompts, None
    if not prompts:
        raise ValueError("no prompts given")
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long, device=prompts[0].device)
    real = torch.zeros(len(prompts), length, dtype=torch.bool, device=prompts[0].device)
    for i, p in enumerate(prompts):
        ids[i, length - p.numel() :] = p.reshape(-1)
        real[i, length - p.numel() :] = True
    return ids, (None if bool(real.all()) else real)


def generate(
    model: Callable,
    prompt: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    mask_token_id: int,
    gen_length: int = 64,
    steps: Optional[int] = None,
    block_length: Optional[int] = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    schedule: str = "uniform",
    confidence_threshold: Optional[float] = None,
    cfg_scale: float = 0.0,
    shift_logits: bool = False,
    pad_token_id: int = 0,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> DecodeResult:
    """Decodes ``gen_length`` tokens after ``prompt`` by iterative unmasking.

    ``steps`` denoising steps are split evenly over the ``gen_length / block_length`` blocks, decoded left to
    right. Each step commits, inside the current block, the masked positions with the highest confidence:
    as many as the schedule says (``uniform``: LLaDA's even split; ``dream``: Dream's timestep schedule) or,
    with ``confidence_threshold``, every one above it and at least one. ``shift_logits`` applies Dream's
    convention that position i's logits predict token i + 1.
    """
    steps = gen_length if steps is None else steps
    block_length = gen_length if block_length is None else block_length
    _check_args(gen_length, steps, block_length, remasking, schedule, confidence_threshold, cfg_scale)
    with torch.inference_mode():
        # Every tensor the model sees is made here, so a compiled model sees one kind (no recompile).
        x, plen, attention_mask, real_prompt = _initial_state(prompt, pad_token_id, mask_token_id, gen_length)
        batch = x.shape[0]
        num_blocks = gen_length // block_length
        steps_per_block = steps // num_blocks
        mask_id = torch.tensor([mask_token_id], device=x.device)
        forward = _Forward(model, mask_token_id, real_prompt, attention_mask, cfg_scale, shift_logits)
        bar = _progress_bar(progress, batch * gen_length)
        total_steps = 0
        start = time.perf_counter()
        for block in range(num_blocks):
            lo, hi = plen + block * block_length, plen + (block + 1) * block_length
            initial = (x[:, lo:hi] == mask_token_id).sum(dim=1)
            step = 0
            while bool((x[:, lo:hi] == mask_token_id).any()):
                masked = x[:, lo:hi] == mask_token_id
                # Only the current block can commit (earlier blocks are complete, later ones wait), so tokens
                # are proposed for its positions alone: the same commits as proposing for the whole sequence,
                # without a softmax over [B, N, vocab] logits every step (at 1150 tokens and LLaDA's 126k vocab,
                # gigabytes of traffic per step, as much as a sparse step's).
                logits = forward(x)[:, lo:hi].float()
                # Never proposing the mask token (decoding would loop); out of place, as the output may be the
                # model's own buffer.
                logits = logits.index_fill(-1, mask_id, float("-inf"))
                x0, confidence = _propose(logits, temperature, remasking, generator)
                confidence = confidence.masked_fill(~masked, float("-inf"))
                if confidence_threshold is not None:
                    commit = _above_threshold(confidence, confidence_threshold)
                else:
                    count = _transfer_count(schedule, step, steps_per_block, masked.sum(dim=1), initial)
                    commit = _top_k_per_row(confidence, count)
                if bool((masked.any(dim=1) & ~torch.isfinite(confidence).any(dim=1)).any()):
                    raise RuntimeError("decoding made no progress on a sequence: the model returned non-finite "
                                       "logits for all of its masked positions")
                x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
                step += 1
                if bar is not None:
                    bar.update(int(commit.sum()))
            total_steps += step
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    stats = DecodeStats(total_steps, forward.calls, batch * gen_length, seconds)
    return DecodeResult(x, plen, stats)


def _initial_state(prompt, pad_token_id: int, mask_token_id: int, gen_length: int):
    """The masked sequence [B, P + gen_length], prompt length, key mask (or None), real-prompt positions."""
    ids, key_mask = pad_prompts(prompt, pad_token_id)
    batch, plen = ids.shape
    x = torch.full((batch, plen + gen_length), mask_token_id, dtype=torch.long, device=ids.device)
    x[:, :plen] = ids
    attention_mask = None
    if key_mask is not None:
        attention_mask = torch.cat([key_mask, key_mask.new_ones(batch, gen_length)], dim=1)
    real_prompt = torch.zeros_like(x, dtype=torch.bool)
    real_prompt[:, :plen] = True if key_mask is None else key_mask
    return x, plen, attention_mask, real_prompt


class _Forward:
    """Calls the model, applies classifier-free guidance and Dream's logit shift."""

    def __init__(self, model, mask_token_id, real_prompt, attention_mask, cfg_scale, shift_logits) -> None:
        self.model = model
        self.mask_token_id = mask_token_id
        self.real_prompt = real_prompt
        self.attention_mask = attention_mask
        self.cfg_scale = cfg_scale
        self.shift_logits = shift_logits
        self.calls = 0

    def _call(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        out = self.model(x) if attention_mask is None else self.model(x, attention_mask=attention_mask)
        return getattr(out, "logits", out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg_scale > 0:
            unconditional = x.masked_fill(self.real_prompt, self.mask_token_id)
            mask = self.attention_mask
            both = self._call(torch.cat([x, unconditional]), None if mask is None else torch.cat([mask, mask]))
            cond, uncond = both.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        else:
            logits = self._call(x, self.attention_mask)
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def _propose(
    logits: torch.Tensor, temperature: float, remasking: str, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the proposed token per position and its confidence (higher commits first)."""
    if temperature > 0:
        # LLaDA's Gumbel-max sampling, in fp64 as its reference code does.
        noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        x0 = (logits.double().exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
    else:
        x0 = logits.argmax(dim=-1)
    probs = F.softmax(logits, dim=-1)
    if remasking == "low_confidence":
        confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
    elif remasking == "margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif remasking == "entropy":
        confidence = (probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    else:
        confidence = torch.rand(x0.shape, generator=generator, device=x0.device)
    return x0, confidence


def _transfer_count(
    schedule: str, step: int, steps: int, remaining: torch.Tensor, initial: torch.Tensor
) -> torch.Tensor:
    """How many tokens each row commits at ``step`` of a block (0-based)."""
    if step >= steps - 1:
        return remaining  # the last step of a block commits everything left
    if schedule == "uniform":
        base, extra = initial // steps, initial % steps
        return base + (step < extra).long()
    t = 1 - step * (1 - _DREAM_EPS) / steps
    s = 1 - (step + 1) * (1 - _DREAM_EPS) / steps
    return (remaining.double() * (1 - s / t)).long()


def _top_k_per_row(confidence: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    rank = confidence.argsort(dim=1, descending=True).argsort(dim=1)
    return (rank < count[:, None]) & torch.isfinite(confidence)


def _above_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    commit = confidence > threshold
    best = confidence.argmax(dim=1, keepdim=True)
    has_candidate = torch.isfinite(confidence.gather(1, best))
    return commit.scatter(1, best, has_candidate | commit.gather(1, best))


def _check_args(gen_length, steps, block_length, remasking, schedule, threshold, cfg_scale) -> None:
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError("gen_length, steps and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    if threshold is None and steps % (gen_length // block_length):
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks ({gen_length // block_length})"
        )
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1), got {threshold}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="decoding")


def dream_generate(model: Callable, prompt, **kwargs) -> DecodeResult:
    """Dream's decoding: shifted logits, its timestep schedule, entropy confidence, one block."""
    kwargs.setdefault("remasking", "entropy")
    kwargs.setdefault("schedule", "dream")
    return generate(model, prompt, shift_logits=True, **kwargs)
