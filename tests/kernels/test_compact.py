"""``tiles.compact``: per batch element, the positions of its flagged entries in order and their count, on the
device in one launch; with ``any_of``, the entries flagged there in any head count too. Compared with torch's
``nonzero`` per row, at sizes below, at and across the kernel's block (1024), with empty and full rows."""

import pytest
import torch

from dyllm_compile.kernels.tiles import compact

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(flags: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in flags.cpu()]


@pytest.mark.parametrize("n", [1, 37, 1024, 1500])
def test_compact_lists_each_rows_flagged_positions_in_order(n):
    gen = torch.Generator().manual_seed(n)
    flags = torch.rand(4, n, generator=gen) < torch.tensor([[0.0], [0.05], [0.5], [1.0]])  # empty ... full rows
    order, count = compact(flags.to(DEVICE))
    assert order.dtype == count.dtype == torch.int32 and order.shape == (4, n)
    want = _expected(flags)
    assert count.tolist() == [len(w) for w in want]
    assert [order[b, :len(w)].tolist() for b, w in enumerate(want)] == want


@pytest.mark.parametrize("n", [37, 1500])
def test_compact_adds_rows_flagged_in_any_head(n):
    gen = torch.Generator().manual_seed(0)
    flags = torch.rand(3, n, generator=gen) < 0.05
    any_of = (torch.rand(3, 5, n, generator=gen) < 0.01).to(torch.uint8)
    order, count = compact(flags.to(DEVICE), any_of.to(DEVICE))
    want = _expected(flags | any_of.bool().any(dim=1))
    assert count.tolist() == [len(w) for w in want]
    assert [order[b, :len(w)].tolist() for b, w in enumerate(want)] == want
