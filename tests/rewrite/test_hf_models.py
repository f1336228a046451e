"""Hugging Face modeling code, unmodified, through ``backend="dyllm"``: threshold 1 equals dense at every call.

BERT (post-LN, learned positions, masked LM), ModernBERT (one fused q/k/v projection unbound into three, RoPE,
GeGLU) and decoder architectures called with a full 4-d mask (bidirectional, as Dream runs its Qwen2 layers):
Qwen2, GPT-2 (Conv1D as addmm), GPT-NeoX and Falcon (parallel attention and MLP summed before the residual),
Phi-3 (a fused projection sliced three ways). None is known to the compiler: each site is found from the graph
and cached, no site stays dense, and every layer's FFN is gated."""

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, FalconConfig, FalconForCausalLM, GPT2Config,
                          GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, ModernBertConfig, ModernBertForMaskedLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

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


def _bidirectional(cls, config):
    config._attn_implementation = "sdpa"
    config.use_cache = False
    model = cls(config)

    def forward(ids):  # additive: every token sees every token
        return model(input_ids=ids, attention_mask=torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])).logits
    return model, forward


def _qwen2():
    return _bidirectional(Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, max_position_embeddings=64, **SMALL))


def _falcon():
    return _bidirectional(FalconForCausalLM, FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, new_decoder_architecture=False,
                                                          multi_query=True, alibi=False))


MODELS = {
    "bert": _bert,
    "modernbert": _modernbert,
    "qwen2": _qwen2,
    "gpt2": lambda: _bidirectional(GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                               n_positions=64)),
    "gpt_neox": lambda: _bidirectional(GPTNeoXForCausalLM, GPTNeoXConfig(max_position_embeddings=64, **SMALL)),
    "falcon": _falcon,
    "phi3": lambda: _bidirectional(Phi3ForCausalLM, Phi3Config(num_key_value_heads=2, pad_token_id=0,
                                                               max_position_embeddings=64, **SMALL)),
}


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
    assert [r.layer for r in runtime.plan.regions if r.role == "ffn"] == [0, 1]
    assert {r.role for r in runtime.plan.regions} >= {"k", "v", "q", "lm_head"}


def test_cache_keeps_a_value_the_model_writes_into_later():
    """Falcon's ``mlp_output += attention_output`` writes into the FFN's output, the value the FFN cache keeps.
    Before: the cache held the sum (on a later call, rows that keep their cached FFN output would have added the
    attention twice). After: the cache is the FFN output as computed, and the model goes on with a copy."""
    torch._dynamo.reset()
    before = last_serial()
    torch.manual_seed(0)
    model, forward = _falcon()
    model.eval()
    compiled = torch.compile(forward, backend="dyllm", options={"lowering": "aot_eager"})
    mlp = {}
    model.transformer.h[0].mlp.register_forward_hook(lambda module, args, out: mlp.__setitem__("out", out.clone()))
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(ids.clone()), forward(ids.clone()), rtol=1e-5, atol=1e-5)
    (runtime,) = runtimes(before)
    (states,) = runtime.states.values()
    names = [spec.name for spec in runtime.plan.caches]
    torch.testing.assert_close(states[0].caches[names.index("L0.ffn")], mlp["out"], rtol=1e-5, atol=1e-6)
