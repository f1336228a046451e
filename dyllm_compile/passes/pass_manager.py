"""Runs the passes in order over one graph, with readable dumps before and after each.

Each pass is a class with a ``name``, a ``uuid`` (hash of its source, so anything cached on a pass result is
invalidated when the pass changes, as in vLLM) and ``__call__(state)``. Analysis passes annotate
``node.meta['dyllm']`` and fill the :class:`~dyllm_compile.passes.analysis.GraphAnalysis` state; they never
edit the graph Dynamo handed over (those that edit it, flex_attention, in_place_writes, dead_code, fused_layers,
folded_heads and hand_written_attention, replace the state's graph with an edited copy).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("dyllm_compile")


class DyllmPass:
    name: str = "pass"

    @classmethod
    def uuid(cls) -> str:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]

    def __call__(self, state: Any) -> None:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: Sequence[DyllmPass], debug_dir: Optional[str] = None,
                 render: Optional[Callable[[Any], str]] = None) -> None:
        self.passes = list(passes)
        self.debug_dir = debug_dir
        self.render = render

    def uuid(self) -> str:
        return hashlib.sha256("".join(p.uuid() for p in self.passes).encode()).hexdigest()[:16]

    def run(self, state: Any, graph_id: str) -> Any:
        for index, p in enumerate(self.passes):
            self._dump(state, graph_id, f"{index:02d}_{p.name}.before.txt")
            p(state)
            self._dump(state, graph_id, f"{index:02d}_{p.name}.after.txt")
        return state

    def _dump(self, state: Any, graph_id: str, filename: str) -> None:
        if self.debug_dir is None or self.render is None:
            return
        folder = os.path.join(self.debug_dir, graph_id)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, filename), "w") as f:
            f.write(self.render(state))
        log.debug("dyllm: wrote %s", os.path.join(folder, filename))
