"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit runs: kernels then run on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dyllm_compile.models import dream_like, llada_like  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llada():
    return llada_like("tiny")


@pytest.fixture(scope="session")
def tiny_dream():
    return dream_like("tiny")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
