"""The Triton kernels (paper and exact mode) equal the op's plain-torch reference at odd shapes, GQA ratios, masks,
dtypes, query-row subsets, and (exact mode) rows whose removed mass forces a recompute.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest before the kernels are
imported); with one, the same cases run natively on CUDA tensors (the interpreter is then off). The reference runs
exact mode's incremental update (its small-problem route would recompute every row, which the kernels do not
mirror: both give dense attention, with different but consistent row statistics).
"""

import pytest
import torch

from dyllm_compile.kernels.cached_attention import cached_attention_paper, cuda_implementation
from dyllm_compile.kernels.exact_attention import cached_attention_exact
from dyllm_compile.ops.cached_attention import (_attention_with_stats, cached_attention_reference, default_scale,
                                                repeat_kv_heads)

pytestmark = pytest.mark.kernels

# Per dtype: (atol, rtol) of the kernel vs the fp32-computing reference, both rounding to the dtype at the end.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
STATS_TOLERANCE = (1e-4, 1e-4)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # natively, or under the interpreter
HEADS = [(4, 4), (4, 1), (7, 1)]  # (query heads, kv heads)
HEAD_IDS = ["mha", "gqa4", "gqa7"]


@pytest.fixture(autouse=True)
def incremental_reference(incremental_attention):
    """The reference on its incremental update, as the kernels' (conftest)."""


def _case(b, h, g, n, d, salient, mask, dtype, device, seed=0):
    """Inputs of one call: this step's and the previous step's keys/values, which differ exactly on the rows
    salient in some batch element, and the previous context with its softmax statistics (dense attention of the
    same queries over the old keys: what exact mode's caches hold)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = rnd(b, h, n, d)
    k, v = rnd(b, g, n, d), rnd(b, g, n, d)
    shared = rnd(d)  # "dominant": a direction every query leans to, which the changed columns' old keys held
    sal = torch.zeros(b, n, dtype=torch.bool)
    if salient == "one":
        sal[0, n // 2] = True
    elif salient == "all":
        sal[:] = True
    elif salient in ("some", "dominant"):
        sal = torch.rand(b, n, generator=gen) < 0.3
    changed = sal[:, None, :, None]  # the op's contract: an element's keys and values change on its salient rows
    k_old = torch.where(changed, rnd(b, g, n, d), k)
    if salient == "dominant":  # the changed columns held most of the old softmax mass: their removal cancels
        q = q + shared
        k_old = torch.where(changed, shared, k)
    v_old = torch.where(changed, rnd(b, g, n, d), v)
    attn_mask = None
    if mask in ("padding", "no_keys"):
        attn_mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        attn_mask[-1, ..., : n // 3] = False
        if mask == "no_keys":  # the padded rows see no key either: their context is zero, as SDPA's
            attn_mask = attn_mask & attn_mask.transpose(-1, -2)
    elif mask == "additive":
        attn_mask = rnd(1, 1, n, n)
    elif mask == "head_bias":  # what a flex score_mod's bias becomes: ALiBi per head, -inf where a tile masks
        slopes = 2.0 ** -torch.arange(1, h + 1, dtype=torch.float32)
        position = torch.arange(n, dtype=torch.float32)
        attn_mask = slopes[:, None, None] * (position - position[:, None])  # [H, N, N]: slope * (kv - q)
        attn_mask = attn_mask.masked_fill(position // 8 < position[:, None] // 8, float("-inf"))[None]
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    q, k, v, k_old, v_old = (cast(t) for t in (q, k, v, k_old, v_old))
    attn_mask = None if attn_mask is None else attn_mask.to(device)
    c_old, m_old, l_old = _attention_with_stats(q, repeat_kv_heads(k_old, h), repeat_kv_heads(v_old, h), attn_mask,
                                                default_scale(d))
    return (q, k, v, k_old, v_old, c_old, m_old, l_old), sal.to(device), attn_mask


def _rows(tensors, queried):
    """q, c_old, m_old, l_old restricted to the queried rows (query pruning)."""
    if queried is None:
        return tensors
    q, k, v, k_old, v_old, c_old, m_old, l_old = tensors
    q, c_old, m_old, l_old = (t.index_select(2, queried) for t in (q, c_old, m_old, l_old))
    return q, k, v, k_old, v_old, c_old, m_old, l_old


def _compare(mode, b, h, g, n, d, salient, mask, dtype, device=KERNEL_DEVICE, queried=None, tensor_cores=None,
             softcap=0.0):
    tensors, sal, attn_mask = _case(b, h, g, n, d, salient, mask, dtype, device)
    queried = None if queried is None else torch.tensor(queried, device=device)
    q, k, v, k_old, v_old, c_old, m_old, l_old = _rows(tensors, queried)
    scale = default_scale(d)
    if softcap:  # the previous step's context and statistics as the capped scores give them
        c_old, m_old, l_old = _attention_with_stats(tensors[0], repeat_kv_heads(k_old, h), repeat_kv_heads(v_old, h),
                                                    attn_mask, scale, softcap=softcap)
        q, k, v, k_old, v_old, c_old, m_old, l_old = _rows((*tensors[:5], c_old, m_old, l_old), queried)
    want = cached_attention_reference(q, k, v, k_old, v_old, c_old, m_old, l_old, sal, attn_mask, scale, mode, 0.5,
                                      queried, softcap)
    if mode == "paper":
        got = cached_attention_paper(q, k, v, v_old, c_old, sal, attn_mask, scale, queried,
                                     tensor_cores=tensor_cores, softcap=softcap)
    else:
        got = cached_attention_exact(q, k, v, k_old, v_old, c_old, m_old, l_old, sal, attn_mask, scale, 0.5,
                                     queried, tensor_cores=tensor_cores, softcap=softcap)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=atol, rtol=rtol)
    if mode == "exact":  # and exact mode's contract itself: dense attention of the (cached) queries
        full_q = tensors[0]
        dense = _attention_with_stats(full_q, repeat_kv_heads(k, h), repeat_kv_heads(v, h), attn_mask, scale,
                                      softcap=softcap)[0]
        dense = dense if queried is None else dense.index_select(2, queried)
        torch.testing.assert_close(got[0].float(), dense.float(), atol=atol, rtol=rtol)
    for got_stat, want_stat in zip(got[1:], want[1:]):
        torch.testing.assert_close(got_stat, want_stat, atol=STATS_TOLERANCE[0], rtol=STATS_TOLERANCE[1])
    assert got[0].dtype == dtype and got[0].shape == q.shape


@pytest.mark.parametrize("salient", ["none", "one", "some", "all"])
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_paper_kernel_matches_reference_fp32(salient, n, heads):
    _compare("paper", 2, heads[0], heads[1], n, 16, salient, None, torch.float32)


@pytest.mark.parametrize("salient", ["none", "one", "some", "all", "dominant"])
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_exact_kernel_matches_reference_fp32(salient, n, heads):
    _compare("exact", 2, heads[0], heads[1], n, 16, salient, None, torch.float32)


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("mask", ["padding", "additive", "no_keys", "head_bias"])
@pytest.mark.parametrize("salient", ["one", "some"])
def test_kernels_match_reference_with_masks(mode, mask, salient):
    _compare(mode, 2, 4, 2, 45, 32, salient, mask, torch.float32)


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("mask", [None, "no_keys"])
@pytest.mark.parametrize("salient", ["some", "dominant"])
def test_kernels_match_reference_with_soft_capped_scores(mode, mask, salient):
    """Gemma-2's soft-capped scores (``softcap * tanh(s / softcap)``, before the mask), in every score the kernels
    compute: the softmax pass, paper mode's changed columns, exact mode's update and recomputed rows."""
    _compare(mode, 2, 4, 2, 41, 16, salient, mask, torch.float32, softcap=1.5)


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_reference_low_precision(mode, dtype):
    _compare(mode, 1, 4, 2, 40, 16, "some", None, dtype)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_kernels_match_reference_with_tensor_core_products(mode):
    # 16-bit full-row products on the tensor cores (on by default on CUDA). The interpreter gets bf16 dots wrong,
    # so this runs fp16 (the same branch of tiles.dot) there; on a GPU, bf16 too via the test above.
    _compare(mode, 2, 4, 2, 40, 16, "some", "padding", torch.float16, tensor_cores=True)


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("mask", [None, "padding"])
def test_kernels_take_a_subset_of_query_rows(mode, mask):
    # Query pruning: 19 of 41 rows, unsorted, with salient and unqueried rows on both sides of the subset.
    queried = [40, 0, 3, 5, 8, 13, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 33, 2]
    _compare(mode, 3, 4, 2, 41, 16, "some", mask, torch.float32, queried=queried)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_kernels_take_keys_beyond_the_query_rows(mode):
    """A site whose keys extend its rows by a prefix (rows.prefix_operands): 29 query rows at the keys' first 29
    positions, then 12 prefix keys that never change; the mask holds the query rows only ([1, 1, 29, 41])."""
    b, h, g, r, n, d = 2, 4, 2, 29, 41, 16
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = rnd(b, h, r, d), rnd(b, g, n, d), rnd(b, g, n, d)
    sal = torch.cat([torch.rand(b, r, generator=gen) < 0.3, torch.zeros(b, n - r, dtype=torch.bool)], dim=1)
    k_old = torch.where(sal[:, None, :, None], rnd(b, g, n, d), k)
    v_old = torch.where(sal[:, None, :, None], rnd(b, g, n, d), v)
    mask = rnd(1, 1, r, n)
    scale = default_scale(d)
    q, k, v, k_old, v_old, mask, sal = (t.to(KERNEL_DEVICE) for t in (q, k, v, k_old, v_old, mask, sal))
    c_old, m_old, l_old = _attention_with_stats(q, repeat_kv_heads(k_old, h), repeat_kv_heads(v_old, h), mask, scale)
    queried = torch.arange(r, device=KERNEL_DEVICE)
    args = (q, k, v, k_old, v_old, c_old, m_old, l_old, sal, mask, scale)
    want = cached_attention_reference(*args, mode, 0.5, queried)
    got = cuda_implementation(*args, mode, 0.5, queried)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
    if mode == "exact":
        dense = _attention_with_stats(q, repeat_kv_heads(k, h), repeat_kv_heads(v, h), mask, scale)[0]
        torch.testing.assert_close(got[0], dense, atol=2e-5, rtol=2e-5)
    for got_stat, want_stat in zip(got[1:], want[1:]):
        torch.testing.assert_close(got_stat, want_stat, atol=STATS_TOLERANCE[0], rtol=STATS_TOLERANCE[1])


@pytest.mark.parametrize("mode", ["exact", "paper"])
def test_fixed_tiles_compute_what_the_autotuned_ones_do(mode):
    """Benchmarks fix the tiles (rows x keys per program, warps); the op leaves them to the autotuners. Both compute
    the reference's result; block_m without block_n is refused."""
    tensors, sal, attn_mask = _case(2, 4, 2, 40, 16, "some", "padding", torch.float32, KERNEL_DEVICE)
    q, k, v, k_old, v_old, c_old, m_old, l_old = _rows(tensors, None)
    args = (q, k, v, k_old, v_old, c_old, m_old, l_old, sal, attn_mask, default_scale(16), mode, 0.5)
    want = cached_attention_reference(*args)
    for tiling in ({}, dict(block_m=32, block_n=16, num_warps=2)):
        got = cuda_implementation(*args, **tiling)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="block_m and block_n go together"):
        cuda_implementation(*args, block_m=32)


def test_dominant_case_recomputes_rows_in_the_kernel():
    # The case above is only a test of the recompute path if the update flags rows: the old mass of the changed
    # columns exceeds half the kept mass for some rows, and the kernel's result is still dense attention.
    (q, k, v, k_old, v_old, c_old, m_old, l_old), sal, _ = _case(1, 4, 4, 37, 16, "dominant", None, torch.float32,
                                                                  KERNEL_DEVICE)
    cols = sal[0].nonzero().flatten()
    old_scores = torch.matmul(q, k_old[:, :, cols].transpose(-1, -2)) * default_scale(16)
    removed_share = (old_scores - m_old[..., None]).exp().sum(-1) / l_old
    assert (removed_share > 0.5).any() and not sal.all()
    got = cached_attention_exact(q, k, v, k_old, v_old, c_old, m_old, l_old, sal, None, default_scale(16), 0.5)
    dense = _attention_with_stats(q, k, v, None, default_scale(16))
    torch.testing.assert_close(got[0], dense[0], atol=2e-5, rtol=2e-5)


def test_exact_kernel_recomputes_every_row_where_most_columns_changed():
    # Element 0 changed 30 of 40 rows (more than half: recomputing every row is cheaper than the update), element
    # 1 changed 4: element 0's rows all get dense attention with its exact statistics, element 1's non-salient
    # rows the update's running ones.
    (q, k, v, k_old, v_old, c_old, m_old, l_old), _, _ = _case(2, 4, 2, 40, 16, "none", None, torch.float32,
                                                              KERNEL_DEVICE)
    sal = torch.zeros(2, 40, dtype=torch.bool, device=KERNEL_DEVICE)
    sal[0, :30], sal[1, ::10] = True, True
    changed = sal[:, None, :, None]
    k, v = torch.where(changed, k.flip(2), k_old), torch.where(changed, v.flip(2), v_old)
    got = cached_attention_exact(q, k, v, k_old, v_old, c_old, m_old, l_old, sal, None, 0.25, 0.5)
    dense = _attention_with_stats(q, repeat_kv_heads(k, 4), repeat_kv_heads(v, 4), None, 0.25)
    for got_part, dense_part in zip(got, dense):
        torch.testing.assert_close(got_part[0], dense_part[0], atol=2e-5, rtol=2e-5)  # stats too: recomputed
    torch.testing.assert_close(got[0][1], dense[0][1], atol=2e-5, rtol=2e-5)
    unchanged = ~sal[1]
    assert not torch.equal(got[1][1][:, unchanged], dense[1][1][:, unchanged])  # running maxima: the update ran


@pytest.mark.parametrize("mode", ["paper", "exact"])
@pytest.mark.parametrize("head_dim", [8, 24, 40, 80])
def test_kernels_take_any_head_dim(mode, head_dim):
    # Tiles pad the head dim to a power of two >= 16 and mask the padding (80: Phi-2's heads).
    _compare(mode, 2, 4, 2, 21, head_dim, "some", "padding", torch.float32)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_cuda_implementation_dispatch_equals_reference(mode):
    # What the op runs on CUDA (the mode's kernel), here on CPU tensors.
    (q, k, v, k_old, v_old, c_old, m_old, l_old), sal, attn_mask = _case(2, 4, 2, 21, 16, "some", "padding",
                                                                         torch.float32, KERNEL_DEVICE)
    args = (q, k, v, k_old, v_old, c_old, m_old, l_old, sal, attn_mask, 0.25, mode, 0.5)
    for got, want in zip(cuda_implementation(*args), cached_attention_reference(*args)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # with the mask's last value (a mask that changes with the keys; the kernels read one mask): the reference's
    # result, mask_old used in exact mode (it differs from the mask on the changed keys' columns), ignored in paper
    mask_old = attn_mask & ~(sal[:, None, None, :] & (torch.arange(21, device=sal.device) % 2 == 0))
    with_old = (*args, None, 0.0, mask_old)
    for got, want in zip(cuda_implementation(*with_old), cached_attention_reference(*with_old)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(cached_attention_reference(*with_old)[0], cached_attention_reference(*args)[0]) == (
        mode == "paper")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_op_on_cuda_runs_the_kernel_without_host_sync_and_matches_reference(mode):
    from dyllm_compile.ops.cached_attention import cached_attention

    (q, k, v, k_old, v_old, c_old, m_old, l_old), sal, _ = _case(1, 8, 2, 300, 64, "some", None, torch.bfloat16,
                                                                  "cuda")
    args = (q, k, v, k_old, v_old, c_old, m_old, l_old, sal, None, 0.125, mode, 0.5)
    cached_attention(*args)  # compiles and autotunes the kernels first (timing the candidates syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync inside the op now raises
    try:
        got = cached_attention(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = cached_attention_reference(*args)
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autotuners_choose_tiles_per_batch_size():
    """The best tiles depend on how many programs fill the device (batch x heads x row blocks): a new batch size is
    timed again (the autotuners' key holds it), not served the first batch size's choice."""
    from dyllm_compile.kernels.exact_attention import _update_kernel

    for batch in (1, 3):
        tensors, sal, _ = _case(batch, 4, 4, 200, 64, "some", None, torch.bfloat16, "cuda")
        cached_attention_exact(*tensors, sal, None, 0.125, 0.5)
    assert {1, 3} <= {key[0] for key in _update_kernel.cache}, _update_kernel.cache
