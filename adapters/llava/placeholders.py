"""Placeholder tokens: the per-item check at the call, and rewriting inputs expanded for the unpatched model
(``compact_image_tokens``, ``check_placeholder_counts``)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..qwen_vl.kinds import is_qwen_vl
from .anyres import _aspect, _cropped, _host_sizes, reduced_length
from .context import LlavaContext, _context
from .features import _video_counts
from .kinds import inner_model


# ------------------------------------------------------------------------------------ placeholder counts
def _runs(ids: Tensor, token_id: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Placeholder runs of ``ids`` ``[B, L]``: ``(is_placeholder, position_in_run, is_run_end)``, all ``[B, L]``."""
    m = ids == token_id
    prev = F.pad(m[:, :-1], (1, 0), value=False)
    nxt = F.pad(m[:, 1:], (0, 1), value=False)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start = torch.where(m & ~prev, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return m, pos - start, m & ~nxt


def _check_placeholder_runs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
                            ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
    """Forward pre-hook on the inner model (registered once, at patch time; reads the context of the model it
    runs on, so a copy checks its own): every placeholder run must be a whole number of reduced images (videos)
    of LLaVA-1.5 and the video models, where transformers only compares totals.

    No host read of its own: when a run is not a multiple of the reduced count, the placeholders of that kind
    are hidden from this call's ``input_ids`` (one ``where`` on the device), so the model's own total check
    (its one read per prefill) fails, and ``_placeholder_mask`` turns that failure into mmmerge's error. Anyres
    images have a count per image size; their totals are checked by transformers, their split by
    ``check_placeholder_counts``.

    Returns the call's ``(args, kwargs)`` with the checked ``input_ids``, or None when there is nothing to check.
    """
    ctx = module.__dict__.get("_mmmerge_llava")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ctx is None or ids is None:
        return None
    config = module.config
    checks = []
    encoded = kwargs.get("mm_encoder_outputs") or {}  # generate() runs the tower before the prefill
    if ctx.kind.images == "uniform" and (kwargs.get("pixel_values") is not None or encoded.get("image") is not None):
        checks.append((config.image_token_id, ctx.keep_tokens))
    videos = kwargs.get("pixel_values_videos")
    if ctx.kind.videos and videos is not None:
        checks.append((config.video_token_id, _video_counts(ctx, module, videos.shape[1])[1]))
    elif ctx.kind.videos and encoded.get("video") is not None:
        pooled = encoded["video"].pooler_output
        count = pooled[0].flatten(0, 1).shape[0] if isinstance(pooled, (tuple, list)) else pooled.shape[1]
        checks.append((config.video_token_id, count))
    if not checks:
        return None
    stand_in = _stand_in_id(config)
    for token_id, keep in checks:
        m, pos, end = _runs(ids, token_id)
        broken = (end & ((pos + 1) % keep != 0)).any()  # [] bool, on the device
        ids = torch.where(broken & m, stand_in, ids)
    if "input_ids" in kwargs or not args:
        return args, {**kwargs, "input_ids": ids}
    return (ids,) + tuple(args[1:]), kwargs


def _stand_in_id(config: Any) -> int:
    """A token id that is no placeholder (the LM's pad id, else 0), to hide broken placeholder runs with."""
    ids = {getattr(config, name, None) for name in ("image_token_id", "video_token_id")}
    text = getattr(config, "text_config", config)
    for candidate in (getattr(text, "pad_token_id", None), 0, 1, 2):
        if candidate is not None and candidate not in ids:
            return candidate
    raise RuntimeError("mmmerge.llava: no token id to stand in for placeholders")  # ids 0, 1 and 2 all placeholders


def _placeholder_mask(lm: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Replacement of the inner model's ``get_placeholder_mask``: the model's own count check, with mmmerge's
    error when the placeholders do not match the reduced features (inputs from an unpatched processor, for any
    keep, or a run split across items: see ``_check_placeholder_runs``). No work of its own on success."""
    try:
        return original(*args, **kwargs)
    except ValueError as err:
        if "do not match" not in str(err):
            raise
        ctx = lm.__dict__.get("_mmmerge_llava")
        if ctx is None:
            raise
        per_item = ctx.keep_tokens if ctx.keep_tokens is not None else ctx.keep
        raise ValueError(
            f"mmmerge.llava: the placeholders in input_ids do not match the reduced visual tokens ({err}). The model "
            f"was reduced to keep={per_item} per image (video): every run of placeholders must be a whole number of "
            f"reduced items, and a run that is not a multiple of keep={per_item} (or the full count of an unreduced "
            "item) is refused. Inputs from a processor that was not patched hold the full count: pass processor= to "
            "reduce_visual_tokens (it then emits the reduced count), or rewrite input_ids with "
            "compact_image_tokens(input_ids, attention_mask, model)") from None


def _anyres_counts(ctx: LlavaContext, lm: nn.Module, image_sizes: Any, batch_num_images: Any
                   ) -> Tuple[List[int], List[int]]:
    """Per anyres image, in batch order: (unreduced placeholders, reduced placeholders)."""
    if image_sizes is None:
        raise ValueError(f"{type(lm).__name__} has a token count per image size: pass image_sizes= (and, for "
                         "OneVision prompts with several images, batch_num_images=) from the processor's output")
    sizes = _host_sizes(image_sizes)
    images = [ctx.image_layout(lm, s, c, _aspect(lm)) for s, c in zip(sizes, _cropped(sizes, batch_num_images))]
    return [i.length for i in images], [reduced_length(ctx.keep, i) for i in images]


def _uniform_keep_mask(ids: Tensor, token_id: int, full: int, keep: int, what: str) -> Tensor:
    """``[B, L]``: False for the placeholders past ``keep`` in each item of ``full`` placeholders."""
    m, pos, end = _runs(ids, token_id)
    lengths = (pos + 1)[end]
    bad = lengths[lengths % full != 0]
    if bad.numel():
        raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of the {full} "
                         f"an unreduced {what} has; compact_image_tokens expects inputs from the unpatched "
                         "processor (already compacted inputs need no rewrite)")
    return ~m | (pos % full < keep)


def _ragged_keep_mask(ids: Tensor, token_id: int, full: Sequence[int], keep: Sequence[int]) -> Tensor:
    """``[B, L]``: False for the placeholders past ``keep[i]`` in image i (images in row-major order)."""
    m = ids == token_id
    total = int(m.sum())
    if total != sum(full):
        raise ValueError(f"input_ids hold {total} image placeholders, but these images make {sum(full)} unreduced "
                         f"({list(full)} per image); compact_image_tokens expects inputs from the unpatched processor "
                         "and the image_sizes of the same batch")
    flat = m.flatten()
    rank = flat.long().cumsum(0) - 1  # placeholder index in the batch
    ends = torch.tensor(list(full), device=ids.device).cumsum(0)
    image = torch.searchsorted(ends, rank.clamp_min(0), right=True).clamp_max(len(full) - 1)
    position = rank - (ends - torch.tensor(list(full), device=ids.device))[image]
    kept = position < torch.tensor(list(keep), device=ids.device)[image]
    return (~flat | kept).view_as(ids)


def check_placeholder_counts(input_ids: Tensor, model: nn.Module, num_frames: Optional[int] = None,
                             image_sizes: Any = None, batch_num_images: Any = None) -> None:
    """Raise ValueError unless every image (video) has exactly its reduced count of placeholders.

    Host-side check (one sync), for use outside the forward path. LLaVA-1.5 and videos: each run of placeholders
    is a whole number of reduced items. Anyres images (pass ``image_sizes``, and ``batch_num_images`` for
    OneVision prompts with several images): the placeholders split, in order, into one contiguous run per image
    of exactly its reduced count.
    """
    ctx = _context(model)
    lm = inner_model(model)
    checks = []
    if ctx.kind.images == "uniform":
        checks.append((lm.config.image_token_id, ctx.keep_tokens, "image"))
    if ctx.kind.videos and bool((input_ids == lm.config.video_token_id).any()):
        if num_frames is None:
            raise ValueError("this is a video model: pass num_frames= (frames per video) to count video placeholders")
        checks.append((lm.config.video_token_id, _video_counts(ctx, lm, num_frames)[1], "video"))
    for token_id, keep, what in checks:
        m, pos, end = _runs(input_ids, token_id)
        lengths = (pos + 1)[end]
        bad = lengths[lengths % keep != 0]
        if bad.numel():
            raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of "
                             f"keep={keep}; use the patched processor or compact_image_tokens")
    if ctx.kind.images == "anyres" and bool((input_ids == lm.config.image_token_id).any()):
        _, reduced = _anyres_counts(ctx, lm, image_sizes, batch_num_images)
        where = torch.nonzero((input_ids == lm.config.image_token_id).flatten()).flatten()
        if where.numel() != sum(reduced):
            raise ValueError(f"input_ids hold {where.numel()} image placeholders, these images need {sum(reduced)} "
                             f"({reduced} per image); use the patched processor or compact_image_tokens")
        counts = torch.tensor(reduced, device=where.device)  # host-side check: one copy, then device arithmetic
        starts = counts.cumsum(0) - counts
        first, last = where[starts], where[starts + counts - 1]
        L = input_ids.shape[1]
        broken = ((last - first + 1) != counts) | (first // L != last // L)
        if bool(broken.any()):
            i = int(torch.nonzero(broken)[0])
            raise ValueError(f"image {i}'s {reduced[i]} placeholders are not one contiguous run in one row; use the "
                             "patched processor or compact_image_tokens")


def compact_image_tokens(input_ids: Tensor, attention_mask: Optional[Tensor], model: nn.Module,
                         num_frames: Optional[int] = None, pad_token_id: Optional[int] = None,
                         image_sizes: Any = None, batch_num_images: Any = None, **qwen_inputs: Any) -> Any:
    """Rewrite inputs expanded for the unpatched model so every image (video) has its reduced placeholder count.

    Of every item's placeholders the first ``count`` remain (the LM fills them in order, so only the count
    matters). LLaVA-1.5 and videos: each run must hold a whole number of unreduced items (N each, 576 for
    LLaVA-1.5; frames x tokens per frame (+1 newline, OneVision) for video). Anyres images: pass the batch's
    ``image_sizes`` (and ``batch_num_images`` for OneVision prompts with several images); the placeholders are
    assigned to the images in order. Rows are re-padded on the side the input was padded on (left if any row
    starts with padding).

    Args:
        input_ids: ``[B, L]`` long. attention_mask: ``[B, L]`` or None (no padding). model: a model patched
            by ``reduce_visual_tokens``. num_frames: frames per video (videos only).
        pad_token_id: id for new padding (default: the model's pad id, else 0).
    Returns:
        ``(input_ids [B, L'], attention_mask [B, L'])`` on the input's device. Host syncs (L' is data
        dependent): call it once per batch, outside the model's forward.
    Raises:
        ValueError if the model is not patched or the placeholders do not match unreduced items.

    A Qwen-VL model goes to ``mmmerge.adapters.qwen_vl.compact_image_tokens`` (``image_grid_thw=``,
    ``video_grid_thw=``, ``mm_token_type_ids=``; it also returns the compacted token types when given them).
    """
    if is_qwen_vl(model):
        from mmmerge.adapters import qwen_vl

        return qwen_vl.compact_image_tokens(input_ids, attention_mask, model, pad_token_id=pad_token_id,
                                            **qwen_inputs)
    if qwen_inputs:
        raise TypeError(f"compact_image_tokens got {sorted(qwen_inputs)}, which only Qwen-VL models take")
    ctx = _context(model)
    lm = inner_model(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()
    kept = real
    if ctx.kind.images == "uniform":
        kept = kept & _uniform_keep_mask(input_ids, lm.config.image_token_id, ctx.layout.num_features,
                                         ctx.keep_tokens, "image")
    elif ctx.kind.images == "anyres" and bool((input_ids == lm.config.image_token_id).any()):
        full, reduced = _anyres_counts(ctx, lm, image_sizes, batch_num_images)
        kept = kept & _ragged_keep_mask(input_ids, lm.config.image_token_id, full, reduced)
    if ctx.kind.videos and bool((input_ids == lm.config.video_token_id).any()):
        if num_frames is None:
            raise ValueError("this is a video model: pass num_frames= (frames per video) to count video placeholders")
        full, keep = _video_counts(ctx, lm, num_frames)
        kept = kept & _uniform_keep_mask(input_ids, lm.config.video_token_id, full, keep, "video")
    counts = kept.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    left = bool((~real[:, 0]).any()) and bool(real[:, -1].all())
    B, L = input_ids.shape
    rank = kept.long().cumsum(1) - 1  # slot among kept tokens
    slot = rank + (width - counts).unsqueeze(1) if left else rank
    if pad_token_id is None:
        pad_token_id = getattr(getattr(lm.config, "text_config", lm.config), "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    new_ids = input_ids.new_full((B, width + 1), pad_token_id)
    new_mask = attention_mask.new_zeros((B, width + 1))
    dest = torch.where(kept, slot, torch.full_like(slot, width))  # dropped tokens go to a spare column
    new_ids.scatter_(1, dest, input_ids)
    new_mask.scatter_(1, dest, torch.ones_like(attention_mask))
    return new_ids[:, :width].contiguous(), new_mask[:, :width].contiguous()


