"""Attention sites whose keys extend their own rows by a prefix (passes/attention_sites.py): found, the prefix
split off, and the rest of each layer row-wise as in self-attention. Before, such a site (q N rows, k N + P) was no
site at all and nothing in the graph was gated."""

import pytest

from graph_helpers import assert_region_runs_on_rows, capture
from prefix_decoder import HEAD_DIM, KV_HEADS, PrefixDecoder, block, prefix


@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv"])
def test_prefix_sites_found_and_their_own_rows_gated(gqa):
    """Both sites found with their prefix split off; k and v chains (kv heads only), FFNs and lm_head gated."""
    model = PrefixDecoder(gqa).eval()
    (cap,) = capture(model, (block(2, 12), *prefix(2, 7, 0)), dynamic=False)
    a = cap.analysis
    assert [(s.kind, s.layer) for s in a.sites] == [("sdpa", 0), ("sdpa", 1)]
    for site in a.sites:
        # the layer's slices of the stacked prefix input
        assert [(n.args[0].op, n.args[1]) for n in (site.prefix_k, site.prefix_v)] == [("placeholder", site.layer)] * 2
        assert site.prefix_first
        assert tuple(site.k.meta["example_value"].shape) == (2, KV_HEADS, 12, HEAD_DIM)
    assert [(r.role, r.layer) for r in a.gated_regions] == [("ffn", 0), ("ffn", 1), ("lm_head", 1)]
    for chains in a.chains:
        assert chains["k"].gated and chains["v"].gated
    for region in a.gated_regions + [c for chains in a.chains for c in chains.values()]:
        assert_region_runs_on_rows(cap, region)
    assert not a.mixing  # the prefix is no token mixing: the runtime compares it whole each call
