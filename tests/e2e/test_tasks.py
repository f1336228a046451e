"""Generated tasks: answers follow each task's definition; the fixed right-aligned layout round-trips."""

import pytest
import torch

from dyllm_compile.tasks import (ANSWER_LENGTH, PROMPT_LENGTH, TASKS, TOKENIZER, Problem, encode_answers,
                                 encode_prompts, sample_problems)


@pytest.mark.parametrize("task", TASKS)
def test_answers_follow_the_task_definition(task):
    for p in sample_problems(task, 50, seed=3):
        body = p.prompt[:-1]  # every prompt ends with "="
        assert p.prompt.endswith("=")
        if task == "copy":
            assert p.answer == body and 4 <= len(body) <= 12
        elif task == "reverse":
            assert p.answer == body[::-1]
        elif task == "sort":
            assert p.answer == "".join(sorted(body))
        elif task == "add":
            a, b = body.split("+")
            assert int(p.answer) == int(a) + int(b)
        else:
            pairs, key = body.split("?")
            table = {pairs[i]: pairs[i + 1: i + 3] for i in range(0, len(pairs), 3)}
            assert len(table) == 8 and p.answer == table[key]
    assert sample_problems(task, 5, seed=1) == sample_problems(task, 5, seed=1)


def test_layout_is_right_aligned_and_round_trips():
    problems = [Problem("copy", "abc=", "abc"), Problem("add", "12+30=", "42")]
    prompts, answers = encode_prompts(problems), encode_answers(problems)
    assert prompts.shape == (2, PROMPT_LENGTH) and answers.shape == (2, ANSWER_LENGTH)
    pad = TOKENIZER.pad_token_id
    assert (prompts[0, : PROMPT_LENGTH - 5] == pad).all() and prompts[0, -1] == TOKENIZER.ids["="]
    assert (answers[0, : ANSWER_LENGTH - 3] == pad).all() and answers[0, -3:].tolist() == [
        TOKENIZER.ids[c] for c in "abc"]
    assert [TOKENIZER.decode_answer(row.tolist()) for row in answers] == ["abc", "42"]
    # A pad or mask inside an answer is visible (the answer is wrong), not dropped.
    broken = answers[0].clone()
    broken[-2] = TOKENIZER.mask_token_id
    assert TOKENIZER.decode_answer(broken.tolist()) == "a<mask>c"
    assert TOKENIZER.decode_answer([pad] * 4) == ""


def test_layout_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="PROMPT_LENGTH"):
        encode_prompts([Problem("copy", "a" * PROMPT_LENGTH + "=", "a")])
    with pytest.raises(ValueError, match="ANSWER_LENGTH"):
        encode_answers([Problem("copy", "a=", "a" * (ANSWER_LENGTH + 1))])
    with pytest.raises(ValueError, match="ANSWER_LENGTH"):
        encode_answers([Problem("copy", "=", "")])
    with pytest.raises(ValueError, match="unknown task"):
        sample_problems("multiply", 1, seed=0)
    assert torch.equal(encode_prompts([]), torch.zeros(0, PROMPT_LENGTH, dtype=torch.long))
