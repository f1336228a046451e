"""linear_order: the linear layers of gated regions on gathered rows, in the model's operand order or weight first."""

import pytest
import torch
from torch import fx

from dyllm_compile.passes import linear_order
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.passes.linear_order import choose, weight_first_linear
from dyllm_compile.passes.regions import Region
from dyllm_compile.passes.rewrite import build_sparse
from oracle import Oracle
from test_oracle import _run
from test_sparse_graph import _calls, _plan
from test_threshold_one import _compare

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (3, 1, 2, 7), (1, 3, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_first_linear_equals_linear(dtype, shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(11, 7, generator=gen).to(dtype)
    b = torch.randn(11, generator=gen).to(dtype) if bias else None
    tol = TOLERANCES[dtype]
    got = weight_first_linear(x, weight, b)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), rtol=tol, atol=tol)
    assert got.is_contiguous()  # row-major, as the model's order returns it
    strided = torch.randn(*shape[:-1], 14, generator=gen).to(dtype)[..., ::2]  # a non-contiguous input
    torch.testing.assert_close(weight_first_linear(strided, weight, b),
                               torch.nn.functional.linear(strided, weight, b), rtol=tol, atol=tol)


def _linears(gm):
    return [n for n in gm.graph.nodes if op_name(n) == "linear"]


def _weight_first(gm):
    return _calls(gm, weight_first_linear)


def test_sparse_graph_input_first_vs_weight_first():
    """Before (input_first): every projection of the sparse variant is a ``linear``. After (weight_first): those on
    gathered rows (q/k/v chains, FFN, lm_head) are ``weight_first_linear``; the o projection, which runs on every
    row, is still a ``linear``. Nothing else changes."""
    before_plan = _plan(batch=2, linear_order="input_first")
    after_plan = _plan(batch=2, linear_order="weight_first")
    before, after = build_sparse(before_plan, None), build_sparse(after_plan, None)
    gated = sum(linear_order.is_linear(n) for r in after_plan.regions for n in r.nodes)
    layers = len(after_plan.sites)
    assert not before_plan.weight_first and not _weight_first(before)
    assert len(_weight_first(after)) == gated == len(after_plan.weight_first) == len(_linears(before)) - layers
    assert len(_linears(after)) == layers  # each o projection, on every row
    assert len(after.graph.nodes) == len(before.graph.nodes)  # one call for another


def test_auto_emits_the_measured_order(monkeypatch):
    """auto: a gathered linear is emitted weight first where its shape measured faster that way (the measurement
    pinned here: the widening projections, out > in, only), at this graph's batch and token count."""
    seen = set()

    def measured(out_features, in_features, dtype, few_rows, many_rows, threads):
        seen.add((few_rows, many_rows))
        return out_features > in_features

    monkeypatch.setattr(linear_order, "weight_first_faster", measured)
    plan = _plan(batch=2)  # linear_order="auto" is the default
    widening = {n for r in plan.regions for n in r.nodes if linear_order.is_linear(n)
                and n.args[1].meta["example_value"].shape[0] > n.args[1].meta["example_value"].shape[1]}
    assert plan.weight_first == widening and widening
    assert len(_weight_first(build_sparse(plan, None))) == len(widening)
    batch, tokens = 2, 12  # _plan's input: a dense call gathers every row plus the padding of each element
    assert seen == {(batch * linear_order.FEW_ROWS, batch * (tokens + 2))}


def _linear_region(device: str) -> tuple[Region, fx.Node]:
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    node = graph.call_function(torch.nn.functional.linear, (x, w))
    x.meta["val"] = torch.empty(2, 4, 32, device=device)
    w.meta["val"] = torch.empty(48, 32, device=device)
    node.meta["val"] = torch.empty(2, 4, 48, device=device)
    return Region("ffn", node, [node], [x], [w], 0), node


def test_choose_by_order():
    """input_first emits nothing weight first, weight_first every gathered linear; auto keeps the model's order off
    the CPU and on the CPU times the shape once per process (a second plan reuses the measurement)."""
    cpu, node = _linear_region("cpu")
    meta, _ = _linear_region("meta")
    assert choose([cpu], "input_first", 1, 8) == frozenset()
    assert choose([cpu], "weight_first", 1, 8) == {node}
    assert choose([meta], "auto", 1, 8) == frozenset()
    linear_order.weight_first_faster.cache_clear()
    first = choose([cpu], "auto", 1, 8)
    assert first <= {node} and choose([cpu], "auto", 1, 8) == first
    info = linear_order.weight_first_faster.cache_info()
    assert (info.misses, info.hits) == (1, 1)


@pytest.mark.parametrize("name", ["llada", "dream", "neox", "moe"])  # biases on q/k/v (dream), on the MLP (neox)
def test_threshold_one_equals_dense_weight_first(name):
    runtime = _compare(name, 2, "aot_eager", linear_order="weight_first")
    assert runtime.plan.weight_first


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_weight_first_matches_oracle(mode):
    """Below threshold 1, forced salient sets, batch 3: the compiled model with every gathered linear weight first
    follows the plain-torch oracle step by step."""
    options = {"attention_mode": mode, "force_salient": 0.3, "seed": 4, "linear_order": "weight_first"}
    lock, oracle = _run("dream", 3, options, dict(mode=mode, force_salient=0.3, seed=4))
    assert lock.steps == 16 and isinstance(oracle, Oracle)
    (runtime,) = [r for r in lock.runtimes if r.stats.sparse_calls]
    assert runtime.plan.weight_first


@pytest.mark.inductor
def test_weight_first_under_inductor_equals_dense():
    """Inductor lowers ``mm(W, x^T)`` over an unbacked row count at batch 2 (where a count of one must not be
    guarded on), with the q/k/v biases of the Dream-like model."""
    runtime = _compare("dream", 2, "inductor", calls=3, tol=1e-4, linear_order="weight_first")
    assert runtime.plan.weight_first


def test_place_rows_pins_a_weight_first_product_row_major():
    """Before the merge, the gathered rows' product is pinned row-major as a buffer of its own
    (``prims.inductor_force_stride_order``), so that Inductor cannot inline the weight-first product's row-major
    copy into the merge, which gathers a row for every cache row (and then read the product feature-major, one
    element at a time: docs/rewrite.md, "Linear layers on gathered rows"). The merge is unchanged: the salient
    rows come from the product, the others from the cache. (Below torch 2.13, whose Inductor cannot order an
    unbacked row count's strides, nothing is pinned: the merge alone.)"""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dyllm_compile.runtime import rows as row_ops
    from dyllm_compile.runtime.rows import place_rows

    gen = torch.Generator().manual_seed(0)
    cache, rows, weight = torch.randn(2, 6, 5, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn(5, 4)
    salient = torch.tensor([[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    position = torch.tensor([0, 0, 0, 1, 1, 2])  # cache row -> gathered row (read where salient)

    def merge(cache, rows, weight, salient, position):
        return place_rows(cache, weight_first_linear(rows, weight), position, salient, 1)

    gm = make_fx(merge)(cache, rows, weight, salient, position)
    nodes = list(gm.graph.nodes)
    pins = [n for n in nodes if n.target is torch.ops.prims.inductor_force_stride_order.default]
    (gather,) = [n for n in nodes if n.target is torch.ops.aten.index_select.default]
    if row_ops._PINS_ROWS:
        (pin,) = pins
        assert gather.args[0] is pin and nodes.index(pin) < nodes.index(gather)
        assert tuple(pin.args[1]) == (15, 5, 1)  # row-major [B, rows, features]
    else:
        assert not pins
    product = torch.nn.functional.linear(rows, weight)
    expected = cache.clone()
    for b, n in salient.nonzero().tolist():
        expected[b, n] = product[b, position[n]]
    torch.testing.assert_close(gm(cache, rows, weight, salient, position), expected)
    torch.testing.assert_close(merge(cache, rows, weight, salient, position), expected)
