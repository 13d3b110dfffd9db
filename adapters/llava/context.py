"""What one ``reduce_visual_tokens`` call set up (``LlavaContext``), what each call did (per-thread records for
``mmmerge.last_info``), and the replaced methods of the inner model (``Replacement``)."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from mmmerge.info import MergeInfo

from ..vlm import Replacement  # noqa: F401  (re-exported: the LLaVA parts import it from here)
from .anyres import ImageLayout, RaggedPlan, _pack, _tiles
from .kinds import KeepSpec, Layout, ModelKind, inner_model

# Per thread: the call in progress where the model's call graph gives no way to pass a value (the pre_projector
# hooks, cdpruner's prompt). Only set for the duration of one call, by that call.
CALL = threading.local()


@dataclass(eq=False)  # identity: one context per patched model (per copy), a key of the per-thread records
class LlavaContext:
    """What one ``reduce_visual_tokens`` call set up; lives on the inner model (``_mmmerge_llava``).

    Fixed at patch time and only read by a forward, except two memos of host arithmetic (anyres layouts per
    image size, index plans per batch layout) that a forward may fill: pure functions of their keys, written
    whole under the GIL, so threads never see a partial entry (at worst two compute the same one).
    A copy (``copy.deepcopy``, pickle) carries the settings; it starts with empty memos and without the
    processors, which belong to the user and stay patched for the original model.
    """

    kind: ModelKind
    keep: KeepSpec  # as given (fractions of anyres images and videos resolve per item)
    keep_tokens: Optional[int]  # uniform images: resolved per image
    method: str
    where: str
    layout: Layout
    time_mode: str
    hyper: Dict[str, Any]
    # The hidden states to ask the tower for (the feature layers and the key layer's input), or None where
    # the model's get_*_features always returns every hidden state (transformers 5.17).
    select_hidden: Optional[Tuple[int, ...]] = None
    processor_undo: List[Callable[[], None]] = field(default_factory=list)
    image_layouts: Dict[Tuple, ImageLayout] = field(default_factory=dict)  # memo: (size, cropped, aspect) -> layout
    plans: Dict[Tuple, RaggedPlan] = field(default_factory=dict)  # memo: (keep, layouts, device) -> plan

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update(processor_undo=[], image_layouts={}, plans={})
        return state

    @property
    def info(self) -> MergeInfo:
        """This thread's last reduction with this context (see ``last_info``)."""
        return _last_record(self)

    def image_layout(self, lm: nn.Module, size: Sequence[int], cropped: bool, aspect: Optional[str]) -> ImageLayout:
        """The packed layout of one anyres image, found by running the model's own packing on token indices."""
        key = (tuple(int(s) for s in size), bool(cropped), aspect)
        image = self.image_layouts.get(key)
        if image is None:
            tiles = _tiles(lm, key[0], cropped)
            n = self.layout.num_features
            index = torch.arange(tiles * n, dtype=torch.float64).view(tiles, n, 1)
            with torch.no_grad():
                packed = _pack(lm, [index], torch.tensor([key[0]]), torch.tensor([-1.0], dtype=torch.float64),
                               self.layout.strategy, aspect)[0][:, 0]
            newlines = tuple(torch.nonzero(packed == -1.0).flatten().tolist())
            if not torch.equal(packed[:n], torch.arange(n, dtype=torch.float64)):
                raise RuntimeError("mmmerge.llava: this transformers version packs anyres images differently (the "
                                   "base view does not come first); please report it")
            exact = bool((packed == packed.round()).all())
            origin = packed.clamp_min(0).long() if exact else None
            image = ImageLayout(key, packed.shape[0], n, newlines, tiles, origin)
            if len(self.image_layouts) > 256:
                self.image_layouts.clear()
            self.image_layouts[key] = image
        return image


# ------------------------------------------------------------------------------- what a call did, per thread
_RECORDS = threading.local()  # per thread: WeakKeyDictionary context -> MergeInfo of its last reduction


def _record(ctx: LlavaContext, info: MergeInfo) -> None:
    """Keep ``info`` as this thread's last reduction by ``ctx`` (eager calls only: a compiled graph has no
    Python side effects)."""
    if torch.compiler.is_compiling():
        return
    records = getattr(_RECORDS, "by_context", None)
    if records is None:
        records = _RECORDS.by_context = weakref.WeakKeyDictionary()
    records[ctx] = info


def _last_record(ctx: LlavaContext) -> MergeInfo:
    """This thread's last reduction by ``ctx``; before one, what is known without input (LLaVA-1.5 images: the
    counts; anyres images and videos have counts per input: an empty MergeInfo)."""
    info = getattr(_RECORDS, "by_context", {}).get(ctx)
    if info is not None:
        return info
    if ctx.kind.images == "uniform" and not ctx.kind.videos:
        N = ctx.layout.num_features
        return MergeInfo(schedule=[N - ctx.keep_tokens], tokens_per_layer=[N, ctx.keep_tokens])
    return MergeInfo()


# ---------------------------------------------------------------------------------------- patch / undo
def _context(model: nn.Module) -> LlavaContext:
    ctx = inner_model(model).__dict__.get("_mmmerge_llava")
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched: call reduce_visual_tokens(model, keep=...) first")
    return ctx


def _context_of(lm: nn.Module) -> LlavaContext:
    ctx = lm.__dict__.get("_mmmerge_llava")
    if ctx is None:  # only reachable if the patch's attributes were removed by hand
        raise RuntimeError(f"{type(lm).__name__} has a reduced feature method but no mmmerge context; call "
                           "restore_visual_tokens(model) and patch again")
    return ctx
