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


def _knob(default: Any, doc: str, *, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"doc": doc, "choices": choices})


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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(
                    f"dyllm option {f.name!r} must be one of {list(choices)}, got {value!r}"
                )
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


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DyllmConfig))


def option_docs() -> list[tuple[str, Any, str]]:
    """(name, default, doc) per option: the README's options table is checked against this."""
    return [(f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(DyllmConfig)]


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")
