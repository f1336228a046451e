"""Piecewise lowering: a variant split at its layer cuts, each distinct piece compiled once."""

import logging

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from dyllm_compile import lowering, piecewise
from dyllm_compile.models import llada_like
from dyllm_compile.ops.cached_attention import cached_attention_or_dense
from dyllm_compile.passes.layer_cuts import PIECE_END
from dyllm_compile.passes.rewrite import build_dense, build_sparse
from dyllm_compile.piecewise import layout_key, lower_piecewise, split_pieces, structure_key
from dyllm_compile.runtime import rows
import test_oracle
from test_oracle import _run
from test_policies import EsDllmRules
from test_sparse_graph import _calls, _plan


def _pieces(split: fx.GraphModule) -> list[fx.GraphModule]:
    return [split.get_submodule(n.target) for n in split.graph.nodes if n.op == "call_module"]


@pytest.fixture(params=["tuple_return", "bare_single_values"])
def split_api(request, monkeypatch):
    """Both of split_module's ways: every piece returning a tuple, or (torch 2.11, no tuple_return) a piece of one
    value returning it bare, which split_pieces wraps."""
    if request.param == "tuple_return" and not piecewise._HAS_TUPLE_RETURN:
        pytest.skip("this torch's split_module has no tuple_return")
    monkeypatch.setattr(piecewise, "_HAS_TUPLE_RETURN", request.param == "tuple_return")


def test_sparse_variant_splits_into_alike_layers(split_api):
    """Before: one graph over the tiny LLaDA-like model's two layers; layer 1's k/v chains and layer 0's FFN
    share one row selection. After: the embedding with the RoPE tables, a piece per layer with its attention op
    and its own two selections (S_in for q/k/v, S_out for the FFN), and the head with its own; the two layers'
    pieces are the same code, the first and last differ from them. No piece reads a data-dependent size."""
    plan = _plan()
    assert len(plan.cuts) == len(plan.sites) + 1
    gm = build_sparse(plan, None)
    pieces = _pieces(split_pieces(gm))
    assert len(pieces) == len(plan.sites) + 2
    assert [len(_calls(p, cached_attention_or_dense)) for p in pieces] == [0, 1, 1, 0]
    selections = [len(_calls(p, rows.select_rows_unbacked)) for p in pieces]
    assert selections == [0, 2, 2, 1] and sum(selections) == len(_calls(gm, rows.select_rows_unbacked))
    embedding = [n for n in pieces[0].graph.nodes if n.op == "call_function" and "embedding" in str(n.target)]
    assert embedding and not _calls(pieces[0], rows.gather_rows)
    keys = [structure_key(p) for p in pieces]
    assert keys[1] == keys[2] and len(set(keys)) == 3
    for piece in pieces:
        for node in piece.graph.nodes:
            if node.op == "placeholder":
                assert not any(u.op == "call_method" and u.target == "size" for u in node.users)


def test_dense_variant_marks_the_same_cuts():
    plan = _plan()
    pieces = _pieces(split_pieces(build_dense(plan)))
    assert len(pieces) == len(plan.sites) + 2
    assert structure_key(pieces[1]) == structure_key(pieces[2])


def _two_layers(x, w1, w2):
    h = x + torch.relu(x @ w1)
    h = h + torch.relu(h @ w2)
    return h * 2, h.sum()


def _marked(fn, ends):
    gm = fx.symbolic_trace(fn)
    for node in gm.graph.nodes:
        if node.name in ends:
            node.meta[PIECE_END] = True
    return gm


def _counting(compiled):
    def compile_piece(piece, inputs):
        compiled.append(piece)
        return piece.forward
    return compile_piece


def test_lower_piecewise_compiles_a_repeated_piece_once(split_api):
    """Before: x -> two residual ReLU layers -> two results. After: three pieces, the layers one compiled piece
    called twice with each layer's weight; the results equal the graph's."""
    gm = _marked(_two_layers, {"add", "add_1"})
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    compiled = []
    split = lower_piecewise(gm, [x, w1, w2], _counting(compiled))
    assert split is not None and len(_pieces(split)) == 3 and len(compiled) == 2
    assert all(isinstance(p.graph.output_node().args[0], tuple) for p in compiled)
    for got, expected in zip(split(x, w1, w2), _two_layers(x, w1, w2)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _three_layers(x, w1, w2, w3):
    h = x + torch.relu(x @ w1)
    h = h + torch.relu(h @ w2)
    h = h + torch.relu(h @ w3)
    return h * 2, h.sum()


def test_a_repeated_piece_is_run_once_on_fake_inputs(monkeypatch):
    """Before: three residual ReLU layers, the third's weight transposed (another layout). The propagation of fake
    inputs through the pieces runs the second layer's piece not again (the first's code on the very same input
    layouts: it has the first's outputs) but the third's (its weight's strides differ); every piece still gets its
    example inputs, the first two share one compiled piece, and the results equal the graph's."""
    fake_runs = []
    real = fx.Interpreter.call_module

    def counted(self, target, args, kwargs):
        if isinstance(self, piecewise._Propagate):
            fake_runs.append(target)
        return real(self, target, args, kwargs)

    monkeypatch.setattr(fx.Interpreter, "call_module", counted)
    gm = _marked(_three_layers, {"add", "add_1", "add_2"})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen)
    w1, w2, w3 = (torch.randn(8, 8, generator=gen) for _ in range(3))
    w3 = w3.t()
    compiled = []
    split = lower_piecewise(gm, [x, w1, w2, w3], _counting(compiled))
    pieces = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert len(pieces) == 4 and fake_runs == [pieces[0], pieces[2], pieces[3]]
    assert len(compiled) == 3  # the first two layers share one
    for got, expected in zip(split(x, w1, w2, w3), _three_layers(x, w1, w2, w3)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _transposed_layers(x, w1, w2, w3):
    h = (x @ w1).t()
    h = (h.t() @ w2).t()
    h = (h.t() @ w3).t()
    return h * 2


def test_a_piece_gets_its_inputs_in_the_layouts_it_was_compiled_for(caplog):
    """Before: layers that each return their product transposed (a view, strides (1, 8)). The compiled pieces
    return theirs contiguous instead, as Inductor did once with a context (the fake run said otherwise), and the
    compiled code does not check its inputs (no size assertions in the variants): each piece must still get the
    strides it was compiled for, copied into them (logged once per piece), and the results equal the graph's."""
    gm = _marked(_transposed_layers, {"t", "t_2", "t_4"})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen)
    ws = [torch.randn(8, 8, generator=gen) for _ in range(3)]
    seen = []

    def compile_piece(piece, inputs):
        def run(*args):
            seen.append([a.stride() for a in args])
            return tuple(o.contiguous() for o in piece(*args))
        return run

    split = lower_piecewise(gm, [x, *ws], compile_piece)
    assert split is not None
    with caplog.at_level(logging.INFO, logger="dyllm_compile"):
        torch.testing.assert_close(split(x, *ws), _transposed_layers(x, *ws), rtol=0, atol=0)
    assert [strides[0] for strides in seen] == [(8, 1), (1, 8), (1, 8), (1, 8)]
    assert caplog.text.count("came in another layout") == 3


def test_a_layout_differing_only_in_dims_of_size_one_is_the_same():
    """As Inductor's assertion reads strides: those of dims of size 1 do not matter (no copy for them); any other
    differing stride does, and no expected strides means contiguous."""
    assert piecewise._has_layout(torch.empty(1, 4), (99, 1))
    assert not piecewise._has_layout(torch.empty(4, 2).t(), (4, 1))
    assert piecewise._has_layout(torch.empty(2, 4), None) and not piecewise._has_layout(torch.empty(4, 2).t(), None)
    restrided = piecewise._restrided(torch.arange(8.0).view(2, 4), (1, 2))
    assert restrided.stride() == (1, 2) and torch.equal(restrided, torch.arange(8.0).view(2, 4))


def _seventeen_layers(x, w):
    h = x
    for _ in range(17):
        h = h + torch.relu(h @ w)
    return h * 2, h.sum()


@pytest.mark.parametrize("layers_per_piece, pieces", [(1, 18), (None, 10), (4, 6), (6, 5)])
def test_layers_go_several_to_a_piece(split_api, layers_per_piece, pieces):
    """Before: seventeen residual ReLU layers, a cut after each, then the head. After: the first layer and the
    head as pieces of their own, the sixteen between ``layers_per_piece`` to a piece (the last piece shorter where
    that does not divide them; None: two, an eighth of them), alike pieces compiled once; the results equal the
    graph's."""
    gm = _marked(_seventeen_layers, {"add"} | {f"add_{i}" for i in range(1, 17)})
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen) / 8
    compiled = []
    split = lower_piecewise(gm, [x, w], _counting(compiled), layers_per_piece=layers_per_piece)
    assert len(_pieces(split)) == pieces
    per_piece = [sum(n.target is torch.relu for n in p.graph.nodes) for p in compiled]
    group = layers_per_piece or 2
    assert per_piece == ([1, 0] if group == 1 else [1, group, 0] if 16 % group == 0 else [1, group, 16 % group, 0])
    for got, expected in zip(split(x, w), _seventeen_layers(x, w)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_automatic_layers_per_piece():
    """About eight pieces of layers, their count dividing the layers', where the distinct pieces to compile hold
    no more layers than an eighth of the model or its distinct layers: one layer each under 16 layers or for a
    prime count; a pattern of alike layers kept whole within a piece."""
    auto = piecewise.auto_layers_per_piece
    assert [auto(["a"] * n) for n in (2, 4, 15, 16, 28, 31, 32, 80)] == [1, 1, 1, 2, 2, 1, 4, 10]
    assert auto(["a", "b"] * 16) == 4  # one piece of abab, compiled once
    assert auto(["a", "b", "c"] * 8) == 3  # abc: 24 layers, pieces of 3
    assert auto(["b"] + ["a"] * 31) == 2  # ba and aa: 4 layers compiled (pieces of 4: ba aa and aaaa, 8)
    assert auto((["a"] * 5 + ["b"]) * 5 + ["a"] * 4) == 2  # 34 layers, every sixth differs: aa and ab


def test_layout_key_with_the_same_symbols_tells_sizes_of_one_form_apart():
    """Two inputs whose sizes are different symbols of the same form share a compiled piece (``layout_key``), but
    only the very same sizes let a piece's fake run stand for another's (``same_symbols``)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    a, b, twin = (mode.from_tensor(torch.empty(n, 4), static_shapes=False) for n in (3, 5, 3))
    assert a.shape[0] is not b.shape[0] and isinstance(a.shape[0], torch.SymInt)
    assert layout_key([a]) == layout_key([b])
    assert layout_key([a], same_symbols=True) != layout_key([b], same_symbols=True)
    # a tensor of a's sizes gets a's symbols (duck sizing): its fake run stands for a's
    assert layout_key([a], same_symbols=True) == layout_key([twin], same_symbols=True)


def test_lower_piecewise_declines(caplog):
    """Whole-graph lowering (None) where no piece repeats, where nothing is marked, and where a data-dependent
    size would cross a cut (the gather index of a ``nonzero`` made in one piece and read in the next)."""
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    compiled = []
    assert lower_piecewise(_marked(_two_layers, {"add"}), [x, w, w], _counting(compiled)) is None
    assert lower_piecewise(_marked(_two_layers, set()), [x, w, w], _counting(compiled)) is None

    def gathered(mask, x):
        index = mask.nonzero().squeeze(1)
        return x.index_select(0, index).sum(0)

    with caplog.at_level(logging.INFO, logger="dyllm_compile"):
        assert lower_piecewise(_marked(gathered, {"squeeze"}), [torch.tensor([True, False, True, True]), x],
                               _counting(compiled)) is None
    assert "of a data-dependent size" in caplog.text
    assert not compiled


def _whole_compiles(monkeypatch) -> list:
    """Every call of the lowering of one graph (whole, or one piece)."""
    seen = []
    real = lowering._lower_whole

    def counted(gm, *args, **kwargs):
        seen.append(gm)
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(lowering, "_lower_whole", counted)
    return seen


@pytest.mark.parametrize("rows", ["threshold", "forced", "forced, capacity per selection"])
def test_piecewise_matches_oracle_and_compiles_one_layer(monkeypatch, split_api, rows):
    """Batch 3: the piecewise-lowered model follows the plain-torch oracle step by step, and its one sparse
    variant was compiled as three pieces (embedding, one layer for both, head): at the default threshold; with
    forced salient sets (each layer's taken at the start: indexed in the layer, the layers differed by the index
    and compiled whole); and with symbolic capacity buckets, one per layer's selection (the layers' capacities
    differ, their code does not; the dense variant is three pieces more)."""
    seen = _whole_compiles(monkeypatch)
    forced = {} if rows == "threshold" else {"force_salient": 0.3, "seed": 5}
    buckets = {"row_counts": "buckets", "row_capacity": "per_selection"} if "selection" in rows else {}
    lock, oracle = _run("llada", 3, {**forced, **buckets}, dict(mode="exact", **forced))
    assert lock.steps == 16 and 0 < torch.tensor(oracle.fractions).mean() < 1
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.stats.sparse_compiles == 1 and len(seen) == (6 if buckets else 3)


def test_layers_grouped_to_pieces_match_oracle(monkeypatch):
    """Batch 3, a four-layer model with ``piece_layers=2``: the sparse variant compiled as the embedding, one piece
    of two layers (with two attention sites) for both pairs, and the head; the model follows the oracle step by
    step."""
    seen = _whole_compiles(monkeypatch)
    monkeypatch.setitem(test_oracle.MODELS, "llada, 4 layers", lambda: llada_like("tiny", init_std=0.2, n_layers=4))
    lock, oracle = _run("llada, 4 layers", 3, {"piece_layers": 2}, dict(mode="exact"))
    assert lock.steps == 16 and 0 < torch.tensor(oracle.fractions).mean() < 1
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.stats.sparse_compiles == 1
    assert [len(_calls(piece, cached_attention_or_dense)) for piece in seen] == [0, 2, 0]


def test_layer_reading_policy_compiles_whole(monkeypatch):
    """ES-dLLM's hooks read the layer index (its early layers differ): no two layers' pieces are alike, so the
    variant is compiled whole, and it follows the oracle of the policy."""
    seen = _whole_compiles(monkeypatch)
    lock, _ = _run("llada", 3, {"policy": "es_dllm", "mask_token_id": 127},
                   dict(mode="exact", rules=EsDllmRules(1, 0.25)))
    assert lock.steps == 16 and len(seen) == 1
