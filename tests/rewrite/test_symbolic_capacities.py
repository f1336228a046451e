"""``symbolic_capacities``: a sparse variant compiled once with its capacity buckets as symbolic input sizes serves
every bucket its compilers' guards admit, and matches the oracle step by step; the guards are checked before a
variant runs at new sizes."""

import pytest
import torch
from torch import fx

from dyllm_compile.generate import generate
from dyllm_compile.lowering import lower
from dyllm_compile.models import llada_like
from dyllm_compile.runtime import rows
from dyllm_compile.runtime.graph_runtime import GraphRuntime, last_serial, runtimes
from oracle import Lockstep, Oracle

fx.wrap("select_rows")
select_rows = rows.select_rows


def _top_rows(x, salient, capacity):
    """The first rows of a selection at the capacity ``capacity.size(0)``, and the union count."""
    picked = select_rows(salient, capacity.size(0))
    return x.index_select(1, picked[0]) * 2, picked[2]


@pytest.mark.parametrize("lowering", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_guards_admit_only_the_sizes_the_compilers_assumed(lowering):
    """Top-K of 64 rows at a symbolic K: the ShapeEnv records K <= 64 (top-K's bound) and K >= 2 (sizes 0 and 1
    are specialised), so a variant compiled at K = 8 admits 2..64, not 1 or 65, and gives eager's result for each
    size it admits; one compiled at K = 1 is specialised to it."""
    gm = fx.symbolic_trace(_top_rows)
    x, salient = torch.randn(2, 64, 8), torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.2
    at_8 = lower(gm, [x, salient, torch.empty(8)], lowering, symbolic_inputs=[2])
    assert [at_8.admits({2: k}) for k in (1, 2, 8, 64, 65)] == [False, True, True, True, False]
    for k in (2, 8, 64):
        got, want = at_8(x, salient, torch.empty(k)), _top_rows(x, salient, torch.empty(k))
        assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])
    at_1 = lower(gm, [x, salient, torch.empty(1)], lowering, symbolic_inputs=[2])
    assert [at_1.admits({2: k}) for k in (1, 2, 8)] == [True, False, False]


def _decode(options, oracle_kwargs, monkeypatch, batch=2, prompt=120, lowering="aot_eager"):
    """A decode in lockstep with the oracle; returns the runtime and, for every sparse try, its capacities (of the
    union's selections, of the queried rows, of each element's selections)."""
    tried = []
    symbolic = GraphRuntime._symbolic

    def spy(self, capacity, args, caches, changed, extra, query_capacity, per_element, scalars):
        tried.append((capacity, query_capacity, per_element))
        return symbolic(self, capacity, args, caches, changed, extra, query_capacity, per_element, scalars)

    monkeypatch.setattr(GraphRuntime, "_symbolic", spy)
    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"lowering": lowering, "row_counts": "buckets", "symbolic_capacities": True, **options}
    lock = Lockstep(torch.compile(model, backend="dyllm", options=options), Oracle(model, **oracle_kwargs))
    ids = torch.randint(0, 100, (batch, prompt), generator=torch.Generator().manual_seed(6))
    generate(lock, ids, mask_token_id=127, gen_length=16, steps=16, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert lock.steps == 16 and runtime.stats.sparse_calls == 15
    return runtime, tried


@pytest.mark.parametrize("scope", ["shared", "per_selection"])
def test_one_variant_serves_every_bucket_and_matches_oracle(scope, monkeypatch):
    """Forced rows grow the salient sets past the first guess: the call reruns at bigger buckets (per selection:
    each layer's its own), and the one variant compiled serves them all (static capacities compile one per
    capacity tuple: 2 shared, 3 per selection, in this decode)."""
    runtime, tried = _decode({"force_salient": 0.2, "seed": 6, "row_capacity": scope},
                             dict(force_salient=0.2, seed=6), monkeypatch)
    assert runtime.stats.reruns >= 1 and len(set(tried)) >= 2
    assert runtime.stats.sparse_compiles == 1 and not runtime.sparse_fns


def test_query_pruning_capacities_are_symbolic_too(monkeypatch):
    """Query pruning at a short prompt: the refresh queries all 24 rows, the other calls the 16 response rows
    (two capacities of the queried rows), both served by one variant."""
    options = {"query_pruning_period": 4, "mask_token_id": 127}
    runtime, tried = _decode(options, dict(threshold=0.99, query_pruning_period=4), monkeypatch, batch=3, prompt=8)
    assert {queried for _, queried, _ in tried} == {24, 16}
    assert runtime.stats.sparse_compiles == 1


@pytest.mark.inductor
def test_inductor_per_selection_capacities_match_oracle(monkeypatch):
    """Inductor's code for symbolic capacities (the layers' pieces shared although their capacities differ)."""
    runtime, tried = _decode({"force_salient": 0.2, "seed": 6, "row_capacity": "per_selection"},
                             dict(force_salient=0.2, seed=6), monkeypatch, lowering="inductor")
    assert runtime.stats.sparse_compiles == 1 and len(set(tried)) >= 2


def test_a_failed_symbolic_compile_falls_back_to_a_variant_per_bucket(monkeypatch, caplog):
    """A compiler that cannot take the symbolic sizes: the runtime warns, naming why, and compiles a variant per
    bucket from then on; the decode still matches the oracle."""
    import logging

    import dyllm_compile.backend as backend

    real = backend.lower

    def refuses_symbolic(*args, symbolic_inputs=(), **kwargs):
        if symbolic_inputs:
            raise NotImplementedError("no symbolic sizes here")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "lower", refuses_symbolic)  # what the runtime lowers its variants with
    with caplog.at_level(logging.WARNING, logger="dyllm_compile"):
        runtime, tried = _decode({"force_salient": 0.2, "seed": 6}, dict(force_salient=0.2, seed=6), monkeypatch)
    assert "symbolic capacities failed (NotImplementedError: no symbolic sizes here)" in caplog.text
    assert not any(runtime._symbolic_fns.values()) and len(runtime.sparse_fns) == runtime.stats.sparse_compiles >= 2
