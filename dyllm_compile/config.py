"""The backend's one validated configuration.

``torch.compile(model, backend="dyllm", options={...})`` hands ``options`` to the backend, which builds a
:class:`DyllmConfig` from it. Every knob is a dataclass field whose metadata carries its documentation and
its valid values, so validation, error messages and the README's options table come from one place.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

#: Setting this environment variable to ``1`` turns the backend into plain Inductor.
DISABLE_ENV = "DYLLM_DISABLE"

LOWERINGS = ("inductor", "aot_eager", "eager")


ATTENTION_MODES = ("paper", "exact")

ROW_COUNTS = ("auto", "buckets", "unbacked")

ROW_CAPACITIES = ("shared", "per_selection")

OUTPUT_PROJECTIONS = ("dense", "salient")

LINEAR_ORDERS = ("auto", "input_first", "weight_first")  # what passes/linear_order.py emits

TOKEN_CHANGES = ("unmask", "any")

WRAPPERS = ("python", "cpp")


def _knob(default: Any, doc: str, *, choices: Optional[tuple] = None, kind: Optional[type] = None,
          low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
          optional: bool = False) -> Any:
    """A config field; ``low``/``high`` bound numbers (``low_open``: exclusive), ``optional`` allows None."""
    meta = {"doc": doc, "choices": choices, "kind": kind, "low": low, "high": high, "low_open": low_open,
            "optional": optional}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DyllmConfig:
    """Options of the ``dyllm`` backend (``torch.compile(..., options={...})``)."""

    lowering: str = _knob(
        "inductor",
        "How the rewritten graph is lowered: Inductor (Triton on GPU, C++ on CPU), aot_eager "
        "(AOTAutograd without code generation: fast compiles for correctness tests) or eager.",
        choices=LOWERINGS,
    )
    debug_dir: Optional[str] = _knob(
        None,
        "Directory for readable dumps of each graph before and after every pass, and the explain "
        "report. None disables dumps.",
    )
    threshold: float = _knob(
        0.99,
        "Saliency threshold tau: a row is salient when the cosine of its attention context with the cached "
        "one is below tau (a row that came in salient stays salient; a context zero at both calls, a padded row "
        "that sees no key, counts as unchanged). 1.0 recomputes every row (equals dense).",
        kind=float, low=0.0, high=1.0, low_open=True,
    )
    attention_mode: str = _knob(
        "exact",
        "exact: running softmax statistics updated for the changed key columns only; equals dense attention for "
        "unchanged queries. paper: non-salient rows get c_old + softmax(qK^T)(V - V_old) (DyLLM), with q and the "
        "scores of every row recomputed. exact is the default: closer to dense on the trained model and cheaper "
        "per step (docs/rewrite.md).",
        choices=ATTENTION_MODES,
    )
    dense_steps: int = _knob(1, "Calls per sequence that run dense (and fill the caches) before sparse ones.",
                             kind=int, low=1)
    refresh_period: int = _knob(0, "Run a dense, cache-refreshing call every this many calls (0: never).",
                                kind=int, low=0)
    query_pruning_period: int = _knob(
        0, "Query pruning: 0 queries every row on every call. P > 0: rows outside the response (not masked at the "
        "sequence's first call: the prompt) are queried only on every P-th call; on the others they keep their "
        "cached context, K/V, attention output and FFN output. Needs token-id inputs and a known mask id "
        "(mask_token_id, or inferred); a graph without them queries every row.", kind=int, low=0,
    )
    output_projection: str = _knob(
        "dense",
        "dense: every row's attention output projection is recomputed on every call (its context moves a little "
        "even when it is not salient). salient: only the rows of the site's S_out (the rows whose FFN is "
        "recomputed) are projected; the others keep their cached projection, as they keep their cached FFN "
        "output. An approximation beyond DESIGN.md's default, measured in docs/rewrite.md. With query pruning "
        "a pruned site projects its queried rows either way.",
        choices=OUTPUT_PROJECTIONS,
    )
    max_salient_fraction: float = _knob(
        1.0, "A call whose salient rows (in any layer) exceed this fraction of the sequence runs dense.",
        kind=float, low=0.0, high=1.0, low_open=True,
    )
    max_changed_fraction: float = _knob(
        0.5, "A call whose new rows (over the batch: the rows whose token inputs changed and, with query pruning, "
        "the rows queried again, as at each refresh) exceed this fraction of the sequence runs dense, known "
        "before it runs: recomputing them is most of a dense call's work, and with capacity buckets a sparse "
        "variant at full capacity gathers every row and is a compile of its own. A policy's own rows do not count.",
        kind=float, low=0.0, high=1.0, low_open=True,
    )
    min_salient_fraction: float = _knob(
        0.0, "Smallest row capacity of a sparse call, as a fraction of the sequence (row_counts buckets only).",
        kind=float, low=0.0, high=1.0,
    )
    row_counts: str = _knob(
        "auto",
        "How a sparse call sizes the rows it gathers for a gated region. buckets: top-K with a static capacity "
        "K in N/16, N/8, N/4, N/2, N (rows padded up to K, one compiled variant for every bucket or one per "
        "bucket: symbolic_capacities; no host sync in the graph, a rerun when a layer needs a bigger bucket). "
        "unbacked: exactly the salient rows (nonzero, a data-dependent size: one variant, no padding, no rerun; "
        "a device-to-host sync per row set on GPU). "
        "auto: unbacked on CPU, where it measured as fast or faster (benchmarks/bench_rows.py), buckets on "
        "other devices (CUDA graphs need static shapes).",
        choices=ROW_COUNTS,
    )
    row_capacity: str = _knob(
        "shared",
        "With capacity buckets, how many capacities a sparse call has. shared: one bucket for every layer's row "
        "selection, the deepest layer's (fewest compiled variants and reruns). per_selection: a bucket per "
        "layer's selection (a deeper layer's salient set is larger): fewer padded rows computed (GPU benchmark "
        "configuration on CPU: 25% -> 15% of the rows at batch 1, 27% -> 21% at batch 8 with query pruning) for "
        "more variants and reruns (measured there: twice the compile time, and slower steps on a model whose "
        "step is overhead, not arithmetic; with symbolic_capacities no more compiles); not yet measured on a GPU.",
        choices=ROW_CAPACITIES,
    )
    symbolic_capacities: bool = _knob(
        True,
        "With capacity buckets: each sparse variant is compiled once with its capacities symbolic (read from "
        "the sizes of extra inputs), and serves every bucket that the guards its compilers recorded admit, "
        "instead of one compile per bucket (the compiled pieces of layers with different capacities are shared "
        "too). Fewer compiles and no recompile when a call needs another bucket, for generated code on symbolic "
        "sizes. False: a compile per bucket (also where the symbolic compile fails, with a warning).",
        choices=(False, True),
    )
    linear_order: str = _knob(
        "auto",
        "Operand order of the linear layers that gated regions run on gathered rows. input_first: x @ W^T, as "
        "the model wrote it. weight_first: (W @ x^T)^T, the same products with the few rows as the BLAS call's "
        "narrow operand (MKL's sgemm streams weights several times faster that way for a few rows on some CPUs). "
        "auto: on the CPU, both orders are timed once per weight shape and the faster kept; elsewhere input_first "
        "(docs/rewrite.md).",
        choices=LINEAR_ORDERS,
    )
    piecewise: bool = _knob(
        True,
        "Lower the rewritten graph a few layers at a time (piece_layers), each distinct piece once (pieces with the "
        "same code and shapes share one compiled function; torch.fx split_module at the residual stream between "
        "layers): compile time near one piece's instead of every layer's. False lowers the whole graph at once (fusion "
        "across layer boundaries). Not with the eager lowering.",
        choices=(False, True),
    )
    piece_layers: Optional[int] = _knob(
        None,
        "With piecewise lowering, how many consecutive layers go to one compiled piece. None: about an eighth of "
        "the layers where they divide so (a deep model's pieces of a few layers: fewer piece calls for the host, "
        "one short piece compiled; a model of under 16 layers keeps one layer to a piece). 1: one layer each "
        "(the least compile time).",
        kind=int, low=1, optional=True,
    )
    wrapper: str = _knob(
        "python",
        "How the code Inductor generates for the rewritten graph's variants calls its kernels (lowering inductor "
        "only). python: Inductor's default Python wrapper. cpp: Inductor's C++ wrapper (cpp_wrapper), no Python "
        "between a piece's kernels and products, for a C++ compile of each piece's wrapper: on the CPU a 4-10% "
        "shorter sparse step on the reference model for about 1.5x its compile time (docs/benchmarks.md); not yet "
        "run on a GPU. A piece the C++ wrapper fails to compile gets the Python one, with a warning.",
        choices=WRAPPERS,
    )
    mask_token_id: Optional[int] = _knob(
        None, "Id of the mask token. None: inferred as the id that changed rows held (with token_changes='unmask', "
        "a row that leaves another id means a new sequence, which runs dense).", kind=int, low=0, optional=True,
    )
    token_changes: str = _knob(
        "unmask",
        "Which changes of token-id inputs continue a sequence. unmask: rows that held the mask id and no longer "
        "do (masked diffusion: LLaDA, Dream); any other change (a new prompt, even one token) starts a new "
        "sequence, dense. any: whatever the changed rows hold now (uniform-noise diffusion, whose sampler "
        "re-noises rows with random tokens: DiffusionGemma); each changed row is recomputed from layer 0, and a "
        "call that changed more than max_changed_fraction of the rows runs dense.",
        choices=TOKEN_CHANGES,
    )
    recompute_share: float = _knob(
        0.5, "Exact mode: a row whose removed softmax mass exceeds this share of its denominator is recomputed.",
        kind=float, low=0.0, high=1.0, low_open=True,
    )
    force_salient: Optional[float] = _knob(
        None, "Debug: instead of the cosine test, each layer adds a random fraction of rows (seeded by `seed` and "
        "the call count) to the salient set. For oracle tests.", kind=float, low=0.0, high=1.0, optional=True,
    )
    seed: int = _knob(0, "Seed of force_salient's random row sets.", kind=int, low=0)
    dense_layers: tuple = _knob(
        (), "Layers (attention sites, numbered per graph as `explain` prints them) computed densely: their "
        "attention and their gated regions run on every row; saliency still passes through them by the cosine "
        "test. The lm_head counts as part of the last layer. For experiments and for excluding a layer.", kind=tuple,
    )
    policy: Any = _knob(
        "dyllm", "Caching policy: a name (dyllm, block_freeze, dllm_cache, es_dllm) or a "
        "dyllm_compile.policies.Policy instance; "
        "decides per layer which rows a sparse call recomputes (docs/policies.md).",
    )
    shadow: bool = _knob(
        False, "Shadow mode: every sparse call also runs the dense variant (caches untouched) and records the "
        "largest absolute difference of the first output and its argmax flips per call (RuntimeStats.shadow). "
        "For measuring drift; it costs a dense call per step.", choices=(False, True),
    )

    def __post_init__(self) -> None:
        if isinstance(self.dense_layers, list):  # options often come as JSON-like lists
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        for f in dataclasses.fields(self):
            _validate(f, getattr(self, f.name))
        from .policies import resolve

        resolve(self.policy)  # raises ValueError naming the valid policies
        if self.debug_dir is not None and not isinstance(self.debug_dir, (str, os.PathLike)):
            raise ValueError(
                f"dyllm option 'debug_dir' must be a path or None, got {type(self.debug_dir).__name__}"
            )

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "DyllmConfig":
        """Builds the config from ``torch.compile``'s ``options``; unknown keys raise ``ValueError``."""
        if options is None:
            return cls()
        if isinstance(options, DyllmConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"dyllm options must be a dict, got {type(options).__name__}")
        valid = option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown dyllm option(s) {unknown}; valid options are {list(valid)}"
            )
        return cls(**options)


def _validate(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None and meta.get("optional"):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"dyllm option {f.name!r} must be one of {list(choices)}, got {value!r}")
    kind = meta.get("kind")
    if kind is None:
        return
    if kind is tuple:
        if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                   for v in value):
            raise ValueError(f"dyllm option {f.name!r} must be a list of non-negative ints, got {value!r}")
        return
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not isinstance(value, int)):
        raise ValueError(f"dyllm option {f.name!r} must be {kind.__name__}, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if meta.get("low_open") else "["
        raise ValueError(f"dyllm option {f.name!r} must be in {left}{low}, {high if high is not None else 'inf'}]"
                         f", got {value!r}")


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DyllmConfig))


def option_docs() -> list[tuple[str, Any, str]]:
    """(name, default, doc) per option: the README's options table is checked against this."""
    return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(DyllmConfig)]


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
