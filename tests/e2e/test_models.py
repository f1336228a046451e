import pytest
import torch

from dyllm_compile.models import TransformerConfig, dream_config, llada_config, llada_like


def test_key_padding_mask_hides_pads():
    model = llada_like("tiny").double()
    x = torch.randint(0, 100, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        # RoPE is relative, so left padding with masked pad keys leaves the real rows unchanged.
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(x))


def test_additive_mask_equals_boolean_mask():
    model = llada_like("tiny")
    x = torch.randint(0, 100, (2, 6))
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~keep[:, None, None, :], float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(model(x, attention_mask=additive), model(x, attention_mask=keep))


def test_full_size_presets_match_published_shapes():
    llada = llada_config("8b")
    shape = (llada.n_layers, llada.d_model, llada.n_heads, llada.d_ffn, llada.vocab_size)
    assert shape == (32, 4096, 32, 12288, 126464)
    dream = dream_config("7b")
    assert (dream.n_layers, dream.d_model, dream.n_heads, dream.n_kv_heads, dream.qkv_bias) == (28, 3584, 28, 4, True)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="n_heads % n_kv_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
