"""Token mixing other than attention moves rows next to the salient ones; the sparse variant tests it like an
attention context (passes/mixing_points.py) and recomputes the rows it moved.

Before, the rows a convolution over the tokens changed next to a salient row kept stale cached values in the gated
regions after it, whatever the threshold. At a threshold just below 1 every row that moved at all is recomputed,
so the compiled model must equal dense: with a banded attention mask (only rows near a changed token move) while
many rows are skipped, and on LFM2 (Hugging Face's conv / attention hybrid), whose first layer is a convolution.
A value mixed over every token (a mean) makes every row salient when it changes. Without the tests these differed
from dense by up to 1.0, 3e-4 and 2.0."""

import pytest
import torch

from decode_driver import NEARLY_ONE, unmasking
from dyllm_compile.models import llada_like
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from dyllm_compile.runtime.rows import moved_rows
from hf_builders import build
from hybrid_layers import HybridLM

MASK = 127


def _decode(forward, ids, prompt: int, calls: int, tol: float = 1e-5, **options):
    """Compiled vs eager over ``calls`` unmasking calls after ``prompt`` tokens; the runtime with sparse calls."""
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager", **options})
    with torch.inference_mode():
        for x in unmasking(ids, prompt, MASK, calls):
            torch.testing.assert_close(compiled(x.clone()), forward(x.clone()), rtol=tol, atol=tol)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    return runtime


def _band(n: int) -> torch.Tensor:
    """An additive mask by which each token attends to itself and its neighbours: a changed token moves only the
    rows near it."""
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    return torch.zeros(1, 1, n, n).masked_fill(distance > 1, float("-inf"))


@pytest.mark.parametrize("row_counts", ["unbacked", "buckets"])
def test_rows_a_token_conv_moves_are_recomputed(row_counts):
    """The conv (width 3, at the start of each FFN branch) moves the rows next to the attention's salient rows;
    attention within one token moves those next to a changed token. Both row-count routes (the GPU's default:
    capacity buckets, each selection after a test its own). The tests in generated C++: the hybrid model's, below."""
    n = 48  # not the model width (64): the conv output [B, 64, N] keeps one dim of N
    model = llada_like("tiny", init_std=0.2, token_conv=3, n_layers=2)
    ids = torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(0))
    band = _band(n)
    runtime = _decode(lambda x: model(x, band), ids, 12, 9, threshold=NEARLY_ONE, row_counts=row_counts)
    assert len(runtime.plan.mixing) == 2  # one conv per layer
    fractions = runtime.stats.salient_fraction  # the rows near the changed ones, not every row
    assert min(fractions) < 0.6 and max(fractions) < 0.95


def test_lfm2_convolution_layer_before_attention():
    """LFM2's first layer is a gated short convolution (in_proj, conv over the tokens, out_proj), before any
    attention site tests a row: its out_proj and FFN ran on the changed rows alone (before the test of the conv's
    output); its in_proj runs on them alone."""
    model, forward = build("lfm2")
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(1))
    runtime = _decode(forward, ids, 6, 6, threshold=NEARLY_ONE)
    ((axis, _),) = runtime.plan.mixing.values()
    assert axis == 2  # the conv's output [B, D, N], sliced to the sequence
    # its in_proj on the salient rows too, cached as B * x (the conv's input) and C (read after the conv)
    assert [len(r.exits) for r in runtime.plan.regions if r.role == "mixer_in"] == [2]


@pytest.mark.parametrize("row_counts, lowering", [
    ("unbacked", "aot_eager"), ("buckets", "aot_eager"),
    pytest.param("buckets", "inductor", marks=pytest.mark.inductor),  # the mixing points' tests in generated C++
])
def test_split_projections_into_token_mixing_run_on_the_salient_rows(row_counts, lowering):
    """The input projections of an LFM2-like short convolution and a Mamba-like layer (passes/mixer_inputs.py): each
    a region run on the salient rows, every exit (the mixer's input, and the split's results read after the mixer)
    scattered into a cache of its own; the mixers then read every row of the caches. Equal to eager at each call
    with fewer rows computed than dense (before: both projections ran on every row)."""
    model = HybridLM()
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    band = _band(24)
    runtime = _decode(lambda x: model(x, band), ids, 6, 6, tol=1e-4 if lowering == "inductor" else 1e-5,
                      threshold=NEARLY_ONE, row_counts=row_counts, lowering=lowering)
    mixers = [r for r in runtime.plan.regions if r.role == "mixer_in"]
    assert [len(r.exits) for r in mixers] == [2, 3]
    cached = [spec.node for spec in runtime.plan.caches]
    assert all(x in cached for r in mixers for x in r.exits)
    assert runtime.stats.fallback is None and max(runtime.stats.salient_fraction) < 0.6
    if row_counts == "unbacked":  # (buckets of 24 rows round up to every row)
        assert runtime.stats.rows_computed < 0.7 * runtime.stats.rows_dense


@pytest.mark.parametrize("output_projection", ["dense", "salient"])
@pytest.mark.parametrize("conv_after_o", ["direct", "projected"])
def test_an_output_projection_feeding_a_convolution_follows_the_option(conv_after_o, output_projection):
    """A convolution over the tokens reads an attention's output projection (Inkling), or a projection of it
    (Zamba's attention output, a Mamba's input): the output projection is the attention's all the same, dense
    unless ``output_projection='salient'`` gates it with the site, and the mixer's own input region, after it, is
    gated. Before, the mixer-input region took the output projection in and ran it on the salient rows whatever
    the option said."""
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    runtime = _decode(HybridLM(conv_after_o=conv_after_o).eval(), ids, 12, 6, threshold=NEARLY_ONE,
                      output_projection=output_projection)
    (site,) = runtime.plan.sites
    projections = [r.role for r in runtime.plan.regions if site.site.node in r.token_inputs]
    assert projections == (["attn_out"] if output_projection == "salient" else [])
    mixer_inputs = [r for r in runtime.plan.regions if r.role == "mixer_in"]
    assert len(mixer_inputs) == 2 + (conv_after_o == "projected")  # the hybrid's two, and the projection after o
    assert len(runtime.plan.mixing) == 3  # the convolution after the attention, and the hybrid's two


def test_a_value_mixed_over_every_token_makes_every_row_salient_when_it_changes():
    """A mean over the tokens added to every row before the first layer (a global context): it has no token axis,
    so a call whose tokens changed it recomputes every row, at the default threshold too (before, the layers' k/v
    projections ran on the changed rows alone, every other row keeping keys computed with the old mean)."""
    model = llada_like("tiny", init_std=0.2, n_layers=2)
    model.layers[0].register_forward_pre_hook(lambda module, args: (args[0] + args[0].mean(1, keepdim=True),
                                                                     *args[1:]))
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    runtime = _decode(model, ids, 6, 5)
    ((axis, _),) = runtime.plan.mixing.values()
    assert axis is None and runtime.stats.salient_fraction == [1.0, 1.0]


class Vmapped(torch.nn.Module):
    """``module`` mapped over the batch by ``torch.vmap``, and over the tokens too where ``levels`` is 2."""

    def __init__(self, module: torch.nn.Module, levels: int):
        super().__init__()
        self.module, self.levels = module, levels

    def forward(self, x):
        fn = self.module
        for _ in range(self.levels):
            fn = torch.vmap(fn)
        return fn(x)


@pytest.mark.parametrize("levels", [1, 2])
def test_a_layer_under_vmap_is_tested_where_its_level_ends(levels):
    """Each FFN runs under ``torch.vmap`` (the analysis has no row-wise rule for its batching calls: mixed). Before,
    the test was placed on ``_add_batch_dim``'s output, a batched tensor that cannot leave its vmap level: the sparse
    variant failed to compile ("Cannot access storage of BatchedTensorImpl") and the whole graph ran without the
    rewrite. Now what is computed under the level stays mixed up to ``_remove_batch_dim``, whose plain tensor is
    tested per row: no fallback, the attention sites cached, every row the FFNs moved recomputed."""
    model = llada_like("tiny", init_std=0.2, n_layers=2)
    for layer in model.layers:
        layer.ffn = Vmapped(layer.ffn, levels)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    band = _band(24)
    runtime = _decode(lambda x: model(x, band), ids, 6, 5, threshold=NEARLY_ONE)
    assert runtime.stats.fallback is None
    assert [axis for axis, _ in runtime.plan.mixing.values()] == [1, 1]  # one per layer, per row
    assert min(runtime.stats.salient_fraction) < 1.0


def test_moved_rows_by_cosine_by_change_or_all():
    """Rows of a mixing point's value: by cosine (floats), by any change (masks); every row where a value without a
    token axis changed, or at threshold 1."""
    salient = torch.tensor([[True, False, False, False]])
    cached = torch.ones(1, 3, 4)  # [B, D, N]: tokens on dim 2
    fresh = cached.clone()
    fresh[0, :, 2] = torch.tensor([1.0, 1.0, -1.0])  # row 2 turned; row 3 scaled only (cosine 1)
    fresh[0, :, 3] *= 2
    assert moved_rows(salient, fresh, cached, 2, 0.99).tolist() == [[True, False, True, False]]
    assert moved_rows(salient, fresh > 0, cached > 0, 2, 0.99).tolist() == [[True, False, True, False]]
    assert moved_rows(salient, fresh, cached, None, 0.99).all()
    assert moved_rows(salient, cached, cached, None, 0.99).tolist() == salient.tolist()
    assert moved_rows(salient, cached, cached, 2, 1.0).all()  # threshold 1: every row
    assert moved_rows(salient, fresh[:, 0], cached[:, 0], 1, 0.99).tolist() == [[True, False, False, True]]
