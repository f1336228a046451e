"""The shipped default model: it loads, stays accurate on a small fixed held-out set, and dyllm at threshold 1
decodes exactly what dense decodes on it."""

import pytest
import torch

from dyllm_compile.evaluate import decode_problems, evaluate, held_out
from dyllm_compile.models import load_default_model

# Floors well below the accuracy measured on 1000 problems per task (README: copy and reverse ~100%, sort ~95%),
# so that only a broken model, decoder or task format fails them, not sampling noise on 40 problems (sort: 5
# standard deviations). add and recall are barely learned (a few %): a floor there could not fail, so none.
FLOORS = {"copy": 0.85, "reverse": 0.85, "sort": 0.75}
COUNT = 40


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def dense_results(model):
    return evaluate(model, tasks=sorted(FLOORS), count=COUNT, batch_size=COUNT)


def test_checkpoint_is_small_and_named_in_package_data(model):
    import fnmatch
    import os

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from dyllm_compile.models.default import DEFAULT_MODEL_DIR

    size = os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"))
    assert size <= 25 * 2 ** 20
    assert sum(p.numel() for p in model.parameters()) * 4 <= size + 2 ** 16
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["dyllm_compile"]
    for name in ("model.safetensors", "config.json"):
        assert any(fnmatch.fnmatch(f"models/default/{name}", p) for p in patterns), name


@pytest.mark.parametrize("task", sorted(FLOORS))
def test_dense_accuracy_stays_above_floor(dense_results, task):
    assert dense_results[task].accuracy >= FLOORS[task], (task, dense_results[task].accuracy)


def test_dyllm_threshold_one_decodes_what_dense_decodes(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dyllm", options={"threshold": 1.0, "lowering": "aot_eager"})
    problems = held_out("sort", 8) + held_out("reverse", 8)
    dense = decode_problems(model, problems).tokens
    assert torch.equal(decode_problems(compiled, problems).tokens, dense)
