"""The processor: checked against the model, and patched to emit each image's (video's) reduced count."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from ..vlm import replace_processor_methods
from .anyres import _aspect, reduced_length
from .context import LlavaContext
from .features import _video_counts
from .kinds import Layout, ModelKind, inner_model


# ------------------------------------------------------------------------------------------- processors
def _tile_size(sub: Any) -> Optional[Tuple[int, int]]:
    """The pixel size a sub-processor (image or video) hands the tower: its crop, or a fixed height x width."""
    for name in ("crop_size", "size"):
        value = getattr(sub, name, None)
        if value is None:
            continue
        h, w = (value.get("height"), value.get("width")) if isinstance(value, dict) else (
            getattr(value, "height", None), getattr(value, "width", None))
        if h is not None and w is not None:
            return int(h), int(w)
    return None


def _check_processor(processor: Any, model: nn.Module, kind: ModelKind, layout: Layout) -> None:
    cfg = inner_model(model).config
    names = [c.__name__ for c in type(processor).__mro__]
    if kind.processor not in names:
        raise TypeError(f"processor is a {type(processor).__name__}, but a {type(model).__name__} needs a "
                        f"{kind.processor}")
    problems = []
    patch = cfg.vision_config.patch_size
    if hasattr(processor, "patch_size") and processor.patch_size != patch:
        problems.append(f"patch_size {processor.patch_size} vs the tower's {patch}")
    if getattr(processor, "num_image_tokens", None) not in (None, layout.num_features):
        problems.append(f"num_image_tokens {processor.num_image_tokens} vs the tower's {layout.num_features}")
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if strategy is not None and strategy != cfg.vision_feature_select_strategy:
        problems.append(f"vision_feature_select_strategy '{strategy}' vs the model's "
                        f"'{cfg.vision_feature_select_strategy}'")
    if getattr(processor, "image_token_id", cfg.image_token_id) != cfg.image_token_id:
        problems.append(f"image_token_id {processor.image_token_id} vs the model's {cfg.image_token_id}")
    if kind.videos and getattr(processor, "video_token_id", cfg.video_token_id) != cfg.video_token_id:
        problems.append(f"video_token_id {processor.video_token_id} vs the model's {cfg.video_token_id}")
    # The pixels the processor makes for what gets reduced: images and/or video frames.
    size = cfg.vision_config.image_size
    for what, reduced in (("image", kind.images is not None), ("video", kind.videos)):
        tile = _tile_size(getattr(processor, f"{what}_processor", None)) if reduced else None
        if tile is not None and tile != (size, size):
            problems.append(f"{what} crop {tile[0]}x{tile[1]} vs the tower's {size}x{size}")
    aspect = getattr(processor, "vision_aspect_ratio", None)
    if aspect is not None and getattr(cfg, "vision_aspect_ratio", aspect) != aspect:
        problems.append(f"vision_aspect_ratio '{aspect}' vs the model's '{cfg.vision_aspect_ratio}'")
    if kind.images == "anyres":
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        if pinpoints is not None and [list(p) for p in pinpoints] != [list(p) for p in cfg.image_grid_pinpoints]:
            problems.append(f"image_grid_pinpoints {pinpoints} vs the model's {cfg.image_grid_pinpoints}")
    if problems:
        raise ValueError("processor does not match the model: " + "; ".join(problems) +
                         ". Load the processor saved with this model (AutoProcessor.from_pretrained(same path))")
    for attr, needed in (("replace_image_token", kind.images is not None), ("replace_video_token", kind.videos)):
        if needed and not hasattr(type(processor), attr):
            raise TypeError(f"{type(processor).__name__} has no {attr} (this transformers version expands tokens "
                            "differently); use compact_image_tokens on its output instead")


def _patch_processor(processor: Any, ctx: LlavaContext, lm: nn.Module) -> Callable[[], None]:
    """Make the processor expand each ``<image>`` / ``<video>`` to its reduced count.

    Anyres images: the unpatched expansion gives the image's full count; the model's own packing (for that
    image size) gives its layout, which must agree, and the reduced count follows from the budget rule.
    """
    cls = type(processor)
    replacements: Dict[str, Callable] = {}
    if ctx.kind.images == "uniform":
        def replace_image(self, *args, **kwargs) -> str:
            return self.image_token * ctx.keep_tokens
        replacements["replace_image_token"] = replace_image
    elif ctx.kind.images == "anyres":
        def replace_image(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            full = len(cls.replace_image_token(self, image_inputs, image_idx, **kwargs)) // len(self.image_token)
            size = image_inputs["image_sizes"][image_idx]
            size = size.tolist() if isinstance(size, Tensor) else list(size)
            aspect = _aspect(lm)  # the model's (checked against the processor's at patch time)
            # OneVision does not crop an image of a prompt with several images: its base view and one newline.
            cropped = full != ctx.layout.num_features + 1
            image = ctx.image_layout(lm, size, cropped, aspect)
            if image.length != full:
                raise ValueError(f"the processor expands this {size[0]}x{size[1]} image to {full} tokens, the model "
                                 f"packs {image.length}: processor and model settings differ (image_grid_pinpoints, "
                                 "vision_aspect_ratio, tile size)")
            return self.image_token * reduced_length(ctx.keep, image)
        replacements["replace_image_token"] = replace_image
    if ctx.kind.videos:
        def replace_video(self, video_inputs: dict = None, video_idx: int = 0, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])
            full, reduced = _video_counts(ctx, lm, frames)
            given = len(cls.replace_video_token(self, video_inputs, video_idx, **kwargs)) // len(self.video_token)
            if given != full:
                raise ValueError(f"the processor expands a {frames}-frame video to {given} tokens, the model makes "
                                 f"{full}: processor and model settings differ")
            return self.video_token * reduced
        replacements["replace_video_token"] = replace_video
    return replace_processor_methods(processor, replacements)


