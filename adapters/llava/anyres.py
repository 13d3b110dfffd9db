"""Anyres arithmetic (LLaVA-NeXT, OneVision): how the model packs one image (base view, crops, newlines), the
budget of each part, and the index plans that reduce a batch of packed images.

Everything here is host arithmetic on image sizes, done with the model's own packing code on token indices.
"""
from __future__ import annotations

import sys
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmmerge.reduce import plan_rows
from mmmerge.rows import RowBudgets

from .kinds import KeepSpec, _ceil_fraction

if TYPE_CHECKING:  # the context holds the memos; it imports this module
    from .context import LlavaContext


# ------------------------------------------------------------------------------------------- anyres layout
@dataclass(frozen=True)
class ImageLayout:
    """One anyres image as the LM sees it, unreduced: ``[base (n)] + crop rows, each followed by a newline``."""

    key: Tuple  # (size, cropped, aspect): what the layout was made for
    length: int  # packed tokens, newlines included
    base: int  # base-view tokens: the first ``base`` packed tokens
    newlines: Tuple[int, ...]  # packed positions of the newline tokens
    tiles: int  # tower inputs of this image (base view + crops)
    # Tower token (tile * n + token) behind each packed position (newlines: 0), or None where the model
    # resamples the crop grid (OneVision's downsampling of very large grids).
    origin: Optional[Tensor] = field(default=None, compare=False, hash=False, repr=False)

    @property
    def features(self) -> int:
        """F: feature tokens (base + crops), newlines excluded."""
        return self.length - len(self.newlines)

    @property
    def crops(self) -> int:
        return self.features - self.base


def anyres_budget(keep: KeepSpec, image: ImageLayout) -> Tuple[int, int]:
    """``(k_base, k_crops)``: feature tokens an anyres image keeps in its base view and in its crops.

    K = ``ceil(keep * F)`` for a fraction, ``min(keep, F)`` for an int; spread in proportion to the parts' tokens:
    ``k_base = ceil(K * n / F)``, clipped so that each part that exists keeps at least one token.
    """
    F_, n = image.features, image.base
    K = _ceil_fraction(keep, F_) if isinstance(keep, float) else min(keep, F_)
    if image.crops == 0:
        return K, 0
    K = max(K, 2)
    k_base = min(max(-(-K * n // F_), 1), K - 1)
    return k_base, K - k_base


def reduced_length(keep: KeepSpec, image: ImageLayout) -> int:
    """Tokens the LM sees for one anyres image after the reduction (newlines included)."""
    return sum(anyres_budget(keep, image)) + len(image.newlines)


def _pack(lm: nn.Module, features: Sequence[Tensor], image_sizes: Tensor, newline: Tensor, strategy: str,
          aspect: Optional[str]) -> List[Tensor]:
    """The model's own ``pack_image_features`` (NeXT and OneVision name their arguments differently)."""
    params = inspect.signature(lm.pack_image_features).parameters
    kwargs: Dict[str, Any] = {"image_newline": newline}
    if "vision_feature_select_strategy" in params:
        kwargs["vision_feature_select_strategy"] = strategy
    if "vision_aspect_ratio" in params:
        kwargs["vision_aspect_ratio"] = aspect
    return list(lm.pack_image_features(list(features), image_sizes, **kwargs)[0])


def _tiles(lm: nn.Module, size: Tuple[int, int], cropped: bool) -> int:
    """Tower inputs of one image: the model's own ``image_size_to_num_patches``, or 1 when it is not cropped."""
    if not cropped:
        return 1
    module = sys.modules[type(lm).__module__]
    return int(module.image_size_to_num_patches(image_size=list(size), grid_pinpoints=lm.config.image_grid_pinpoints,
                                                 patch_size=lm.config.vision_config.image_size))


def _aspect(lm: nn.Module, given: Optional[str] = None) -> Optional[str]:
    return given if given is not None else getattr(lm.config, "vision_aspect_ratio", None)


@dataclass
class RaggedPlan:
    """Index maps that reduce a batch of anyres images in one engine call: every part of every image (its base view,
    its crops) is one row of a padded batch ``[G, W]`` with a keep of its own (``mmmerge.reduce.plan_rows``).

    Output slots: the ``G * K`` engine outputs (row g's ``keeps[g]`` real tokens first, then padding) followed by
    the ``NL`` newline tokens; the output is their real slots sorted by earliest packed position.
    """

    rows: Tensor  # [G, W] packed position of each row's tokens (its real tokens first; padding repeats position 0)
    budgets: Optional[RowBudgets]  # every row's keep; None when all rows have one length and one keep (no padding)
    keep: int  # K: tokens per row after the reduction
    first: Tensor  # [G, W] packed position of each row entry, L for padding (padding slots sort last)
    offsets: Tensor  # [G, 1] first output slot of each row (g * K)
    entry_of: Tensor  # [L] entry of each packed position: g * W + column in its row, or G * W + i for newline i
    row_image: Tensor  # [G] image of each row (cdpruner's prompt)
    newlines: Tensor  # [NL] global packed positions of the newline tokens
    newline_slots: Tensor  # [NL] output slots of the newlines (G * K + i)
    newline_sizes: Tensor  # [NL] float ones
    origin: Optional[Tensor]  # [L] tower token (over all tiles) behind each packed position, None if resampled
    lengths_out: List[int]  # tokens per image after the reduction
    items: List[Tuple[int, int]]  # (tokens in, tokens out) per image
    counts_out: Tensor  # [images] lengths_out on the device (cdpruner's prompt rows)

    @property
    def total_out(self) -> int:
        return sum(self.lengths_out)


def _cropped(sizes: Sequence, batch_num_images: Any) -> List[bool]:
    """Which images the model crops: all of them, except OneVision's images in prompts with several images."""
    if batch_num_images is None:
        return [True] * len(sizes)
    counts = batch_num_images.tolist() if isinstance(batch_num_images, Tensor) else list(batch_num_images)
    return [int(n) == 1 for n in counts for _ in range(int(n))]


def _host_sizes(image_sizes: Any) -> List[Tuple[int, int]]:
    if image_sizes is None:
        raise ValueError("anyres models need image_sizes (the processor returns them with pixel_values)")
    rows = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
    return [(int(r[0]), int(r[1])) for r in rows]


# ------------------------------------------------------------------------------ anyres image wrapper
def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-built index tensor to ``device`` without a synchronising copy (pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _row_index(parts: Sequence[Tensor], width: int, fill: int) -> Tensor:
    """``[G, width]`` long: row g holds ``parts[g]`` first, then ``fill``."""
    rows = torch.full((len(parts), width), fill, dtype=torch.long)
    for g, part in enumerate(parts):
        rows[g, : part.shape[0]] = part
    return rows


def ragged_plan(ctx: LlavaContext, images: Sequence[ImageLayout], device: torch.device) -> RaggedPlan:
    """The rows of a batch of anyres images: every image gives a base row and (if cropped) a crop row, each with its
    own keep (``anyres_budget``); together one padded batch (``plan_rows``). Host arithmetic only, cached per batch
    layout and device."""
    key = (ctx.keep, tuple(images), str(device))
    plan = ctx.plans.get(key)
    if plan is not None:
        return plan
    parts: List[Tensor] = []  # packed positions of each row's tokens
    keeps, row_image, newlines, lengths_out, items, origins = [], [], [], [], [], []
    offset = tile_offset = 0
    for i, image in enumerate(images):
        if image.origin is not None:
            origins.append(image.origin + tile_offset * image.base)
        tile_offset += image.tiles
        k_base, k_crops = anyres_budget(ctx.keep, image)
        positions = torch.arange(offset, offset + image.length)
        is_crop = torch.ones(image.length, dtype=torch.bool)
        is_crop[: image.base] = False
        is_crop[list(image.newlines)] = False
        parts.append(positions[: image.base])
        keeps.append(k_base)
        if image.crops:
            parts.append(positions[is_crop])
            keeps.append(k_crops)
        row_image += [i] * (1 + bool(image.crops))
        newlines.append(positions[list(image.newlines)])
        lengths_out.append(k_base + k_crops + len(image.newlines))
        items.append((image.length, lengths_out[-1]))
        offset += image.length
    lengths = [p.shape[0] for p in parts]
    uniform = len(set(zip(lengths, keeps))) == 1
    budgets = None if uniform else plan_rows(ctx.method, lengths, keeps)
    width, keep = (lengths[0], keeps[0]) if budgets is None else (budgets.width, budgets.out)
    G, newline = len(parts), torch.cat(newlines)
    entry_of = torch.empty(offset, dtype=torch.long)
    for g, part in enumerate(parts):
        entry_of[part] = g * width + torch.arange(part.shape[0])
    entry_of[newline] = G * width + torch.arange(newline.shape[0])

    def move(t: Tensor) -> Tensor:
        return _to_device(t, device)

    plan = RaggedPlan(
        rows=move(_row_index(parts, width, 0)), budgets=None if budgets is None else budgets.moved(move), keep=keep,
        first=move(_row_index(parts, width, offset)), offsets=move(torch.arange(G).unsqueeze(1) * keep),
        entry_of=move(entry_of), row_image=move(torch.tensor(row_image)), newlines=move(newline),
        newline_slots=move(G * keep + torch.arange(newline.shape[0])), newline_sizes=move(torch.ones(newline.shape[0])),
        origin=move(torch.cat(origins)) if len(origins) == len(images) else None, lengths_out=lengths_out,
        items=items, counts_out=move(torch.tensor(lengths_out)))
    if len(ctx.plans) > 64:
        ctx.plans.clear()
    ctx.plans[key] = plan
    return plan
