import importlib

import pytest
import torch
import torch.nn.functional as F

from dyllm_compile.ops import cached_attention, cached_attention_reference
from dyllm_compile.ops.cached_attention import MODES as ATTENTION_MODES

_op_module = importlib.import_module("dyllm_compile.ops.cached_attention")

B_H_N_D = [(1, 4, 13, 8), (3, 4, 13, 8)]
GQA = [1, 2, 4]  # query heads per kv head
# "no_keys": the padded rows are hidden from every key too (Dream's padded batches): rows with no key, which SDPA
# returns as zeros; "shared": one additive [N, N] mask, no batch or head dims, for every element (the op gathers
# each element's rows and columns of it)
MASKS = [None, "padding", "additive", "no_keys", "shared"]
SALIENT = ["none", "one", "some", "all"]


def _force_route(monkeypatch, route):
    """Exact mode's route, whichever the problem size would pick: the incremental update (never recompute) or
    recomputing every row (always); None (paper mode) leaves it."""
    if route is not None:
        monkeypatch.setattr(_op_module, "RECOMPUTE_WORK", 0 if route == "incremental" else 1 << 62)
    if route == "incremental":
        monkeypatch.setattr(_op_module, "UPDATE_COST", 0)


@pytest.fixture(params=["incremental", "recompute"])
def exact_route(request, monkeypatch):
    _force_route(monkeypatch, request.param)
    return request.param


# Paper mode once, exact mode by each of its routes.
MODE_ROUTES = [("paper", None), ("exact", "incremental"), ("exact", "recompute")]


def _mask(kind, b, h, n, gen):
    if kind is None:
        return None
    if kind == "shared":
        hidden = (torch.rand(n, n, generator=gen) < 0.3).logical_and_(~torch.eye(n, dtype=torch.bool))
        return (torch.randn(n, n, generator=gen) * 0.5).masked_fill_(hidden, float("-inf"))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :3] = False
    bool_mask = keep[:, None, None, :]
    if kind == "padding":
        return bool_mask
    if kind == "no_keys":
        return bool_mask & keep[:, None, :, None]
    return torch.where(bool_mask, torch.randn(b, 1, n, n, generator=gen) * 0.5, float("-inf"))


def _salient(kind, b, n, gen):
    if kind == "none":
        return torch.zeros(b, n, dtype=torch.bool)
    if kind == "all":
        return torch.ones(b, n, dtype=torch.bool)
    if kind == "one":
        s = torch.zeros(b, n, dtype=torch.bool)
        s[:, 5] = True
        return s
    s = torch.rand(b, n, generator=gen) < 0.3
    if kind == "mixed":  # batch elements with some, none and every row salient, in turn
        s[1::3], s[2::3] = False, True
    return s


def _dense(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask)


def _step(shape, rep, mask_kind, salient_kind, seed=0, softcap=0.0):
    """A previous step (dense) and a new one where the salient rows' q, k, v changed."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    g = h // rep
    q0 = torch.randn(b, h, n, d, generator=gen)
    k0, v0 = torch.randn(b, g, n, d, generator=gen), torch.randn(b, g, n, d, generator=gen)
    mask = _mask(mask_kind, b, h, n, gen)
    salient = _salient(salient_kind, b, n, gen)
    everyone = torch.ones(b, n, dtype=torch.bool)
    stats = torch.zeros(b, h, n)
    c0, m0, l0 = cached_attention(q0, k0, v0, k0, v0, torch.zeros_like(q0), stats, stats, everyone, mask,
                                  d ** -0.5, "exact", 0.5, None, softcap)
    rows = salient[:, None, :, None]
    q1 = torch.where(rows, torch.randn(b, h, n, d, generator=gen), q0)
    k1 = torch.where(rows, torch.randn(b, g, n, d, generator=gen), k0)
    v1 = torch.where(rows, torch.randn(b, g, n, d, generator=gen), v0)
    return dict(q0=q0, k0=k0, v0=v0, c0=c0, m0=m0, l0=l0, q1=q1, k1=k1, v1=v1, mask=mask, salient=salient, d=d)


@pytest.mark.parametrize("shape", B_H_N_D)
@pytest.mark.parametrize("rep", GQA)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("salient_kind", SALIENT)
def test_exact_mode_equals_dense_attention(shape, rep, mask_kind, salient_kind, exact_route):
    t = _step(shape, rep, mask_kind, salient_kind)
    torch.testing.assert_close(t["c0"], _dense(t["q0"], t["k0"], t["v0"], t["mask"]), rtol=1e-5, atol=1e-5)
    c1, m1, l1 = cached_attention(t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"],
                                  t["salient"], t["mask"], t["d"] ** -0.5, "exact", 0.5)
    torch.testing.assert_close(c1, _dense(t["q1"], t["k1"], t["v1"], t["mask"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("update_cost", [_op_module.UPDATE_COST, 0])
def test_exact_mode_recomputes_every_row_of_an_element_where_the_update_costs_more(update_cost, monkeypatch):
    """Element 0 changed 14 of its 40 keys: updating its 40 rows over 14 columns (UPDATE_COST per row and column)
    and recomputing its 14 salient rows cost more than recomputing all 40, which it does: its statistics are the
    dense attention's exact ones. Element 1 changed 4 and is updated: its rows keep a running max above the exact
    one (the changed keys held its maximum). With the rule off, element 0 is updated too. Every context is dense
    attention's."""
    monkeypatch.setattr(_op_module, "RECOMPUTE_WORK", 0)
    monkeypatch.setattr(_op_module, "UPDATE_COST", update_cost)
    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 2, 40, 8
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    salient = torch.zeros(b, n, dtype=torch.bool)
    salient[0, ::3], salient[1, ::10] = True, True
    changed = salient[:, None, :, None]
    k_old = torch.where(changed, k + q.mean(dim=2, keepdim=True), k)  # the changed keys leaned to the queries
    v_old = torch.where(changed, torch.randn(b, h, n, d, generator=gen), v)
    c_old, m_old, l_old = _op_module._attention_with_stats(q, k_old, v_old, None, d ** -0.5)
    c, m, l = cached_attention(q, k, v, k_old, v_old, c_old, m_old, l_old, salient, None, d ** -0.5, "exact", 0.5)
    dense_c, dense_m, dense_l = _op_module._attention_with_stats(q, k, v, None, d ** -0.5)
    torch.testing.assert_close(c, dense_c, rtol=1e-5, atol=1e-5)
    # an updated element's running max sits well above the exact one (0.38 and 0.47 here)
    recomputed = [torch.allclose(m[i], dense_m[i], atol=1e-5) and torch.allclose(l[i], dense_l[i], atol=1e-5)
                  for i in range(b)]
    assert recomputed == [update_cost > 0, False]


@pytest.mark.parametrize("shape", B_H_N_D)
@pytest.mark.parametrize("mask_kind", ["padding", "additive"])
def test_exact_mode_removes_changed_keys_under_the_masks_last_value(shape, mask_kind, monkeypatch):
    """A mask that changes with the keys (computed from the tokens): at the changed keys' columns, and at the salient
    queries' rows. Given the mask's last value (``mask_old``), the incremental update equals dense attention under
    the new mask; without it, it does not (the old scores removed under the new mask)."""
    _force_route(monkeypatch, "incremental")
    t = _step(shape, 2, mask_kind, "some", seed=3)
    gen = torch.Generator().manual_seed(4)
    columns, rows = t["salient"][:, None, None, :], t["salient"][:, None, :, None]
    if mask_kind == "padding":  # keys shown or hidden anew (element 0's first three start hidden)
        mask = t["mask"] ^ (columns & (torch.rand(columns.shape, generator=gen) < 0.5))
    else:
        moved = columns | rows
        mask = torch.where(moved & t["mask"].isfinite(), torch.randn(t["mask"].shape, generator=gen), t["mask"])
    assert not torch.equal(mask, t["mask"])
    args = (t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"], t["salient"], mask,
            t["d"] ** -0.5, "exact", 0.5)
    expected = _dense(t["q1"], t["k1"], t["v1"], mask)
    c1, _, _ = cached_attention(*args, None, 0.0, t["mask"])
    torch.testing.assert_close(c1, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached_attention(*args)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rep", GQA)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("salient_kind", SALIENT)
def test_paper_mode_formula(rep, mask_kind, salient_kind):
    t = _step((3, 4, 13, 8), rep, mask_kind, salient_kind)
    c1, _, _ = cached_attention(t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"],
                                t["salient"], t["mask"], t["d"] ** -0.5, "paper", 0.5)
    dense = _dense(t["q1"], t["k1"], t["v1"], t["mask"])
    # c_old + P (v_new - v_old) with the new attention weights P, written independently of the op.
    propagated = t["c0"] + (dense - _dense(t["q1"], t["k1"], t["v0"], t["mask"]))
    expected = torch.where(t["salient"][:, None, :, None], dense, propagated)
    torch.testing.assert_close(c1, expected, rtol=1e-5, atol=1e-5)
    if salient_kind in ("none", "all"):  # nothing changed / everything recomputed: both equal dense
        torch.testing.assert_close(c1, dense if salient_kind == "all" else t["c0"], rtol=1e-5, atol=1e-5)


def _dense_capped(q, k, v, mask, softcap):
    """Attention with soft-capped scores written out: ``softcap * tanh(q k^T / sqrt(d) / softcap)``, then the mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = softcap * torch.tanh(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1).nan_to_num(0.0)  # rows with no key: zeros
    return probs @ v


@pytest.mark.parametrize("mode,route", MODE_ROUTES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("salient_kind", ["none", "some", "all"])
def test_soft_capped_scores(mode, route, mask_kind, salient_kind, monkeypatch):
    """``softcap``: each score capped before the mask, in both modes and both exact routes: exact mode equals the
    soft-capped dense attention, paper mode its formula over the capped weights; the cap is not a no-op here."""
    _force_route(monkeypatch, route)
    cap = 1.5
    t = _step((2, 4, 13, 8), 2, mask_kind, salient_kind, softcap=cap)
    torch.testing.assert_close(t["c0"], _dense_capped(t["q0"], t["k0"], t["v0"], t["mask"], cap), rtol=1e-5,
                               atol=1e-5)
    c1, _, _ = cached_attention(t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"],
                                t["salient"], t["mask"], t["d"] ** -0.5, mode, 0.5, None, cap)
    dense = _dense_capped(t["q1"], t["k1"], t["v1"], t["mask"], cap)
    if mode == "exact":
        expected = dense
    else:
        propagated = t["c0"] + (dense - _dense_capped(t["q1"], t["k1"], t["v0"], t["mask"], cap))
        expected = torch.where(t["salient"][:, None, :, None], dense, propagated)
    torch.testing.assert_close(c1, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense, _dense(t["q1"], t["k1"], t["v1"], t["mask"]), atol=1e-3)


@pytest.mark.parametrize("mode,route", MODE_ROUTES)
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("salient_kind", SALIENT)
def test_queried_rows_equal_the_full_op_on_those_rows(mode, route, rep, mask_kind, salient_kind, monkeypatch):
    """Query pruning: the op run on a subset of query rows (q, c_old, m_old, l_old gathered; keys, values, mask
    and salient_in whole) gives exactly the full op's rows."""
    _force_route(monkeypatch, route)
    t = _step((3, 4, 13, 8), rep, mask_kind, salient_kind)
    queried = torch.tensor([0, 2, 3, 5, 9, 12])
    rows = lambda x: x.index_select(2, queried)  # noqa: E731
    args = (t["k1"], t["v1"], t["k0"], t["v0"])
    full = cached_attention(t["q1"], *args, t["c0"], t["m0"], t["l0"], t["salient"], t["mask"], t["d"] ** -0.5,
                            mode, 0.5)
    part = cached_attention(rows(t["q1"]), *args, rows(t["c0"]), rows(t["m0"]), rows(t["l0"]), t["salient"],
                            t["mask"], t["d"] ** -0.5, mode, 0.5, queried)
    for got, expected in zip(part, full):
        torch.testing.assert_close(got, rows(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,route", MODE_ROUTES)
@pytest.mark.parametrize("shape", B_H_N_D)
@pytest.mark.parametrize("salient_kind", SALIENT)
def test_inputs_are_not_written_and_their_layout_does_not_matter(mode, route, shape, salient_kind, monkeypatch):
    """The CPU body writes into temporaries in place: the caches it is given (float32, so ``.float()`` returns
    them unchanged) must come out untouched, and a transposed layout must give the same results."""
    _force_route(monkeypatch, route)
    t = _step(shape, 2, "padding", salient_kind)
    inputs = [t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"]]
    before = [x.clone() for x in inputs]
    tail = (t["salient"], t["mask"], t["d"] ** -0.5, mode, 0.5)
    expected = cached_attention(*inputs, *tail)
    for x, kept in zip(inputs, before):
        assert torch.equal(x, kept)
    # The same values stored [B, N, H, D] (or [B, N, H]) and viewed back: not contiguous.
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    assert not strided[5].is_contiguous()
    for got, want in zip(cached_attention(*strided, *tail), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for x, kept in zip(strided, before):
        assert torch.equal(x, kept)


def test_exact_mode_drift_over_fifty_steps(exact_route):
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 1, 4, 256, 64
    q = torch.randn(b, h, n, d, generator=gen)
    k, v = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    stats = torch.zeros(b, h, n)
    everyone = torch.ones(b, n, dtype=torch.bool)
    c, m, l = cached_attention(q, k, v, k, v, torch.zeros_like(q), stats, stats, everyone, None, d ** -0.5,
                               "exact", 0.5)
    worst = 0.0
    for _ in range(50):
        salient = torch.zeros(b, n, dtype=torch.bool)
        salient[0, torch.randperm(n, generator=gen)[:8]] = True
        rows = salient[:, None, :, None]
        q1 = torch.where(rows, torch.randn(b, h, n, d, generator=gen), q)
        k1 = torch.where(rows, torch.randn(b, h, n, d, generator=gen), k)
        v1 = torch.where(rows, torch.randn(b, h, n, d, generator=gen), v)
        c, m, l = cached_attention(q1, k1, v1, k, v, c, m, l, salient, None, d ** -0.5, "exact", 0.5)
        q, k, v = q1, k1, v1
        worst = max(worst, (c - F.scaled_dot_product_attention(q, k, v)).abs().max().item())
    assert worst < 1e-5


def test_op_runs_inside_a_compiled_graph(exact_route):
    t = _step((2, 4, 13, 8), 2, "padding", "some")
    args = (t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"], t["salient"], t["mask"])

    def fn(*a):
        c, m, l = torch.ops.dyllm.cached_attention(*a, t["d"] ** -0.5, "exact", 0.5)
        return c * 2, m, l

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    expected = cached_attention_reference(*args, t["d"] ** -0.5, "exact", 0.5)
    got = compiled(*args)
    torch.testing.assert_close(got[0], expected[0] * 2)
    torch.testing.assert_close(got[1], expected[1])


def _traced(args, tail):
    """The graphs' call at a cached site, traced by make_fx: (graph, its outputs)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda *a: _op_module.cached_attention_or_dense(*a, *tail))(*args)
    return gm, gm(*args)


def _calls_op(gm) -> bool:
    return any(n.target is torch.ops.dyllm.cached_attention.default for n in gm.graph.nodes)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("rep", [1, 2])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("queried", [None, [0, 2, 3, 5, 9, 12]])
@pytest.mark.parametrize("salient_kind", ["some", "mixed"])
def test_graphs_trace_plain_ops_for_small_problems(mode, rep, mask_kind, queried, salient_kind):
    """Small problems in either mode: the traced graph holds plain ops (no op call left) with the op's results:
    context, row max and denominator, GQA, masks (rows no key sees included) and a queried-row subset included.
    Salient rows: some in each element (their union not every row, so paper mode's sum over every column stands for
    the op's over the changed ones), or some, none and every row in the three elements."""
    t = _step((3, 4, 13, 8), rep, mask_kind, salient_kind)
    index = None if queried is None else torch.tensor(queried)
    rows = (lambda x: x) if index is None else (lambda x: x.index_select(2, index))  # noqa: E731
    args = (rows(t["q1"]), t["k1"], t["v1"], t["k0"], t["v0"], rows(t["c0"]), rows(t["m0"]), rows(t["l0"]),
            t["salient"], t["mask"])
    tail = (t["d"] ** -0.5, mode, 0.5, index)
    gm, got = _traced(args, tail)
    assert not _calls_op(gm)
    for g, want in zip(got, cached_attention(*args, *tail)):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_graphs_call_the_op_elsewhere(mode, monkeypatch):
    """Where the problem is too large for plain ops (``RECOMPUTE_WORK``), either mode's graph calls the op."""
    _force_route(monkeypatch, "incremental")
    t = _step((1, 4, 13, 8), 1, None, "some")
    args = (t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"], t["salient"], t["mask"])
    tail = (t["d"] ** -0.5, mode, 0.5)
    gm, got = _traced(args, tail)
    assert _calls_op(gm)
    for g, want in zip(got, cached_attention(*args, *tail)):
        torch.testing.assert_close(g, want)


@pytest.mark.inductor
@pytest.mark.parametrize("mode,route", [("exact", "recompute"), ("exact", "incremental"), ("paper", "recompute")])
def test_inductor_fuses_the_attention_of_small_problems(mode, route, monkeypatch):
    """Through dyllm's lowering, Inductor's generated code calls the op only where the problem is too large for
    plain ops (``RECOMPUTE_WORK``, "incremental" here); either way, in either mode, the results are the op's."""
    from torch._inductor.utils import run_and_get_code

    from dyllm_compile.lowering import lower

    _force_route(monkeypatch, None if route == "recompute" else "incremental")
    t = _step((2, 4, 13, 8), 2, "padding", "some")
    args = (t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"], t["salient"], t["mask"])

    def fn(*a):
        c, m, l = _op_module.cached_attention_or_dense(*a, t["d"] ** -0.5, mode, 0.5)
        return c * 2, m, l

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=lambda gm, inputs: lower(gm, inputs, "inductor"), fullgraph=True)
    got, (code,) = run_and_get_code(compiled, *args)
    assert ("torch.ops.dyllm.cached_attention.default(" in code) == (route == "incremental")
    expected = cached_attention(*args, t["d"] ** -0.5, mode, 0.5)
    torch.testing.assert_close(got[0], expected[0] * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,route", MODE_ROUTES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("queried", [False, True])
def test_fake_implementation_gives_the_real_layouts(mode, route, layout, queried, monkeypatch):
    """Compiled code takes the op's results in the layouts its fake implementation gives, unchecked (the variants
    are compiled without Inductor's size assertions): every implementation must return those, whatever the
    layouts of its inputs (torch.library.opcheck compares shapes, strides and dtypes, and the schema)."""
    _force_route(monkeypatch, route)
    t = _step((2, 4, 13, 8), 2, "padding", "some")
    inputs = [t["q1"], t["k1"], t["v1"], t["k0"], t["v0"], t["c0"], t["m0"], t["l0"]]
    if layout == "strided":  # stored [B, N, H, D] (or [B, N, H]), viewed back
        inputs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    rows = torch.tensor([0, 3, 4, 9]) if queried else None
    if rows is not None:
        inputs = [x if i in (1, 2, 3, 4) else x.index_select(2, rows) for i, x in enumerate(inputs)]
    torch.library.opcheck(cached_attention, (*inputs, t["salient"], t["mask"], t["d"] ** -0.5, mode, 0.5, rows),
                          test_utils=("test_schema", "test_faketensor"))
