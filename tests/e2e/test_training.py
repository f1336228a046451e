"""The training script trains (loss falls), writes a loadable checkpoint, and masks only answer positions."""

import math

import torch

from dyllm_compile import train as training
from dyllm_compile.evaluate import held_out_prompts
from dyllm_compile.models import load_checkpoint
from dyllm_compile.tasks import ANSWER_LENGTH, PROMPT_LENGTH, TASKS, TOKENIZER


def test_mask_answers_masks_with_ratio_t_stratified_over_the_batch():
    answers = torch.full((4000, ANSWER_LENGTH), 5)
    noised, masked, t = training.mask_answers(answers, torch.Generator().manual_seed(0))
    assert torch.equal(noised == TOKENIZER.mask_token_id, masked)
    assert (t > 0).all() and (t <= 1).all()
    # Stratified: every 1/40 of (0, 1] holds exactly 100 of the 4000 draws.
    counts = torch.histc(t.squeeze(1), bins=40, min=0, max=1)
    assert counts.min() == counts.max() == 100
    # Per-sequence masking rate follows t: the rate over sequences with t in a band sits inside the band.
    band = (t.squeeze(1) > 0.4) & (t.squeeze(1) < 0.6)
    assert 0.4 < masked[band].float().mean() < 0.6


def test_stream_skips_held_out_problems():
    free = training.ProblemStream(0, frozenset()).problems(20)
    assert [p.task for p in free[:5]] == list(TASKS)
    blocked = {(p.task, p.prompt) for p in free[:3]}
    kept = training.ProblemStream(0, frozenset(blocked)).problems(200)
    assert not blocked & {(p.task, p.prompt) for p in kept}
    held = held_out_prompts()
    assert not held & {(p.task, p.prompt) for p in training.ProblemStream(1, held).problems(2000)}
    prompts, answers = training.ProblemStream(0, held).batch(7)
    assert prompts.shape == (7, PROMPT_LENGTH) and answers.shape == (7, ANSWER_LENGTH)


def test_stream_mixes_tasks_by_weight_and_rejects_bad_weights():
    import pytest

    stream = training.ProblemStream(0, frozenset(), {"recall": 3, "copy": 0})
    tasks = [p.task for p in stream.problems(12)]
    assert tasks == ["reverse", "sort", "add", "recall", "recall", "recall"] * 2
    for bad in ({"recal": 2}, {"copy": -1}, {t: 0 for t in TASKS}):
        with pytest.raises(ValueError, match="task weights"):
            training.ProblemStream(0, frozenset(), bad)
    assert training._weights("reverse=3,recall=2") == {"reverse": 3, "recall": 2}


def test_short_training_lowers_loss_and_round_trips(tmp_path):
    shape = dict(d_model=32, n_layers=1, n_heads=2, d_ffn=64)
    gen = torch.Generator().manual_seed(1)
    model = training.train(str(tmp_path), steps=60, batch=16, lr=3e-3, warmup=5, seed=0, shape=shape)
    rows = [line.split(",") for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    first, last = float(rows[0][1]), float(rows[-1][1])
    assert math.isfinite(last) and last < first
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, TOKENIZER.vocab_size, (2, PROMPT_LENGTH + ANSWER_LENGTH), generator=gen)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_continued_training_starts_from_the_checkpoint_and_extends_the_curve(tmp_path):
    shape = dict(d_model=32, n_layers=1, n_heads=2, d_ffn=64)
    first = training.train(str(tmp_path / "a"), steps=10, batch=8, lr=1e-3, warmup=2, seed=0, shape=shape)
    more = training.train(str(tmp_path / "b"), steps=5, batch=8, lr=1e-9, warmup=1, seed=1, init=str(tmp_path / "a"))
    for a, b in zip(first.parameters(), more.parameters()):  # lr 1e-9: continued, not re-initialised
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "b" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 14 and len(steps) > 2
