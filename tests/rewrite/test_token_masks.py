"""Attention masks computed from the tokens. Exact mode updates a row that is not salient for the changed keys only:
it removes each changed key's old scores and adds its new ones, under the one mask the op is given, this call's.
A mask whose column changes with its key would remove the old scores under the new mask.

- computed from the token ids row by row (here: mask tokens hidden from the keys), it changes only where the ids
  do: a mixing point tested as a whole at each call (passes/mixing_points.py), whose last value the op gets
  (``mask_old``) to remove a changed key's old scores under; changes at the changed keys' columns (and the salient
  queries' rows) are the op's, any other makes every row salient. Before, the compiled model departed from dense
  by up to 0.24 once a hidden key was unmasked (then, without ``mask_old``, every row was salient at every call);
- computed from the hidden states row by row (a bias of each key from its own hidden state), it may change at every
  call: the site stays dense, named (before: 0.07 off dense);
- mixed over the tokens (DeBERTa's relative-position scores, an indexer's top-k keys): a mixing point already,
  tested per row (tests/rewrite/test_hf_models.py).

The sizes are too small for the incremental update (``RECOMPUTE_WORK``) unless the op is made to take it (the
``incremental_attention`` fixture)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decode_driver import unmasking
from dyllm_compile.runtime.graph_runtime import last_serial, runtimes

MASK = 63


class KeyMasked(nn.Module):
    """One attention layer, no FFN: each output row is its residual plus its exact attention output, so exact mode
    equals dense whatever the threshold. ``mask``: the ids' or the hidden states' key mask."""

    def __init__(self, mask: str):
        super().__init__()
        torch.manual_seed(0)
        self.mask = mask
        self.embed = nn.Embedding(64, 32)
        self.qkv = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.bias = nn.Linear(32, 1)
        self.o = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.embed(ids)
        b, n, _ = h.shape
        q, k, v = (p(h).view(b, n, 2, 16).transpose(1, 2) for p in self.qkv)
        if self.mask == "ids":
            mask = (ids != MASK)[:, None, None, :]
        else:
            mask = 4 * self.bias(h)[:, None, None, :, 0]
        return h + self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, 32))


@pytest.mark.parametrize("mask", ["ids", "hidden_states"])
def test_key_masks_from_the_tokens_equal_dense_in_exact_mode(mask, incremental_attention):
    model = KeyMasked(mask).eval()
    torch._dynamo.reset()
    before = last_serial()
    compiled = torch.compile(model, backend="dyllm", options={"lowering": "aot_eager", "threshold": 0.5,
                                                              "attention_mode": "exact"})
    ids = torch.randint(0, MASK, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for x in unmasking(ids, 12, MASK, 6):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (runtime,) = [r for r in runtimes(before) if r.stats.sparse_calls]
    assert runtime.stats.sparse_calls == 5
    (site,) = runtime.plan.sites
    if mask == "ids":  # cached, the mask tested at each call as a whole, its last value the op's
        assert site.cached and [axis for axis, _ in runtime.plan.mixing.values()] == [None]
        assert list(runtime.plan.old_masks) == [site.site.mask]
        assert max(runtime.stats.salient_fraction) < 0.5  # the changed keys' columns do not make every row salient
    else:
        assert not site.cached and site.reason == "the attention mask is computed from the hidden states, row by row"
