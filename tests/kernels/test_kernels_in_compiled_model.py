"""The Triton kernels as dyllm::cached_attention's implementation inside a compiled model, decoding in lockstep with
the plain-torch oracle of the algorithm: the CUDA path's contract (cache layouts, running statistics carried
across steps, query pruning's row subsets) checked without a GPU, by registering the kernels as the op's CPU
implementation under TRITON_INTERPRET=1. On a GPU, tests/rewrite/test_oracle.py runs the same natively."""

import importlib
import os
import sys

import pytest
import torch

from dyllm_compile.generate import generate
from dyllm_compile.kernels.cached_attention import cuda_implementation
from dyllm_compile.models import dream_like
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "rewrite"))
from oracle import Lockstep, Oracle  # noqa: E402

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels natively there")]
_op_module = importlib.import_module("dyllm_compile.ops.cached_attention")
MASK = 127


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[11])  # the mode
        return cuda_implementation(*args)

    monkeypatch.setattr(_op_module, "RECOMPUTE_WORK", 0)  # every site calls the op, at any size
    _op_module.cached_attention.register_kernel("cpu")(counted)
    yield calls
    _op_module.cached_attention.register_kernel("cpu")(_op_module.cached_attention_reference)


# Capacity buckets are the row-count route on CUDA (padded row selections, queried rows included).
@pytest.mark.parametrize("mode,row_counts", [("paper", "unbacked"), ("exact", "unbacked"), ("exact", "buckets")])
def test_kernels_follow_the_oracle_in_a_compiled_decode(mode, row_counts, kernels_on_cpu):
    torch._dynamo.reset()
    serial = last_serial()
    model = dream_like("tiny", init_std=0.2)  # GQA: kv heads repeated inside the kernels
    options = {"lowering": "aot_eager", "attention_mode": mode, "query_pruning_period": 4, "mask_token_id": MASK,
               "row_counts": row_counts}
    compiled = torch.compile(model, backend="dyllm", options=options)
    oracle = Oracle(model, mode=mode, threshold=0.99, query_pruning_period=4)
    prompt = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    lock = Lockstep(compiled, oracle)
    generate(lock, prompt, mask_token_id=MASK, gen_length=16, steps=16, block_length=8)
    (runtime,) = [r for r in runtimes(serial) if r.stats.sparse_calls]
    assert lock.steps == 16 and (runtime.stats.dense_calls, runtime.stats.sparse_calls) == (1, 15)
    assert kernels_on_cpu and set(kernels_on_cpu) == {mode}  # the sites ran on the kernels
    assert torch.tensor(oracle.fractions).mean() < 1.0
