"""dense_layers keeps chosen layers dense; shadow mode records the true drift from dense per call."""

import pytest
import torch

from dyllm_compile.config import DyllmConfig
from dyllm_compile.models.zoo import ZOO
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from decode_driver import decode_inputs


def _run(options, calls=6):
    entry = ZOO["llada"]
    model = entry.build()
    torch._dynamo.reset()
    since = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", **options})
    outs = []
    with torch.no_grad():
        for args in decode_inputs(entry, batch=2, prompt=6, response=10, calls=calls):
            outs.append((compiled(*args), model(*args)))
    (runtime,) = runtimes(since)
    return runtime, outs


def test_all_layers_dense_equals_dense_below_threshold_one():
    runtime, outs = _run({"threshold": 0.3, "dense_layers": [0, 1]})
    assert [s.cached for s in runtime.plan.sites] == [False, False]
    assert all("dense_layers" in s.reason for s in runtime.plan.sites)
    assert [r for r in runtime.plan.regions] == []  # nothing gated: FFNs and the lm_head run on all rows
    assert runtime.stats.sparse_calls > 0
    for got, want in outs:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_dense_layer_keeps_the_other_gated():
    runtime, _ = _run({"threshold": 0.3, "dense_layers": [0]})
    assert [s.cached for s in runtime.plan.sites] == [False, True]
    gated = {(r.role, r.layer) for r in runtime.plan.regions}
    assert ("ffn", 0) not in gated and ("ffn", 1) in gated and ("lm_head", 1) in gated


def test_shadow_records_the_drift_from_dense_at_every_sparse_call():
    runtime, outs = _run({"threshold": 0.5, "shadow": True})
    sparse_outs = outs[1:]  # the first call is dense
    assert runtime.stats.sparse_calls == len(sparse_outs) == len(runtime.stats.shadow)
    for (drift, flips), (got, want) in zip(runtime.stats.shadow, sparse_outs):
        assert drift == pytest.approx(float((got - want).abs().max()), abs=1e-4)
        assert flips == int((got.argmax(-1) != want.argmax(-1)).sum())
    assert max(d for d, _ in runtime.stats.shadow) > 1e-3  # threshold 0.5 really serves stale rows


def test_shadow_at_threshold_one_sees_no_drift():
    runtime, _ = _run({"threshold": 1.0, "shadow": True})
    assert runtime.stats.shadow and all(d < 1e-4 and f == 0 for d, f in runtime.stats.shadow)


@pytest.mark.parametrize("options, message", [
    ({"dense_layers": [0, -1]}, "non-negative ints"),
    ({"dense_layers": 1}, "list of non-negative ints"),
    ({"shadow": "yes"}, "'shadow' must be one of"),
])
def test_bad_knob_values_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        DyllmConfig.from_options(options)
