"""The row-count benchmark (capacity buckets vs unbacked sizes) runs end to end on tiny shapes; only the shape
of its output is asserted, and that both routes compute the same rows."""

import csv
import math

import torch
from bench_modules import load


def test_both_routes_agree_and_rows_are_well_formed(tmp_path):
    bench = load("bench_rows")
    gen = torch.Generator().manual_seed(0)
    h, cache = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    w1, w3, w2 = torch.randn(8, 12, generator=gen), torch.randn(8, 12, generator=gen), torch.randn(12, 8, generator=gen)
    salient = torch.rand(2, 16, generator=gen) < 0.2
    expected = torch.where(salient[..., None], bench.ffn(h, w1, w3, w2), cache)
    torch.testing.assert_close(bench.bucket_step(h, cache, salient, w1, w3, w2, 8), expected)
    torch.testing.assert_close(bench.unbacked_step(h, cache, salient, w1, w3, w2), expected)

    out = tmp_path / "rows.csv"
    bench.main(["--tokens", "16", "--d-model", "8", "--d-ffn", "12", "--counts", "1,5", "--repeats", "2",
                "--device", "cpu", "--out", str(out)])
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        rows = list(reader)
    assert [(r["route"], int(r["salient_rows"])) for r in rows] == [
        ("buckets", 1), ("buckets", 5), ("unbacked", 1), ("unbacked", 5)]
    assert [int(r["capacity"]) for r in rows] == [1, 8, 1, 5]
    for r in rows:
        assert math.isfinite(float(r["ms_per_call"])) and float(r["ms_per_call"]) > 0
        assert int(r["graphs_compiled"]) >= 1
