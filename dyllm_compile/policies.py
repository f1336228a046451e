"""Caching policies: which rows a sparse call recomputes, as small objects the compiler traces into its graphs.

A policy has two halves:

- **in the graph**: ordinary tensor code, traced into the sparse variant at three hook points. Each hook sees the
  rows recomputed so far in this call (``salient_in``, [B, N] bool), a fresh value for every row and its cached
  value, the layer index and the call's row hint, and returns the rows recomputed from there on:

  - :meth:`Policy.before_attention`, on the site's value vectors: the rows whose keys and values are recomputed
    (and that get exact attention). The value projection then runs on every row: a policy that reads values
    pays for computing them.
  - :meth:`Policy.after_attention`, on the site's attention context: the layer's salient rows ``S_out``. Every
    gated region after the site runs on them; the next layer's k/v projections run on them.
  - :meth:`Policy.at_branch`, on a gated region's input (an FFN's, lm_head's): the rows that region runs on (they
    carry on into the next layer). The input is cached per region for this hook, only when a policy defines it.

  Only the hooks a policy overrides are traced in; returning ``salient_in`` unchanged freezes everything else.
- **outside the graph** (:meth:`Policy.dense_call`, :meth:`Policy.first_rows`, :meth:`Policy.row_hint`): the
  per-call plan the runtime makes from the call's token ids (which rows hold the mask token now, at the
  sequence's last dense call and at its first call, how many calls it has had): whether this call runs dense
  (refreshing every cache), layer 0's ``S_in``, and an optional row mask passed into the graph as an input (so
  it changes per call without recompiling).

Select one with ``options={"policy": "block_freeze"}`` or pass an instance: ``options={"policy":
BlockFreeze(block_length=64)}``. Write your own by subclassing :class:`Policy` (docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CallState:
    """What the runtime knows about a call before running it (outside the graph)."""

    calls: int  # calls this sequence has had (the first, dense, call is 0)
    changed: torch.Tensor  # [B, N] rows whose inputs changed since the last call
    # The mask positions below are None unless the policy sets needs_mask_positions.
    masked: Optional[torch.Tensor]  # [B, N] rows holding the mask token now
    masked_at_dense: Optional[torch.Tensor]  # the same at the sequence's last dense call
    masked_at_start: Optional[torch.Tensor]  # the same at the sequence's first call: its response rows


HOOK_POINTS = ("before_attention", "after_attention", "at_branch")


class Policy:
    """Base class: the DyLLM defaults for the runtime half; subclasses override at least one hook point."""

    #: Name in error messages and reports.
    name = "policy"
    #: True when :meth:`row_hint` returns a tensor (it is then a graph input of the sparse variant).
    uses_row_hint = False
    #: True when the policy reads the mask positions of :class:`CallState` (they are computed only then); they
    #: need token-id inputs and a known mask id, without which the runtime runs dense and warns.
    needs_mask_positions = False
    #: False when no hook reads its ``layer`` argument: the hooks of different layers then behave alike, and
    #: piecewise lowering compiles their layers once (:meth:`PolicyHook.piece_key`). True unless a policy says so.
    reads_layer = True

    def before_attention(self, salient_in: torch.Tensor, values: torch.Tensor, cached: torch.Tensor, axis: int,
                         layer: int, hint: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
        """[B, N]: the rows whose keys and values one attention site recomputes. ``values`` (this call's, every
        row) and ``cached`` carry the tokens on ``axis``."""
        return salient_in

    def after_attention(self, salient_in: torch.Tensor, context: torch.Tensor, cached: torch.Tensor, axis: int,
                        layer: int, hint: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
        """``S_out [B, N]`` of one attention site; ``context``/``cached`` carry the tokens on ``axis``."""
        return salient_in

    def at_branch(self, salient_in: torch.Tensor, inputs: torch.Tensor, cached: torch.Tensor, axis: int,
                  layer: int, hint: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
        """[B, N]: the rows a gated region (FFN, lm_head) runs on; ``inputs`` is the region's input for every
        row, ``cached`` its value when each row last ran through the region."""
        return salient_in

    @classmethod
    def hooks(cls) -> frozenset:
        """The hook points this policy overrides (the only ones traced into the graph)."""
        return frozenset(p for p in HOOK_POINTS if getattr(cls, p) is not getattr(Policy, p))

    def dense_call(self, state: CallState) -> bool:
        return False

    def first_rows(self, state: CallState) -> torch.Tensor:
        """Layer 0's ``S_in``; by default the rows whose inputs changed. Rows added here are recomputed from the
        start of the call, attention included."""
        return state.changed

    def row_hint(self, state: CallState) -> Optional[torch.Tensor]:
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def cosine_below(context: torch.Tensor, cached: torch.Tensor, axis: int, threshold: float) -> torch.Tensor:
    """[B, N]: rows whose context (all heads together) has cosine below ``threshold`` with its cached value."""
    return row_cosine(context, cached, axis) < threshold


class DyllmPolicy(Policy):
    """DyLLM (arXiv 2603.08026): a row is salient when the cosine of its attention context with the cached one
    falls below the ``threshold`` option; rows salient in an earlier layer stay salient. Knob: ``threshold``
    (the config option)."""

    name = "dyllm"
    reads_layer = False

    def after_attention(self, salient_in, context, cached, axis, layer, hint, threshold):
        if threshold >= 1.0:
            return torch.ones_like(salient_in)
        return salient_in | cosine_below(context, cached, axis, threshold)


class BlockFreeze(Policy):
    """Fast-dLLM's dual cache (arXiv 2505.22618) as a policy: the rows of the block being decoded are recomputed
    in every layer at every call; rows before and after it (prompt, finished blocks, later masked blocks) are
    frozen at their values from the block's first call, which is dense.

    The block starts at a sequence's first masked row at its last dense call and spans ``block_length`` rows;
    once every row of it is unmasked, the next call is dense and opens the next block. Knob: ``block_length``
    (the decoder's block length; 32 is LLaDA's and Fast-dLLM's default).
    """

    name = "block_freeze"
    reads_layer = False
    uses_row_hint = True
    needs_mask_positions = True

    def __init__(self, block_length: int = 32) -> None:
        if not isinstance(block_length, int) or block_length < 1:
            raise ValueError(f"BlockFreeze block_length must be a positive int, got {block_length!r}")
        self.block_length = block_length

    def active_rows(self, masked_at_dense: torch.Tensor) -> torch.Tensor:
        """[B, N]: the block opened at the last dense call, per batch element (none if nothing was masked)."""
        n = masked_at_dense.shape[1]
        position = torch.arange(n, device=masked_at_dense.device)
        first = torch.where(masked_at_dense, position, n).amin(dim=1, keepdim=True)
        return (position >= first) & (position < first + self.block_length)

    def dense_call(self, state: CallState) -> bool:
        active = self.active_rows(state.masked_at_dense)
        return not bool((state.masked & active).any())  # the block is finished: open the next one

    def first_rows(self, state: CallState) -> torch.Tensor:
        return state.changed | self.active_rows(state.masked_at_dense)

    def row_hint(self, state: CallState) -> torch.Tensor:
        return self.active_rows(state.masked_at_dense)

    def after_attention(self, salient_in, context, cached, axis, layer, hint, threshold):
        return salient_in | hint


def lowest_fraction(score: torch.Tensor, fraction: float, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N] bool: per batch element, the ``ceil(fraction * |allowed|)`` allowed rows of lowest ``score``.

    Ranks come from a double argsort, so the count may differ per batch element without a host sync."""
    if allowed is None:
        allowed = torch.ones_like(score, dtype=torch.bool)
    score = score.masked_fill(~allowed, float("inf"))
    rank = score.argsort(dim=1, stable=True).argsort(dim=1)
    count = torch.ceil(fraction * allowed.sum(dim=1, keepdim=True).float())
    return (rank < count) & allowed


def row_cosine(fresh: torch.Tensor, cached: torch.Tensor, axis: int) -> torch.Tensor:
    """[B, N]: per row (tokens on ``axis``, every other dim flattened together), the cosine of fresh vs cached.

    Two zero rows count as unchanged (1): their cosine is undefined and ``F.cosine_similarity`` gives 0, which made
    a row with no context at either call (a padded row that sees no key) salient at every call."""
    rows = fresh.movedim(axis, 1).flatten(2).float()
    old = cached.movedim(axis, 1).flatten(2).float()
    both_zero = (rows == 0).all(dim=-1) & (old == 0).all(dim=-1)
    return F.cosine_similarity(rows, old, dim=-1).masked_fill(both_zero, 1.0)


class DllmCache(Policy):
    """dLLM-Cache (arXiv 2506.06295): prompt rows refreshed every ``prompt_interval`` calls (a dense call),
    response rows every ``response_interval`` calls (all of them recomputed), and in between an adaptive partial
    update, in every layer, of the ``update_fraction`` of response rows whose value vectors changed most (lowest
    cosine between this call's value and the cached one, before attention). Response rows: the rows holding the
    mask token at the sequence's first call. Knobs: ``prompt_interval``, ``response_interval``,
    ``update_fraction``.
    """

    name = "dllm_cache"
    reads_layer = False
    uses_row_hint = True
    needs_mask_positions = True

    def __init__(self, prompt_interval: int = 50, response_interval: int = 8, update_fraction: float = 0.25) -> None:
        for key, value in (("prompt_interval", prompt_interval), ("response_interval", response_interval)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DllmCache {key} must be a positive int, got {value!r}")
        if not 0 <= update_fraction <= 1:
            raise ValueError(f"DllmCache update_fraction must be in [0, 1], got {update_fraction!r}")
        self.prompt_interval, self.response_interval = prompt_interval, response_interval
        self.update_fraction = update_fraction

    def dense_call(self, state: CallState) -> bool:
        return state.calls % self.prompt_interval == 0

    def first_rows(self, state: CallState) -> torch.Tensor:
        refresh = state.calls % self.response_interval == 0
        return state.changed | state.masked_at_start if refresh else state.changed

    def row_hint(self, state: CallState) -> torch.Tensor:
        return state.masked_at_start  # the response rows, among which the partial update ranks

    def before_attention(self, salient_in, values, cached, axis, layer, hint, threshold):
        score = row_cosine(values, cached, axis)
        return salient_in | lowest_fraction(score, self.update_fraction, allowed=hint)


class EsDllm(Policy):
    """ES-dLLM (arXiv 2508.10788), early skipping: the first ``early_layers`` layers recompute every row; at the
    last of them each row's importance is how much its attention context changed (1 - cosine with the cache),
    and only the ``keep_fraction`` most important rows, plus the rows whose tokens changed, go through the later
    layers; the others keep their cached values there. Knobs: ``early_layers``, ``keep_fraction``.
    """

    name = "es_dllm"
    uses_row_hint = True

    def __init__(self, early_layers: int = 1, keep_fraction: float = 0.25) -> None:
        if not isinstance(early_layers, int) or early_layers < 1:
            raise ValueError(f"EsDllm early_layers must be a positive int, got {early_layers!r}")
        if not 0 <= keep_fraction <= 1:
            raise ValueError(f"EsDllm keep_fraction must be in [0, 1], got {keep_fraction!r}")
        self.early_layers, self.keep_fraction = early_layers, keep_fraction

    def first_rows(self, state: CallState) -> torch.Tensor:
        return torch.ones_like(state.changed)  # early layers: every row

    def row_hint(self, state: CallState) -> torch.Tensor:
        return state.changed  # rows whose tokens changed always go on

    def after_attention(self, salient_in, context, cached, axis, layer, hint, threshold):
        if layer < self.early_layers - 1:
            return torch.ones_like(salient_in)
        if layer == self.early_layers - 1:
            return hint | lowest_fraction(row_cosine(context, cached, axis), self.keep_fraction)
        return salient_in  # later layers: the set chosen at the last early layer


POLICIES: dict[str, type] = {"dyllm": DyllmPolicy, "block_freeze": BlockFreeze, "dllm_cache": DllmCache,
                             "es_dllm": EsDllm}


def resolve(policy: Union[str, Policy]) -> Policy:
    """A policy instance from a name or an instance; anything else raises ``ValueError`` naming the choices."""
    if isinstance(policy, Policy):
        if not policy.hooks():
            raise ValueError(f"policy {policy!r} overrides none of the hook points {HOOK_POINTS}")
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(f"dyllm option 'policy' must be one of {sorted(POLICIES)} or a dyllm_compile.policies.Policy "
                     f"instance, got {policy!r}")


class PolicyHook(torch.nn.Module):
    """The in-graph half of a policy at one hook point of one site or region: a submodule the sparse variant
    calls, traced by the lowering."""

    def __init__(self, policy: Policy, point: str, axis: int, layer: int, threshold: float) -> None:
        super().__init__()
        self.policy, self.hook = policy, getattr(policy, point)
        self.point, self.axis, self.layer, self.threshold = point, axis, layer, threshold

    def piece_key(self) -> tuple:
        """Equal for hooks that compute the same function (:mod:`dyllm_compile.piecewise`)."""
        layer = self.layer if self.policy.reads_layer else None
        return id(self.policy), self.point, self.axis, layer, self.threshold

    def forward(self, salient_in: torch.Tensor, fresh: torch.Tensor, cached: torch.Tensor,
                hint: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hook(salient_in, fresh, cached, self.axis, self.layer, hint, self.threshold).to(torch.bool)
