"""Qwen-VL model kinds, the settings of one reduction (``QwenContext``) and the per-item token budgets.

An *item* is one image or one video of a call, as the model's ``image_grid_thw`` / ``video_grid_thw`` row
``(t, h, w)`` describes it in patches. The language model sees ``F = t * (h / s) * (w / s)`` tokens of it
(``s`` = ``spatial_merge_size``, 2 in every released model), in raster order over ``(time, row, col)``.
A *run* is one contiguous stretch of placeholders in ``input_ids``: one per image, one per video for Qwen2-VL
and Qwen2.5-VL, one per temporal patch of a video for Qwen3-VL (its processor writes a timestamp before every
temporal patch).
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmmerge.info import MergeInfo

KeepSpec = Union[int, float]


@dataclass(frozen=True)
class ModelKind:
    """One Qwen-VL family."""

    name: str
    processor: str  # the processor class that matches
    frame_runs: bool  # video placeholders come in one run per temporal patch (Qwen3-VL's timestamps)
    deepstack: bool  # the tower also returns per-layer features that the LM adds to the visual tokens
    video_via_image: bool  # the model's get_video_features calls its get_image_features (Qwen3-VL)


KINDS = {
    "qwen2_vl": ModelKind("qwen2_vl", "Qwen2VLProcessor", False, False, False),
    "qwen2_5_vl": ModelKind("qwen2_5_vl", "Qwen2_5_VLProcessor", False, False, False),
    "qwen3_vl": ModelKind("qwen3_vl", "Qwen3VLProcessor", True, True, True),
}
CLASSES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2VLModel": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen2_5_VLModel": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen3VLModel": "qwen3_vl",
}
SUPPORTED = tuple(CLASSES)


def model_kind(model: nn.Module) -> Optional[ModelKind]:
    """The kind of ``model`` (by class name, subclasses included), or None for any other model."""
    for cls in type(model).__mro__:
        if cls.__name__ in CLASSES:
            return KINDS[CLASSES[cls.__name__]]
    return None


def is_qwen_vl(model: nn.Module) -> bool:
    """True for the Qwen-VL classes this package reduces (what ``mmmerge.adapters.llava`` dispatches on)."""
    return model_kind(model) is not None


def inner(model: nn.Module) -> nn.Module:
    """The ``Qwen*VLModel`` that owns the vision tower (``visual``) and the language model."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model


def ceil_fraction(keep: float, count: int) -> int:
    """``ceil(keep * count)``, forgiving float rounding (0.1 * 30 is 3, not 4), at least 1."""
    return max(1, math.ceil(keep * count - 1e-9))


@dataclass(frozen=True)
class Item:
    """One image or video of a call: its grid in LM tokens and what the reduction keeps of it.

    ``frames`` x ``rows`` x ``cols`` LM tokens (F = ``tokens``), ``kept`` of them after the reduction;
    ``per_frame``: tokens each temporal patch keeps when the budget is per frame (``within_frame``), else 0.
    ``runs``: ``(full, reduced, first original index)`` of each placeholder run of the item, in order.
    """

    frames: int
    rows: int
    cols: int
    kept: int
    per_frame: int
    runs: Tuple[Tuple[int, int, int], ...]

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def frame_tokens(self) -> int:
        return self.rows * self.cols


_RECORDS = threading.local()  # per thread: WeakKeyDictionary context -> MergeInfo of its last reduction


@dataclass(eq=False)  # identity: one context per patched model (per copy)
class QwenContext:
    """What one ``reduce_visual_tokens`` call set up; lives on the inner model (``_mmmerge_qwen``).

    Fixed at patch time and only read by a forward, except the memo of index tables (``plans``). A copy
    (``copy.deepcopy``, pickle) carries the settings and starts without the memo and the processors, which
    belong to the user and stay patched for the original model.
    """

    kind: ModelKind
    keep: KeepSpec
    method: str
    time_mode: str  # "global", "within_frame", "adjacent" or "window(k)"
    merge_size: int  # spatial_merge_size: s x s patches make one LM token
    image_token_id: int
    video_token_id: int
    hyper: Dict[str, Any] = field(default_factory=dict)
    processor_undo: List[Callable[[], None]] = field(default_factory=list)
    # Memo of host arithmetic: index tables per call layout (item shapes, device), filled by ``reduction.plan``;
    # a pure function of its key, written whole under the GIL, so threads never see a partial entry.
    plans: Dict[Tuple, Any] = field(default_factory=dict)

    @property
    def info(self) -> "MergeInfo":
        """This thread's last reduction with this context (``mmmerge.last_info``): per item (image or video, in
        call order) ``(tokens in, tokens out)``; an empty MergeInfo before the first."""
        return getattr(_RECORDS, "by_context", {}).get(self) or MergeInfo()

    def record(self, items: Sequence["Item"]) -> None:
        """Keep this call's counts as this thread's last reduction (eager calls only)."""
        if torch.compiler.is_compiling():
            return
        total_in, total_out = sum(i.tokens for i in items), sum(i.kept for i in items)
        records = getattr(_RECORDS, "by_context", None)
        if records is None:
            records = _RECORDS.by_context = weakref.WeakKeyDictionary()
        records[self] = MergeInfo(schedule=[total_in - total_out], tokens_per_layer=[total_in, total_out],
                                  items=[(i.tokens, i.kept) for i in items])

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update(processor_undo=[], plans={})
        return state

    def item(self, grid: Sequence[int], video: bool) -> Item:
        """The budget of one image (``video=False``) or video with grid ``(t, h, w)`` in patches.

        Images and ``global`` / ``adjacent`` / ``window(k)`` videos keep ``min(keep, F)`` (an int) or
        ``ceil(keep * F)`` (a fraction) of their F tokens. ``within_frame`` videos keep the same count in every
        temporal patch: ``ceil(keep * n)`` of its n tokens for a fraction, ``max(1, keep // t)`` for an int.
        """
        t, h, w = (int(v) for v in grid)
        s = self.merge_size
        rows, cols = h // s, w // s
        n = rows * cols
        F = t * n
        per_frame = 0
        if video and self.time_mode == "within_frame":
            per_frame = ceil_fraction(self.keep, n) if isinstance(self.keep, float) else max(1, min(self.keep // t, n))
            kept = per_frame * t
        else:
            kept = ceil_fraction(self.keep, F) if isinstance(self.keep, float) else min(self.keep, F)
        if video and self.kind.frame_runs:
            runs = tuple((n, per_frame, j * n) for j in range(t))
        else:
            runs = ((F, kept, 0),)
        return Item(t, rows, cols, kept, per_frame, runs)

    def items(self, grids: Optional[Sequence[Sequence[int]]], video: bool) -> List[Item]:
        return [] if grids is None else [self.item(g, video) for g in grids]


def host_grid(grid: Any) -> Optional[List[List[int]]]:
    """``image_grid_thw`` / ``video_grid_thw`` as host lists (the model reads them on the host itself)."""
    if grid is None:
        return None
    return [[int(v) for v in row] for row in (grid.tolist() if hasattr(grid, "tolist") else grid)]
