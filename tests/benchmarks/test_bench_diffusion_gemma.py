"""The DiffusionGemma benchmark runs end to end on a tiny model (needs transformers >= 5.25); only the shape of
its output is asserted."""

import csv

import pytest
from bench_modules import load

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no DiffusionGemma (5.25 has)", allow_module_level=True)


def test_rows_are_well_formed(tmp_path):
    bench = load("bench_diffusion_gemma")
    out = tmp_path / "dg.csv"
    bench.main(["--hidden", "64", "--layers", "2", "--vocab", "128", "--canvas", "8", "--prompt", "8",
                "--calls", "3", "--repeats", "1", "--experts", "batched_mm", "--thresholds", "0.9",
                "--lowering", "aot_eager", "--out", str(out)])
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        rows = list(reader)
    assert [(r["experts"], r["mode"]) for r in rows] == [("batched_mm", "aot_eager"), ("batched_mm", "dyllm")]
    assert all(float(r["ms_per_step"]) > 0 and float(r["speedup_vs_inductor"]) > 0 for r in rows)
    assert len(rows[1]["salient_fraction_per_layer"].split()) == 2  # one per layer
    assert (tmp_path / "dg_speedup.png").exists()
