"""MergeInfo: what a merged forward did. One type for every adapter (encoders, LLaVA)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import Tensor

from .state import TokenState


@dataclass
class MergeInfo:
    """What merging did in one forward (or, for the static fields, in every forward of a patch).

    Attributes:
        schedule: tokens removed at each merge step (one entry per encoder layer; for a one-shot reduction
            such as LLaVA's, the removals of that one step).
        tokens_per_layer: tokens entering each step, then the output count (``len(schedule) + 1`` entries).
            Shapes depend only on the schedule, so these hold for every input of the patched shape.
        state: TokenState of the output tokens (``size`` ``[B, N]``, ``source`` ``[B, N0]`` and any carried
            coordinates) when the forward recorded it (``trace_source=True``), else None.
        items: per reduced item (image or video, in batch order) ``(tokens in, tokens out)`` where items
            differ in their counts (LLaVA-NeXT anyres); None where every item has the same counts.
    """

    schedule: List[int] = field(default_factory=list)
    tokens_per_layer: List[int] = field(default_factory=list)
    state: Optional[TokenState] = None
    items: Optional[List[Tuple[int, int]]] = None

    @property
    def tokens_in(self) -> int:
        """Tokens entering the first step (per item, where items agree)."""
        return self.tokens_per_layer[0] if self.tokens_per_layer else 0

    @property
    def tokens_out(self) -> int:
        """Tokens leaving the last step (per item, where items agree)."""
        return self.tokens_per_layer[-1] if self.tokens_per_layer else 0

    @property
    def size(self) -> Optional[Tensor]:
        """``[B, N]`` originals per output token, or None when not recorded."""
        return None if self.state is None else self.state.size

    @property
    def source(self) -> Optional[Tensor]:
        """``[B, N0]`` output token holding each original token, or None when not recorded."""
        return None if self.state is None else self.state.source
