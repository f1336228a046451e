"""A graph break inside every layer: one compiled graph serves all layers, the FFN and the head run in graphs of
their own, and the salient rows flow from each graph to the next on the hidden states (row tags)."""

import pytest
import torch

from dyllm_compile.generate import generate
from dyllm_compile.models import llada_like
from dyllm_compile.passes.analysis import analyze
from dyllm_compile.runtime import row_tags
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from oracle import Lockstep, Oracle

MASK = 127
KW = dict(mask_token_id=MASK, gen_length=16, steps=16, block_length=8)


class BreakInsideLayers(torch.nn.Module):
    """The reference model with a graph break between each layer's attention and its FFN.

    Dynamo compiles each called method as a frame of its own: the attention half of a layer (one graph for every
    layer, keyed by the weights it is called with), the FFN half after the break (likewise), and the head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        m = self.model
        h = m.embed(ids)
        rope = m.rotary(ids.shape[1], h.dtype)
        for layer in m.layers:
            h = self.layer(layer, h, rope)
        return self.head(h)

    def layer(self, layer, h, rope):
        h = h + layer.attn(layer.attn_norm(h), rope, None)
        torch._dynamo.graph_break()
        return h + layer.ffn(layer.ffn_norm(h))

    def head(self, h):
        return self.model.lm_head(self.model.final_norm(h))


def _prompt(seed, batch=1, length=8):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", **options})


def test_graphs_without_attention_gate_their_regions_on_the_hidden_state_input():
    """Before: a graph with no attention site (the FFN half, the head) was left dense. After: its hidden-state
    input seeds the token axis, and its FFN / lm_head is a gated region fed from that input."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(analyze(gm, f"g{len(graphs)}"))
        return gm.forward

    with torch.inference_mode():
        torch.compile(BreakInsideLayers(llada_like("tiny")), backend=backend)(_prompt(0, length=12))
    roles = [sorted(r.role for r in g.gated_regions) for g in graphs if g.gated_regions or g.sites]
    assert roles == [[], ["ffn"], ["lm_head"]]  # attention half (site, no gated region), FFN half, head
    attention, ffn, head = [g for g in graphs if g.gated_regions or g.sites]
    assert len(attention.sites) == 1 and not attention.hidden_inputs
    for g in (ffn, head):
        assert not g.sites and len(g.hidden_inputs) == 1
        (region,) = g.gated_regions
        assert g.hidden_inputs[0] in region.token_inputs + g.spine.nodes[:1]
        assert g.spine.nodes[0] is g.hidden_inputs[0]


def test_a_three_dimensional_weight_is_not_a_hidden_state():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x):
            return x + torch.relu(x @ self.w[0])

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(analyze(gm))
        return gm.forward

    with torch.inference_mode():
        torch.compile(Experts(), backend=backend)(torch.randn(2, 5, 8))
    (g,) = graphs
    assert [n.name for n in g.hidden_inputs] == ["l_x_"]


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_break_inside_layers_matches_the_oracle(mode, batch):
    """Below threshold 1, with every layer split by a break, the compiled model matches the unbroken oracle step
    by step: each graph's S_in is the S_out the graph before it left."""
    model = llada_like("tiny", init_std=0.2)
    before = last_serial()
    wrapped = _compiled(BreakInsideLayers(model), attention_mode=mode)
    oracle = Oracle(model, threshold=0.99, mode=mode)
    lock = Lockstep(wrapped, oracle)
    generate(lock, _prompt(batch, batch=batch), **KW)
    assert lock.steps == 16
    live = [r for r in runtimes(before) if r.stats.sparse_calls]
    # The attention graph, the FFN graph and the head all ran sparse, each graph once per layer it serves.
    layers = len(model.layers)
    assert layers > 1 and len(live) == 3 and sorted(r.stats.sparse_calls for r in live) == [15, 15 * layers,
                                                                                            15 * layers]
    assert any(len(r.states) == layers for r in live), "one graph holds a state per layer's weights"
    assert 0 < torch.tensor(oracle.fractions).mean() < 1.0
    # Rows really skipped (with random weights the later layers of this tiny model are mostly salient).
    assert min(r.stats.rows_fraction for r in live) < 0.8


def test_graph_break_inside_layers_at_threshold_one_equals_dense():
    model = llada_like("tiny", init_std=0.2)
    wrapped = _compiled(BreakInsideLayers(model), threshold=1.0)

    def lockstep(x):
        expected = model(x)
        torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
        return expected

    generate(lockstep, _prompt(9), **KW)


def test_a_row_tag_is_void_once_its_tensor_changes():
    h = torch.randn(2, 6, 4)
    rows = torch.zeros(2, 6, dtype=torch.bool)
    rows[:, 2] = True
    row_tags.tag(h, rows, 1, source=7, step=3)
    found = row_tags.read(h, 1)
    assert found is not None and found.source == 7 and found.step == 3 and torch.equal(found.rows, rows)
    assert row_tags.read(h, 2) is None  # read along another axis
    assert row_tags.read(h.clone(), 1) is None  # another tensor
    h[0, 4] += 1.0  # written in place between the graphs: the rows no longer describe it
    assert row_tags.read(h, 1) is None


def test_hidden_state_written_between_graphs_voids_the_rows():
    """Eager code between the graphs that changes the hidden state in place: the next graph cannot trust the
    rows it was handed, and computes from what it sees (dense here: every row changed). At threshold 1, where a
    float row that changed at all is changed (below it, one that moved less than the threshold is not:
    test_float_inputs.py)."""

    @torch._dynamo.disable
    def nudge(h):
        h.add_(1e-3)

    class Nudged(BreakInsideLayers):
        def layer(self, layer, h, rope):
            h = h + layer.attn(layer.attn_norm(h), rope, None)
            nudge(h)
            return h + layer.ffn(layer.ffn_norm(h))

    model = llada_like("tiny", init_std=0.2)
    before = last_serial()
    wrapped = _compiled(Nudged(model), threshold=1.0)
    with torch.inference_mode():
        generate(wrapped, _prompt(4), **KW)
    ffn = [r for r in runtimes(before) if not r.plan.sites and r.plan.regions[0].role == "ffn"]
    assert len(ffn) == 1 and ffn[0].stats.sparse_calls + ffn[0].stats.dense_calls == 16 * len(model.layers)
    # Every FFN call saw all rows changed: none ran on a subset of rows.
    assert ffn[0].stats.rows_fraction == 1.0


def test_two_feed_forwards_in_a_graph_without_attention_get_caches_of_their_own():
    """The FFN halves of two layers in one graph (a break in each attention, as DeepSeek-V3's graphs came out) are
    both layer 0's: before, their caches had one name, the variant's inputs too, and compiling it failed
    ("duplicate argument")."""

    class TwoFeedForwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffns = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 32),
                                                                torch.nn.GELU(), torch.nn.Linear(32, 16))
                                            for _ in range(2))

        def forward(self, h):
            for ffn in self.ffns:
                h = h + ffn(h)
            return h

    torch._dynamo.reset()
    before = last_serial()
    model = TwoFeedForwards().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    with torch.inference_mode():
        h = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
        for call in range(3):
            torch.testing.assert_close(compiled(h), model(h), rtol=1e-5, atol=1e-6)
            h = h.clone()
            h[:, call] += 1.0
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 2
    assert [spec.name for spec in runtime.plan.caches] == ["L0.ffn", "L0.ffn_1"]


class BranchOnMaskContents(torch.nn.Module):
    """The reference model called as LLaDA's published forward calls its layers: the key mask becomes an additive
    bias only ``if 0.0 in attention_mask`` (a branch on a tensor's contents, before the layers), and the head is
    called from the same frame. Dynamo cannot resume inside that branch's ``Tensor.__contains__``: by default the
    frame runs eagerly and only the modules it calls compile, each as a graph of its own (the head's ``nn.Linear``
    not at all). With ``capture_scalar_outputs`` the break falls at the branch itself, and everything after it
    (every layer and the head) is one graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask=None):
        m = self.model
        h = m.embed(ids)
        if attention_mask is not None and 0.0 in attention_mask:
            attention_mask = (1.0 - attention_mask.float()[:, None, None, :]) * torch.finfo(torch.float32).min
        else:
            attention_mask = None
        rope = m.rotary(ids.shape[1], h.dtype)
        for layer in m.layers:
            h = layer(h, rope, attention_mask)
        return m.lm_head(m.final_norm(h))


def test_a_branch_on_the_mask_contents_with_captured_scalars_gates_every_layer_and_the_head():
    """The recipe docs/rewrite.md ("Graph breaks") gives for LLaDA's published code with padded prompts: the graph
    after the branch takes the embeddings (a float hidden state from the graph before it, whose changed rows are
    compared exactly) and the mask; every site is cached, each layer's FFN and the head are gated, and at threshold
    1 each call equals the model."""
    model = llada_like("tiny", init_std=0.2)
    prompts = [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 6)]
    before = last_serial()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        wrapped = _compiled(BranchOnMaskContents(model), threshold=1.0)

        def lockstep(x, attention_mask=None):
            expected = BranchOnMaskContents(model)(x, attention_mask)
            torch.testing.assert_close(wrapped(x, attention_mask), expected, rtol=1e-5, atol=1e-5)
            return expected

        with torch.inference_mode():
            generate(lockstep, prompts, pad_token_id=1, **KW)
    (runtime,) = [r for r in runtimes(before) if r.plan.sites]
    assert runtime.stats.sparse_calls >= 14
    layers = len(model.layers)
    assert len(runtime.plan.sites) == layers and all(s.cached for s in runtime.plan.sites), runtime.plan.reasons
    roles = sorted((r.role, r.layer) for r in runtime.plan.regions if r.role in ("ffn", "lm_head"))
    assert roles == sorted([("ffn", i) for i in range(layers)] + [("lm_head", layers - 1)])
