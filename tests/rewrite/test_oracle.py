"""The compiled model (backend="dyllm", aot_eager lowering) matches the plain-torch oracle step by step."""

import pytest
import torch

from dyllm_compile.generate import generate
from dyllm_compile.models import dream_like, llada_like
from dyllm_compile.passes.region_graph import SIZES_SYMBOLIC_FOLDS
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from oracle import Lockstep, Oracle

MASK = 127
MODELS = {"llada": lambda: llada_like("tiny", init_std=0.2), "dream": lambda: dream_like("tiny", init_std=0.2)}
# Forms the rewrite takes a graph-level step for, each run by one test, not by every MODELS test: one q/k/v
# projection split three ways (the k/v and exact mode's q chains share it); hand-written attention (replaced by
# SDPA before the analysis, its products as matmuls or as einsums; the oracle computes attention its own way, so
# it checks that replacement too); an MoE dispatching each expert's rows; an MoE on rows sorted by expert
# (grouped products, the inverse permutation); q/k norms on the heads folded into the rows (in the k chain and
# exact mode's q chain); attention sinks (GPT-OSS's, a logit per head; and one projected from each row), which
# scale each row's cached sink-free context; hyper-connections (residual streams per row, each branch reading a mix
# of them and writing its output back into each: the FFN's cached branch is what it writes back); flex_attention
# (replaced by SDPA with the mask its block mask applies, the full mask built in the graph); soft-capped scores
# (Gemma-2's, hand-written or as a flex score_mod: dyllm::sdpa_softcap, the cap passed to the cached attention); the
# FFN and its residual add on rows with the batch folded in (OPT's: gathered and scattered as [B, N, D]); the FFN
# and its residual add with the tokens last, [B, D, N], its products kernel-1 convolutions (SqueezeBERT's layout:
# its output scattered along dim 2).
MODELS_FORMS = {"fused": lambda: llada_like("tiny", init_std=0.2, fused_qkv=True, n_kv_heads=2),
                "hand_written": lambda: llada_like("tiny", init_std=0.2, attention="manual", n_kv_heads=2),
                "einsum": lambda: llada_like("tiny", init_std=0.2, attention="einsum"),
                "folded_heads": lambda: llada_like("tiny", init_std=0.2, attention="folded", n_kv_heads=2),
                "moe_dispatch": lambda: llada_like("tiny", init_std=0.2, ffn="moe", moe_routing="dispatch"),
                "moe_grouped": lambda: llada_like("tiny", init_std=0.2, ffn="moe", moe_routing="grouped"),
                "qk_norm_rows": lambda: llada_like("tiny", init_std=0.2, qk_norm=True, qk_norm_layout="rows"),
                "sinks": lambda: llada_like("tiny", init_std=0.2, attention="manual", n_kv_heads=2, sinks="head"),
                "row_sinks": lambda: llada_like("tiny", init_std=0.2, attention="einsum", sinks="row"),
                "hyper_connections": lambda: llada_like("tiny", init_std=0.2, hyper_connections=4),
                "flex": lambda: llada_like("tiny", init_std=0.2, attention="flex", n_kv_heads=2),
                "softcap": lambda: llada_like("tiny", init_std=0.2, attention="manual", n_kv_heads=2, softcap=0.5),
                "flex_softcap": lambda: llada_like("tiny", init_std=0.2, attention="flex", softcap=0.5),
                "folded_ffn": lambda: llada_like("tiny", init_std=0.2, ffn_rows="folded"),
                "channels_ffn": lambda: llada_like("tiny", init_std=0.2, ffn_rows="channels")}
# Forms Dynamo traces whole only with data-dependent sizes captured (an MoE's torch.where dispatch)
DYNAMIC_OUTPUT_FORMS = {"moe_dispatch"}


def all_pairs(a: tuple, b: tuple, c: tuple) -> list[tuple]:
    """Three two-level factors in the four runs of a two-level orthogonal array: every value of each factor with
    every value of each other factor, not every triple. The matrices below run so rather than as full
    cross-products (the suite's time is mostly these decodes)."""
    (a0, a1), (b0, b1), (c0, c1) = a, b, c
    return [(a0, b0, c0), (a0, b1, c1), (a1, b0, c1), (a1, b1, c0)]


ALL_PAIRS_OF_MODE_BATCH_ROUTE = all_pairs(("paper", "exact"), (1, 3), ("buckets", "unbacked"))


def in_both_modes(items, other: tuple) -> list[tuple]:
    """Each of ``items`` in both modes, in two runs whose mode and ``other`` factor (two values) both differ; which
    mode takes which value alternates from item to item, so that across items every (mode, value) pair runs."""
    (first, second) = other
    pairs = ((("paper", first), ("exact", second)), (("paper", second), ("exact", first)))
    return [(item, mode, value) for i, item in enumerate(items) for mode, value in pairs[i % 2]]


def _run(arch, batch, options, oracle_kwargs, lowering="aot_eager", gen_length=16, device="cpu", prompt_length=8,
         dynamic=None):
    torch._dynamo.reset()
    lock_serial = last_serial()
    model = {**MODELS, **MODELS_FORMS}[arch]().to(device)
    compiled = torch.compile(model, backend="dyllm", dynamic=dynamic, options={"lowering": lowering, **options})
    oracle = Oracle(model, **oracle_kwargs)
    prompt = torch.randint(0, 100, (batch, prompt_length), generator=torch.Generator().manual_seed(batch)).to(device)
    lock = Lockstep(compiled, oracle)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=arch in DYNAMIC_OUTPUT_FORMS):
        generate(lock, prompt, mask_token_id=MASK, gen_length=gen_length, steps=gen_length, block_length=8)
    lock.runtimes = runtimes(lock_serial)
    return lock, oracle


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("mode, batch, row_counts", ALL_PAIRS_OF_MODE_BATCH_ROUTE)
def test_forced_salient_sets_match_oracle(arch, mode, batch, row_counts):
    lock, oracle = _run(arch, batch, {"attention_mode": mode, "force_salient": 0.3, "seed": 5,
                                      "row_counts": row_counts},
                        dict(mode=mode, force_salient=0.3, seed=5))
    assert lock.steps == 16
    fractions = torch.tensor(oracle.fractions)
    assert 0.2 < fractions.mean() < 0.9  # really sparse, not everything recomputed


@pytest.mark.parametrize("arch, mode, batch", all_pairs(tuple(MODELS), ("paper", "exact"), (1, 3)))
def test_default_threshold_matches_oracle(arch, mode, batch):
    lock, oracle = _run(arch, batch, {"attention_mode": mode}, dict(mode=mode, threshold=0.99))
    stats = [r.stats for r in lock.runtimes if r.stats.sparse_calls]
    assert len(stats) == 1 and stats[0].sparse_calls == 15 and stats[0].dense_calls == 1
    assert torch.tensor(oracle.fractions).mean() < 1.0


@pytest.mark.parametrize("arch, mode, row_counts", in_both_modes(MODELS_FORMS, ("buckets", "unbacked")))
def test_model_forms_match_oracle(arch, mode, row_counts):
    """A fused q/k/v projection is in the k and v chains (and exact mode's q chain), computed once on their rows;
    paper mode's q, on every row, computes it for every row as well. Hand-written attention is cached like SDPA.
    An MoE that dispatches each expert's rows (torch.where, index_add_), or sorts them by expert (sort, grouped
    products, the inverse permutation), is gated like any FFN: it runs on the salient rows alone. A k norm on the
    heads folded into the rows ([B * N * H, D]) is in the k chain."""
    lock, oracle = _run(arch, 3, {"attention_mode": mode, "force_salient": 0.3, "seed": 5,
                                  "row_counts": row_counts}, dict(mode=mode, force_salient=0.3, seed=5))
    assert lock.steps == 16 and 0.2 < torch.tensor(oracle.fractions).mean() < 0.9
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert all(site.cached for site in runtime.plan.sites) and not runtime.plan.reasons
    assert {r.role for r in runtime.plan.regions} >= {"moe" if arch.startswith("moe") else "ffn", "k", "v"}
    if row_counts == "unbacked":  # the default route on CPU: the decode at the defaults, once per form
        _, oracle2 = _run(arch, 1, {"attention_mode": mode}, dict(mode=mode, threshold=0.99))
        assert torch.tensor(oracle2.fractions).mean() < 1.0


@pytest.mark.parametrize("row_counts", ["buckets", "unbacked"])
@pytest.mark.parametrize("arch", ["moe_dispatch", "moe_grouped"])
def test_symbolic_batch_folded_into_rows_matches_oracle(arch, row_counts):
    """Compiled with dynamic shapes at batch 3, the MoE folds a symbolic batch into the rows it dispatches
    (``x.reshape(-1, D)``: [s0, s1, D] -> [s0 * s1, D]) or sorts (the inverse permutation's ``arange`` as long
    as the rows), and is gated all the same."""
    if arch == "moe_grouped" and not SIZES_SYMBOLIC_FOLDS:
        pytest.skip("torch < 2.13 cannot size the sorted rows' arange in the rewritten graph: the MoE stays dense, "
                    "named (tests/passes/test_sorted_rows.py checks the refusal)")
    lock, oracle = _run(arch, 3, {"force_salient": 0.3, "seed": 5, "row_counts": row_counts},
                        dict(mode="exact", force_salient=0.3, seed=5), dynamic=True)
    assert lock.steps == 16 and 0.2 < torch.tensor(oracle.fractions).mean() < 0.9
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert [r.layer for r in runtime.plan.regions if r.role == "moe"] == [0, 1] and not runtime.plan.reasons


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_soft_cap_read_from_an_input_matches_oracle(mode, incremental_attention):
    """Compiled with dynamic shapes, the cap is a float attribute Dynamo reads from an input (``.item()``, divided by
    before the tanh and multiplied by after it): the site is still one soft-capped op, its cap each variant's
    constant, and the op (the incremental route, forced) takes it as a Scalar (before, the dense variant failed
    on the op's float argument and the graph fell back to plain lowering)."""
    lock, oracle = _run("softcap", 3, {"attention_mode": mode, "force_salient": 0.3, "seed": 5},
                        dict(mode=mode, force_salient=0.3, seed=5), dynamic=True)
    assert lock.steps == 16 and 0.2 < torch.tensor(oracle.fractions).mean() < 0.9
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.stats.fallback is None and not runtime.plan.reasons
    assert all(s.cached and isinstance(s.site.softcap, torch.fx.Node) for s in runtime.plan.sites)


@pytest.mark.inductor
def test_pointwise_convolutions_on_gathered_rows_lower_through_inductor():
    """SqueezeBERT's layout (channels_ffn: the FFN's products kernel-1 convolutions over [B, D, N]) through
    Inductor's C++ code on CPU's data-dependent row counts: on the gathered rows the convolutions run as the
    products they are (``region_graph.channel_product``). Before, Inductor's convolution could not be lowered over
    a data-dependent length, the sparse variant failed to compile and the graph ran without the rewrite."""
    lock, _ = _run("channels_ffn", 2, {"force_salient": 0.3, "seed": 5, "row_counts": "unbacked"},
                   dict(mode="exact", force_salient=0.3, seed=5), lowering="inductor")
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert lock.steps == 16 and runtime.stats.sparse_calls == 15 and runtime.stats.fallback is None


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("query_pruning_period", [0, 4])
def test_the_ops_incremental_route_matches_oracle(device, mode, query_pruning_period, incremental_attention):
    """Every site calls dyllm::cached_attention (the small-problem route, which traces either mode's attention
    into the graph instead, is off), so the op's CPU reference and, on CUDA, its Triton kernels run under the
    lowering (aot_eager on CPU, Inductor on CUDA) against the oracle, with and without query pruning."""
    options = {"attention_mode": mode, "query_pruning_period": query_pruning_period, "mask_token_id": MASK}
    lowering = "inductor" if device == "cuda" else "aot_eager"
    lock, oracle = _run("dream", 3, options, dict(mode=mode, threshold=0.99,
                                                   query_pruning_period=query_pruning_period),
                        lowering=lowering, device=device)
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert lock.steps == 16 and runtime.stats.sparse_calls == 15
    assert torch.tensor(oracle.fractions).mean() < 1.0


@pytest.mark.parametrize("arch, mode, batch", all_pairs(tuple(MODELS), ("paper", "exact"), (1, 3)))
def test_query_pruning_matches_oracle(arch, mode, batch):
    """Prompt rows are queried on every 4th call only; in between they keep their cached context (and so their
    K/V, attention output and FFN output), as the oracle does."""
    options = {"attention_mode": mode, "query_pruning_period": 4, "mask_token_id": MASK}
    lock, oracle = _run(arch, batch, options, dict(mode=mode, threshold=0.99, query_pruning_period=4))
    assert lock.steps == 16
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.plan.prunes_queries and runtime.plan.queried_regions  # q chain, attention and o proj
    # exact mode: q is projected for S_in only, into its cache, and the queried rows are gathered from it
    assert [s.gated_q for s in runtime.plan.sites] == [mode == "exact"] * len(runtime.plan.sites)
    # CPU default: unbacked row counts, so one variant serves the calls that query every row and the others.
    assert list(runtime.sparse_fns) and {key[:2] for key in runtime.sparse_fns} == {(None, None)}
    assert runtime.stats.sparse_compiles == 1
    assert runtime.stats.rows_computed < 0.8 * runtime.stats.rows_dense


@pytest.mark.parametrize("arch", ["sinks", "row_sinks"])
@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_attention_sinks_with_query_pruning_match_oracle(arch, mode):
    """With query pruning, rows not queried keep their sink's share of the mass (the cached softmax statistics
    it is computed from, kept in paper mode too) as well as their context."""
    options = {"attention_mode": mode, "query_pruning_period": 4, "mask_token_id": MASK}
    lock, oracle = _run(arch, 3, options, dict(mode=mode, threshold=0.99, query_pruning_period=4))
    assert lock.steps == 16
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.plan.prunes_queries and all(site.cached and site.site.sinks is not None
                                               for site in runtime.plan.sites)
    assert {spec.name for spec in runtime.plan.caches} >= {"L0.c", "L0.m", "L0.l", "L1.c", "L1.m", "L1.l"}


def test_query_pruning_buckets_match_oracle():
    """Capacity buckets: the queried rows have their own static capacity, sized from the queried mask."""
    options = {"query_pruning_period": 4, "mask_token_id": MASK, "row_counts": "buckets",
               "symbolic_capacities": False}  # a variant per queried capacity, which the keys show
    lock, _ = _run("llada", 3, options, dict(threshold=0.99, query_pruning_period=4))
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    n = 8 + 16
    assert {key[1] for key in runtime.sparse_fns} == {n, 16}  # all rows every 4th call, else the 16 response rows


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("row_counts", ["buckets", "unbacked"])
def test_refresh_over_a_long_prompt_runs_dense_and_matches_oracle(mode, row_counts):
    """A refresh queries the 24 prompt rows of 40 again: more than max_changed_fraction (0.5) of the rows are new,
    so the call runs dense, as in the oracle, on both row-count routes; the calls between refreshes stay sparse."""
    options = {"attention_mode": mode, "query_pruning_period": 4, "mask_token_id": MASK, "row_counts": row_counts}
    lock, _ = _run("llada", 2, options, dict(mode=mode, query_pruning_period=4), prompt_length=24)
    (runtime,) = lock.runtimes
    assert lock.steps == 16 and runtime.stats.dense_calls == 4 and runtime.stats.sparse_calls == 12  # 0, 4, 8, 12
    assert all(key[1] != 40 for key in runtime.sparse_fns)  # no variant queries every row


def test_query_pruning_with_forced_salient_rows_matches_oracle():
    """Forced sets also mark prompt rows: salient but not queried, they keep their cached context."""
    options = {"query_pruning_period": 3, "mask_token_id": MASK, "force_salient": 0.3, "seed": 2}
    lock, _ = _run("llada", 3, options, dict(query_pruning_period=3, force_salient=0.3, seed=2))
    assert lock.steps == 16


@pytest.mark.parametrize("arch, mode, salient", all_pairs(tuple(MODELS), ("paper", "exact"), ("forced", "threshold")))
def test_salient_output_projection_matches_oracle(arch, mode, salient):
    """output_projection="salient": the o projection runs on each site's S_out only (one gathered region more
    per layer, cached like the FFN output); the other rows keep their cached projection, as in the oracle."""
    rows = {"force_salient": 0.3, "seed": 3} if salient == "forced" else {}
    options = {"attention_mode": mode, "output_projection": "salient", **rows}
    lock, oracle = _run(arch, 3, options, dict(mode=mode, threshold=0.99, output_projection="salient", **rows))
    assert lock.steps == 16
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    gated = [r.role for r in runtime.plan.regions]
    assert gated.count("attn_out") == len(runtime.plan.sites) == 2 and not runtime.plan.queried_regions
    assert [c.name for c in runtime.plan.caches].count("L0.o") == 1
    assert runtime.stats.rows_computed < runtime.stats.rows_dense
    assert torch.tensor(oracle.fractions).mean() < 1.0
