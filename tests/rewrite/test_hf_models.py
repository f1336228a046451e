"""Hugging Face modeling code, unmodified, through ``backend="dyllm"``: threshold 1 equals dense at every call.

BERT (post-LN, learned positions, masked LM), ModernBERT (one fused q/k/v projection unbound into three, RoPE,
GeGLU) and Qwen2 called with a full 4-d mask (bidirectional, as Dream runs its Qwen2 layers). None is known to
the compiler: each site is found from the graph and cached, no site stays dense."""

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, Qwen2Config,
                          Qwen2ForCausalLM)

from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

MASK = 127
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _bert():
    model = BertForMaskedLM(BertConfig(max_position_embeddings=64, attn_implementation="sdpa", **SMALL))
    return model, lambda ids: model(input_ids=ids).logits


def _modernbert():
    config = ModernBertConfig(max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=1, reference_compile=False,
                              attn_implementation="sdpa", **SMALL)
    model = ModernBertForMaskedLM(config)
    return model, lambda ids: model(input_ids=ids).logits


def _qwen2():
    model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                                         attn_implementation="sdpa", **SMALL))

    def bidirectional(ids):
        full = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])  # additive: every token sees every token
        return model(input_ids=ids, attention_mask=full).logits
    return model, bidirectional


MODELS = {"bert": _bert, "modernbert": _modernbert, "qwen2": _qwen2}


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_threshold_one_equals_dense(name):
    torch._dynamo.reset()
    before = last_serial()
    torch.manual_seed(0)
    model, forward = MODELS[name]()
    model.eval()
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager", "threshold": 1.0})
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[:, 6:] = MASK
    with torch.inference_mode():
        for call in range(4):
            expected, got = forward(ids.clone()), compiled(ids.clone())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            ids[:, 6 + 2 * call: 8 + 2 * call] = torch.randint(3, 120, (2, 2))
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 3
    assert len(runtime.plan.sites) == 2 and all(s.cached for s in runtime.plan.sites), runtime.plan.reasons
    assert {r.role for r in runtime.plan.regions} >= {"k", "v", "q", "ffn", "lm_head"}
