"""Attention over keys that extend a site's own rows by a prefix (passes/attention_sites.py): a block-diffusion
decoder whose block attends to the prompt's cached keys and values, ``k = cat([P_k, K])``, as DiffusionGemma's
decoder (transformers 5) and prefix KV caches do.

Before, such a site had no row-wise rule (q holds N rows, k N + P) and the whole graph was analysed without an
attention site: nothing gated. Now the site's own k and v chains are gated and cached, the prefix is appended to
them at each call (own rows first, the query rows at their positions), and the rest of the layer is gated as in
self-attention. At a threshold just below 1 every row that moved at all is recomputed, so the compiled model must
equal dense while most rows are skipped; a new prefix starts a new sequence."""

import pytest
import torch

from decode_driver import NEARLY_ONE, unmasking
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes
from prefix_decoder import MASK, PrefixDecoder, block, prefix


def _decode(model, kv, ids, calls, mask=None, tol=1e-5, **options):
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", **options})
    with torch.inference_mode():
        for x in unmasking(ids, 3, MASK, calls):
            torch.testing.assert_close(compiled(x, *kv, mask), model(x, *kv, mask), rtol=tol, atol=tol)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    return compiled, runtime, x


# Paper mode's update of an unchanged row ignores the re-weighting of its unchanged columns (the paper's formula):
# dense-equal only where every row that moved is recomputed from the site on, at threshold 1
@pytest.mark.parametrize("mode, threshold", [("exact", NEARLY_ONE), ("paper", 1.0)])
@pytest.mark.parametrize("row_counts", ["unbacked", "buckets"])
def test_block_decode_with_a_prefix_equals_dense(mode, threshold, row_counts):
    """Every output dense-equal through the sparse variant (in full attention every row's context moves a little
    when one token changes, so at this threshold the layers recompute every row after the first site: the masked
    test below skips rows there); batch 2, GQA through repeat_kv after the concatenation, both row-count routes."""
    model = PrefixDecoder("repeat_kv").eval()
    _, runtime, _ = _decode(model, prefix(2, 9, 1), block(2, 16), 6, threshold=threshold, attention_mode=mode,
                         row_counts=row_counts)
    assert runtime.stats.sparse_calls == 5 and all(s.cached for s in runtime.plan.sites)


@pytest.mark.parametrize("prefix_first", [True, False])
def test_masked_prefix_keys_follow_the_mask(prefix_first):
    """A mask over the prefix and the block [B, 1, N, P + N] (a padded prompt, and a banded block) in either order
    of the keys: the op sees its columns in the order it sees the keys."""
    model = PrefixDecoder("enable_gqa", prefix_first=prefix_first).eval()
    p, n = 9, 32
    keep = torch.ones(2, 1, n, p + n, dtype=torch.bool)
    prefix_cols, own_cols = (slice(0, p), slice(p, p + n)) if prefix_first else (slice(n, n + p), slice(0, n))
    keep[0, :, :, prefix_cols][..., :3] = False  # the first prompt is left-padded by 3
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    keep[:, :, :, own_cols] &= distance <= 2
    _, runtime, _ = _decode(model, prefix(2, p, 2), block(2, n, 3), 14, mask=keep, threshold=NEARLY_ONE)
    # the rows near the two changed a call (the first calls' union covers more), in both layers
    assert max(runtime.stats.salient_fraction) < 0.9 and runtime.stats.rows_computed < 0.7 * runtime.stats.rows_dense


def test_a_new_prefix_starts_a_new_sequence():
    """The same block after a different prefix (the next prompt, same length): the prefix is compared whole each
    call, so that call is dense, never continued from the old prefix's caches. Paper mode, whose update of an
    unchanged row reads the cached context (continued, it returned the old prefix's logits: 1.6 off); exact mode
    recomputes every row at these tiny sizes (``RECOMPUTE_WORK``) and would not show it."""
    model = PrefixDecoder().eval()
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "attention_mode": "paper"})
    kv, other = prefix(1, 5, 4), prefix(1, 5, 5)
    with torch.inference_mode():
        for x in unmasking(block(1, 12), 3, MASK, 4):
            compiled(x, *kv)
        (runtime,) = runtimes(before)
        assert runtime.stats.sparse_calls == 3
        torch.testing.assert_close(compiled(x, *other), model(x, *other), rtol=1e-5, atol=1e-5)
    assert runtime.stats.dense_calls == 2


@pytest.mark.inductor
def test_prefix_decode_inductor():
    model = PrefixDecoder("repeat_kv").eval()
    _, runtime, _ = _decode(model, prefix(1, 9, 6), block(1, 16, 7), 5, tol=1e-4, threshold=NEARLY_ONE,
                         lowering="inductor")
    assert runtime.stats.sparse_calls == 4 and runtime.stats.rows_computed < runtime.stats.rows_dense
