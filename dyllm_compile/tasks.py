"""Generated tasks with exact answers for the in-repo diffusion LM, and its character-level tokenizer.

Each problem is a prompt and an answer. A sequence is ``[prompt, left-padded to PROMPT_LENGTH][answer,
left-padded to ANSWER_LENGTH]``: one fixed shape for every task, so training batches mix tasks freely and a decode
never changes the compiled graph's shapes. The answer region is what the model generates, padding included.

Both halves are right-aligned on purpose: the last prompt character and the last answer character then sit at a
fixed distance, so every answer digit of ``copy`` (and the units digits of ``add``) has its source at one constant
relative offset, which a RoPE attention head learns quickly. With the answer left-aligned the offset depends on
the prompt's length, and a 2-core CPU hour of training did not find it (copy 1.3%, reverse 0.2% exact match).

Tasks (the tag token opens the prompt):

- ``copy``: a string of 4-12 letters, repeated.
- ``reverse``: a string of 4-12 letters, reversed.
- ``sort``: 4-12 digits, in ascending order.
- ``add``: the sum of two numbers of 1-5 digits.
- ``recall``: 8 key/value pairs (letter, two digits), then ``?`` and a key: that key's value. The answer depends
  on one pair anywhere in the prompt (a long-range dependency).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

PROMPT_LENGTH = 32
ANSWER_LENGTH = 16
SEQ_LENGTH = PROMPT_LENGTH + ANSWER_LENGTH

TASKS = ("copy", "reverse", "sort", "add", "recall")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# "<eos>" is unused since answers became right-aligned; it keeps its id so every token id (and the shipped
# checkpoint's embedding rows) stays where it was.
_SPECIALS = ("<pad>", "<eos>") + tuple(f"<{t}>" for t in TASKS)
_CHARS = "0123456789" + _LETTERS + "+=?"


class Tokenizer:
    """Characters and a few special tokens; the mask token is the last id."""

    def __init__(self) -> None:
        self.vocab = list(_SPECIALS) + list(_CHARS) + ["<mask>"]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id = self.ids["<pad>"]
        self.mask_token_id = self.ids["<mask>"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, task: str, text: str) -> list[int]:
        return [self.ids[f"<{task}>"]] + [self.ids[c] for c in text]

    def decode_answer(self, ids: Sequence[int]) -> str:
        """The answer region's text after its leading padding; any later special token stays visible (so a pad
        or mask inside an answer makes it wrong rather than silently shorter)."""
        ids = list(ids)
        start = next((k for k, i in enumerate(ids) if i != self.pad_token_id), len(ids))
        return "".join(self.vocab[i] for i in ids[start:])


TOKENIZER = Tokenizer()


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 12)))


def _copy(rng: random.Random) -> Problem:
    s = _letters(rng)
    return Problem("copy", s + "=", s)


def _reverse(rng: random.Random) -> Problem:
    s = _letters(rng)
    return Problem("reverse", s + "=", s[::-1])


def _sort(rng: random.Random) -> Problem:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 12))]
    return Problem("sort", "".join(map(str, digits)) + "=", "".join(map(str, sorted(digits))))


def _add(rng: random.Random) -> Problem:
    a, b = (rng.randint(0, 10 ** rng.randint(1, 5) - 1) for _ in range(2))
    return Problem("add", f"{a}+{b}=", str(a + b))


def _recall(rng: random.Random) -> Problem:
    keys = rng.sample(_LETTERS, 8)
    values = [f"{rng.randint(0, 99):02d}" for _ in keys]
    query = rng.randrange(len(keys))
    pairs = "".join(k + v for k, v in zip(keys, values))
    return Problem("recall", f"{pairs}?{keys[query]}=", values[query])


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "copy": _copy, "reverse": _reverse, "sort": _sort, "add": _add, "recall": _recall,
}


def sample_problems(task: str, count: int, seed: int) -> list[Problem]:
    """``count`` problems of ``task``, deterministic in ``seed``."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    rng = random.Random(f"{task}/{seed}")
    return [_GENERATORS[task](rng) for _ in range(count)]


def encode_prompts(problems: Sequence[Problem]) -> torch.Tensor:
    """``[B, PROMPT_LENGTH]`` prompt ids, left-padded with the pad token."""
    out = torch.full((len(problems), PROMPT_LENGTH), TOKENIZER.pad_token_id, dtype=torch.long)
    for row, p in enumerate(problems):
        ids = TOKENIZER.encode(p.task, p.prompt)
        if len(ids) > PROMPT_LENGTH:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds PROMPT_LENGTH={PROMPT_LENGTH}: {p.prompt!r}")
        out[row, PROMPT_LENGTH - len(ids):] = torch.tensor(ids)
    return out


def encode_answers(problems: Sequence[Problem]) -> torch.Tensor:
    """``[B, ANSWER_LENGTH]`` answer ids, left-padded (right-aligned, like the prompt)."""
    out = torch.full((len(problems), ANSWER_LENGTH), TOKENIZER.pad_token_id, dtype=torch.long)
    for row, p in enumerate(problems):
        if not 0 < len(p.answer) <= ANSWER_LENGTH:
            raise ValueError(f"answer must have 1..ANSWER_LENGTH={ANSWER_LENGTH} characters: {p.answer!r}")
        out[row, ANSWER_LENGTH - len(p.answer):] = torch.tensor([TOKENIZER.ids[c] for c in p.answer])
    return out
