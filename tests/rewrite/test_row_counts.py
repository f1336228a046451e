"""Row counts of the sparse variant's gathers: capacity buckets (top-K, static) vs unbacked (``nonzero``)."""

import pytest
import torch

from dyllm_compile.generate import generate
from dyllm_compile.models import llada_like
from dyllm_compile.models.zoo import ZOO
from dyllm_compile.runtime import rows
from dyllm_compile.runtime.graph_runtime import forced_masks, last_serial, runtimes
from decode_driver import decode_inputs
from oracle import Lockstep, Oracle


def test_unbacked_selection_pads_and_places():
    salient = torch.tensor([[False, True, False, False, True], [False, False, False, True, False]])
    gather, position, count = rows.select_rows_unbacked(salient)
    assert int(count) == 3
    assert gather.tolist() == [1, 3, 4] + [4] * rows.UNBACKED_PAD  # padding: the last row, never read back
    assert [position[i].item() for i in (1, 3, 4)] == [0, 1, 2]
    x = torch.arange(20.0).view(2, 5, 2)
    cache = -torch.ones(2, 5, 2)
    fresh = 100 + x.index_select(1, gather)  # the region on the gathered rows
    placed = rows.place_rows(cache, fresh, position, salient, 1)
    # reference: each element's salient rows from the region, every other row from the cache
    assert torch.equal(placed, torch.where(salient[..., None], 100 + x, cache))
    empty = rows.select_rows_unbacked(torch.zeros(1, 5, dtype=torch.bool))
    assert empty[0].shape == (rows.UNBACKED_PAD,) and int(empty[2]) == 0
    none = torch.zeros(1, 5, dtype=torch.bool)
    placed = rows.place_rows(cache[:1], x[:1].index_select(1, empty[0]), empty[1], none, 1)
    assert torch.equal(placed, cache[:1])


def _decode(options, calls=8, lowering="aot_eager"):
    torch._dynamo.reset()
    before = last_serial()
    entry = ZOO["llada"]
    model = entry.build()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": lowering, **options})
    with torch.inference_mode():
        for args in decode_inputs(entry, 1, prompt=6, response=10, calls=calls):
            compiled(*args)
    (runtime,) = runtimes(before)
    return runtime


@pytest.fixture(scope="module")
def routes():
    forced = {"force_salient": 0.3, "seed": 3}
    # buckets compiled per bucket (static capacities): the route as the GPU ran it before symbolic capacities
    return {route: _decode({"row_counts": route, "symbolic_capacities": False, **forced})
            for route in ("auto", "buckets", "unbacked")}


def test_unbacked_compiles_one_variant_and_never_reruns(routes):
    unbacked = routes["unbacked"]
    assert {key[0] for key in unbacked.sparse_fns} == {None}
    assert unbacked.stats.sparse_compiles == 1 and unbacked.stats.reruns == 0
    buckets = routes["buckets"]  # the same salient sets overflow buckets: reruns, a variant per bucket
    assert all(isinstance(key[0], tuple) for key in buckets.sparse_fns)  # a capacity per row selection
    assert buckets.stats.reruns > 0 and buckets.stats.sparse_compiles > 1


def test_auto_is_unbacked_on_cpu(routes):
    assert {key[0] for key in routes["auto"].sparse_fns} == {None}


def test_unbacked_counts_only_the_salient_rows(routes):
    """Same forced salient sets on both routes: buckets compute their padded capacity, unbacked the rows."""
    buckets, unbacked = routes["buckets"].stats, routes["unbacked"].stats
    assert unbacked.sparse_calls == buckets.sparse_calls
    assert 0 < unbacked.rows_computed < buckets.rows_computed


def test_max_salient_fraction_runs_dense_on_the_unbacked_route():
    """The count is known only after the variant ran: a call over the cap is then rerun dense."""
    runtime = _decode({"row_counts": "unbacked", "force_salient": 0.9, "max_salient_fraction": 0.5})
    assert runtime.stats.sparse_compiles == 1  # the sparse variant ran, found too many rows
    assert runtime.stats.dense_calls == 8 and runtime.stats.sparse_calls == 0


@pytest.mark.inductor
@pytest.mark.parametrize("route", ["buckets", "unbacked"])
def test_routes_under_inductor_match_oracle(route):
    """Inductor lowers both routes; unbacked: the data-dependent row count, one variant for every count. At batch
    2 an unpadded count fails to lower (a guard on the count being one in bmm's layout choice)."""
    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"force_salient": 0.3, "seed": 5, "row_counts": route, "symbolic_capacities": False}
    compiled = torch.compile(model, backend="dyllm", options=options)
    lock = Lockstep(compiled, Oracle(model, force_salient=0.3, seed=5))
    prompt = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    generate(lock, prompt, mask_token_id=127, gen_length=8, steps=8, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 7
    assert (runtime.stats.sparse_compiles == 1) == (route == "unbacked")


def test_buckets_gather_each_elements_rows_in_a_batch():
    """Capacity buckets at batch 8: each region runs on each element's own salient rows (10% forced per layer),
    at a capacity below what the union of the batch's forced rows alone needs (every call: more than half the
    rows), and the decode still follows the oracle step by step."""
    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"lowering": "aot_eager", "force_salient": 0.1, "seed": 4, "row_counts": "buckets",
               "symbolic_capacities": False}  # a variant per capacity tuple, which the keys show
    lock = Lockstep(torch.compile(model, backend="dyllm", options=options), Oracle(model, force_salient=0.1, seed=4))
    prompt = torch.randint(0, 100, (8, 24), generator=torch.Generator().manual_seed(4))
    generate(lock, prompt, mask_token_id=127, gen_length=8, steps=8, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert lock.steps == 8 and runtime.stats.sparse_calls == 7
    union = [int(forced_masks(4, call, 2, 8, 32, 0.1).any(dim=1).sum(dim=1).max()) for call in range(1, 8)]
    per_element = [key[-1] for key in runtime.sparse_fns]  # (capacities, queried, shapes, scalars, per element)
    assert all(isinstance(k, tuple) for k in per_element) and max(map(max, per_element)) < min(union)


@pytest.mark.parametrize("max_changed_fraction", [0.5, 1.0])
def test_a_refresh_does_not_size_the_next_call(monkeypatch, max_changed_fraction):
    """Query pruning's refresh queries every row again: here the 40 prompt rows of 56, all recomputed. By default
    (``max_changed_fraction`` 0.5) that many new rows make it a dense call, so no variant at full capacity is
    compiled. Allowed to run sparse (1.0), it needs the full bucket; either way the next call changes a token or
    two and takes a small bucket again: its capacities come from its own changed rows and the share of the others
    the layers made salient lately (sized from the refresh's count, it took the full one and compiled a variant)."""
    from dyllm_compile.runtime.graph_runtime import GraphRuntime

    calls = []
    sparse = GraphRuntime._sparse

    def spy(self, capacity, args, caches, changed, extra, query_capacity=None, per_element=None):
        calls.append((self.stats.dense_calls + self.stats.sparse_calls, (*capacity, *(per_element or ())),
                      int(changed.any(0).sum())))
        return sparse(self, capacity, args, caches, changed, extra, query_capacity, per_element)

    monkeypatch.setattr(GraphRuntime, "_sparse", spy)
    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"lowering": "aot_eager", "force_salient": 0.1, "seed": 4, "row_counts": "buckets",
               "query_pruning_period": 4, "mask_token_id": 127, "max_changed_fraction": max_changed_fraction}
    prompt = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(4))
    generate(torch.compile(model, backend="dyllm", options=options), prompt, mask_token_id=127, gen_length=16,
             steps=16, block_length=16)
    (runtime,) = runtimes(before)
    n, refreshes = 56, [4, 8, 12]  # the sequence's calls whose count is a multiple of the period
    if max_changed_fraction == 0.5:
        assert runtime.stats.dense_calls == 1 + len(refreshes) and runtime.stats.sparse_calls == 12
        assert all(max(capacities) < n for _, capacities, _ in calls)
        return
    assert runtime.stats.dense_calls == 1
    at = {call: (capacities, changed) for call, capacities, changed in calls}  # the last try of each call
    for call in refreshes:
        assert at[call][1] >= 40 and max(at[call][0]) == n  # the refresh: the full bucket
        capacities, changed = at[call + 1]
        assert changed < 4 and max(capacities) < n


@pytest.mark.parametrize("scope", ["shared", "per_selection"])
def test_row_capacity_per_selection_or_shared(scope):
    """Each layer adds forced rows to the salient set, so a deeper layer's selection needs more rows:
    ``per_selection`` sizes each selection's bucket on its own, ``shared`` gives every selection the largest.
    Either way the decode follows the oracle step by step."""
    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"lowering": "aot_eager", "force_salient": 0.2, "seed": 6, "row_counts": "buckets",
               "row_capacity": scope, "symbolic_capacities": False}  # a variant per capacity tuple
    lock = Lockstep(torch.compile(model, backend="dyllm", options=options), Oracle(model, force_salient=0.2, seed=6))
    prompt = torch.randint(0, 100, (1, 120), generator=torch.Generator().manual_seed(6))
    generate(lock, prompt, mask_token_id=127, gen_length=8, steps=8, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert lock.steps == 8 and runtime.stats.sparse_calls == 7
    capacities = [key[0] for key in runtime.sparse_fns]
    assert all(len(c) == len(capacities[0]) > 1 for c in capacities)
    if scope == "shared":
        assert all(len(set(c)) == 1 for c in capacities)
    else:
        assert any(c[0] < c[-1] for c in capacities)  # the first layer's selection smaller than the last's


def test_capacity_guess_survives_dense_calls_and_new_sequences():
    """How many rows the layers add is the model's, not one call's: after a policy's periodic dense call (a block
    boundary of block_freeze) and for a new sequence of the same shapes, the first sparse call's capacities come
    from the last calls' growth. Reset, each of those calls started at the smallest buckets and reran."""
    import dyllm_compile
    from dyllm_compile.policies import BlockFreeze

    torch._dynamo.reset()
    before = last_serial()
    model = llada_like("tiny", init_std=0.2)
    options = {"lowering": "aot_eager", "force_salient": 0.3, "seed": 2, "row_counts": "buckets",
               "policy": BlockFreeze(block_length=8), "mask_token_id": 127}
    compiled = torch.compile(model, backend="dyllm", options=options)
    prompt = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # a second decode: a new sequence
        dyllm_compile.reset()
        generate(compiled, prompt, mask_token_id=127, gen_length=24, steps=24, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.dense_calls >= 4  # each decode's first call and its block boundaries
    assert runtime.stats.reruns == 1  # the very first sparse call only
