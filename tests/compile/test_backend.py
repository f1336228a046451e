import pytest
import torch


def _compile_and_compare(model, lowering):
    torch._dynamo.reset()
    x = torch.randint(0, 127, (2, 12))
    compiled = torch.compile(model, backend="dyllm", options={"lowering": lowering})
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_aot_eager_lowering_matches_eager(tiny_dream):
    _compile_and_compare(tiny_dream, "aot_eager")


@pytest.mark.inductor
def test_inductor_lowering_matches_eager(tiny_llada):
    _compile_and_compare(tiny_llada, "inductor")
