"""M-RoPE positions of a reduced prompt: every kept token keeps the position the unreduced model gave it.

Qwen-VL places each visual token at 3D rotary positions (time, row, col) from ``image_grid_thw`` /
``video_grid_thw`` and continues the text after an item from where the item's grid ends. The model computes
them in ``get_rope_index`` (from ``input_ids``, ``mm_token_type_ids``, the grids and the attention mask), which
both ``compute_3d_position_ids`` (in ``forward``) and ``_prepare_position_ids_for_generation`` (``generate``)
call. That is the hook: the inner model's ``get_rope_index`` is replaced (an instance attribute) by
``reduced_rope_index``, which

1. expands the reduced prompt back to the layout the unpatched processor would have made (each placeholder run
   of K tokens becomes its full F: host arithmetic on the token types, which the model reads on the host
   anyway),
2. calls the model's own ``get_rope_index`` on that layout (so Qwen2-VL, Qwen2.5-VL's ``second_per_grid_ts``
   and Qwen3-VL's per-frame timestamps all keep their own rules, in every transformers version), and
3. gathers, for every token of the reduced prompt, the position of its original token: text 1:1, each visual
   token at the grid cell the reduction placed it at (``kept``: its own cell for a token kept as it is, the
   member nearest the weighted centre of its group for a merged one, ``reduction.py``; on the device: a gather,
   no host read). ``rope_deltas`` grow by the tokens removed from each row, so decoding continues where the unreduced
   model would.

Where ``kept`` comes from: the reduction of this very call. ``forward`` of a reduced model (``features.py``) runs
the vision step first, holds its result for the call (a per-thread frame, dropped when the call returns) and
lets the model's own forward continue; ``get_rope_index`` reads ``kept`` from that frame. Before the vision step
(``generate`` prepares positions before it encodes the pixels) the visual positions are not known yet: they
are filled with the last K cells of each run (a prompt that ends on an image then still ends where it would
have, which is where decoding continues from), and ``forward`` replaces the three M-RoPE rows of the position
ids it is given for a call with pixels (text positions and ``rope_deltas`` never depend on which tokens are kept).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .kinds import Item, QwenContext, host_grid


@dataclass
class Expansion:
    """A reduced prompt ``[B, L]`` and its unreduced layout ``[B, L_full]`` (host tensors)."""

    ids: Tensor  # [B, L_full] the unreduced input_ids
    types: Tensor  # [B, L_full] mm_token_type_ids of the unreduced layout
    mask: Tensor  # [B, L_full] attention mask of the unreduced layout
    column: Tensor  # [B, L] full column of each reduced token (visual tokens: their run's full start - first)
    visual: Tensor  # [B, L] bool: visual tokens (their column still needs the token's original index)
    offset: Tensor  # [B, L] stand-in for ``kept``: the last K cells of each run (exact for an item kept whole)
    removed: Tensor  # [B] tokens removed from each row


def _runs(types: Tensor, real: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Runs of equal nonzero type: ``(visual [B, L], start [B, L], position in run [B, L])``."""
    visual = (types > 0) & real
    prev = F.pad(types[:, :-1], (1, 0), value=-1)
    prev_visual = F.pad(visual[:, :-1], (1, 0), value=False)
    start = visual & ~(prev_visual & (prev == types))
    pos = torch.arange(types.shape[1]).expand_as(types)
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return visual, start, pos - first


def expand(ids: Tensor, types: Tensor, real: Tensor, images: Sequence[Item], videos: Sequence[Item]) -> Expansion:
    """The unreduced layout of a reduced prompt (host tensors ``[B, L]``; vectorised, no loop over tokens).

    Raises ValueError if the placeholder runs do not match the reduced counts of these items.
    """
    B, L = ids.shape
    visual, start, in_run = _runs(types, real)
    width = torch.ones(B, L, dtype=torch.long)
    base = torch.zeros(B, L, dtype=torch.long)  # first original index of the token's run in its item
    skip = torch.zeros(B, L, dtype=torch.long)  # tokens the reduction removed from the token's run
    for code, items, what in ((1, images, "image"), (2, videos, "video")):
        runs = [run for item in items for run in item.runs]
        is_start = (start & (types == code)).flatten()
        found = int(is_start.sum())
        if found != len(runs):
            raise ValueError(f"input_ids hold {found} runs of {what} placeholders, the {what}_grid_thw of this call "
                             f"make {len(runs)}; pass the grids of this batch")
        if not runs:
            continue
        run_id = (is_start.long().cumsum(0) - 1).view(B, L)
        mine = visual & (types == code)
        full = torch.tensor([r[0] for r in runs])
        reduced = torch.tensor([r[1] for r in runs])
        first = torch.tensor([r[2] for r in runs])
        rid = run_id.clamp_min(0)
        length = torch.zeros(len(runs), dtype=torch.long).index_add_(0, rid[mine], torch.ones_like(rid[mine]))
        bad = torch.nonzero(length != reduced).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{what} placeholder run {i} holds {int(length[i])} tokens, the reduced {what} needs "
                             f"{int(reduced[i])} (of {int(full[i])} unreduced): the processor or input_ids were made "
                             "for another keep; pass processor= to reduce_visual_tokens or rewrite input_ids with "
                             "compact_image_tokens")
        last = mine & (in_run == reduced[rid] - 1)
        width = torch.where(last, width + (full - reduced)[rid], width)
        base = torch.where(mine, first[rid], base)
        skip = torch.where(mine, (full - reduced)[rid], skip)
    column = width.cumsum(1) - width  # full column of each token (of the first copy)
    run_start = column - in_run  # for visual tokens: the full column of their run's start
    column = torch.where(visual, run_start - base, column)
    # Stand-in cells before the reduction ran (generate prepares positions first): a run's last K cells, so a
    # prompt that ends on an image still ends at the unreduced position its decoding continues from.
    offset = torch.where(visual, base + skip + in_run, torch.zeros_like(column))
    total = width.sum(1)
    L_full = int(total.max())
    reps = width.flatten()
    row = torch.arange(B).repeat_interleave(L).repeat_interleave(reps)
    copy = torch.arange(int(reps.sum())) - (reps.cumsum(0) - reps).repeat_interleave(reps)
    dest = (width.cumsum(1) - width).flatten().repeat_interleave(reps) + copy
    full = {}
    for name, values, fill in (("ids", ids, 0), ("types", types, 0), ("mask", real.long(), 0)):
        t = torch.full((B, L_full), fill, dtype=values.dtype)
        t[row, dest] = values.flatten().repeat_interleave(reps)
        full[name] = t
    return Expansion(full["ids"], full["types"], full["mask"], column, visual, offset, total - L)


def reduced_rope_index(lm: Any, original: Callable, input_ids: Tensor, mm_token_type_ids: Optional[Tensor] = None,
                       image_grid_thw: Optional[Tensor] = None, video_grid_thw: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """Replacement of ``get_rope_index``: ``(position_ids [3, B, L], rope_deltas [B, 1])`` of a reduced prompt,
    each token at the position the unreduced model gives its grid cell (module docstring)."""
    from .features import context_of, frame_of  # the frame of this call, if the vision step ran in it

    ctx: QwenContext = context_of(lm)
    frame = frame_of(lm)
    if frame is not None:  # generate() pops the grids after encoding: the frame has them
        image_grid_thw = frame.image_grid if image_grid_thw is None else image_grid_thw
        video_grid_thw = frame.video_grid if video_grid_thw is None else video_grid_thw
    images = ctx.items(host_grid(image_grid_thw), False)
    videos = ctx.items(host_grid(video_grid_thw), True)
    call = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **kwargs)
    if all(i.kept == i.tokens for i in images + videos):  # nothing reduced: the model's own, bit for bit
        return original(input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **call)
    device = input_ids.device
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == ctx.image_token_id).long() + 2 * (input_ids == ctx.video_token_id).long()
    ids_h, types_h = host_copy(input_ids), host_copy(mm_token_type_ids).long()
    real_h = torch.ones_like(ids_h, dtype=torch.bool) if attention_mask is None else host_copy(attention_mask).bool()
    ex = expand(ids_h, types_h, real_h, images, videos)
    named = inspect.signature(original).parameters  # only what the model's own call names: generate() hands
    host = {k: (v.cpu() if isinstance(v, Tensor) else v)  # it every model input (pixels stay where they are)
            for k, v in call.items() if k in named and named[k].kind is not inspect.Parameter.VAR_KEYWORD}
    full_pos, full_delta = original(ex.ids, mm_token_type_ids=ex.types.to(mm_token_type_ids.dtype),
                                    attention_mask=ex.mask, **host)
    column = to_dev(ex.column, device)
    visual = to_dev(ex.visual, device)
    kept = to_dev(ex.offset, device)  # stand-in cells: exact for an item kept whole
    if frame is not None and frame.kept_for(images, videos):
        for code, values in ((1, frame.image_kept), (2, frame.video_kept)):
            if values is not None:
                kept = kept.masked_scatter(visual & (mm_token_type_ids.to(device) == code), values)
    column = torch.where(visual, column + kept, column)
    positions = to_dev(full_pos, device).gather(2, column.unsqueeze(0).expand(3, -1, -1))
    if attention_mask is not None:
        positions = positions.masked_fill(~attention_mask.to(device).bool().unsqueeze(0), 0)
    deltas = to_dev(full_delta.cpu() + ex.removed.unsqueeze(1), device)
    return positions.to(input_ids.dtype), deltas


def host_copy(t: Tensor) -> Tensor:
    """The one host read of the positions: the prompt's ids, token types and mask (the model's own
    ``get_rope_index`` reads the same tensors on the host, row by row)."""
    return t.cpu()


def to_dev(t: Tensor, device: torch.device) -> Tensor:
    from .reduction import to_device
    return to_device(t, device) if t.device != device else t
