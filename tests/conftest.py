"""Shared fixtures. Without a CUDA device, Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be
set before any @triton.jit runs (importing torch runs none); with one, they and Inductor's generated kernels run
natively."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
