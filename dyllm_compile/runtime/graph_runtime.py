"""Per compiled graph: sequence states (caches), the step policy, and the dense / sparse variants.

Each call picks a variant. Dense: the first ``dense_steps`` calls of a sequence, every ``refresh_period`` calls,
any call that does not continue a known sequence, calls with too many changed rows (``max_changed_fraction``, known
before the call) or salient rows (``max_salient_fraction``, in any layer: known after it). Sparse otherwise: layer
0's salient rows are the rows whose token inputs changed since the last call. With unbacked row counts a dense
call is the sparse variant with every row salient (its ``dense_call`` input), from zero caches for a new
sequence: one compiled variant serves both kinds of call. With capacity buckets (and in shadow mode, which
compares against it) the dense variant is compiled as well. Row counts (``row_counts``):
unbacked, one variant gathers exactly the salient rows; buckets, each row selection (a layer's salient set in a
piece) has a capacity K, the smallest bucket that holds the call's changed rows plus the largest share of the
others that the layers made salient at that selection over the last few calls (a refresh that changes most rows
does not inflate the next call), and if a selection needed more, the call is rerun with bigger buckets (caches
are functional, so a rerun is safe), so a salient row is never left stale. With ``symbolic_capacities`` the
capacities are input sizes: one compiled variant serves every bucket its guards admit (checked once per set of
capacities), where otherwise each capacity tuple is a compile of its own. In a batch, the regions gathered per
element (``plan.element_regions``) have capacities of their own, bucketed and rerun the same way from the most
rows one element needed; the others gather the union of the batch's rows.

A sequence continues when every changed row held the mask id and no longer does (diffusion decoding only
unmasks). Any other change (a new prompt, even one token) starts a new sequence with a dense call. After a graph
break, a graph whose input is the hidden state another graph returned follows that graph (:mod:`row_tags`): it
runs dense when its producer did, and otherwise takes the producer's last salient rows as its S_in; a hidden
state without a valid tag falls back to the rows that changed at all (exact compare). States are
keyed by input shapes, dtypes, devices and the identity of the weights (one graph can serve several layers
after a graph break), up to ``MAX_SEQUENCES`` per key, least recently used evicted first, so alternating
sequences (classifier-free guidance) do not thrash.
The states of a set of weights are dropped when those weights are collected (the model deleted): Dynamo keeps
the compiled graph, not the caches, alive, and new weights at the same addresses never see old caches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..config import DyllmConfig
from ..lowering import output_layouts
from ..passes.rewrite import COUNT_SELECTIONS, build_dense, build_sparse, capacity_sizes, scalar_inputs
from ..passes.rewrite_plan import RewritePlan
from ..policies import CallState, cosine_below
from . import row_tags
from .rows import merge_rows

log = logging.getLogger("dyllm_compile")

MAX_SEQUENCES = 4
BUCKET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
_runtimes: "weakref.WeakSet[GraphRuntime]" = weakref.WeakSet()
_serials = itertools.count(1)


@dataclass
class RuntimeStats:
    dense_calls: int = 0
    sparse_calls: int = 0
    reruns: int = 0
    sparse_compiles: int = 0
    # Per call, oldest first: the salient fraction per attention site and batch element [sites, B] of a sparse
    # call, None for a dense one. Kept as the variant returned them, so that reading the counters, not the step,
    # pays the sync and the batch mean.
    history: list = field(default_factory=list)
    # Per call, the share of the rows it queried (a [B, N] mask's mean, kept unsynced like ``history``); None where
    # it queried every row (a dense call, a call without query pruning).
    queried: list = field(default_factory=list)
    # Shadow mode, per sparse call: (largest |sparse - dense| of the first output, argmax flips over its last dim).
    shadow: list = field(default_factory=list)
    rows_computed: int = 0  # rows run through gated regions, summed over calls
    rows_dense: int = 0  # what dense calls would have run through them
    fallback: Optional[str] = None  # why the graph runs as compiled without the rewrite, if it does

    @property
    def salient_fraction(self) -> list[float]:
        """Per attention site, the mean salient fraction over sparse calls ([] before any)."""
        sparse = [h.float().mean(dim=1) for h in self.history if h is not None]
        return torch.stack(sparse).mean(0).tolist() if sparse else []

    def per_call_fractions(self, n_sites: int) -> torch.Tensor:
        """[calls, sites]: the salient fraction per call and site, dense calls counted as 1."""
        rows = [torch.ones(n_sites) if h is None else h.float().mean(dim=1).cpu() for h in self.history]
        return torch.stack(rows) if rows else torch.zeros(0, n_sites)

    @property
    def queried_fraction(self) -> float:
        """The mean share of the rows a call queried (1.0 before any call)."""
        shares = [1.0 if q is None else float(q) for q in self.queried]
        return sum(shares) / len(shares) if shares else 1.0

    @property
    def rows_fraction(self) -> float:
        return self.rows_computed / self.rows_dense if self.rows_dense else 1.0


@dataclass(eq=False)  # identity: states are found and moved by identity, never compared by value
class SequenceState:
    tokens: list[torch.Tensor]
    others: list[torch.Tensor]
    caches: list[torch.Tensor]
    mask_id: Optional[int]
    dense_tokens: list[torch.Tensor]  # token inputs at the last dense call (the policies' block boundaries)
    start_tokens: list[torch.Tensor]  # token inputs at the sequence's first call (its response rows)
    calls: int = 1
    # Per recent sparse call (the last GROWTH_WINDOW, oldest first) and row selection (the union's, and each
    # batch element's): the share of the unchanged rows that the layers made salient (for a per-element
    # selection, in the element that needed the most rows). The next call's capacities are its own changed rows
    # plus the largest recent share of the others.
    growth: list[list[float]] = field(default_factory=list)
    growth_per_element: list[list[float]] = field(default_factory=list)
    upstream: Optional[tuple[int, int]] = None  # (producer state serial, its step) of the tagged input last read
    queried: Optional[torch.Tensor] = None  # query pruning: the rows the last call queried (None: every row)
    serial: int = field(default_factory=lambda: next(_serials))


def bucket_sizes(n: int) -> list[int]:
    """The row capacities a sparse variant is compiled for, for a sequence of ``n`` rows."""
    return sorted({max(1, math.ceil(f * n)) for f in BUCKET_FRACTIONS})


#: Sparse calls whose growth sizes the next call's capacities: the largest share over a few calls, so that a
#: selection whose count sits just under a bucket does not overflow it with each call's noise and rerun the call
#: (measured on CPU in the GPU benchmark's configuration, 255 sparse calls: with the last call's share alone, 41
#: reruns at batch 8 with query pruning and 19 at batch 1; with the largest of the last 8, 9 and 8).
GROWTH_WINDOW = 8


def _expected_growth(history: list[list[float]], selections: int) -> list[float]:
    """The largest recent growth per selection (0 where the state has none for this many selections)."""
    return [max(shares) for shares in zip(*(h for h in history if len(h) == selections))] or [0.0] * selections


def _per_selection(counts: list[int], selections: list[tuple[bool, int]]) -> tuple[list[int], list[int]]:
    """The most rows each selection needed (its regions' counts), union selections and per-element ones."""
    found: dict[bool, list[int]] = {False: [], True: []}
    for count, (own, i) in zip(counts, selections):
        needed = found[own]
        needed.extend([0] * (i + 1 - len(needed)))
        needed[i] = max(needed[i], count)
    return found[False], found[True]


def _fits(needed: list[int], capacity: tuple[int, ...]) -> bool:
    return all(k <= c for k, c in zip(needed, capacity))


def _grown(rows: int, growth: float, n: int) -> int:
    """``rows`` changed rows plus the share ``growth`` of the other ``n - rows`` that the layers make salient."""
    return rows + math.ceil(growth * (n - rows))


def _query_capacity(queried: torch.Tensor) -> int:
    """Rows a query-pruned call gathers for ``queried [B, N]``: the union, rounded up to N/16 steps (the response's
    size is fixed per sequence: one variant, not one per count)."""
    n = queried.shape[1]
    step = max(1, n // 16)
    return min(n, max(1, step * math.ceil(int(queried.any(0).sum()) / step)))


def unbacked_rows(config: DyllmConfig, device: torch.device) -> bool:
    """Whether sparse calls on ``device`` size their row sets by unbacked counts (else capacity buckets)."""
    return config.row_counts == "unbacked" or (config.row_counts == "auto" and device.type == "cpu")


def forced_masks(seed: int, call: int, layers: int, batch: int, n: int, fraction: float) -> torch.Tensor:
    """The rows ``force_salient`` adds per layer at a sequence's ``call``-th call: [layers, batch, n] bool."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + call)
    return torch.rand(layers, batch, n, generator=gen) < fraction


class VariantFailed(Exception):
    """Building or compiling a variant failed (a bug of the rewrite or of a compiler on this graph)."""


@contextlib.contextmanager
def _compiling(what: str) -> Iterator[None]:
    """Errors building or compiling ``what`` become :class:`VariantFailed` (the runtime's fallback)."""
    try:
        yield
    except VariantFailed:
        raise
    except Exception as err:
        raise VariantFailed(f"compiling {what} failed ({type(err).__name__}: {err})") from err


class GraphRuntime:
    def __init__(self, plan: RewritePlan, dense_fn: Optional[Callable], lower: Callable[..., Callable],
                 graph_id: str, unrewritten: Optional[Callable[[tuple], Callable]] = None) -> None:
        """``lower(gm, example_inputs, dynamic_output_shapes=...)`` compiles a sparse variant; ``dense_fn`` is the
        compiled dense variant, None where dense calls run through the sparse one (unbacked row counts).
        ``unrewritten(args)`` compiles the graph as Dynamo handed it over: what runs, from then on, where a
        variant fails to compile (the compile must not fail the model)."""
        self.plan = plan
        self.unrewritten = unrewritten
        self._fallback: Optional[Callable] = None
        self.config = plan.config
        self.dense_fn = dense_fn
        self.lower = lower
        self.graph_id = graph_id
        self.n_caches = len(plan.caches)
        self.n_user = len(plan.analysis.gm.graph.output_node().args[0])
        self.n_sites = len(plan.sites)
        self.states: "OrderedDict[Any, list[SequenceState]]" = OrderedDict()
        # per variant: the compiled function, and the row selection each of its row counts counts
        self.sparse_fns: dict[tuple, tuple[Callable, list[tuple[bool, int]]]] = {}
        self._selection_counts: dict[tuple, tuple[int, int]] = {}
        # symbolic_capacities: per variant structure, the variants compiled with symbolic capacities so far
        self._symbolic_fns: dict[tuple, list[tuple[Callable, list[tuple[bool, int]]]]] = {}
        self._symbolic_at: dict[tuple, tuple[Callable, list[tuple[bool, int]]]] = {}  # (structure, *sizes) -> one
        self._carrier_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._static_capacities = False  # set where a symbolic compile failed
        # per input shapes, the growth history of the last sparse call's sequence: a new sequence's first capacity
        # guess (only a guess: an overflow reruns). Not sequence data, so reset() keeps it.
        self._growth: dict[tuple, tuple[list[list[float]], list[list[float]]]] = {}
        self._cache_layouts: dict[tuple, list] = {}
        self.stats = RuntimeStats()
        self.scalar_inputs = scalar_inputs(plan)
        # Input positions by kind, from the first call (:meth:`_find_positions`).
        self._weights: Optional[list[int]] = None
        self._versions: dict[tuple, Optional[tuple]] = {}  # per key: its weights' version counters (_call)
        self._not_weights: list[int] = []
        self._others_at: list[int] = []
        self.policy = plan.policy
        self._warned_policy = False
        self._copied: set[str] = set()  # caches that came back in another layout than contiguous (logged once)
        self.serial = next(_serials)  # creation order
        _runtimes.add(self)

    # ---- public ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Frees every cached sequence; the next call runs dense."""
        self.states.clear()

    def cache_bytes(self) -> int:
        """Bytes held by the caches of every live sequence state."""
        return sum(c.numel() * c.element_size() for states in self.states.values() for st in states
                   for c in st.caches)

    def __call__(self, *args: Any) -> Any:
        if self._fallback is not None:
            return self._fallback(*args)
        try:
            return self._call(*args)
        except VariantFailed as err:
            if self.unrewritten is None:
                raise
            self._fall_back(err, self.unrewritten(args))
            return self._fallback(*args)
        except Exception as err:
            if self.unrewritten is None:
                raise
            # A variant failed while running. The graph as Dynamo handed it over tells whose error it is: where it
            # fails on these inputs too, theirs (raised as it is, the rewrite kept); else the rewrite's, and its
            # result is this call's.
            unrewritten = self.unrewritten(args)
            try:
                out = unrewritten(*args)
            except Exception:
                raise err from None
            self._fall_back(f"running a variant failed ({type(err).__name__}: {err})", unrewritten)
            return out

    def _fall_back(self, why: Any, unrewritten: Callable) -> None:
        """From now on the graph runs as compiled without the rewrite (``unrewritten``); the caches are dropped."""
        log.warning("dyllm: graph %s: %s; it runs as compiled without the rewrite from now on", self.graph_id,
                    why, exc_info=log.isEnabledFor(logging.DEBUG))
        self.stats.fallback = str(why)
        self.states.clear()
        self._fallback = unrewritten

    def _call(self, *args: Any) -> Any:
        if self._weights is None:
            self._find_positions(args)
        tokens = [args[i] for i in self.plan.token_inputs]
        key = self._key(args)
        versions = self._weight_versions(args)
        if self._versions.get(key, versions) != versions:
            # a weight was written in place since (load_state_dict, an optimizer step): every state is stale, even
            # the one an identical input would continue (a decode of one call, then the same prompt again)
            self.states.pop(key, None)
        self._versions[key] = versions
        if key not in self.states:
            self._watch(args, key)
        states = self.states.setdefault(key, [])
        self.states.move_to_end(key)
        others = self._others(args)
        upstream = self._upstream(tokens)
        if upstream is not None:
            state = next((s for s in reversed(states) if s.upstream and s.upstream[0] == upstream.source), None)
            _touch(states, state)
            if (state is None or upstream.rows is None or upstream.step != state.upstream[1] + 1
                    or any(not torch.equal(a, b) for a, b in zip(others, state.others))):
                return self._dense(states, state, args, tokens, others, upstream)
            return self._step(states, state, args, tokens, others, upstream.rows, upstream)
        # Most recently used first: a decode continues the state of its last call, and each test of another
        # state costs a comparison of every input (finished decodes stay until evicted).
        for state in reversed(states):
            changed = self._continuation(state, tokens, others)
            if changed is not None:
                _touch(states, state)
                return self._step(states, state, args, tokens, others, changed)
        return self._dense(states, None, args, tokens, others)

    # ---- policy ------------------------------------------------------------------------------------------

    def _find_positions(self, args: tuple) -> None:
        """Where the weights (Parameters) are among the inputs, and the other tensors that are not token inputs.
        Fixed per graph: Dynamo guards each input's type, so an input of another kind recompiles (a new runtime)."""
        weight = [isinstance(a, torch.nn.Parameter) for a in args]
        self._weights = [i for i, w in enumerate(weight) if w]
        self._not_weights = [i for i, w in enumerate(weight) if not w]
        tokens = set(self.plan.token_inputs)
        self._others_at = [i for i in self._not_weights if isinstance(args[i], torch.Tensor) and i not in tokens]

    def _key(self, args: tuple) -> tuple:
        return self._shapes(args), tuple(args[i].data_ptr() for i in self._weights)

    def _weight_versions(self, args: tuple) -> Optional[tuple]:
        """The weights' version counters, which every in-place write bumps; None for inference tensors, which keep
        none (and can be written only in inference mode, never by a training step)."""
        try:
            return tuple(args[i]._version for i in self._weights)
        except RuntimeError:
            return None

    def _shapes(self, args: tuple) -> tuple:
        """Shapes, dtypes and devices of the inputs that are not weights (and the non-tensor inputs). The weights'
        are Dynamo's guards: a change recompiles, with a runtime of its own."""
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                     for a in (args[i] for i in self._not_weights))

    def _watch(self, args: tuple, key: tuple) -> None:
        """Drop ``key``'s states when its weights die (weakly: the runtime does not keep them alive)."""
        if self._weights:
            weakref.finalize(args[self._weights[0]], _forget, weakref.ref(self), key)

    def _others(self, args: tuple) -> list[torch.Tensor]:
        """The tensor inputs that are neither weights nor token inputs (masks, tables), compared whole."""
        return [args[i] for i in self._others_at]

    def _upstream(self, tokens: list[torch.Tensor]) -> Optional[row_tags.RowTag]:
        """The valid tag of the first hidden-state input another graph returned, if any."""
        for t, axis in zip(tokens, self.plan.input_axes):
            if t.is_floating_point():
                found = row_tags.read(t, axis)
                if found is not None:
                    return found
        return None

    def _continuation(self, state: SequenceState, tokens: list[torch.Tensor],
                      others: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Rows changed since ``state``'s last call [B, N], or None when this call starts a new sequence."""
        if any(not torch.equal(a, b) for a, b in zip(others, state.others)):
            return None  # a mask, a table or another non-weight input changed
        changed, mask_id = None, self._mask_id(state)
        for new, old, axis in zip(tokens, state.tokens, self.plan.input_axes):
            diff = new != old
            rows = diff.movedim(axis, 1).flatten(2).any(dim=2) if diff.dim() > 2 else diff
            if new.is_floating_point() and new.dim() > 2 and self.config.threshold < 1.0:
                # Float rows (soft embeddings, a self-conditioning signal) may move a little on every row each call:
                # a row changed when its cosine with the row it was last computed from falls below the threshold,
                # as an attention context's test does (at threshold 1, any change)
                rows &= cosine_below(new, old, axis, self.config.threshold)
            if not new.is_floating_point() and self.config.token_changes == "unmask" and bool(rows.any()):
                if mask_id is None:
                    mask_id = int(old[diff][0])
                # Every changed element held the mask id and no longer does (elementwise: no gather of the rows).
                if not bool(((old == mask_id) & (new != mask_id)).logical_or_(~diff).all()):
                    return None
            changed = rows if changed is None else changed | rows
        # Kept only once the call continues the state: an inference from a call that starts a new sequence would
        # make the state's later continuations test against another id.
        state.mask_id = mask_id
        return changed

    def _step(self, states: list[SequenceState], state: SequenceState, args: tuple, tokens: list[torch.Tensor],
              others: list[torch.Tensor], changed: torch.Tensor, upstream: Optional[row_tags.RowTag] = None) -> Any:
        cfg = self.config
        n = changed.shape[1]
        cap = math.ceil(cfg.max_salient_fraction * n)
        refresh = cfg.refresh_period and state.calls % cfg.refresh_period == 0
        call = self._call_state(state, tokens, changed)
        hint = self.policy.row_hint(call) if call is not None and self.policy.uses_row_hint else None
        new_rows = changed  # what changed since the last call: the inputs, then rows queried again
        if call is not None:
            changed = self.policy.first_rows(call)
        queried = self._queried(state, changed) if self.plan.prunes_queries else None
        if queried is not None and state.queried is not None:
            # A row queried again after calls that skipped it has an old context (its incremental update would
            # miss the keys that changed meanwhile): it is recomputed, salient.
            again = queried & ~state.queried
            changed, new_rows = changed | again, new_rows | again
        rows, rows_per_element, new = torch.stack([changed.any(0).sum(), changed.sum(1).max(),
                                                   new_rows.any(0).sum()]).tolist()  # one sync
        # Most rows changed (a query-pruning refresh over a long prompt): a dense call, not a sparse variant at full
        # capacity, which gathers every row and compiles a variant of its own (``max_changed_fraction``). The
        # policy's own rows are its choice, and a graph after a break follows its producer's (its S_in is the rows
        # the layers before it made salient): neither counts.
        if (state.calls < cfg.dense_steps or refresh or rows > cap or call is None
                or (upstream is None and new > math.ceil(cfg.max_changed_fraction * n))
                or self.policy.dense_call(call)):
            return self._dense(states, state, args, tokens, others, upstream)
        if cfg.threshold >= 1.0:  # every row salient, layer 0 included: the sparse variant computes densely
            changed = torch.ones_like(changed)
            rows = rows_per_element = n
        # Contiguous, as every variant is compiled for it (a changed set read from an upstream graph's tag, or made
        # from inputs of another layout, may not be): the compiled code does not check its inputs' layouts
        changed = changed.contiguous()
        forced = None
        if cfg.force_salient is not None:
            # drawn on the CPU (the same rows on every device, as the oracle draws them), used where the rows are
            forced = forced_masks(cfg.seed, state.calls, self.n_sites, changed.shape[0], n,
                                  cfg.force_salient).to(changed.device)
        extra = self._extra_inputs(changed, forced, hint, queried, dense=False)
        unbacked = unbacked_rows(cfg, changed.device)
        query_capacity = None if queried is None or unbacked else _query_capacity(queried)
        capacity = per_element = None
        if not unbacked:
            # Each row selection's need (a deeper layer's salient set is larger than a shallower one's), from this
            # call's changed rows and the recent growth, not from the last call's counts: a call that changed most
            # rows (a query-pruning refresh) would otherwise size the next, small one like itself. A bucket per
            # selection, or the largest for all (``row_capacity``). Regions gathered per batch element have
            # capacities of their own.
            n_union, n_element = self._selections(args, query_capacity)
            capacity = self._capacities((_grown(rows, g, n) for g in _expected_growth(state.growth, n_union)), n)
            per_element = self._capacities((_grown(rows_per_element, g, n)
                                            for g in _expected_growth(state.growth_per_element, n_element)), n) or None
        while True:
            fn, selections = self._sparse(capacity, args, state.caches, changed, extra, query_capacity,
                                          per_element)
            out = fn(*args, *state.caches, changed, *extra)
            counts = out[self.n_user + self.n_caches].tolist()  # one sync: rows per gathered region
            if max(counts, default=0) > cap:  # more salient rows than the policy allows: run dense
                return self._dense(states, state, args, tokens, others, upstream)
            needed, needed_per_element = _per_selection(counts, selections)
            if capacity is None or (_fits(needed, capacity) and _fits(needed_per_element, per_element or ())):
                break
            self.stats.reruns += 1
            capacity = self._capacities((max(c, k) for c, k in zip(capacity, needed)), n)
            if per_element is not None:
                per_element = self._capacities((max(c, k) for c, k in zip(per_element, needed_per_element)), n)
        state.caches = self._stored(out[self.n_user : self.n_user + self.n_caches])
        # Each row's inputs as its caches were last computed from: a float row that moved less than the threshold
        # keeps its old value, so that small moves add up to a recompute (equal to the inputs otherwise)
        state.tokens = [merge_rows(changed, t, old, axis) for t, old, axis in
                        zip(tokens, state.tokens, self.plan.input_axes)]
        state.calls += 1
        if not unbacked:  # the growth sizes capacity buckets; unbacked counts need no guess
            if rows < n:
                state.growth = [*state.growth, [max(0, k - rows) / (n - rows) for k in needed]][-GROWTH_WINDOW:]
            if rows_per_element < n:
                shares = [max(0, k - rows_per_element) / (n - rows_per_element) for k in needed_per_element]
                state.growth_per_element = [*state.growth_per_element, shares][-GROWTH_WINDOW:]
            self._growth[self._shapes(args)] = state.growth, state.growth_per_element
        state.queried = None if queried is None or bool(queried.all()) else queried
        if cfg.shadow and isinstance(out[0], torch.Tensor) and out[0].is_floating_point():
            self._shadow(args, out[0])
        queried_rows = query_capacity or (0 if queried is None else int(queried.any(0).sum()))
        gathered = sum(counts) if capacity is None else sum((per_element if own else capacity)[i]
                                                            for own, i in selections)
        self._count_sparse(out, len(counts), gathered, n, queried_rows)
        self.stats.queried.append(None if queried is None else queried.float().mean())
        return self._returned(state, out, out[self.n_user + self.n_caches + 2], upstream)

    def _stored(self, caches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Caches as a state keeps them: contiguous, the one layout every variant is compiled for. The builders
        return them so (``.contiguous()`` in the graph), but Inductor may hand one back in another layout: at batch
        1 a dense hand-written site's context came back as [B, N, H, D] memory viewed as [B, H, N, D], and the next
        call's compiled code rejected it (its input stride assertion). A copy only then, logged once per cache:
        a copy every call is memory traffic a step should not pay."""
        stored = []
        for spec, cache in zip(self.plan.caches, caches):
            if not cache.is_contiguous():
                if spec.name not in self._copied:
                    self._copied.add(spec.name)
                    log.info("dyllm: graph %s: cache %s came back with strides %s, not contiguous: copied",
                             self.graph_id, spec.name, cache.stride())
                cache = cache.contiguous()
            stored.append(cache)
        return stored

    def _count_sparse(self, out: Any, regions: int, gathered: int, n: int, queried: int) -> None:
        """A sparse call's counters: its salient fractions per site, and the rows its gated regions computed:
        the ``regions`` gathered ones ``gathered`` in all (their counted rows, or their capacities), queried ones
        the ``queried`` rows (or their capacity), regions a policy computes for every row (its values) all ``n``."""
        self.stats.sparse_calls += 1
        self.stats.history.append(out[self.n_user + self.n_caches + 1])
        queried_rows = queried * len(self.plan.queried_regions)
        ungathered = len(self.plan.regions) - regions - len(self.plan.queried_regions)
        self.stats.rows_computed += gathered + queried_rows + n * ungathered
        self.stats.rows_dense += n * len(self.plan.regions)

    def _returned(self, state: SequenceState, out: Any, rows: Optional[torch.Tensor],
                  upstream: Optional[row_tags.RowTag]) -> tuple:
        """The user outputs, their hidden states tagged with ``rows`` (None: dense) for a graph after a break."""
        if upstream is not None:
            state.upstream = (upstream.source, upstream.step)
        result = tuple(out[: self.n_user])
        for position, axis in self.plan.row_outputs:
            row_tags.tag(result[position], rows, axis, state.serial, state.calls)
        return result

    def _call_state(self, state: SequenceState, tokens: list[torch.Tensor],
                    changed: torch.Tensor) -> Optional[CallState]:
        """The policy's view of this call; None when it needs mask positions the inputs cannot give.

        Mask positions are computed only for policies that read them (not on the default policy's hot path)."""
        if not self.policy.needs_mask_positions:
            return CallState(state.calls, changed, None, None, None)
        response = self._response_rows(state)
        if response is None:
            if not self._warned_policy:
                log.warning("dyllm: graph %s: policy %s needs token-id inputs and a known mask id "
                            "(set mask_token_id); running dense", self.graph_id, self.policy.name)
                self._warned_policy = True
            return None
        mask_id = self._mask_id(state)
        return CallState(state.calls, changed, tokens[0] == mask_id, state.dense_tokens[0] == mask_id, response)

    def _queried(self, state: SequenceState, changed: torch.Tensor) -> torch.Tensor:
        """Query pruning's rows [B, N]: the response; every row on every ``query_pruning_period``-th call, and
        where the inputs cannot tell the response (hidden states, unknown mask)."""
        response = self._response_rows(state)
        if state.calls % self.config.query_pruning_period == 0 or response is None:
            return torch.ones_like(changed)
        return response

    def _response_rows(self, state: SequenceState) -> Optional[torch.Tensor]:
        """Rows masked at the sequence's first call [B, N], or None when the inputs are not [B, N] token ids or
        the mask id is unknown."""
        ids, mask_id = state.start_tokens[0], self._mask_id(state)
        if ids.is_floating_point() or ids.dim() != 2 or mask_id is None:
            return None
        return ids == mask_id

    def _mask_id(self, state: SequenceState) -> Optional[int]:
        """The configured mask id, else the one inferred for this sequence (None until a row unmasks)."""
        return self.config.mask_token_id if self.config.mask_token_id is not None else state.mask_id

    def _shadow(self, args: tuple, sparse: torch.Tensor) -> None:
        dense = self.dense_fn(*args)[0]  # its caches are dropped: the sparse trajectory goes on undisturbed
        drift = float((sparse.float() - dense.float()).abs().max()) if dense.numel() else 0.0
        flips = int((sparse.argmax(-1) != dense.argmax(-1)).sum()) if dense.dim() >= 2 else 0
        self.stats.shadow.append((drift, flips))

    def _capacities(self, needed: Iterable[int], n: int) -> tuple[int, ...]:
        """The buckets of selections that need ``needed`` rows: each its own, or with ``row_capacity="shared"``
        all the largest one."""
        buckets = [self._bucket(k, n) for k in needed]
        if self.config.row_capacity == "shared" and buckets:
            return (max(buckets),) * len(buckets)
        return tuple(buckets)

    def _bucket(self, needed: int, n: int) -> int:
        floor = math.ceil(self.config.min_salient_fraction * n)
        return next(k for k in bucket_sizes(n) if k >= max(needed, floor, 1))

    def _dense(self, states: list[SequenceState], old: Optional[SequenceState], args: tuple,
               tokens: list[torch.Tensor], others: list[torch.Tensor],
               upstream: Optional[row_tags.RowTag] = None) -> Any:
        out = self._dense_outputs(args, tokens, old)
        caches = self._stored(out[self.n_user : self.n_user + self.n_caches])
        state = old
        if state is not None:
            state.caches, state.tokens, state.others = caches, [t.clone() for t in tokens], [o.clone() for o in others]
            state.calls, state.dense_tokens, state.queried = state.calls + 1, state.tokens, None
            # the growth history stays: how many rows the layers add is the model's, not the last call's (reset,
            # every sparse call after a policy's periodic dense call started at the smallest buckets and reran)
        else:
            copies = [t.clone() for t in tokens]
            state = SequenceState(copies, [o.clone() for o in others], caches, self.config.mask_token_id, copies,
                                  copies)
            state.growth, state.growth_per_element = self._growth.get(self._shapes(args), ([], []))
            states.append(state)
            del states[:-MAX_SEQUENCES]
        self.stats.dense_calls += 1
        self.stats.history.append(None)
        self.stats.queried.append(None)
        n = tokens[0].shape[self.plan.input_axes[0]]
        self.stats.rows_computed += n * len(self.plan.regions)
        self.stats.rows_dense += n * len(self.plan.regions)
        return self._returned(state, out, None, upstream)

    def _dense_outputs(self, args: tuple, tokens: list[torch.Tensor], old: Optional[SequenceState]) -> Any:
        """A dense call's outputs: the dense variant's, or where it is not compiled the sparse variant's with every
        row salient, from ``old``'s caches or zero ones (every cache row is rewritten either way)."""
        if self.dense_fn is not None:
            return self.dense_fn(*args)
        everyone = torch.ones(tokens[0].shape[0], tokens[0].shape[self.plan.input_axes[0]], dtype=torch.bool,
                              device=tokens[0].device)
        caches = old.caches if old is not None else self._zero_caches(args)
        forced = everyone.repeat(self.n_sites, 1, 1) if self.config.force_salient is not None else None
        queried = everyone if self.plan.prunes_queries else None
        extra = self._extra_inputs(everyone, forced, everyone if self.policy.uses_row_hint else None, queried,
                                   dense=True)
        return self._sparse(None, args, caches, everyone, extra)[0](*args, *caches, everyone, *extra)

    def _zero_caches(self, args: tuple) -> list[torch.Tensor]:
        """Zero caches in the layout the dense variant would return for ``args`` (found from a fake run)."""
        key = self._shapes(args)
        if key not in self._cache_layouts:
            with _compiling("the dense variant"):
                layouts = output_layouts(build_dense(self.plan), args)
            self._cache_layouts[key] = layouts[self.n_user : self.n_user + self.n_caches]
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in self._cache_layouts[key]]

    @staticmethod
    def _extra_inputs(salient_in: torch.Tensor, forced: Optional[torch.Tensor], hint: Optional[torch.Tensor],
                      queried: Optional[torch.Tensor], dense: bool) -> list[torch.Tensor]:
        """The sparse variant's inputs after ``salient_in [B, N]``, in :func:`build_sparse`'s order: those this plan
        has (None: not an input), then ``dense_call [B, 1]``."""
        flag = torch.full((salient_in.shape[0], 1), dense, dtype=torch.bool, device=salient_in.device)
        return [x.contiguous() for x in (forced, hint, queried) if x is not None] + [flag]

    def _selections(self, args: tuple, query_capacity: Optional[int]) -> tuple[int, int]:
        """How many row selections a sparse variant with capacity buckets makes for its gated regions: of the
        batch's union, and per batch element (read from a variant's graph, built once, not lowered)."""
        key = (self._shapes(args), query_capacity is None)
        if key not in self._selection_counts:
            scalars = {i: args[i].item() for i in self.scalar_inputs}
            with _compiling("the sparse variant"):
                meta = build_sparse(self.plan, 1, scalars, query_capacity,
                                    1 if self.plan.element_regions else None).meta
            self._selection_counts[key] = tuple(1 + max((i for own, i in meta[COUNT_SELECTIONS] if own == kind),
                                                        default=-1) for kind in (False, True))
        return self._selection_counts[key]

    def _sparse(self, capacity: Optional[tuple[int, ...]], args: tuple, caches: list[torch.Tensor],
                changed: torch.Tensor, extra: list, query_capacity: Optional[int] = None,
                per_element: Optional[tuple[int, ...]] = None) -> tuple[Callable, list[tuple[bool, int]]]:
        """The sparse variant for ``capacity`` rows per union selection (None: unbacked counts),
        ``query_capacity`` queried rows and ``per_element`` rows of each batch element per per-element
        selection (the plan's element regions; None: they gather the union too); with it, per row count it
        returns, the selection it counts (``COUNT_SELECTIONS``). ``extra``: the forced-salient, row-hint,
        queried-rows and dense-call inputs."""
        scalars = {i: args[i].item() for i in self.scalar_inputs}
        if capacity is not None and self.config.symbolic_capacities and not self._static_capacities:
            try:
                return self._symbolic(capacity, args, caches, changed, extra, query_capacity, per_element, scalars)
            except Exception as err:  # a compiler that cannot take symbolic sizes: a compile per bucket still works
                log.warning("dyllm: graph %s: compiling the sparse variant with symbolic capacities failed (%s: %s);"
                            " compiling a variant per bucket instead", self.graph_id, type(err).__name__, err)
                self._static_capacities = True
        key = (capacity, query_capacity, self._shapes(args), tuple(scalars.items()), per_element)
        if key not in self.sparse_fns:
            with _compiling("the sparse variant"):
                gm = build_sparse(self.plan, capacity, scalars, query_capacity, per_element)
                fn = self.lower(gm, [*args, *caches, changed, *extra], dynamic_output_shapes=capacity is None)
            self.sparse_fns[key] = fn, gm.meta[COUNT_SELECTIONS]
            self._count_compile(capacity, per_element, "")
        return self.sparse_fns[key]

    def _count_compile(self, capacity: Optional[tuple[int, ...]], per_element: Optional[tuple[int, ...]],
                  symbolic: str) -> None:
        self.stats.sparse_compiles += 1
        log.info("dyllm: graph %s: compiled the sparse variant for %s rows%s%s", self.graph_id,
                 "unbacked" if capacity is None else capacity,
                 "" if per_element is None else f" ({per_element} of each batch element per-element)", symbolic)

    def _symbolic(self, capacity: tuple[int, ...], args: tuple, caches: list[torch.Tensor], changed: torch.Tensor,
                  extra: list, query_capacity: Optional[int], per_element: Optional[tuple[int, ...]],
                  scalars: dict[int, Any]) -> tuple[Callable, list[tuple[bool, int]]]:
        """``_sparse`` with ``symbolic_capacities``: the capacities are the sizes of extra inputs, and a variant
        compiled for one set of them runs any other its guards admit (the first such of the variants compiled
        for this structure), else one more is compiled, for these sizes."""
        sizes = capacity_sizes(capacity, per_element, query_capacity)
        inputs = [*args, *caches, changed, *extra]
        at = {len(inputs) + i: size for i, size in enumerate(sizes)}
        structure = (len(capacity), query_capacity is None, self._shapes(args), tuple(scalars.items()),
                     None if per_element is None else len(per_element))
        variants = self._symbolic_fns.setdefault(structure, [])
        if (structure, *sizes) not in self._symbolic_at:  # the guards are checked once per set of sizes
            found = next((v for v in variants if v[0].admits(at)), None)
            if found is None:
                gm = build_sparse(self.plan, capacity, scalars, query_capacity, per_element, symbolic=True)
                fn = self.lower(gm, [*inputs, *self._carriers(sizes, changed.device)], symbolic_inputs=list(at))
                found = fn, gm.meta[COUNT_SELECTIONS]
                variants.append(found)
                self._count_compile(capacity, per_element, ", symbolic: for every capacity its guards admit")
            self._symbolic_at[(structure, *sizes)] = found
        (fn, selections), carriers = self._symbolic_at[(structure, *sizes)], self._carriers(sizes, changed.device)
        return (lambda *a: fn(*a, *carriers)), selections

    def _carriers(self, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
        """1-d inputs of the ``sizes`` (their values are never read), kept per size and device."""
        for size in sizes:
            if (size, device) not in self._carrier_cache:
                self._carrier_cache[size, device] = torch.empty(size, dtype=torch.uint8, device=device)
        return [self._carrier_cache[size, device] for size in sizes]


def _touch(states: list[SequenceState], state: Optional[SequenceState]) -> None:
    """Moves ``state`` to the end of ``states``, which evicts from the front: least recently used first."""
    if state is not None and states[-1] is not state:
        states.remove(state)
        states.append(state)


def _forget(runtime: "weakref.ref[GraphRuntime]", key: tuple) -> None:
    alive = runtime()
    if alive is not None:
        alive.states.pop(key, None)
        alive._versions.pop(key, None)


def runtimes(since: int = 0) -> list[GraphRuntime]:
    """Live runtimes (one per compiled graph) created after serial ``since``, oldest first."""
    return sorted((r for r in _runtimes if r.serial > since), key=lambda r: r.serial)


def last_serial() -> int:
    """The serial of the newest runtime so far: pass it to :func:`runtimes` to see only later ones."""
    return max((r.serial for r in _runtimes), default=0)


def reset_all() -> None:
    for runtime in runtimes():
        runtime.reset()
