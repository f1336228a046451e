"""Real Hugging Face modeling code (Llama, GQA) through its attention registry: what the analysis finds."""

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from graph_helpers import assert_region_runs_on_rows, capture


@torch.library.custom_op("dyllm_test::opaque_attention", mutates_args=())
def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stands in for flash_attention_2: one kernel the analysis cannot look into."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


@opaque_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


def _opaque_forward(module, query, key, value, attention_mask, **kwargs):
    return opaque_attention(query, key, value), None


AttentionInterface.register("dyllm_test_opaque", _opaque_forward)


def _llama(implementation):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llama_sites_regions_and_chains(implementation):
    """Eager attention (hand-written) is replaced by SDPA first, then analysed alike."""
    (cap,) = capture(_llama(implementation), (torch.randint(0, 128, (2, 12)),), dynamic=False)
    a = cap.analysis
    hand_written = implementation == "eager"
    assert [(s.kind, s.hand_written, s.layer) for s in a.sites] == [("sdpa", hand_written, 0),
                                                                    ("sdpa", hand_written, 1)]
    assert [(r.role, r.layer) for r in a.gated_regions] == [("ffn", 0), ("ffn", 1), ("lm_head", 1)]
    for chains in a.chains:
        assert chains["k"].gated and chains["v"].gated
        assert "k_proj" in next(n for n in chains["k"].nodes if cap.ops([n]) == ["linear"]).args[1].name
    for region in a.gated_regions + [c for chains in a.chains for c in chains.values()]:
        assert_region_runs_on_rows(cap, region)


def test_llama_flex_attention_sites_become_sdpa():
    """transformers' flex_attention: its score_mod returns the score (no soft-capping), its block mask comes from
    the padding mask: each site becomes SDPA with the mask the block mask applies (before: two dense flex sites,
    no k/v chain gated)."""
    graphs = capture(_llama("flex_attention"), (torch.randint(0, 128, (1, 12)),), dynamic=False)
    sites = [s for cap in graphs for s in cap.analysis.sites]
    assert [(s.kind, s.dense_reason) for s in sites] == [("sdpa", ""), ("sdpa", "")]
    assert all(c["k"].gated and c["v"].gated for cap in graphs for c in cap.analysis.chains)


def test_opaque_attention_kernel_is_named():
    (cap,) = capture(_llama("dyllm_test_opaque"), (torch.randint(0, 128, (1, 12)),), dynamic=False)
    assert cap.analysis.sites == [] and cap.analysis.gated_regions == []
    assert "dyllm_test::opaque_attention" in cap.analysis.dense_reasons[0]
