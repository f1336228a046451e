"""The sparse variant's graph, before (the analysed Dynamo graph, or one route) and after (another)."""

import operator

import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.models import llada_like
from dyllm_compile.passes.analysis import analyze
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.ops.cached_attention import cached_attention_or_dense
from dyllm_compile.passes.rewrite import build_sparse, plan_rewrite
from dyllm_compile.runtime import rows


def _plan(batch: int = 1, **options):
    """The rewrite plan of the tiny LLaDA-like model at ``batch`` x 12 tokens, lowered by aot_eager."""
    torch._dynamo.reset()
    analyses = []

    def backend(gm, example_inputs):
        analyses.append(analyze(gm))
        return gm.forward

    ids = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.compile(llada_like("tiny"), backend=backend)(ids)
    (analysis,) = analyses
    return plan_rewrite(analysis, DyllmConfig(lowering="aot_eager", **options))


def _calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def test_sparse_graph_buckets_vs_unbacked():
    """Before (buckets): each salient set is picked by top-K at a static capacity, the region runs on K rows and
    scatters K. After (unbacked): picked by nonzero, the region runs on the count plus the padding, and its rows
    are placed into the cache by position (``where`` over the salient set, no scatter). Same selections, same
    regions, same caches out."""
    plan = _plan()
    before, after = build_sparse(plan, 4), build_sparse(plan, None)
    picked = len(_calls(before, rows.select_rows))
    assert picked >= len(plan.sites)  # one per salient set: S_in for the k/v chains, then each layer's S_out
    assert not _calls(before, rows.select_rows_unbacked) and not _calls(before, rows.place_rows)
    assert not _calls(after, rows.select_rows) and not _calls(after, rows.scatter_rows)
    selections = _calls(after, rows.select_rows_unbacked)
    assert len(selections) == picked
    places = _calls(after, rows.place_rows)
    assert len(places) == len(_calls(before, rows.scatter_rows))
    for place in places:  # position: item 1 of a selection over the very mask the place reads
        position, salient = place.args[2], place.args[3]
        assert position.target is operator.getitem and position.args[1] == 1
        assert position.args[0] in selections and position.args[0].args[0] is salient
    sizes = [n for n in after.graph.nodes if n.op == "call_method" and n.target == "size"]
    assert sizes and all(op_name(n.args[0]) == "getitem" for n in sizes)  # the padded gather's length


def test_exact_mode_runs_the_q_chain_on_s_in_only():
    """Before (paper): q projected for every row, the op reads it directly. After (exact): the q chain is one
    more gathered region, on the same rows as k and v, scattered into the q cache; the op reads that cache."""
    paper, exact = _plan(attention_mode="paper"), _plan()  # exact is the default
    assert all(s.gated_q for s in exact.sites) and not any(s.gated_q for s in paper.sites)
    assert len(exact.regions) == len(paper.regions) + len(exact.sites)
    before, after = build_sparse(paper, 4), build_sparse(exact, 4)
    assert len(_calls(after, rows.scatter_rows)) == len(_calls(before, rows.scatter_rows)) + len(exact.sites)
    assert not _calls(after, rows.merge_rows)  # no q computed for every row and merged with the cache
    ops = _calls(after, cached_attention_or_dense)
    assert len(ops) == len(exact.sites) and all(op.args[0].target is rows.scatter_rows for op in ops)
    # the k/v chains and the q chain of a layer share one selection (S_in)
    assert len(_calls(after, rows.select_rows)) == len(_calls(before, rows.select_rows))
