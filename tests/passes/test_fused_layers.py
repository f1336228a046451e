"""``nn.TransformerEncoderLayer``'s fused fast path becomes the ops it computes, so that its attention is a site.

Before: under ``inference_mode`` each layer was one ``torch._transformer_encoder_layer_fwd`` node, opaque to the
analysis (no site, the whole graph dense). After: the layer's own ops, SDPA among them; the new graph computes what
Dynamo's did, and through the backend every site is cached and every FFN gated."""

import pytest
import torch
from torch import nn

from dyllm_compile.passes.fused_layers import FUSED_REASON, unfuse_layers
from dyllm_compile.passes.graph_utils import op_name
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from graph_helpers import capture, ops, traced

B, N, E, HEADS = 2, 10, 32, 4


def layer(norm_first=False, activation="relu"):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.1, activation=activation, batch_first=True,
                                      norm_first=norm_first).eval()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_layer_becomes_its_ops(norm_first, activation, padded):
    x = torch.randn(B, N, E)
    padding = torch.zeros(B, N, dtype=torch.bool)
    padding[1, -3:] = True  # element 1's last three tokens are padding
    module = layer(norm_first, activation)
    gm, inputs = traced(lambda x, p: module(x, src_key_padding_mask=p if padded else None), x, padding)
    before = ops(gm)  # with padding, the layer first turns its boolean mask into an additive one
    assert before.count("_transformer_encoder_layer_fwd") == 1 and "sdpa" not in before
    new = unfuse_layers(gm)
    after = ops(new)
    assert new is not gm and ops(gm) == before  # Dynamo's graph as it was
    assert after.count("sdpa") == 1 and after.count("linear") == 4 and after.count("layer_norm") == 2
    assert after.count(activation) == 1 and "_transformer_encoder_layer_fwd" not in after
    with torch.inference_mode():
        torch.testing.assert_close(new(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)


def test_attention_mask_stays_fused_with_its_reason():
    module = layer()
    causal = nn.Transformer.generate_square_subsequent_mask(N)
    gm, _ = traced(lambda x: module(x, src_mask=causal), torch.randn(B, N, E))
    if "_transformer_encoder_layer_fwd" not in ops(gm):
        pytest.skip("this torch does not take the fast path with an attention mask")
    assert unfuse_layers(gm) is gm
    (fused,) = [n for n in gm.graph.nodes if op_name(n) == "_transformer_encoder_layer_fwd"]
    assert "only key padding is unfused" in fused.meta[FUSED_REASON]


class EncoderLM(nn.Module):
    """A masked LM on ``nn.TransformerEncoder``, as small diffusion LMs are often written."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, E)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 64, batch_first=batch_first), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(E, 128)
        self.batch_first = batch_first

    def forward(self, ids):
        if self.batch_first:
            return self.head(self.encoder(self.embed(ids)))
        return self.head(self.encoder(self.embed(ids).transpose(0, 1)).transpose(0, 1))


def test_encoder_lm_is_cached_through_the_backend():
    torch._dynamo.reset()
    before = last_serial()
    model = EncoderLM().eval()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(3, 120, (B, N), generator=torch.Generator().manual_seed(1))
    ids[:, 4:] = 127
    with torch.inference_mode():
        for call in range(4):
            expected, got = model(ids.clone()), compiled(ids.clone())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            ids[:, 4 + call] = call + 10
    (runtime,) = runtimes(before)
    assert runtime.stats.sparse_calls == 3
    assert [s.cached for s in runtime.plan.sites] == [True, True], runtime.plan.reasons
    assert [(r.role, r.layer) for r in runtime.plan.regions if r.role in ("ffn", "lm_head")] == [
        ("ffn", 0), ("ffn", 1), ("lm_head", 1)]


def test_boolean_key_padding_mask_attends_where_false():
    """The fused op also takes a boolean key-padding mask (True = padding) when called directly."""
    module = layer()
    x, padding = torch.randn(B, N, E), torch.zeros(B, N, dtype=torch.bool)
    padding[0, -2:] = True
    sa = module.self_attn

    def fused(x, padding):  # the mask as keywords: read as such, not taken for absent
        return torch._transformer_encoder_layer_fwd(
            x, E, HEADS, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias, False, False,
            module.norm1.eps, module.norm1.weight, module.norm1.bias, module.norm2.weight, module.norm2.bias,
            module.linear1.weight, module.linear1.bias, module.linear2.weight, module.linear2.bias, mask=padding,
            mask_type=1)

    gm, inputs = traced(fused, x, padding)
    new = unfuse_layers(gm)
    assert "logical_not" in ops(new)
    with torch.inference_mode():
        torch.testing.assert_close(new(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)


def test_sequence_first_attention_is_named_as_the_reason():
    """Sequence-first layers (``batch_first=False``) take no fast path: Dynamo records one
    ``multi_head_attention_forward`` call per layer, not unfused (the rewrite wants batch-first tokens anyway); the
    analysis names it."""
    model = EncoderLM(batch_first=False).eval()
    (cap,) = capture(model, (torch.randint(0, 128, (B, N)),), dynamic=False)
    assert cap.analysis.sites == []
    assert "opaque ops that may hide attention: multi_head_attention_forward" in cap.analysis.dense_reasons[0]
