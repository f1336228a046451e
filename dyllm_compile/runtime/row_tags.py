"""Salient rows carried across a graph break, on the hidden-state tensors one graph returns and the next reads.

A graph break splits one forward into several compiled graphs (one may serve every layer). The algorithm needs
the next layer's S_in to be the last layer's S_out, but a graph whose inputs are hidden states cannot recover it
from them: below threshold 1 every row of the residual stream moves a little. So each graph tags the hidden
states it returns with the rows it left salient, the sequence state it ran against and that state's call count;
the graph that reads the same tensor uses those rows as its S_in, against its own state for that upstream
sequence. A tag is trusted only while the tensor is unchanged: its fingerprint (a sum, compared exactly) is
checked on reading, so eager code that writes the tensor in place between the graphs voids the tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

_tags: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class RowTag:
    rows: Optional[torch.Tensor]  # [B, N] rows left salient; None: the producer ran dense (so must the reader)
    axis: int  # the token axis of the tagged tensor
    source: int  # serial of the producer's sequence state
    step: int  # the producer state's call count after the call that returned the tensor
    fingerprint: torch.Tensor


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    return t.detach().sum(dtype=torch.float32)


def tag(t: torch.Tensor, rows: Optional[torch.Tensor], axis: int, source: int, step: int) -> None:
    _tags[t] = RowTag(rows, axis, source, step, _fingerprint(t))


def read(t: torch.Tensor, axis: int) -> Optional[RowTag]:
    """``t``'s tag if it was tagged along ``axis`` and has not changed since; else None."""
    found = _tags.get(t)
    if found is None or found.axis != axis:
        return None
    if found.rows is not None and tuple(found.rows.shape) != (t.shape[0], t.shape[axis]):
        return None
    return found if torch.equal(found.fingerprint, _fingerprint(t)) else None
