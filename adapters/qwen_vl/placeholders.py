"""Placeholder counts: ``compact_image_tokens`` for inputs an unpatched processor expanded, and the processor
patch that emits the reduced counts directly (``replace_image_token`` / ``replace_video_token``)."""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..vlm import replace_processor_methods
from .kinds import QwenContext, host_grid, inner


def _context(model: nn.Module) -> QwenContext:
    ctx = inner(model).__dict__.get("_mmmerge_qwen")
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched: call reduce_visual_tokens(model, keep=...) first")
    return ctx


def _keep_mask(ids: Tensor, token_id: int, runs: list, what: str) -> Tensor:
    """``[B, L]``: False for the placeholders past the reduced count of their run (runs in row-major order)."""
    m = ids == token_id
    flat = m.flatten()
    prev = torch.cat([flat.new_zeros(1), flat[:-1]])
    starts = flat & ~prev
    row_start = torch.zeros_like(m)
    row_start[:, 0] = True
    starts = starts | (flat & row_start.flatten())
    found = int(starts.sum())
    if found != len(runs):
        raise ValueError(f"input_ids hold {found} runs of {what} placeholders, the {what}_grid_thw given make "
                         f"{len(runs)}; pass the grids of this batch")
    if not runs:
        return torch.ones_like(m)
    run_id = (starts.long().cumsum(0) - 1).clamp_min(0)
    pos = torch.arange(flat.shape[0], device=ids.device)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(0).values
    in_run = pos - first
    full = torch.tensor([r[0] for r in runs], device=ids.device)
    reduced = torch.tensor([r[1] for r in runs], device=ids.device)
    length = torch.zeros(len(runs), dtype=torch.long, device=ids.device).index_add_(
        0, run_id[flat], torch.ones_like(run_id[flat]))
    bad = torch.nonzero(length != full).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{what} run {i} holds {int(length[i])} placeholders, not the {int(full[i])} an unreduced "
                         f"{what} of this grid has; compact_image_tokens expects inputs from the unpatched processor "
                         "(already compacted inputs need no rewrite)")
    return (~flat | (in_run < reduced[run_id])).view_as(ids)


def compact_image_tokens(input_ids: Tensor, attention_mask: Optional[Tensor], model: nn.Module,
                         image_grid_thw: Any = None, video_grid_thw: Any = None, pad_token_id: Optional[int] = None,
                         mm_token_type_ids: Optional[Tensor] = None
                         ) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Rewrite inputs expanded for the unpatched model so every image (video) has its reduced placeholder count.

    Of every placeholder run the first ``count`` remain (the LM fills them in order, and the positions come from
    the grids, so only the count matters). Rows are re-padded on the side the input was padded on (left if any
    row starts with padding).

    Args:
        input_ids: ``[B, L]`` long, from the unpatched processor. attention_mask: ``[B, L]`` or None.
        model: a model patched by ``reduce_visual_tokens``. image_grid_thw / video_grid_thw: ``[items, 3]``, the
            grids of this batch (from the processor). pad_token_id: id for new padding (default: the model's).
        mm_token_type_ids: ``[B, L]`` (Qwen-VL needs them with pixels); compacted with the tokens when given.
    Returns:
        ``(input_ids [B, L'], attention_mask [B, L'])``, plus ``mm_token_type_ids [B, L']`` when given. Host syncs
        (L' is data dependent): call it once per batch, outside the model's forward.
    """
    ctx = _context(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, t in (("attention_mask", attention_mask), ("mm_token_type_ids", mm_token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()
    kept = real
    for token_id, grid, video, what in ((ctx.image_token_id, image_grid_thw, False, "image"),
                                        (ctx.video_token_id, video_grid_thw, True, "video")):
        runs = [run for item in ctx.items(host_grid(grid), video) for run in item.runs]
        if runs or bool((input_ids == token_id).any()):
            kept = kept & _keep_mask(input_ids, token_id, runs, what)
    counts = kept.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    left = bool((~real[:, 0]).any()) and bool(real[:, -1].all())
    B, L = input_ids.shape
    rank = kept.long().cumsum(1) - 1
    slot = rank + (width - counts).unsqueeze(1) if left else rank
    if pad_token_id is None:
        cfg = inner(model).config
        pad_token_id = getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    dest = torch.where(kept, slot, torch.full_like(slot, width))  # dropped tokens go to a spare column
    out = []
    for values, fill in ((input_ids, pad_token_id), (attention_mask, 0), (mm_token_type_ids, 0)):
        if values is None:
            continue
        new = values.new_full((B, width + 1), fill)
        new.scatter_(1, dest, torch.ones_like(values) if values is attention_mask else values)
        out.append(new[:, :width].contiguous())
    return tuple(out)


# ------------------------------------------------------------------------------------------- processors
def check_processor(processor: Any, model: nn.Module, ctx: QwenContext) -> None:
    cfg = inner(model).config
    names = [c.__name__ for c in type(processor).__mro__]
    if ctx.kind.processor not in names:
        raise TypeError(f"processor is a {type(processor).__name__}, but a {type(model).__name__} needs a "
                        f"{ctx.kind.processor}")
    problems = []
    for attr, model_id in (("image_token_id", cfg.image_token_id), ("video_token_id", cfg.video_token_id)):
        if getattr(processor, attr, model_id) != model_id:
            problems.append(f"{attr} {getattr(processor, attr)} vs the model's {model_id}")
    vcfg = cfg.vision_config
    for sub in ("image_processor", "video_processor"):
        p = getattr(processor, sub, None)
        for attr, model_value in (("merge_size", vcfg.spatial_merge_size), ("patch_size", vcfg.patch_size),
                                  ("temporal_patch_size", vcfg.temporal_patch_size)):
            value = getattr(p, attr, None)
            if value is not None and value != model_value:
                problems.append(f"{sub}.{attr} {value} vs the tower's {model_value}")
    if problems:
        raise ValueError("processor does not match the model: " + "; ".join(problems) +
                         ". Load the processor saved with this model (AutoProcessor.from_pretrained(same path))")
    for attr in ("replace_image_token", "replace_video_token"):
        if not hasattr(type(processor), attr):
            raise TypeError(f"{type(processor).__name__} has no {attr} (this transformers version expands tokens "
                            "differently); use compact_image_tokens on its output instead")


def _grid(inputs: dict, key: str, idx: int) -> list:
    g = inputs[key][idx]
    return [int(v) for v in (g.tolist() if hasattr(g, "tolist") else g)]


def patch_processor(processor: Any, ctx: QwenContext) -> Callable[[], None]:
    """Make the processor expand each image / video placeholder to its reduced count (and undo it)."""
    cls = type(processor)

    def replace_image(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        item = ctx.item(_grid(image_inputs, "image_grid_thw", image_idx), False)
        return self.image_token * item.kept

    def replace_video(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        item = ctx.item(_grid(video_inputs, "video_grid_thw", video_idx), True)
        text = cls.replace_video_token(self, video_inputs, video_idx, **kwargs)
        full = self.video_token * item.runs[0][0]
        if text.count(full) != len(item.runs) or text.count(self.video_token) != item.tokens:
            raise ValueError(f"the processor expands this video to {text.count(self.video_token)} placeholders in "
                             f"{text.count(full)} runs, the model makes {item.tokens} in {len(item.runs)}: "
                             "processor and model settings differ")
        pattern = re.escape(full) + r"(?!" + re.escape(self.video_token) + ")"
        return re.sub(pattern, lambda _: self.video_token * item.runs[0][1], text)

    replacements: Dict[str, Callable] = {"replace_image_token": replace_image, "replace_video_token": replace_video}
    return replace_processor_methods(processor, replacements)


def unpatch_processor(processor: Any) -> None:
    for attr in ("replace_image_token", "replace_video_token"):
        processor.__dict__.pop(attr, None)
