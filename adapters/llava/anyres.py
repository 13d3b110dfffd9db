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
    """Index maps that reduce a batch of anyres images: one row group per distinct (length, keep)."""

    groups: List[Tuple[Tensor, int]]  # (global packed positions [G, length], keep)
    newlines: Tensor  # [NL] global packed positions of the newline tokens
    origin: Optional[Tensor]  # [L] tower token (over all tiles) behind each packed position, None if resampled
    lengths_out: List[int]  # tokens per image after the reduction
    items: List[Tuple[int, int]]  # (tokens in, tokens out) per image
    counts_out: Tensor  # [images] lengths_out on the device (cdpruner's prompt rows)
    ends_in: Tensor  # [images] cumulative packed tokens in, on the device (cdpruner's query per row group)


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


def ragged_plan(ctx: LlavaContext, images: Sequence[ImageLayout], device: torch.device) -> RaggedPlan:
    """Row groups of a batch of anyres images: every image gives a base row and (if cropped) a crop row; rows
    with the same (length, keep) form one group. Host arithmetic only, cached per batch layout and device."""
    key = (ctx.keep, tuple(images), str(device))
    plan = ctx.plans.get(key)
    if plan is not None:
        return plan
    rows: Dict[Tuple[int, int], List[Tensor]] = {}
    newlines, lengths_out, items, origins = [], [], [], []
    offset = tile_offset = 0
    for image in images:
        if image.origin is not None:
            origins.append(image.origin + tile_offset * image.base)
        tile_offset += image.tiles
        k_base, k_crops = anyres_budget(ctx.keep, image)
        positions = torch.arange(offset, offset + image.length)
        is_crop = torch.ones(image.length, dtype=torch.bool)
        is_crop[: image.base] = False
        is_crop[list(image.newlines)] = False
        rows.setdefault((image.base, k_base), []).append(positions[: image.base])
        if image.crops:
            rows.setdefault((image.crops, k_crops), []).append(positions[is_crop])
        newlines.append(positions[list(image.newlines)])
        lengths_out.append(k_base + k_crops + len(image.newlines))
        items.append((image.length, lengths_out[-1]))
        offset += image.length
    groups = [(_to_device(torch.stack(r), device), keep) for (_, keep), r in rows.items()]
    origin = _to_device(torch.cat(origins), device) if len(origins) == len(images) else None
    plan = RaggedPlan(groups, _to_device(torch.cat(newlines), device), origin, lengths_out, items,
                      _to_device(torch.tensor(lengths_out), device),
                      _to_device(torch.tensor([i.length for i in images]).cumsum(0), device))
    if len(ctx.plans) > 64:
        ctx.plans.clear()
    ctx.plans[key] = plan
    return plan


