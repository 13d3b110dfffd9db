"""The reduced model's calls: ``get_image_features`` / ``get_video_features`` and ``forward`` of the inner model.

``get_image_features`` / ``get_video_features`` (replacements, instance attributes): the model's own call, then
each item's tokens reduced (``reduction.py``); the output carries ``mmmerge_kept`` (``[sum K_i]`` long, the
index inside its item of the grid cell each output token sits at, ``reduction.py``) and ``mmmerge_items``: per
item's ``pooler_output`` tensor (by identity), its grid row and cells. The positions read both through the items,
so they follow the outputs when ``generate`` regroups them (beam search repeats each prompt's items).

``forward`` (replacement): for a call with pixels (or with encoder outputs that ``generate`` made), it opens a
``Frame`` for the call in this thread, runs the vision step, computes the M-RoPE positions of the reduced prompt
(``positions.py``; the text row of a 4-row ``generate`` position tensor is kept) and sets ``rope_deltas`` as the
model's own ``compute_3d_position_ids`` does, then calls the model's own forward with those positions. The
vision step is not repeated: inside that forward the feature calls return the frame's outputs for the same
pixel tensors. The frame also holds the prompt, cdpruner's query. It is dropped when the call returns, so
nothing outlives a call and threads never see each other's frames.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .kinds import Item, QwenContext, host_grid
from .reduction import reduce_items, to_device

_CALL = threading.local()  # per thread: the stack of open frames


@dataclass(eq=False)
class Frame:
    """One call of one reduced model in this thread."""

    lm: nn.Module
    prompt: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # (input_ids, attention_mask): cdpruner's query
    image_pixels: Optional[Tensor] = None
    image_out: Any = None
    video_pixels: Optional[Tensor] = None
    video_out: Any = None

    @property
    def image_grid(self) -> Optional[Tensor]:
        return _grid_of(self.image_out)

    @property
    def video_grid(self) -> Optional[Tensor]:
        return _grid_of(self.video_out)

    @property
    def image_kept(self) -> Optional[Tensor]:
        return _cells_of(self.image_out)

    @property
    def video_kept(self) -> Optional[Tensor]:
        return _cells_of(self.video_out)

    def kept_for(self, images: Sequence[Item], videos: Sequence[Item]) -> bool:
        """The frame's reductions are those of these items (so their ``kept`` fill the placeholders)."""
        for kept, items in ((self.image_kept, images), (self.video_kept, videos)):
            reduced = any(i.kept != i.tokens for i in items)
            if reduced and (kept is None or kept.shape[0] != sum(i.kept for i in items)):
                return False
        return self.image_kept is not None or self.video_kept is not None


def _items_of(out: Any) -> Optional[List[Tuple[Tensor, List[int], Optional[Tensor]]]]:
    """Per item of a (possibly regrouped) feature output: ``(tokens, grid row, cells or None)``."""
    table = getattr(out, "mmmerge_items", None)
    if table is None:
        return None
    return [table[id(t)][1:] for t in out.pooler_output]


def _grid_of(out: Any) -> Optional[Tensor]:
    items = _items_of(out)
    return None if not items else torch.tensor([grid for grid, _ in items])


def _cells_of(out: Any) -> Optional[Tensor]:
    items = _items_of(out)
    if not items or all(cells is None for _, cells in items):
        return None
    return torch.cat([cells for _, cells in items])


def frame_of(lm: nn.Module) -> Optional[Frame]:
    """The innermost open frame of ``lm`` in this thread, or None."""
    for frame in reversed(getattr(_CALL, "frames", ())):
        if frame.lm is lm:
            return frame
    return None


def _push(frame: Frame) -> None:
    _CALL.__dict__.setdefault("frames", []).append(frame)


def _pop(frame: Frame) -> None:
    frames = getattr(_CALL, "frames", [])
    if frames and frames[-1] is frame:
        frames.pop()


def context_of(lm: nn.Module) -> QwenContext:
    ctx = lm.__dict__.get("_mmmerge_qwen")
    if ctx is None:  # only reachable if the patch's attributes were removed by hand
        raise RuntimeError(f"{type(lm).__name__} has a reduced method but no mmmerge context; call "
                           "restore_visual_tokens(model) and patch again")
    return ctx


# --------------------------------------------------------------------------------------- feature calls
def _queries(ctx: QwenContext, lm: nn.Module, items: Sequence[Item], video: bool, frame: Optional[Frame]
             ) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """cdpruner's query: ``(text embeddings [B, L, C], text mask [B, L], prompt row of each item [items])``: the
    row of an item is the row of its first placeholder in the batch read row by row (no host sync)."""
    if ctx.method != "cdpruner" or frame is None or frame.prompt is None or frame.prompt[0] is None:
        return None
    ids, attention_mask = frame.prompt
    token = ctx.video_token_id if video else ctx.image_token_id
    key = ("counts", tuple(i.kept for i in items), str(ids.device))
    counts = ctx.plans.get(key)
    if counts is None:  # host arithmetic, once per layout (the memo of reduction.plan)
        counts = ctx.plans[key] = to_device(torch.tensor([i.kept for i in items]), ids.device)
    row_end = (ids == token).sum(1).cumsum(0)  # [B] placeholders up to the end of each row
    rows = torch.searchsorted(row_end, counts.cumsum(0) - counts, right=True).clamp_max(ids.shape[0] - 1)
    text = (ids != ctx.image_token_id) & (ids != ctx.video_token_id)
    if attention_mask is not None:
        text = text & attention_mask.bool()
    return lm.get_input_embeddings()(ids), text, rows


def _features(lm: nn.Module, original: Callable, pixels: Tensor, grid: Any, video: bool, kwargs: dict) -> Any:
    ctx = context_of(lm)
    frame = frame_of(lm)
    return_dict = kwargs.pop("return_dict", True)
    cached = None if frame is None else (frame.video_out if video else frame.image_out)
    if cached is not None and (frame.video_pixels if video else frame.image_pixels) is pixels:
        return cached if return_dict else cached.to_tuple()
    out = original(pixels, grid, return_dict=True, **kwargs)
    items = ctx.items(host_grid(grid), video)
    ctx.record(items)
    if any(i.kept != i.tokens for i in items):
        layers = list(out.deepstack_features) if ctx.kind.deepstack and out.deepstack_features else []
        sizes = [i.tokens for i in items]  # transformers 5.17 hands deepstack features unsplit: [sum F_i, C]
        extras = [f.split(sizes) if isinstance(f, torch.Tensor) else list(f) for f in layers]
        main, extra_out, kept = reduce_items(ctx, list(out.pooler_output), extras, items, video,
                                             _queries(ctx, lm, items, video, frame))
        out.pooler_output = tuple(main)
        if layers:
            out.deepstack_features = [torch.cat(e) if isinstance(f, torch.Tensor) else tuple(e)
                                      for f, e in zip(layers, extra_out)]
        out.mmmerge_kept = kept
    split = out.mmmerge_kept.split([i.kept for i in items]) if hasattr(out, "mmmerge_kept") else [None] * len(items)
    rows = host_grid(grid) or []
    out.mmmerge_items = {id(t): (t, row, cells) for t, row, cells in zip(out.pooler_output, rows, split)}
    return out if return_dict else out.to_tuple()


def image_features(lm: nn.Module, original: Callable, pixel_values: Tensor, image_grid_thw: Any = None,
                   **kwargs: Any) -> Any:
    """Replacement of ``get_image_features``: the model's own call, each image reduced to its budget."""
    return _features(lm, original, pixel_values, image_grid_thw, False, kwargs)


def video_features(lm: nn.Module, original: Callable, pixel_values_videos: Tensor, video_grid_thw: Any = None,
                   **kwargs: Any) -> Any:
    """Replacement of ``get_video_features``: the model's own call, each video reduced (time modes apply).
    Where the model's own video call goes through ``get_image_features`` (Qwen3-VL), the class's image call is
    the one run, so a video is reduced once, as a video."""
    own = getattr(original, "func", getattr(original, "__func__", None))  # Replacement.original: a partial
    if context_of(lm).kind.video_via_image and own is type(lm).get_video_features:
        image = lm.__dict__.get("get_image_features")
        original = getattr(image, "original", None) or functools.partial(type(lm).get_image_features, lm)
    return _features(lm, original, pixel_values_videos, video_grid_thw, True, kwargs)


# -------------------------------------------------------------------------------------------- forward
_NAMED = ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_values_videos", "image_grid_thw",
          "video_grid_thw", "mm_token_type_ids", "mm_encoder_outputs", "past_key_values", "cache",
          "inputs_embeds", "use_cache", "second_per_grid_ts", "cache_position")


def _cached_length(cache: Any) -> int:
    return 0 if cache is None or not hasattr(cache, "get_seq_length") else int(cache.get_seq_length())


def forward(lm: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Replacement of the inner model's ``forward`` (see the module docstring)."""
    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    call = dict(bound.arguments)
    extra = call.pop("kwargs", {}) if "kwargs" in call and isinstance(call.get("kwargs"), dict) else {}
    call.update(extra)
    ids = call.get("input_ids")
    pixels, videos = call.get("pixel_values"), call.get("pixel_values_videos")
    encoded = call.get("mm_encoder_outputs") or {}
    cache = call.get("cache", call.get("past_key_values"))
    if (pixels is None and videos is None and not encoded) or _cached_length(cache) > 0:
        return original(*args, **kwargs)
    if ids is None:
        raise ValueError("a reduced Qwen-VL model computes the positions of the kept visual tokens from input_ids: "
                         "pass input_ids (not inputs_embeds) with pixel_values / pixel_values_videos")
    frame = Frame(lm, prompt=(ids, call.get("attention_mask")))
    _push(frame)
    try:
        passthrough = {k: v for k, v in call.items() if k not in _NAMED}
        if pixels is not None:
            frame.image_pixels = pixels
            frame.image_out = lm.get_image_features(pixels, call.get("image_grid_thw"), return_dict=True,
                                                    **passthrough)
        elif encoded.get("image") is not None:
            frame.image_out = encoded["image"]
        if videos is not None:
            frame.video_pixels = videos
            frame.video_out = lm.get_video_features(videos, call.get("video_grid_thw"), return_dict=True,
                                                    **passthrough)
        elif encoded.get("video") is not None:
            frame.video_out = encoded["video"]
        rope = {"second_per_grid_ts": call["second_per_grid_ts"]} if call.get("second_per_grid_ts") is not None \
            else {}
        positions, deltas = lm.get_rope_index(ids, mm_token_type_ids=call.get("mm_token_type_ids"),
                                              image_grid_thw=call.get("image_grid_thw"),
                                              video_grid_thw=call.get("video_grid_thw"),
                                              attention_mask=call.get("attention_mask"), **rope)
        given = call.get("position_ids")
        if given is not None and given.dim() == 3 and given.shape[0] == 4:  # generate's [text; t, h, w]
            positions = torch.cat([given[:1], positions.to(given.dtype)], 0)
        lm.rope_deltas = deltas  # as the model's own compute_3d_position_ids does
        bound.arguments["position_ids"] = positions
        return original(*bound.args, **bound.kwargs)
    finally:
        _pop(frame)


def generate_with_prompt(model: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Replacement of ``generate`` (cdpruner only): hold the prompt for the call, so the vision step that
    ``generate`` runs before its first forward (transformers >= 5.24) gets its query too."""
    from .kinds import inner
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    frame = Frame(inner(model), prompt=(ids, kwargs.get("attention_mask")) if isinstance(ids, Tensor) else None)
    _push(frame)
    try:
        return original(*args, **kwargs)
    finally:
        _pop(frame)
