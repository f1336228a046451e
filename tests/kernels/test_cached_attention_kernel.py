"""The paper-mode Triton kernel equals the op's plain-torch reference at odd shapes, GQA ratios, masks, dtypes.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1 (set in conftest before the kernels are
imported); with one, the same cases run natively on CUDA tensors (the interpreter is then off).
"""

import pytest
import torch

from dyllm_compile.kernels.cached_attention import cached_attention_paper
from dyllm_compile.ops.cached_attention import cached_attention_reference, default_scale

# Per dtype: (atol, rtol) of the kernel vs the fp32-computing reference, both rounding to the dtype at the end.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # natively, or under the interpreter


def _case(b, h, g, n, d, salient, mask, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = rnd(b, h, n, d)
    k, v = rnd(b, g, n, d), rnd(b, g, n, d)
    if salient == "none":
        sal = torch.zeros(b, n, dtype=torch.bool)
    elif salient == "one":
        sal = torch.zeros(b, n, dtype=torch.bool)
        sal[0, n // 2] = True
    elif salient == "all":
        sal = torch.ones(b, n, dtype=torch.bool)
    else:
        sal = torch.rand(b, n, generator=gen) < 0.3
    # Old keys/values differ from the new ones exactly on the rows salient in some batch element.
    changed = sal.any(0)[None, None, :, None]
    k_old = torch.where(changed, rnd(b, g, n, d), k)
    v_old = torch.where(changed, rnd(b, g, n, d), v)
    c_old = rnd(b, h, n, d)
    attn_mask = None
    if mask == "padding":
        attn_mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        attn_mask[-1, ..., : n // 3] = False
    elif mask == "additive":
        attn_mask = rnd(1, 1, n, n)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    tensors = [cast(t) for t in (q, k, v, k_old, v_old, c_old)]
    return tensors, sal.to(device), None if attn_mask is None else attn_mask.to(device)


def _compare(b, h, g, n, d, salient, mask, dtype, device):
    (q, k, v, k_old, v_old, c_old), sal, attn_mask = _case(b, h, g, n, d, salient, mask, dtype, device)
    scale = default_scale(d)
    stats = torch.zeros(b, h, n, device=device)
    want = cached_attention_reference(q, k, v, k_old, v_old, c_old, stats, stats, sal, attn_mask, scale, "paper", 0.5)
    got = cached_attention_paper(q, k, v, v_old, c_old, sal, attn_mask, scale)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)
    assert got[0].dtype == dtype


@pytest.mark.parametrize("salient", ["none", "one", "some", "all"])
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (7, 1)], ids=["mha", "gqa4", "gqa7"])
def test_kernel_matches_reference_fp32(salient, n, heads):
    _compare(2, heads[0], heads[1], n, 16, salient, None, torch.float32, KERNEL_DEVICE)


@pytest.mark.parametrize("mask", ["padding", "additive"])
@pytest.mark.parametrize("salient", ["one", "some"])
def test_kernel_matches_reference_with_masks(mask, salient):
    _compare(2, 4, 2, 45, 32, salient, mask, torch.float32, KERNEL_DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_low_precision(dtype):
    _compare(1, 4, 2, 40, 16, "some", None, dtype, KERNEL_DEVICE)


def test_kernel_rejects_head_dims_it_cannot_tile():
    (q, k, v, _, v_old, c_old), sal, _ = _case(1, 2, 2, 8, 16, "some", None, torch.float32, KERNEL_DEVICE)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        cached_attention_paper(q[..., :12], k[..., :12], v[..., :12], v_old[..., :12], c_old[..., :12], sal, None, 1.0)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_cuda_implementation_dispatch_equals_reference(mode):
    # What the op runs on CUDA (the kernel for paper mode, the reference for exact), without a GPU on CPU tensors.
    from dyllm_compile.kernels.cached_attention import cuda_implementation

    (q, k, v, k_old, v_old, c_old), sal, attn_mask = _case(2, 4, 2, 21, 16, "some", "padding", torch.float32,
                                                           KERNEL_DEVICE)
    stats = (torch.zeros(2, 4, 21, device=KERNEL_DEVICE), torch.ones(2, 4, 21, device=KERNEL_DEVICE))
    if mode == "exact":  # consistent running statistics: those of the old keys/values
        _, *stats = cached_attention_reference(q, k_old, v_old, k_old, v_old, c_old, *stats,
                                               torch.ones_like(sal), attn_mask, 0.25, "exact", 0.5)
    args = (q, k, v, k_old, v_old, c_old, *stats, sal, attn_mask, 0.25, mode, 0.5)
    for got, want in zip(cuda_implementation(*args), cached_attention_reference(*args)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_on_cuda_runs_the_kernel_and_matches_reference():
    from dyllm_compile.ops.cached_attention import cached_attention

    (q, k, v, k_old, v_old, c_old), sal, _ = _case(1, 8, 2, 300, 64, "some", None, torch.bfloat16, "cuda")
    stats = torch.zeros(1, 8, 300, device="cuda")
    args = (q, k, v, k_old, v_old, c_old, stats, stats, sal, None, 0.125, "paper", 0.5)
    got = cached_attention(*args)
    want = cached_attention_reference(*args)
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)
