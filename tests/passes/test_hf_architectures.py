"""Real Hugging Face architectures whose graphs needed graph-level rules (none is known to the compiler).

- GPT-2: its Conv1D is ``addmm(bias, x.view(-1, D), W)``. Before: ``addmm`` had no rule, so nothing was row-wise
  and no residual stream was found (the whole model compiled dense). After: ``mm`` / ``addmm`` are row-wise along
  their left operand's rows, and the fused ``c_attn`` (split three ways) is in all three chains.
- GPT-NeoX and Falcon: parallel attention and MLP summed before the residual add (Falcon: then a dropout).
  Before: the sum was one branch fed by attention, the output projection's, so the MLP stayed dense. After: the
  sum splits into its branches; the MLP is an FFN region.
- Falcon and Phi-3: a fused projection sliced (not split) into q, k and v: the sliced value is in all three
  chains.
- Gemma-2: soft-capped scores. Before: no attention site was found (``tanh`` between the scores and the softmax),
  so nothing was gated; then the sites stayed dense with their reason. After: each site is one
  ``dyllm::sdpa_softcap`` (hand_written_attention), cached with its cap.
"""

import pytest
import torch

from graph_helpers import assert_region_runs_on_rows, capture
from hf_builders import build

NAMES = ["gpt2", "gpt_neox", "falcon", "phi3"]


@pytest.mark.parametrize("name", NAMES)
def test_sites_chains_and_regions(name):
    (cap,) = capture(build(name)[1], (torch.randint(3, 120, (2, 12)),), dynamic=False)
    a = cap.analysis
    assert [s.layer for s in a.sites] == [0, 1]
    assert [(r.role, r.layer) for r in a.gated_regions] == [("ffn", 0), ("ffn", 1), ("lm_head", 1)]
    assert [(r.role, r.layer) for r in a.regions if r.role == "attn_out"] == [("attn_out", 0), ("attn_out", 1)]
    for chains in a.chains:
        projections = [{n for n in c.nodes if cap.ops([n])[0] in ("linear", "matmul", "addmm")} for c in
                       chains.values()]
        assert all(len(p) == 1 for p in projections) and chains["k"].gated and chains["v"].gated
        assert len(set.union(*projections)) == 1  # each of these fuses q, k and v into one projection
        for chain in chains.values():
            assert_region_runs_on_rows(cap, chain)
    for region in a.gated_regions:
        assert_region_runs_on_rows(cap, region)


@pytest.mark.parametrize("name", ["gemma2", "vault_gemma"])
def test_soft_capped_attention_is_one_op_with_its_cap(name):
    """Gemma-2 soft-caps its scores (``tanh(scores / c) * c`` before the mask), which SDPA cannot express: each site
    becomes ``dyllm::sdpa_softcap`` with the config's cap (before 2026-12-05, third change: found, dense with the
    reason "(tanh) on the scores is not a scale or an additive mask"), with its k/v chains, FFN and lm_head gated."""
    model, forward = build(name)
    (cap,) = capture(forward, (torch.randint(3, 120, (2, 12)),), dynamic=False)
    a = cap.analysis
    assert [(s.kind, s.layer, s.softcap, s.dense_reason) for s in a.sites] == [
        ("sdpa", layer, model.config.attn_logit_softcapping, "") for layer in (0, 1)]
    assert all(s.label == "hand-written+softcap" for s in a.sites)
    assert [(r.role, r.layer) for r in a.gated_regions] == [("ffn", 0), ("ffn", 1), ("lm_head", 1)]
    for region in a.gated_regions:
        assert_region_runs_on_rows(cap, region)
