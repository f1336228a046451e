"""Dynamo recompiles across decoding: none with dynamic=True, at most one (the second length) by default."""

import pytest
import torch
from torch._dynamo.utils import counters

from dyllm_compile.generate import generate
from dyllm_compile.models import llada_like

KW = dict(mask_token_id=127, gen_length=24, steps=24, block_length=8)


@pytest.mark.parametrize("dynamic,graphs", [(True, 1), (None, 2)])
def test_recompiles_over_fifty_steps_and_two_lengths(dynamic, graphs):
    torch._dynamo.reset()
    counters.clear()
    model = llada_like("tiny", init_std=0.2)
    compiled = torch.compile(model, backend="dyllm", dynamic=dynamic, options={"lowering": "aot_eager"})
    calls = 0
    for length, seed in ((8, 0), (13, 1), (8, 2)):
        out = generate(compiled, torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(seed)),
                       **KW)
        calls += out.stats.forward_calls
    assert calls >= 50
    assert counters["stats"]["unique_graphs"] == graphs
