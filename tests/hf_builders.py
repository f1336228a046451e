"""Tiny Hugging Face models as ``transformers`` ships them (random weights, two layers, width 64), for the tests.

:func:`build` returns the model and its forward on token ids: masked LMs as they are, decoders called with a full
additive 4-d mask, so that every token attends to every token (as a diffusion LM runs these layers; Dream runs
its Qwen2 layers so)."""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from transformers import (BertConfig, BertForMaskedLM, DeepseekV3Config, DeepseekV3ForCausalLM, Ernie4_5_MoeConfig,
                          Ernie4_5_MoeForCausalLM, FalconConfig, FalconForCausalLM, Gemma2Config, Gemma2ForCausalLM,
                          Glm4MoeConfig, Glm4MoeForCausalLM, GPT2Config, GPT2LMHeadModel, GraniteMoeConfig,
                          GraniteMoeForCausalLM, GPTJConfig, GPTJForCausalLM, GptOssConfig, GptOssForCausalLM,
                          GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Lfm2Config, Lfm2ForCausalLM,
                          ModernBertConfig, ModernBertForMaskedLM, MixtralConfig, MixtralForCausalLM, MptConfig,
                          MptForCausalLM, OlmoeConfig, OlmoeForCausalLM, Phi3Config, Phi3ForCausalLM, PhimoeConfig,
                          PhimoeForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)

# name -> (model class, config, decoder called with a full mask); SDPA attention unless named in EAGER
ARCHITECTURES: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {
    "bert": lambda: (BertForMaskedLM, BertConfig(**SMALL), False),
    # the residual stream channels-first ([B, D, N]), every product of its layers a kernel-1 convolution
    "squeezebert": lambda: (transformers.SqueezeBertForMaskedLM, transformers.SqueezeBertConfig(
        embedding_size=64, **SMALL), False),
    # heads folded into the batch, the products bmm's (passes/folded_heads.py); relative-position scores from q
    # and k added to the scores (DeBERTa-v3's configuration)
    "deberta_v2": lambda: (transformers.DebertaV2ForMaskedLM, transformers.DebertaV2Config(
        relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
        share_att_key=True, norm_rel_ebd="layer_norm", pad_token_id=0, **SMALL), False),
    "modernbert": lambda: (ModernBertForMaskedLM, ModernBertConfig(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=1,
        reference_compile=False, **SMALL), False),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, **SMALL), True),
    "gpt2": lambda: (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64),
                     True),
    "gpt_neox": lambda: (GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL), True),
    "falcon": lambda: (FalconForCausalLM, FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, new_decoder_architecture=False,
                                                       multi_query=True, alibi=False), True),
    "phi3": lambda: (Phi3ForCausalLM, Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL), True),
    # hand-written ("eager") attention: Llama's (GQA), GPT-J's (q and k cast to fp32, divided by a tensor
    # attribute), MPT's (ALiBi bias added, padding filled with the lowest float)
    "llama_eager": lambda: (LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, **SMALL), True),
    "gptj": lambda: (GPTJForCausalLM, GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 rotary_dim=8), True),
    "mpt": lambda: (MptForCausalLM, MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
                    True),
    # multi-head latent attention: one projection split into the latent (k and v are projected from it) and k's
    # rotary part; dense MLPs (its MoE layers branch on each expert's count, which Dynamo cannot trace whole)
    "deepseek_v3": lambda: (DeepseekV3ForCausalLM, DeepseekV3Config(
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        num_key_value_heads=4, first_k_dense_replace=2, **SMALL), True),
    # the FFN and its residual add on the rows with the batch folded in (x.reshape(-1, D)), positions given
    # (POSITIONS), learned position embeddings offset by 2
    "opt": lambda: (transformers.OPTForCausalLM, transformers.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64), True),
    # soft-capped scores, c * tanh(scores / c) before the mask (hand-written attention only): Gemma-2's, and
    # VaultGemma's (Gemma-2's attention without its sliding-window layers)
    "gemma2": lambda: (Gemma2ForCausalLM, Gemma2Config(num_key_value_heads=2, head_dim=16, **SMALL), True),
    "vault_gemma": lambda: (transformers.VaultGemmaForCausalLM, transformers.VaultGemmaConfig(
        num_key_value_heads=2, head_dim=16, **SMALL), True),
}
if hasattr(transformers, "GraniteSWAConfig"):  # transformers 5
    # attention sinks applied after the softmax, out * sigmoid(logsumexp(scores) - s) (hand-written attention only),
    # full and sliding-window layers
    ARCHITECTURES["granite_swa"] = lambda: (transformers.GraniteSWAForCausalLM, transformers.GraniteSWAConfig(
        num_key_value_heads=2, **SMALL), True)
#: Decoders that count positions from a 2-d mask unless given them (OPT): called with positions 0, 1, ...
POSITIONS = {"opt"}
EAGER = {"squeezebert", "deberta_v2", "llama_eager", "gptj", "mpt", "gemma2", "vault_gemma", "gpt_oss", "granite_swa",
         "hy_v4", "diffllama", "deepseek_v4"}

#: MoE blocks. OLMoE's, in transformers 4 (LLaDA-MoE's modeling code copies it), Dynamo traces whole only with
#: ``capture_dynamic_output_shape_ops`` (its dispatch is ``torch.where`` over each expert's rows); the others'
#: there loop over the experts present, which breaks the graph. In transformers 5 the experts are one module with a
#: choice of implementations (``build``'s ``experts``), two of which Dynamo traces whole: ``batched_mm`` (each
#: row's experts' weights gathered, a batched product) and ``grouped_mm``, the default (the rows sorted by expert,
#: grouped products over offsets, the inverse permutation: passes/sorted_rows.py).
MOE: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {
    "olmoe": lambda: (OlmoeForCausalLM, OlmoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                    **SMALL), True),
    "mixtral": lambda: (MixtralForCausalLM, MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                          num_experts_per_tok=2, **SMALL), True),
    "qwen3_moe": lambda: (Qwen3MoeForCausalLM, Qwen3MoeConfig(num_key_value_heads=2, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=32,
                                                              **SMALL), True),
    # a shared expert beside the routed ones, gated by a sigmoid of its own
    "qwen2_moe": lambda: (Qwen2MoeForCausalLM, Qwen2MoeConfig(num_key_value_heads=2, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=32,
                                                              shared_expert_intermediate_size=64, **SMALL), True),
    "granitemoe": lambda: (GraniteMoeForCausalLM, GraniteMoeConfig(num_key_value_heads=2, num_local_experts=4,
                                                                   num_experts_per_tok=2, **SMALL), True),
    # sigmoid routing with a per-expert bias, a shared expert
    "glm4_moe": lambda: (Glm4MoeForCausalLM, Glm4MoeConfig(num_key_value_heads=2, n_routed_experts=4,
                                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                                           first_k_dense_replace=0, n_group=1, topk_group=1,
                                                           **SMALL), True),
    "ernie4_5_moe": lambda: (Ernie4_5_MoeForCausalLM, Ernie4_5_MoeConfig(num_key_value_heads=2, moe_num_experts=4,
                                                                         moe_k=2, moe_intermediate_size=32,
                                                                         moe_layer_start_index=0, **SMALL), True),
    # routed by two masked maxima (sparsemixer), their indices concatenated: the sorted keys
    "phimoe": lambda: (PhimoeForCausalLM, PhimoeConfig(num_key_value_heads=2, num_local_experts=4,
                                                       num_experts_per_tok=2, **SMALL), True),
    # group-limited routing (the top groups' experts only: a scatter and a broadcast mask per row), a shared expert
    "deepseek_v3_moe": lambda: (DeepseekV3ForCausalLM, DeepseekV3Config(
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        num_key_value_heads=4, first_k_dense_replace=0, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, moe_intermediate_size=32, **SMALL), True),
    # attention sinks (a learned logit per head, in hand-written attention only), sliding-window and full layers,
    # experts with clamped SwiGLU and biases
    "gpt_oss": lambda: (GptOssForCausalLM, GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2), True),
}


if hasattr(transformers, "HYV4Config"):  # transformers 5
    # hyper-connections (four residual streams per row, mixed into each branch and written back), attention sinks,
    # a sparse-attention indexer (its top-k keys: all of them at this length), latent attention, shared experts
    MOE["hy_v4"] = lambda: (transformers.HYV4ForCausalLM, transformers.HYV4Config(
        num_key_value_heads=2, mlp_layer_types=["sparse", "sparse"], layer_types=["indexed_attention"] * 2,
        indexer_types=["full", "shared"], n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, index_head_dim=8,
        index_n_heads=2, index_topk=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), True)

if hasattr(transformers, "ErgoConfig"):  # transformers 5
    # each (token, slot) row its own input row (repeat_interleave), unit weights from ``new_ones`` through the
    # sort, a learned RMSNorm per expert on each routed row, then the routing weights; a shared expert
    MOE["ergo"] = lambda: (transformers.ErgoForCausalLM, transformers.ErgoConfig(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        mlp_layer_types=["sparse", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), True)

#: Attention sites that share what they read: DiffLlama's differential attention, in transformers 5 two sites per
#: layer on one q and one k, each with half of the values (one projection split between them).
SHARED_READS: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {
    "diffllama": lambda: (transformers.DiffLlamaForCausalLM, transformers.DiffLlamaConfig(
        num_key_value_heads=2, **SMALL), True),
}
if hasattr(transformers, "DeepseekV4Config"):  # transformers 5
    # hyper-connections whose streams are mixed by a Sinkhorn-projected matrix, compressed sparse attention with
    # sinks (an FFN region whose exit is the query chain's: one cache per value)
    SHARED_READS["deepseek_v4"] = lambda: (transformers.DeepseekV4ForCausalLM, transformers.DeepseekV4Config(
        num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), True)

#: Llama-4's MoE: every expert takes a copy of every token (``x.repeat(experts, 1)``) weighted by its routing score,
#: a batched product per expert, the copies summed; a shared expert beside; q and k rotated as complex numbers.
TILED_EXPERTS: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {
    "llama4": lambda: (transformers.Llama4ForCausalLM, transformers.Llama4TextConfig(
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), True),
}

#: Token mixing other than attention: LFM2's layers are gated short convolutions over the tokens or attention.
HYBRID: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {
    "lfm2": lambda: (Lfm2ForCausalLM, Lfm2Config(num_key_value_heads=2, layer_types=["conv", "full_attention"],
                                                 block_ff_dim=128, block_auto_adjust_ff_dim=False, **SMALL), True),
}

#: A state carried from layer to layer beside the residual stream: Zaya's router reads the previous layer's router
#: state; its experts' last id is a skip expert (replaced by id 0 with weight 0); its attention convolves q and k
#: over the tokens (compressed convolutional attention).
CARRIED_STATES: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {}
if hasattr(transformers, "ZayaConfig"):  # transformers 5
    CARRIED_STATES["zaya"] = lambda: (transformers.ZayaForCausalLM, transformers.ZayaConfig(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32, router_hidden_size=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), True)

#: Zero experts: LongCat-Flash's router also picks among experts that compute nothing and pass the row through
#: times their weight; their ids are spread over the real experts' (weight 0) before the grouped products. Each layer
#: holds two attention sublayers and two FFNs, and the MoE reads the first attention's output (a shortcut).
ZERO_EXPERTS: dict[str, Callable[[], tuple[type, PretrainedConfig, bool]]] = {}
if hasattr(transformers, "LongcatFlashConfig"):  # transformers 5
    ZERO_EXPERTS["longcat_flash"] = lambda: (transformers.LongcatFlashForCausalLM, transformers.LongcatFlashConfig(
        num_key_value_heads=4, n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=32,
        num_layers=1, **{k: v for k, v in SMALL.items() if k != "num_hidden_layers"}), True)


def build(name: str, experts: str = "batched_mm") -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The model (seed 0, eval mode, SDPA or eager attention; an MoE's ``experts`` implementation) and its forward:
    token ids -> logits."""
    every = {**ARCHITECTURES, **MOE, **SHARED_READS, **TILED_EXPERTS, **HYBRID, **CARRIED_STATES, **ZERO_EXPERTS}
    cls, config, full_mask = every[name]()
    config._attn_implementation = "eager" if name in EAGER else "sdpa"
    if name in MOE or name in CARRIED_STATES or name in ZERO_EXPERTS:
        config._experts_implementation = experts  # transformers 5 (MOE's comment); 4 reads no such field
    config.use_cache = False
    torch.manual_seed(0)
    model = cls(config).eval()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if not full_mask:
            return model(input_ids=ids).logits
        batch, length = ids.shape
        positions = {"position_ids": torch.arange(length).expand(batch, length)} if name in POSITIONS else {}
        return model(input_ids=ids, attention_mask=torch.zeros(batch, 1, length, length), **positions).logits
    return model, forward

