"""Hugging Face modeling code, unmodified, through ``backend="dyllm"``: threshold 1 equals dense at every call.

BERT (post-LN, learned positions, masked LM), ModernBERT (one fused q/k/v projection unbound into three, RoPE,
GeGLU), SqueezeBERT (its stream channels-first, [B, D, N], its products kernel-1 convolutions) and decoder
architectures called with a full 4-d mask (bidirectional, as Dream runs its Qwen2 layers):
Qwen2, GPT-2 (Conv1D as addmm), GPT-NeoX and Falcon (parallel attention and MLP summed before the residual),
Phi-3 (a fused projection sliced three ways), OPT (its FFN and residual add on rows with the batch folded in,
``[B * N, D]``), and hand-written ("eager") attention: Llama's, GPT-J's (q and k cast
to fp32, scores divided by a tensor), MPT's (ALiBi bias, padding filled with the lowest float), Granite-SWA's
(attention sinks applied after the softmax; transformers 5). None is known to
the compiler: each site is found from the graph and cached, no site stays dense, and every layer's FFN is gated."""

import importlib.util

import pytest
import torch
import transformers

from dyllm_compile.explain import Report, explain
from dyllm_compile.passes.graph_utils import tensor_value
from dyllm_compile.passes.region_graph import SIZES_SYMBOLIC_FOLDS
from dyllm_compile.passes.regions import distinct_flops, node_flops
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from hf_builders import ARCHITECTURES, CARRIED_STATES, MOE, SHARED_READS, SMALL, ZERO_EXPERTS, build

MASK = 127


def _threshold_one_runtime(name, experts="batched_mm"):
    """Compiles ``name`` at threshold 1, checks four calls (three sparse) against the model, returns the runtime."""
    torch._dynamo.reset()
    before = last_serial()
    model, forward = build(name, experts)
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 6:] = MASK
    with torch.inference_mode():
        for call in range(4):
            expected, got = forward(ids.clone()), compiled(ids.clone())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            ids[:, 6 + 2 * call: 8 + 2 * call] = torch.randint(3, 120, (2, 2))
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3
    return runtime


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_hf_model_threshold_one_equals_dense(name):
    runtime = _threshold_one_runtime(name)
    assert len(runtime.plan.sites) == 2 and all(s.cached for s in runtime.plan.sites), runtime.plan.reasons
    assert [r.layer for r in runtime.plan.regions if r.role == "ffn"] == [0, 1]
    assert {r.role for r in runtime.plan.regions} >= {"k", "v", "q", "lm_head"}


@pytest.mark.parametrize("name", list(SHARED_READS))
def test_hf_sites_sharing_their_reads_threshold_one_equals_dense(name):
    """DiffLlama's two attentions per layer read one q and one k and each half of one value projection: each site is
    cached, the shared queries in one cache (their chain runs once; before, a second chain with the same exit was
    never emitted), each half of the values from its own result of the split (before, both sites stayed dense).
    Each site repeats the shared keys over the heads itself: the sites share the keys' chain and cache, kv heads
    only (before, each cached its repeated keys, all heads, and the key projection ran on every row). DeepSeek-V4's
    hyper-connections mix the streams with a Sinkhorn-projected matrix; an FFN region the analysis finds ends at a
    query: it stays dense, named, and the query is cached with its chain (before, the sparse variant failed to
    build and the graph fell back to plain lowering)."""
    runtime = _threshold_one_runtime(name)
    assert all(s.cached for s in runtime.plan.sites), runtime.plan.reasons
    caches = [s.caches for s in runtime.plan.sites]
    if name == "diffllama" and len(caches) == 4:  # transformers 5 (4 doubles the values in one attention)
        assert all(a["q"] == b["q"] and a["k"] == b["k"] and a["v"] != b["v"] for a, b in (caches[0:2], caches[2:4]))
        kv_heads = SHARED_READS[name]()[1].num_key_value_heads
        assert all(tensor_value(runtime.plan.caches[s.caches["k"]].node).shape[1] == kv_heads
                   for s in runtime.plan.sites)
        # explain names the shared chains with the layer that runs them, their FLOPs counted once (before, the
        # second site's row listed its q and k projections as dense)
        report = Report([runtime.plan.analysis], runtime.config)
        rows = report.layers(runtime.plan.analysis)
        assert rows[1].gated[:2] == ["q proj (layer 0's)", "k proj (layer 0's)"] and "q proj" not in rows[1].dense
        assert report.gated_flops()[0] == distinct_flops(runtime.plan.regions)
        # no product left on every row, in a dynamic graph too, where each site views the query projection itself:
        # the value projection's split and the query projection are shared projections (before 2026-12-06, 13.6%
        # of the FLOPs on every row)
        _, forward = build(name)
        with torch.inference_mode():
            dynamic = explain(forward, torch.randint(3, 120, (2, 16)), dynamic=True, verbose=False)
        assert dynamic.outside(dynamic.graphs[0]) == []
        assert [r.role for r in dynamic.graphs[0].regions].count("shared_proj") >= 2


def test_llama4_tiled_experts_and_complex_rotation_threshold_one_equals_dense():
    """Llama-4's MoE feeds every expert a copy of every token (``x.repeat(experts, 1)``: whole copies of the rows,
    more leading rows) and rotates q and k as complex numbers (``view_as_complex`` / ``view_as_real``). Before,
    neither had a rule: each layer's MoE stayed dense (the first "an input folds batch and tokens together") and the
    rotations were token mixing tested at every call. Now every site is cached and each layer's MoE gated."""
    runtime = _threshold_one_runtime("llama4")
    assert len(runtime.plan.sites) == 2 and all(s.cached for s in runtime.plan.sites), runtime.plan.reasons
    assert [(r.role, r.layer) for r in runtime.plan.regions if r.role in ("ffn", "moe")] == [("moe", 0), ("moe", 1)]
    assert not runtime.plan.mixing  # no token mixing left to test at each call (the rotations were)


def test_cache_keeps_a_value_the_model_writes_into_later():
    """Falcon's ``mlp_output += attention_output`` writes into the FFN's output, the value the FFN cache keeps.
    Once, the cache held the sum (on a later call, rows that keep their cached FFN output would have added the
    attention twice). The write is an out-of-place add by the time the rewrite reads the graph (in_place_writes):
    the cache is the FFN output as computed."""
    torch._dynamo.reset()
    before = last_serial()
    model, forward = build("falcon")
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager"})
    mlp = {}
    model.transformer.h[0].mlp.register_forward_hook(lambda module, args, out: mlp.__setitem__("out", out.clone()))
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids.clone()), forward(ids.clone()), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    (states,) = runtime.states.values()
    names = [spec.name for spec in runtime.plan.caches]
    torch.testing.assert_close(states[0].caches[names.index("L0.ffn")], mlp["out"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_layers, dynamic", [((), None), ((0, 1), None), ((), True)])
def test_hf_moe_traced_whole_threshold_one_equals_dense(dense_layers, dynamic):
    """OLMoE's sparse MoE block. In transformers 4 (LLaDA-MoE's modeling code copies it): a static loop over the
    experts, each taking its rows with ``torch.where`` and adding its output back with ``final.index_add_(...)`` as
    a statement; with Dynamo capturing data-dependent sizes the model is one graph, and each layer's MoE is a gated
    region: its dispatch runs on the salient rows alone (its ``zeros`` accumulator rebuilt for them, batch 2 folded
    into the rows). In transformers 5, the ``batched_mm`` experts (hf_builders): the experts' weights gathered per
    row and a batched product, row-wise too. Before in_place_writes, threshold 1 differed from dense by 0.03 (the
    ``index_add_`` calls, whose results nothing reads, were dropped as dead code, and the MoE returned zeros); with
    ``dense_layers`` compiling failed (the variant was retraced with Dynamo's data-dependent size bindings in
    another ShapeEnv).
    ``dynamic``: the batch is a symbol folded into the rows (``zeros((batch * length, D))``), the accumulator's
    rows computed from the inputs' sizes in the variant (before, the MoE stayed dense)."""
    _moe_equals_dense("olmoe", "batched_mm", dense_layers, dynamic)


@pytest.mark.skipif(importlib.util.find_spec("transformers.integrations.moe") is None,
                    reason=f"transformers {transformers.__version__} has no experts implementations (5 has)")
@pytest.mark.parametrize("name, dynamic", [(name, None) for name in MOE] + [("qwen2_moe", True)])
def test_hf_moe_grouped_mm_experts_threshold_one_equals_dense(name, dynamic):
    """transformers 5's default experts, ``grouped_mm``, in every MoE model here: the rows sorted by expert, a
    grouped product per projection, the inverse permutation. Each layer's MoE is gated (before, the sort kept it
    dense); DeepSeek-V3's group-limited router too (before, its broadcast group mask, ``expand`` from size 1, and
    its ``bool`` cast had no rule), and Phi-MoE's, whose expert ids are two maxima's indices concatenated (before,
    not known to be indices inside the histogram's range). GPT-OSS's attention, hand-written with a sink per head,
    is cached (before, no site was found and nothing in the graph was gated). ``dynamic``: the inverse
    permutation's ``arange`` as long as a symbolic batch times the rows."""
    _moe_equals_dense(name, "grouped_mm", (), dynamic)


def _moe_equals_dense(name, experts, dense_layers, dynamic):
    torch._dynamo.reset()
    before = last_serial()
    model, forward = build(name, experts)
    options = {"lowering": "aot_eager", "threshold": 1.0, "dense_layers": dense_layers}
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 6:] = MASK
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.inference_mode():
        compiled = torch.compile(forward, backend="dyllm", dynamic=dynamic, options=options)
        for call in range(4):
            expected, got = forward(ids.clone()), compiled(ids.clone())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            ids[:, 6 + 2 * call: 8 + 2 * call] = torch.randint(3, 120, (2, 2))
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 3
    assert [s.cached for s in runtime.plan.sites] == [not dense_layers] * 2
    gated = [(r.role, r.layer) for r in runtime.plan.regions if r.role in ("ffn", "moe")]
    if dynamic and not SIZES_SYMBOLIC_FOLDS:  # torch < 2.13: the MoE stays dense, named
        assert not gated and any("materialize_symint" in reason for reason in runtime.plan.reasons)
        return
    assert gated == ([] if dense_layers else [("moe", 0), ("moe", 1)])


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_padded_rows_hidden_from_every_key_equal_dense(mode):
    """Dream's generation utilities mask a padded batch as ``key[:, None, :, None] & key[:, None, None, :]``: a padded
    row sees no key at all, and SDPA returns zeros for it. Before, the cached op returned NaN there (``-inf - -inf``
    in its softmax), from the first (dense) call on, and the NaN reached every row through the padded rows' values
    in the next layer. Now those rows are zeros in both modes and every call equals the model (threshold 1)."""
    torch._dynamo.reset()
    before = last_serial()
    model, _ = build("qwen2")
    key = torch.ones(2, 16, dtype=torch.bool)
    key[1, :5] = False  # the second prompt left-padded by five
    mask = key[:, None, :, None] & key[:, None, None, :]

    def forward(ids):
        return model(input_ids=ids, attention_mask=mask).logits

    compiled = torch.compile(forward, backend="dyllm",
                             options={"lowering": "aot_eager", "threshold": 1.0, "attention_mode": mode})
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 8:] = MASK
    with torch.inference_mode():
        for call in range(4):
            expected, got = forward(ids.clone()), compiled(ids.clone())
            assert not expected.isnan().any()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            ids[:, 8 + 2 * call: 10 + 2 * call] = torch.randint(3, 120, (2, 2))
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3 and all(s.cached for s in runtime.plan.sites), runtime.plan.reasons


def test_padded_rows_that_see_no_key_are_not_salient():
    """Below threshold 1, a padded row that sees no key has context zero at every call: unchanged, so not salient
    (before, the cosine of two zero vectors, 0, made each such row salient in every layer at every call). A call
    that changes no token then recomputes no row of either prompt; the padded prompt's pad rows included."""
    torch._dynamo.reset()
    before = last_serial()
    model, _ = build("qwen2")
    key = torch.ones(2, 16, dtype=torch.bool)
    key[1, :5] = False
    mask = key[:, None, :, None] & key[:, None, None, :]

    def forward(ids):
        return model(input_ids=ids, attention_mask=mask).logits

    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager", "threshold": 0.9})
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 8:] = MASK
    with torch.inference_mode():
        first = compiled(ids.clone())
        again = compiled(ids.clone())
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    fractions = runtime.stats.history[-1]  # [sites, B] of the sparse call
    assert fractions.shape[1] == 2 and (fractions == 0).all(), fractions
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_llama_flex_attention_with_a_padded_batch_equals_dense():
    """Llama through transformers' flex_attention, a left-padded batch of two: the mask's block mask is built
    outside the graph (a graph break), so the position ids [1, N] come in ahead of the hidden states. Each site is
    SDPA with the block mask's mask, cached; every call equals the model (threshold 1). Before, the sites stayed
    dense; and with the sites found, the batch was read from the position ids (1), so every region stayed dense
    ("its output is not batch-first")."""
    torch._dynamo.reset()
    before = last_serial()
    config = transformers.LlamaConfig(num_key_value_heads=2, use_cache=False, **SMALL)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "flex_attention"
    key = torch.ones(2, 16, dtype=torch.long)
    key[1, :3] = 0
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 8:] = MASK
    with torch.inference_mode():
        for call in range(4):
            expected = model(ids.clone(), attention_mask=key).logits
            torch.testing.assert_close(compiled(ids.clone(), attention_mask=key).logits, expected, rtol=1e-5,
                                       atol=1e-5)
            ids[:, 8 + 2 * call: 10 + 2 * call] = torch.randint(3, 120, (2, 2))
    layers = [r for r in runtimes(before) if r.plan.sites]
    assert layers and all(s.cached for r in layers for s in r.plan.sites)
    assert sum(r.stats.sparse_calls for r in layers) >= 2 and not any(r.plan.reasons for r in layers)


@pytest.mark.parametrize("name", list(ZERO_EXPERTS))
def test_moe_with_zero_experts_is_gated(name):
    """LongCat-Flash (transformers 5, ``grouped_mm`` experts): threshold 1 equals dense, both attention sublayers
    are cached, and the MoE, whose zero experts' ids are spread over the real experts' by a ``where`` on the ids'
    range, is gated beside both FFNs (before 2026-12-06 it stayed dense: "'histc' of keys that are not provably
    indices inside its range", passes/index_ranges.py)."""
    runtime = _threshold_one_runtime(name, "grouped_mm")
    assert runtime.stats.fallback is None and [s.cached for s in runtime.plan.sites] == [True, True]
    assert sorted(r.role for r in runtime.plan.regions if r.role in ("ffn", "moe")) == ["ffn", "ffn", "moe"]
    assert not runtime.plan.reasons and not runtime.plan.analysis.dense_reasons


@pytest.mark.parametrize("name", list(CARRIED_STATES))
def test_moe_whose_router_state_reaches_the_next_layer(name):
    """Zaya (transformers 5), with its default ``grouped_mm`` experts: threshold 1 equals dense; both attention sites
    are cached, their q and k convolved over the tokens first (mixing points, tested each call); the last layer's
    MoE is gated, its skip expert's id bounded by ``masked_fill`` (before: "'histc' of keys that are not provably
    indices inside its range"). The first layer's router also passes its state to the next layer's: the spine is
    found without that read, so both MoEs are branches off the residual stream, gated (until 2026-12-06 the first
    ran on every row: the spine jumped from its attention to the last merge); its router's first projection, which
    both layers' MoEs read, is a shared projection computed on every row (docs/rewrite.md, "Open"). The q
    and k projections, read by the convolution (through a concatenation) and by the queries' and keys' residual
    paths, are gated mixer inputs, each cached as a side exit (before, they ran on every row: 82.7% of the FLOPs
    outside every region), and so is the delayed value projection, which a shift over the tokens reads."""
    runtime = _threshold_one_runtime(name, "grouped_mm")
    assert runtime.stats.fallback is None and [s.cached for s in runtime.plan.sites] == [True, True]
    assert [(r.role, r.layer) for r in runtime.plan.regions if r.role in ("ffn", "moe")] == [("moe", 0), ("moe", 1)]
    (router,) = [r for r in runtime.plan.analysis.regions if r.role == "shared_proj" and r not in runtime.plan.regions
                 and r.layer == 0]
    assert [n.name for n in router.nodes if node_flops(n)] == ["router_hidden_states"]
    assert runtime.plan.mixing
    mixers = [r for r in runtime.plan.regions if r.role == "mixer_in"]
    # per layer: q and k projections (two side exits and the conv's input), the delayed value projection
    assert sorted(len(r.exits) for r in mixers) == [1, 1, 3, 3]
    # each numbered with the layer whose attention they feed (before: the second layer's with the first's, as what
    # came before the second site)
    assert sorted(r.layer for r in mixers) == [0, 0, 1, 1]
    assert all(sum(node_flops(n) for n in r.side_exits) for r in mixers if r.side_exits)
