"""flex_attention that only masks becomes SDPA with the mask its block mask applies (passes/flex_attention.py)."""

import operator

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from dyllm_compile.passes.analysis import analyze
from dyllm_compile.passes.flex_attention import block_mask_dense, score_bias_mask
from dyllm_compile.ops import sdpa_softcap
from dyllm_compile.passes.attention_sites import FLEX_REASON
from dyllm_compile.passes.graph_utils import is_symbolic, op_name, tensor_value
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

N, TILE = 24, 8  # three tiles of eight tokens


def _block_causal(b, h, q, kv):
    return (q // TILE) >= (kv // TILE)


def _sliding(b, h, q, kv):
    return (q - kv).abs() <= 5


def _dense(block_mask: BlockMask) -> torch.Tensor:
    t = block_mask.as_tuple()
    return block_mask_dense(t[2], t[3], t[4], t[5], t[0], t[1], t[-3], t[-2], t[-1])


@pytest.mark.parametrize("mask_mod", [_block_causal, _sliding])
@pytest.mark.parametrize("batch,heads", [(None, None), (2, 3)])
def test_block_mask_dense_is_the_mask_mod_where_the_tiles_come_from_it(mask_mod, batch, heads):
    """A block mask built from ``mask_mod``: full tiles where it holds throughout, partial where it holds somewhere;
    the dense mask equals ``mask_mod`` itself (torch's ``create_mask``)."""
    block_mask = create_block_mask(mask_mod, batch, heads, N, N, device="cpu", BLOCK_SIZE=TILE)
    want = create_mask(mask_mod, batch, heads, N, N, device="cpu")
    assert torch.equal(_dense(block_mask), want)


def test_block_mask_dense_follows_the_tiles_over_mask_mod():
    """Tiles listed by hand: unlisted tiles attend nowhere whatever ``mask_mod`` says, full tiles everywhere, partial
    tiles where ``mask_mod`` allows (torch's ``to_dense`` gives the tiles)."""
    partial = torch.tensor([[[[1, 0, 0], [0, 2, 0], [0, 0, 0]]]], dtype=torch.int32)  # kv tile ids per query tile
    block_mask = BlockMask.from_kv_blocks(torch.tensor([[[1, 2, 0]]], dtype=torch.int32), partial,
                                          torch.tensor([[[0, 0, 1]]], dtype=torch.int32),
                                          torch.tensor([[[0, 0, 0], [0, 0, 0], [2, 0, 0]]]).int()[None],
                                          BLOCK_SIZE=TILE, mask_mod=_sliding)
    tiles = block_mask.to_dense().bool()  # [1, 1, 3, 3]: partial or full
    full = torch.zeros(3, 3, dtype=torch.bool)
    full[2, 2] = True
    by_token = lambda t: t.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)  # noqa: E731
    sliding = create_mask(_sliding, 1, 1, N, N, device="cpu")
    want = (by_token(tiles & ~full) & sliding) | by_token(full)
    got = _dense(block_mask)
    assert torch.equal(got, want) and not torch.equal(got, sliding)


class FlexLayer(torch.nn.Module):
    """Self-attention through flex_attention and an MLP, with a block-causal mask as block diffusion uses, and a
    score_mod by name (``SCORE_MODS``)."""

    def __init__(self, score_mod="none", heads=4, kv_heads=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d = 32
        self.heads, self.kv_heads, self.score_mod = heads, kv_heads, score_mod
        self.embed = torch.nn.Parameter(torch.randn(64, d, generator=gen))
        self.qkv = torch.nn.Parameter(torch.randn(d + 2 * d * kv_heads // heads, d, generator=gen) * 0.3)
        self.out = torch.nn.Parameter(torch.randn(d, d, generator=gen) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(4 * d, d, generator=gen) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(d, 4 * d, generator=gen) * 0.3)
        self.head = torch.nn.Parameter(torch.randn(64, d, generator=gen) * 0.3)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))
        self.register_buffer("bias", torch.randn(2, generator=gen))

    def forward(self, ids, block_mask):
        x = torch.nn.functional.embedding(ids, self.embed)
        b, n, d = x.shape
        kv = d * self.kv_heads // self.heads
        q, k, v = (x @ self.qkv.T).split([d, kv, kv], dim=-1)
        q, k, v = (t.view(b, n, -1, d // self.heads).transpose(1, 2) for t in (q, k, v))
        score_mod = SCORE_MODS[self.score_mod](self)
        a = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(b, n, d) @ self.out.T
        x = x + torch.relu(x @ self.up.T) @ self.down.T
        return x @ self.head.T


#: score_mods by name, each made for a FlexLayer: what flex_attention adds to (or does with) the scores.
SCORE_MODS = {
    "none": lambda layer: None,
    "softcap": lambda layer: lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0),
    "alibi": lambda layer: lambda s, b, h, q, kv: s + layer.slopes[h] * (kv - q),  # a buffer read per head
    # terms of every index, through a chain of additions and subtractions: per batch element, a distance penalty
    "batch_bias": lambda layer: lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs() + layer.bias[b] - 1.0,
    "minus_score": lambda layer: lambda s, b, h, q, kv: 1.0 - s,
    "score_twice": lambda layer: lambda s, b, h, q, kv: s + 0.5 * s,
    "capped_then_biased": lambda layer: lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0) + layer.slopes[h],
}


def _graphs(model, *args, dynamic=None):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.inference_mode():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return graphs


def test_graph_before_and_after():
    """Before: one ``flex_attention`` node (its score_mod a graph returning the score, its block mask's tensors
    inputs). After: ``block_mask_dense`` of those tensors and the mask_mod, then SDPA with that mask; the analysis
    finds an SDPA site with its k/v chains and the FFN gated."""
    block_mask = create_block_mask(_block_causal, None, None, N, N, device="cpu", BLOCK_SIZE=TILE)
    (gm,) = _graphs(FlexLayer(), torch.randint(0, 64, (2, N)), block_mask)
    before = [op_name(n) for n in gm.graph.nodes if n.op == "call_function"]
    assert "hop.flex_attention" in before and "sdpa" not in before
    analysis = analyze(gm)
    after = [n for n in analysis.gm.graph.nodes if n.op == "call_function"]
    names = [op_name(n) for n in after]
    assert "hop.flex_attention" not in names and names.count("sdpa") == 1
    mask = next(n for n in after if n.target is block_mask_dense)
    sdpa = next(n for n in after if op_name(n) == "sdpa")
    assert sdpa.kwargs["attn_mask"] is mask and sdpa.kwargs["enable_gqa"]
    assert [(s.kind, s.label) for s in analysis.sites] == [("sdpa", "flex")] and not analysis.sites[0].dense_reason
    assert [r.role for r in analysis.gated_regions] == ["ffn", "lm_head"]
    assert analysis.chains[0]["k"].gated and analysis.chains[0]["v"].gated


@pytest.mark.parametrize("score_mod", ["minus_score", "score_twice", "capped_then_biased"])
def test_a_score_mod_other_than_a_bias_or_a_cap_keeps_the_site_dense_with_its_reason(score_mod):
    """The score subtracted, the score read twice, a cap and a bias together: neither the score plus terms
    independent of it nor a soft-cap by numbers."""
    block_mask = create_block_mask(_block_causal, None, None, N, N, device="cpu", BLOCK_SIZE=TILE)
    (gm,) = _graphs(FlexLayer(score_mod), torch.randint(0, 64, (2, N)), block_mask)
    analysis = analyze(gm)
    assert [s.kind for s in analysis.sites] == ["flex"]
    assert "score_mod changes the scores" in analysis.sites[0].dense_reason


@pytest.mark.parametrize("score_mod", ["alibi", "batch_bias"])
@pytest.mark.parametrize("mask_mod", [_block_causal, None])
def test_score_bias_mask_with_sdpa_is_flex_attention(score_mod, mask_mod):
    """The float mask of an additive score_mod (its terms where the block mask attends, -inf elsewhere) makes SDPA
    compute what flex_attention computes, with the block-causal mask or none (flex's full mask), grouped heads."""
    layer = FlexLayer(score_mod)
    mod = SCORE_MODS[score_mod](layer)
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, N, 8, generator=gen), torch.randn(2, 2, N, 8, generator=gen), torch.randn(
        2, 2, N, 8, generator=gen)
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, N, N, device="cpu",
                                                                   BLOCK_SIZE=TILE)
    want = flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, enable_gqa=True)
    allowed = torch.ones(1, 1, N, N, dtype=torch.bool) if block_mask is None else _dense(block_mask)
    bias = score_bias_mask(allowed, lambda s, b, h, qi, kv, *buffers: mod(s, b, h, qi, kv), 2, 4, N, N)
    assert bias.dtype == torch.float32 and bias.shape == (2, 4, N, N)
    assert torch.equal(bias.isneginf(), ~allowed.expand(2, 4, N, N))
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_mod", [_block_causal, None])
def test_sdpa_softcap_is_flex_attention_with_a_capping_score_mod(mask_mod):
    """Soft-capping as a score_mod (``5 tanh(s / 5)``) under the block-causal mask or none, grouped heads: the
    soft-capped op with the block mask's dense mask computes what flex_attention computes."""
    mod = SCORE_MODS["softcap"](None)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, heads, N, 8, generator=gen) * 3 for heads in (4, 2, 2))
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, N, N, device="cpu",
                                                                   BLOCK_SIZE=TILE)
    want = flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, enable_gqa=True)
    allowed = torch.ones(1, 1, N, N, dtype=torch.bool) if block_mask is None else _dense(block_mask)
    got = sdpa_softcap(q, k, v, softcap=5.0, attn_mask=allowed, scale=8 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    uncapped = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    assert not torch.allclose(got, uncapped, atol=1e-3)


def test_graph_before_and_after_with_a_cap():
    """Before: flex_attention whose score_mod is ``5 * tanh(score / 5)``. After: ``dyllm::sdpa_softcap`` with
    ``softcap`` 5 and flex's scale (times 5 and 1 / 5), the block mask's dense mask; a cached "flex+softcap" site."""
    block_mask = create_block_mask(_block_causal, None, None, N, N, device="cpu", BLOCK_SIZE=TILE)
    (gm,) = _graphs(FlexLayer("softcap"), torch.randint(0, 64, (2, N)), block_mask)
    analysis = analyze(gm)
    after = [n for n in analysis.gm.graph.nodes if n.op == "call_function"]
    assert "hop.flex_attention" not in [op_name(n) for n in after]
    (node,) = [n for n in after if n.target is sdpa_softcap]
    assert node.kwargs["softcap"] == 5.0 and node.kwargs["scale"] == pytest.approx(8 ** -0.5)
    assert node.kwargs["attn_mask"].target is block_mask_dense
    assert [(s.kind, s.label, s.softcap) for s in analysis.sites] == [("sdpa", "flex+softcap", 5.0)]
    assert not analysis.sites[0].dense_reason


@pytest.mark.parametrize("score_mod,sizes", [("alibi", (None, 4, N, N)), ("batch_bias", (2, None, N, N))])
def test_graph_before_and_after_with_a_bias(score_mod, sizes):
    """Before: flex_attention with a score_mod adding terms to the score. After: ``score_bias_mask`` of the block
    mask's dense mask, the score_mod and its buffer, at the sizes of the indices its terms read (the heads for
    ALiBi's slopes, the batch for a per-element bias; one entry for the other), then SDPA with that float mask."""
    block_mask = create_block_mask(_block_causal, None, None, N, N, device="cpu", BLOCK_SIZE=TILE)
    (gm,) = _graphs(FlexLayer(score_mod), torch.randint(0, 64, (2, N)), block_mask)
    assert "hop.flex_attention" in [op_name(n) for n in gm.graph.nodes]
    analysis = analyze(gm)
    after = [n for n in analysis.gm.graph.nodes if n.op == "call_function"]
    assert "hop.flex_attention" not in [op_name(n) for n in after]
    bias = next(n for n in after if n.target is score_bias_mask)
    sdpa = next(n for n in after if op_name(n) == "sdpa")
    assert sdpa.kwargs["attn_mask"] is bias and bias.args[0].target is block_mask_dense
    assert tuple(bias.args[2:6]) == sizes and len(bias.args) == 7  # the buffer the terms read
    assert [(s.kind, s.label) for s in analysis.sites] == [("sdpa", "flex")] and not analysis.sites[0].dense_reason


@pytest.mark.parametrize("mode,score_mod", [("exact", "none"), ("paper", "none"), ("exact", "alibi"),
                                            ("paper", "batch_bias"), ("exact", "softcap"), ("paper", "softcap")])
def test_block_causal_flex_model_at_threshold_one_equals_dense(mode, score_mod):
    """A block-diffusion-style mask (each block attends to itself and the blocks before it), batch 2, with no
    score_mod or one that adds a bias: each call of the compiled model equals the model (threshold 1), its site
    cached."""
    model = FlexLayer(score_mod)
    block_mask = create_block_mask(_block_causal, None, None, N, N, device="cpu", BLOCK_SIZE=TILE)
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm",
                             options={"lowering": "aot_eager", "threshold": 1.0, "attention_mode": mode})
    ids = torch.randint(0, 60, (2, N), generator=torch.Generator().manual_seed(3))
    ids[:, 8:] = 63
    with torch.inference_mode():
        for call in range(4):
            expected = model(ids.clone(), block_mask)  # logits up to ~70: fp32 rounding of the scores' sums
            torch.testing.assert_close(compiled(ids.clone(), block_mask), expected, rtol=1e-5, atol=1e-4)
            ids[:, 8 + 3 * call: 11 + 3 * call] = torch.randint(0, 60, (2, 3))
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3 and [s.cached for s in runtime.plan.sites] == [True]


class MaskInTheForward(FlexLayer):
    """The block mask built in the forward (``create_block_mask``: vmap over ``mask_mod``, and the query tiles'
    index for the backward written into fresh tensors under vmap), or none given (flex's full mask, built alike)."""

    def __init__(self, built: bool, score_mod: str = "none"):
        super().__init__(score_mod)
        self.built = built

    def forward(self, ids):
        n = ids.shape[1]
        mask = create_block_mask(_block_causal, None, None, n, n, device="cpu", BLOCK_SIZE=TILE) if self.built else None
        return super().forward(ids, mask)


def _vmap_levels(gm) -> str:
    return "".join({"_vmap_increment_nesting": "(", "_vmap_decrement_nesting": ")"}.get(
        getattr(n.target, "__name__", ""), "") for n in gm.graph.nodes)


@pytest.mark.parametrize("built", [True, False])
def test_a_block_mask_built_in_the_graph_leaves_no_write_behind(built):
    """Before: the writes under vmap that build the query tiles' index kept the whole graph dense ("in-place
    'setitem' into 'dense_mask'"). After the replacement nothing reads them: they are erased with their vmap levels;
    the levels that build the mask the rewrite reads stay, balanced."""
    (gm,) = _graphs(MaskInTheForward(built), torch.randint(0, 64, (2, N)))
    assert any(n.target is operator.setitem for n in gm.graph.nodes)
    analysis = analyze(gm)
    assert not analysis.dense_reasons and [s.kind for s in analysis.sites] == ["sdpa"]
    assert not any(n.target is operator.setitem for n in analysis.gm.graph.nodes)
    levels = _vmap_levels(analysis.gm)
    assert len(levels) < len(_vmap_levels(gm)) and levels == "(" * (len(levels) // 2) + ")" * (len(levels) // 2)


@pytest.mark.parametrize("built", [True, False])
def test_a_block_mask_built_in_the_graph_at_threshold_one_equals_dense(built):
    """The variants keep the vmap levels that build the mask: torch.fx's dead-code elimination took the calls that
    open and close a level (no users, not marked side-effectful) for dead, and the variant failed to compile
    ("escaped from inside a function being vmapped"), falling back to the graph without the rewrite."""
    model = MaskInTheForward(built)
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(0, 60, (2, N), generator=torch.Generator().manual_seed(4))
    ids[:, 8:] = 63
    with torch.inference_mode():
        for call in range(3):
            torch.testing.assert_close(compiled(ids.clone()), model(ids.clone()), rtol=1e-5, atol=1e-4)
            ids[:, 8 + 3 * call: 11 + 3 * call] = torch.randint(0, 60, (2, 3))
    (runtime,) = runtimes(before)
    assert runtime.stats.fallback is None and runtime.stats.sparse_calls == 2
    assert [s.cached for s in runtime.plan.sites] == [True]


@pytest.mark.parametrize("score_mod", ["none", "alibi"])
def test_a_block_mask_over_dynamic_lengths_at_threshold_one_equals_dense(score_mod):
    """A second prompt length recompiles with the token count symbolic: the block mask built in the forward then
    carries its lengths as graph values, compared by their recorded sizes (before, as nodes they never equalled q's
    size: "covers other lengths", and the whole graph stayed dense through the mask's writes). Both graphs cache
    their site; a bias is built at the block mask's lengths."""
    model = MaskInTheForward(True, score_mod)
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    with torch.inference_mode():
        for n in (N, 2 * N):
            ids = torch.randint(0, 60, (2, n), generator=torch.Generator().manual_seed(n))
            ids[:, 8:] = 63
            for call in range(3):
                torch.testing.assert_close(compiled(ids.clone()), model(ids.clone()), rtol=1e-5, atol=1e-4)
                ids[:, 8 + 3 * call: 11 + 3 * call] = torch.randint(0, 60, (2, 3))
    graphs = runtimes(before)
    inputs = [tensor_value(p) for p in graphs[1].plan.analysis.gm.graph.find_nodes(op="placeholder")]
    assert len(graphs) == 2 and any(is_symbolic(d) for t in inputs if t is not None for d in t.shape)
    for runtime in graphs:
        assert runtime.stats.fallback is None and runtime.stats.sparse_calls == 2
        assert [s.cached for s in runtime.plan.sites] == [True], runtime.plan.reasons


def test_a_bias_over_a_dynamic_batch_it_reads_stays_flex_with_its_reason():
    """A per-element bias (the score_mod reads the batch index) is built at a static batch only: with the batch
    symbolic, the site stays flex, the reason on its node."""
    gms = _graphs(MaskInTheForward(True, "batch_bias"), torch.randint(0, 64, (2, N)), dynamic=True)
    analyze(gms[0])
    (flex,) = [n for n in gms[0].graph.nodes if op_name(n) == "hop.flex_attention"]
    assert "bias over a dynamic size" in flex.meta[FLEX_REASON]


def test_the_reference_model_through_flex_with_a_padded_batch_equals_dense():
    """The in-repo model with ``attention="flex"``, decoding two prompts of different lengths: the key mask becomes
    a block mask in the forward (``mask_mod`` reads the mask, a buffer of the op), and each call equals the model at
    threshold 1, every site cached."""
    from dyllm_compile.generate import generate
    from dyllm_compile.models import llada_like

    model = llada_like("tiny", init_std=0.2, attention="flex", n_kv_heads=2)
    prompts = [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})

    def lockstep(x, attention_mask=None):
        expected = model(x, attention_mask)
        torch.testing.assert_close(compiled(x, attention_mask), expected, rtol=1e-5, atol=1e-5)
        return expected

    with torch.inference_mode():
        generate(lockstep, prompts, pad_token_id=1, mask_token_id=127, gen_length=8, steps=8, block_length=8)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.fallback is None and runtime.stats.sparse_calls == 7
    assert len(runtime.plan.sites) == 2 and all(s.cached for s in runtime.plan.sites)
