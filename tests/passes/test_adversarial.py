"""Ops that mix tokens must never be classified row-wise nor end up inside a gated region."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyllm_compile.models import TransformerConfig, DiffusionTransformer
from dyllm_compile.passes.op_rules import Kind
from dyllm_compile.passes.region_graph import channel_product
from graph_helpers import assert_region_runs_on_rows, capture


class MixingFFN(nn.Module):
    """One attention layer whose FFN branch first applies ``mix`` to the normed residual stream."""

    def __init__(self, mix):
        super().__init__()
        torch.manual_seed(0)
        self.mix = mix
        self.embed = nn.Embedding(64, 32)
        self.qkv = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.o = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, ids):
        h = self.embed(ids)
        b, n, _ = h.shape
        q, k, v = (p(h).view(b, n, 2, 16).transpose(1, 2) for p in self.qkv)
        h = h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 32))
        h = h + self.down(F.gelu(self.up(self.mix(self.norm(h)))))
        return self.head(h)


_POINTWISE = torch.randn(32, 32, 1, generator=torch.Generator().manual_seed(3)) / 6


def _index_by_data(h):
    return h[:, h[0, :, 0].argsort()]


MIXERS = {
    "cumsum": (lambda h: h.cumsum(1), "cumsum"),
    "flip": (lambda h: h.flip(1), "flip"),
    "roll": (lambda h: torch.roll(h, 1, 1), "roll"),
    "mean_over_tokens": (lambda h: h - h.mean(1, keepdim=True), "mean"),
    "norm_over_tokens": (lambda h: h / torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True), "linalg_vector_norm"),
    "max_over_tokens": (lambda h: h * h.amax(dim=1, keepdim=True), "amax"),
    "pool_first_token": (lambda h: h + h[:, 0][:, None], "getitem"),
    "slice_first_token": (lambda h: h + h[:, :1], "getitem"),
    "sort_tokens": (lambda h: h.sort(dim=1).values, "sort"),
    "argsort_gather": (lambda h: h.gather(1, h.argsort(dim=1)), "gather"),
    "data_dependent_index": (_index_by_data, "getitem"),
    # padding the token axis shifts the rows (a linear attention's chunks, a short convolution's left padding)
    "pad_tokens": (lambda h: h + F.pad(h, (0, 0, 1, 0))[:, :-1], "pad"),
    "tensor_split_tokens": (lambda h: h + torch.tensor_split(h, [3], dim=1)[0].mean(1, keepdim=True),
                            "tensor_split"),
    "index_select_tokens": (lambda h: h.index_select(1, torch.arange(h.shape[1] - 1, -1, -1)), "index_select"),
    # a convolution of kernel 3 (its kernel-1 form is row-wise: ROW_WISE's pointwise_conv)
    "conv_over_tokens": (lambda h: F.conv1d(h.transpose(1, 2), _POINTWISE.expand(-1, -1, 3), padding=1).transpose(
        1, 2), "conv1d"),
    # each row times its slice of a value mixed over the tokens, the tokens on a batch dim of the product
    # (HunYuan-V4's indexer weights times its relu'd scores; before, the product was taken for row-wise)
    "batched_matmul_with_mixed": (lambda h: (h.unsqueeze(2) @ (torch.relu(h @ h.transpose(1, 2)).sum(-1)[
        ..., None, None] * torch.eye(h.shape[-1]))).squeeze(2), "matmul"),
}


def _check(cap, op):
    a = cap.analysis
    mixing = [n for n in cap.gm.graph.nodes if cap.ops([n]) == [op] and a.infos[n].kind is Kind.MIXING]
    assert mixing, f"no '{op}' classified token-mixing"
    regions = a.gated_regions + [c for chains in a.chains for c in chains.values()]
    for region in regions:
        assert not set(mixing) & set(region.nodes)
        assert all(a.infos[n].kind is Kind.ROW for n in region.nodes)
        assert_region_runs_on_rows(cap, region, rows=5)
    assert any(f"'{op}'" in reason for reason in a.dense_reasons)


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("dynamic", [False, True])
def test_token_mixing_op_stays_out_of_regions(name, dynamic):
    mix, op = MIXERS[name]
    (cap,) = capture(MixingFFN(mix).eval(), (torch.randint(0, 64, (2, 10)),), dynamic=dynamic)
    assert [r.role for r in cap.analysis.gated_regions] == ["ffn", "lm_head"]
    _check(cap, op)


@pytest.mark.parametrize("dynamic", [False, True])
def test_tiled_rows_read_in_pairs_stay_dense(dynamic):
    """Every row tiled twice (``repeat``: whole copies of the rows one after another, as Llama-4 feeds its experts),
    then two rows' features read as one row: tokens 2i and 2i + 1 meet. The tiling is row-wise (more leading rows),
    the pairing is not: the view is token-mixing, and the FFN after it runs densely (no token axis is left)."""
    def paired(h):
        tiled = h.reshape(-1, 32).repeat(2, 1).view(-1, 64)
        return (tiled[:, :32] + tiled[:, 32:]).reshape(h.shape)

    (cap,) = capture(MixingFFN(paired).eval(), (torch.randint(0, 64, (2, 10)),), dynamic=dynamic)
    _check(cap, "view")


def test_moe_with_expert_capacity_routes_densely():
    model = DiffusionTransformer(TransformerConfig(n_layers=1, ffn="moe", moe_capacity=3)).eval()
    (cap,) = capture(model, (torch.randint(0, 100, (1, 12)),))
    _check(cap, "cumsum")


# Row-wise ops that look like layout changes across rows, and pointwise ops: each stays inside the FFN region. A
# per-row value broadcast over a group of features (DeepSeek-V3's group mask, ``expand`` from size 1: before
# 2026-12-05 the broadcast dim was taken for a moved token axis), and a ``bool`` cast (no rule before).
# Before 2026-12-05 (third change), ``repeat`` along the rows (Llama-4's experts' input: a copy of every token per
# expert) and complex RoPE (``view_as_complex`` / ``view_as_real``) had no rule and kept Llama-4's MoE dense.
_FEATURE_SCALE = torch.linspace(0.5, 1.5, 32)
_ROTATION = torch.polar(torch.ones(16), torch.linspace(0.0, 3.0, 16))


def _complex_rotation(h):
    pairs = torch.view_as_complex(h.float().reshape(*h.shape[:-1], 16, 2))
    return torch.view_as_real(pairs * _ROTATION).flatten(-2)


ROW_WISE = {
    "broadcast_group_value": (lambda h: h * h.amax(-1, keepdim=True).unsqueeze(-1).expand(-1, -1, 4, 8).reshape(
        h.shape), "expand"),
    "bool_mask": (lambda h: h.masked_fill(~(h > 0).bool(), 0.0), "bool"),
    "tiled_rows": (lambda h: h.reshape(-1, 32).repeat(3, 1).view(3, -1, 32).sum(0).view_as(h), "repeat"),
    "complex_rotation": (_complex_rotation, "view_as_complex"),
    # a value without the token axis broadcast to the rows' shape (HRM's initial low-level state): the same in every
    # row, read by the region as a per-position table; before 2026-12-06, "'expand_as' moves the token axis out of
    # place" (the tensor it reads the shape of taken for an operand)
    "broadcast_like_rows": (lambda h: h * _FEATURE_SCALE.expand_as(h), "mul"),
    # pointwise ops with no rule before 2026-12-06 (Ministral-3 floors its positions for the attention's scale)
    "rounding_and_remainders": (lambda h: h + torch.floor(h) * torch.ceil(h) - torch.round(h) + torch.trunc(h)
                                + torch.frac(h) + torch.fmod(h, 0.7) + torch.remainder(h, 0.3) + h % 0.5
                                + h // 0.5 + torch.atan2(h, h + 2) + torch.hypot(h, h) + torch.log2(h.abs() + 1)
                                + torch.nan_to_num(h) * torch.isfinite(h) + torch.copysign(h, -h), "floor"),
    # activations with no rule until the configs sweep of 2026-12-06 (Inkling's router: log-sigmoids of its top-k)
    "log_sigmoid_and_shrinks": (lambda h: F.logsigmoid(h) + F.softshrink(h) + F.hardshrink(h), "log_sigmoid"),
    # torch.linalg's norms over the features (Inkling-2's q/k l2 clipping), no rule until the same sweep
    "linalg_norms": (lambda h: h / torch.linalg.vector_norm(h, 2, -1, True) + h * torch.linalg.norm(h, dim=-1)[
        ..., None], "linalg_vector_norm"),
    # padding or splitting the features (MLA's values padded to the keys' head dim), no rule until the same sweep
    "pad_and_split_features": (lambda h: h + F.pad(h, (1, 2))[..., 2:-1] + torch.cat(
        torch.tensor_split(h, 4, dim=-1)[::-1], -1), "pad"),
    # torch.reshape, the function, whose sizes are one argument (ConvBERT's); re-targeted to the rows as
    # Tensor.reshape's spread-out sizes until the masked-LM sweep of 2026-12-06, it failed to run on gathered rows
    # a convolution of kernel 1 over [B, C, N] (SqueezeBERT's position-wise layers): token mixing for want of a
    # rule until the masked-LM sweep of 2026-12-06
    "pointwise_conv": (lambda h: F.conv1d(h.transpose(1, 2), _POINTWISE, _POINTWISE[:, 0, 0]).transpose(1, 2),
                       "conv1d"),
    "reshape_function": (lambda h: torch.reshape(torch.reshape(h, (h.shape[0], h.shape[1], 4, 8)).softmax(-1),
                                                 [h.shape[0], -1, 32]), "reshape"),
}


@pytest.mark.parametrize("name", list(ROW_WISE))
@pytest.mark.parametrize("dynamic", [False, True])
def test_row_wise_op_stays_in_the_region(name, dynamic):
    mix, op = ROW_WISE[name]
    (cap,) = capture(MixingFFN(mix).eval(), (torch.randint(0, 64, (2, 10)),), dynamic=dynamic)
    a = cap.analysis
    assert [r.role for r in a.gated_regions] == ["ffn", "lm_head"] and not a.dense_reasons
    ffn = a.gated_regions[0]
    assert op in cap.ops(ffn.nodes)
    assert_region_runs_on_rows(cap, ffn, rows=5)


class ChannelsFirst(nn.Module):
    """SqueezeBERT's layout: the residual stream is [B, D, N] from the embedding on and every product in the layer is
    a kernel-1 convolution, so the tokens reach the attention's q, k and v only through convolutions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.qkv, self.o = nn.Conv1d(32, 96, 1), nn.Conv1d(32, 32, 1)
        self.up, self.down = nn.Conv1d(32, 64, 1), nn.Conv1d(64, 32, 1)
        self.head = nn.Linear(32, 64)

    def forward(self, ids):
        h = self.embed(ids).transpose(1, 2)
        b, _, n = h.shape
        q, k, v = self.qkv(h).view(b, 3, 2, 16, n).transpose(-1, -2).unbind(1)
        h = h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, 32, n))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h.transpose(1, 2))


@pytest.mark.parametrize("dynamic", [False, True])
def test_token_axis_is_found_through_pointwise_convolutions(dynamic):
    """The attention's token axis is followed back through the kernel-1 convolutions to the token ids, on the
    channels-first stream's last dim. Before (2026-12-06), a convolution had no backward rule: the token ids and
    the stream did not carry the axis, the first residual add read a stream "not a per-token value" and the graph
    was lowered unchanged (SqueezeBERT 0% gated, 72% since)."""
    (cap,) = capture(ChannelsFirst().eval(), (torch.randint(0, 64, (2, 10)),), dynamic=dynamic)
    a = cap.analysis
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    (ids,) = [n for n, x in zip(placeholders, cap.example_inputs) if isinstance(x, torch.Tensor) and x.dim() == 2
              and not x.is_floating_point()]
    assert a.infos[ids].axis.dim == 1
    assert len(a.sites) == 1 and not a.dense_reasons and not a.mixing
    assert [r.role for r in a.gated_regions] == ["ffn", "lm_head"] and set(a.chains[0]) == {"q", "k", "v"}
    ffn = a.gated_regions[0]
    assert a.infos[ffn.exit].axis.dim == 2 and cap.ops(ffn.nodes).count("conv1d") == 2
    for region in [ffn, *a.chains[0].values()]:
        assert_region_runs_on_rows(cap, region, rows=5)


@pytest.mark.parametrize("dims, groups, bias, batched", [(1, 1, True, True), (1, 4, True, True),
                                                         (1, 4, False, False), (2, 2, True, True), (3, 1, False, True)])
def test_channel_product_is_the_pointwise_convolution(dims, groups, bias, batched):
    """What a region re-emitted on gathered rows runs for a kernel-1 convolution (Inductor cannot lower the
    convolution over a data-dependent length): the same values, grouped or not, batched or not, 1-3 spatial dims."""
    generator = torch.Generator().manual_seed(dims * 10 + groups)
    x = torch.randn(*((2,) if batched else ()), 8, *[5] * dims, generator=generator)
    weight = torch.randn(12, 8 // groups, *[1] * dims, generator=generator)
    b = torch.randn(12, generator=generator) if bias else None
    convolution = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    torch.testing.assert_close(channel_product(x, weight, b, groups), convolution(x, weight, b, groups=groups))
