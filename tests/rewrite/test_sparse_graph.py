"""The sparse variant's graph, before (the analysed Dynamo graph, or one route) and after (another)."""

import operator

import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.models import llada_like
from dyllm_compile.passes.analysis import analyze
from dyllm_compile.passes.graph_utils import listed_args, op_name
from dyllm_compile.ops.cached_attention import cached_attention_or_dense
from dyllm_compile.passes.rewrite import COUNT_SELECTIONS, build_sparse
from dyllm_compile.passes.rewrite_plan import plan_rewrite
from dyllm_compile.runtime import rows


def _plan(batch: int = 1, model: dict = {}, **options):
    """The rewrite plan of the tiny LLaDA-like model (``model``: its config changes) at ``batch`` x 12 tokens,
    lowered by aot_eager."""
    torch._dynamo.reset()
    analyses = []

    def backend(gm, example_inputs):
        analyses.append(analyze(gm))
        return gm.forward

    ids = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.compile(llada_like("tiny", **model), backend=backend)(ids)
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


def test_fused_qkv_projection_runs_once_per_layer_on_the_chains_rows():
    """A fused projection (one linear, split into q, k and v) is in each chain that reads it. Before (paper
    mode): q, for every row, needs it computed for every row, and the k and v chains run it once more on S_in,
    sharing one copy. After (exact): the q, k and v chains run on the same rows and share one copy; nothing of
    it is computed for every row."""
    fused = {"fused_qkv": True, "n_kv_heads": 2}
    paper, exact = _plan(model=fused, attention_mode="paper"), _plan(model=fused)

    def token_sizes(linear):  # of the views of q, k and v: linear -> split -> getitem -> view(B, N, heads, D)
        return {listed_args(view)[1] for piece in next(iter(linear.users)).users for view in piece.users}

    def projections(gm):  # for each copy of the fused projection: is it on the 4 gathered rows (or all 12)
        linears = [n for n in gm.graph.nodes if op_name(n) == "linear" and "qkv_proj" in n.args[1].name]
        return [{4: True, 12: False}[size] for n in linears for size in token_sizes(n)]

    # paper: a copy for q on every row and one for k and v on their rows; exact: one copy, on the rows
    for plan, expected in ((paper, [False, True]), (exact, [True])):
        assert not plan.reasons and all(s.cached for s in plan.sites)
        chains = [r for r in plan.regions if r.role in ("q", "k", "v")]
        assert all(any("qkv_proj" in n.args[1].name for n in r.nodes if op_name(n) == "linear") for r in chains)
        assert sorted(projections(build_sparse(plan, 4))) == sorted(expected * len(plan.sites))


def test_regions_gather_each_elements_rows_in_a_batch():
    """Before (union): at batch 3 every gathered region runs on the union of the batch's salient rows. After
    (``element_capacity``): each region gathers each element's own rows, [B, K], the batch-first inputs by
    ``gather`` along their token axis, RoPE's per-position tables [N, D] (in the k and q chains) as [B, 1, K, D],
    to broadcast against the rank-4 heads as the tables did. At batch 1 nothing is per element (the union is the
    element's set)."""
    assert not _plan().element_regions
    plan = _plan(batch=3)
    assert {r.role for r in plan.regions if id(r) in plan.element_regions} == {"k", "v", "q", "ffn", "lm_head"}
    assert all(id(r) in plan.element_regions for r in plan.regions)
    before, after = build_sparse(plan, 8), build_sparse(plan, 8, element_capacity=4)
    assert not _calls(before, rows.select_rows_per_element)
    assert not any(own for own, _ in before.meta[COUNT_SELECTIONS])
    assert len(_calls(after, rows.scatter_rows_per_element)) == len(_calls(before, rows.scatter_rows))
    assert not _calls(after, rows.scatter_rows) and not _calls(after, rows.select_rows)
    assert all(select.args[1] == 4 for select in _calls(after, rows.select_rows_per_element))
    assert all(own for own, _ in after.meta[COUNT_SELECTIONS])
    gathers = _calls(after, rows.gather_rows_per_element)
    tables = [g for g in gathers if g.args[3] is not None]
    assert {g.args[3] for g in tables} == {4}  # cos and sin, as [B, 1, K, D]
    # gathered once per layer: the k and q chains read them on the same rows (as they read the normed input)
    assert len(tables) == 2 * len(plan.sites) and sum(r.role in ("k", "q") for r in plan.regions) == 2 * len(plan.sites)
    assert len(gathers) == len(tables) + len(plan.sites) + sum(r.role not in ("k", "q", "v") for r in plan.regions)


def test_folded_rows_are_gathered_and_scattered_as_batch_first():
    """OPT's FFN runs on ``x.reshape(-1, D)`` and adds its residual there: the FFN region reads and writes rows
    with the batch folded in ([B * N, D], token axis dim 0). Before (``ffn_rows="tokens"``), each FFN input is
    gathered along its token axis and its output scattered into its cache. After (``"folded"``): the input is
    unfolded to [B, N, D], gathered along dim 1 and folded back ([B * K, D]); the output and its cache are unfolded,
    scattered along dim 1, and the new cache folded back, in the dense graph's layout. The lm_head region reads
    the last layer's folded sum (its view back to [B, N, D] inside it), gathered so too. Not per element: those
    regions gather the batch's union even where the other regions gather each element's rows."""
    before, after = _plan(batch=3), _plan(batch=3, model=dict(ffn_rows="folded"))
    ffn = [r for r in after.regions if r.role == "ffn"]
    assert [r.layer for r in ffn] == [0, 1] and not after.reasons
    (head,) = [r for r in after.regions if r.role == "lm_head"]
    folded = {n for r in ffn for n in (*r.token_inputs, *r.exits)} | set(head.token_inputs)
    assert set(after.folded_rows) == folded and set(after.folded_rows.values()) == {1} and not before.folded_rows
    assert {r.role for r in after.regions if id(r) not in after.element_regions} == {"ffn", "lm_head"}
    old, new = build_sparse(before, 8), build_sparse(after, 8)
    assert not _calls(old, rows.unfold_rows) and not _calls(old, rows.fold_rows)
    unfolded = _calls(new, rows.unfold_rows)
    assert len(unfolded) == 3 * len(ffn) + 1  # per FFN: its input; its output and its cache. The head's input
    for node in unfolded:
        assert node.args[2] == 1 and node.args[1].target == "salient_in"
        (user,) = node.users
        assert user.target in (rows.gather_rows, rows.scatter_rows) and user.args[2 if user.target is rows.gather_rows
                                                                                   else 4] == 1
        (folded,) = user.users
        assert folded.target is rows.fold_rows
    assert len(_calls(new, rows.scatter_rows)) == len(_calls(old, rows.scatter_rows))


def test_per_element_rows_are_each_elements_salient_rows():
    salient = torch.tensor([[False, True, False, False, True, False],
                            [True, False, False, False, False, False]])
    index, valid, count = rows.select_rows_per_element(salient, 2)
    assert index.tolist() == [[1, 4], [0, 1]] and int(count) == 2  # element 1: its row 0, then the first other
    assert valid.tolist() == [[True, True], [True, False]]
    x = torch.arange(24.0).view(2, 6, 2)
    fresh = 100 + rows.gather_rows_per_element(x, index, 1)  # the region on each element's gathered rows
    cache = -torch.ones(2, 6, 2)
    placed = rows.scatter_rows_per_element(cache, fresh, index, valid, 1)
    assert torch.equal(placed, torch.where(salient[..., None], 100 + x, cache))
    # a batch of one is broadcast; a per-position table [N, D] comes back as [B, 1, K, D] for rank-4 heads
    assert torch.equal(rows.gather_rows_per_element(x[:1], index, 1), torch.stack([x[0, [1, 4]], x[0, [0, 1]]]))
    table = torch.arange(12.0).view(6, 2)
    picked = rows.gather_rows_per_element(table, index, 0, rank=4)
    assert picked.shape == (2, 1, 2, 2) and torch.equal(picked[1, 0], table[[0, 1]])


def test_symbolic_capacities_are_input_sizes():
    """Before: each selection's capacity is a constant of the graph (top-K at 4, then 8). After (``symbolic``):
    one input per capacity (per selection here), after ``dense_call``, and each selection reads its capacity as
    that input's size, within its layer's piece; the values given only count the capacities."""
    plan = _plan()
    n_selections = len(_calls(build_sparse(plan, 4), rows.select_rows))
    capacity = tuple(range(4, 4 + n_selections))
    before, after = build_sparse(plan, capacity), build_sparse(plan, capacity, symbolic=True)
    assert [s.args[1] for s in _calls(before, rows.select_rows)] == list(capacity)
    inputs = [n for n in after.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in inputs[-n_selections - 1:]] == ["dense_call"] + [f"capacity_union_{i}"
                                                                           for i in range(n_selections)]
    for i, select in enumerate(_calls(after, rows.select_rows)):
        size = select.args[1]
        assert size.op == "call_method" and size.target == "size" and size.args == (inputs[-n_selections + i], 0)
    assert len(inputs) == len([n for n in before.graph.nodes if n.op == "placeholder"]) + n_selections
