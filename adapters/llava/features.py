"""The replacements of the model's own ``get_image_features`` / ``get_video_features``: the original call,
then the reduction of its output (LLaVA-1.5 images, anyres images, videos), and the pre_projector hooks."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmmerge.constraints import parse_constraint
from mmmerge.info import MergeInfo
from mmmerge.state import TokenState, init_state

from .anyres import _aspect, _cropped, _host_sizes, _pack, ragged_plan, reduced_length
from .context import CALL, LlavaContext, _context_of, _record
from .kinds import SCORED, _feature_index, _resolve_keep
from .query import item_queries
from .reduction import _hidden_request, keys_and_scores, reduce_ragged, reduce_rows


# ------------------------------------------------------------------------------- LLaVA-1.5 image wrapper
@dataclass(eq=False)
class _PreProjectorCall:
    """One pre_projector call of one model, in this thread: the tower hook hands over its hidden states, the
    projector hook reduces the projector's input with them."""

    lm: nn.Module
    ctx: LlavaContext
    hidden_states: Optional[Sequence[Tensor]] = None
    state: Optional[TokenState] = None


def _tower_output_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on the vision tower (registered once, at patch time, for where='pre_projector'): during a
    pre_projector call of this model in this thread, keep the tower's hidden states for the projector hook."""
    call = getattr(CALL, "pre_projector", None)
    if call is not None and call.lm.vision_tower is module:
        call.hidden_states = output.hidden_states


def _projector_input_hook(module: nn.Module, args: Tuple[Tensor, ...]) -> Optional[Tuple[Tensor, ...]]:
    """Forward pre-hook on the projector (registered once, at patch time, for where='pre_projector'): during a
    pre_projector call of this model in this thread, reduce its input ``[images, N, C_vision]`` to ``keep``."""
    call = getattr(CALL, "pre_projector", None)
    if call is None or call.lm.multi_modal_projector is not module or call.hidden_states is None or not args:
        return None
    ctx, layout = call.ctx, call.ctx.layout
    x = args[0]
    keys, score = keys_and_scores(call.lm, layout, call.hidden_states, ctx.method in SCORED)
    d = layout.drop
    y, call.state = reduce_rows(ctx, x, keys[:, d:], None if score is None else score[:, d:], ctx.keep_tokens,
                            layout.protected)
    call.hidden_states = None  # one projector call per image batch
    return (y,) + tuple(args[1:])


def _image_features(lm: nn.Module, original: Callable, pixel_values: Tensor, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaModel.get_image_features``: the original call, with ``keep`` tokens per image.

    ``post_projector``: the projected ``pooler_output`` (images x ``[N, C_text]``) is reduced.
    ``pre_projector``: the projector's input ``[images, N, C_vision]`` is reduced by the projector hook, which
    this call arms for its own thread only.
    """
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    if kwargs.get("image_sizes") is not None:
        raise ValueError("mmmerge.llava: image_sizes (variable-resolution towers) is not supported for LLaVA-1.5")
    return_dict = kwargs.pop("return_dict", True)
    keep, layout = ctx.keep_tokens, ctx.layout
    N = layout.num_features
    info = MergeInfo(schedule=[N - keep], tokens_per_layer=[N, keep])
    call = functools.partial(original, pixel_values, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if keep == N:
        out = call(**kwargs)
    elif ctx.where == "pre_projector":
        slot, outer = _PreProjectorCall(lm, ctx), getattr(CALL, "pre_projector", None)
        CALL.pre_projector = slot
        try:
            out = call(**_hidden_request(ctx, kwargs))
        finally:
            CALL.pre_projector = outer
        if slot.state is None:
            raise RuntimeError("mmmerge.llava: the projector did not run on the tower's features in this call; "
                               "this transformers version computes image features differently, please report it")
        info.state = slot.state
    else:
        out = call(**_hidden_request(ctx, kwargs))
        keys, score = keys_and_scores(lm, layout, out.hidden_states, ctx.method in SCORED)
        d = layout.drop
        x = torch.stack(list(out.pooler_output))
        query = item_queries(ctx, lm, lm.config.image_token_id, torch.full((x.shape[0],), keep, device=x.device))
        y, info.state = reduce_rows(ctx, x, keys[:, d:], None if score is None else score[:, d:], keep,
                                layout.protected, query=query)
        out.pooler_output = list(y)
    _record(ctx, info)
    return out if return_dict else out.to_tuple()


def _check_call(ctx: LlavaContext, layer, strategy) -> None:
    """The token layout was fixed at patch time; a call overriding it would break the counts."""
    layout = ctx.layout
    if strategy is not None and strategy != layout.strategy:
        raise ValueError(f"mmmerge.llava was set up for vision_feature_select_strategy='{layout.strategy}', this "
                         f"call asks for '{strategy}'; re-run reduce_visual_tokens after changing the config")
    if layer is not None:
        given = (layer,) if isinstance(layer, int) else tuple(layer)
        if tuple(_feature_index(g, layout.num_layers) for g in given) != layout.feature_layers:
            raise ValueError(f"mmmerge.llava was set up for vision_feature_layer={layout.feature_layers} (as "
                             f"hidden_states indices); this call asks for {layer}: re-run reduce_visual_tokens")


def _anyres_image_features(lm: nn.Module, original: Callable, pixel_values: Tensor,
                           image_sizes: Optional[Tensor] = None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaNextModel`` / ``LlavaOnevisionModel.get_image_features``: each image's packed tokens
    (base view, crops, newlines) are reduced to its budget (see the module docstring); newlines stay."""
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", True)
    sizes = _host_sizes(image_sizes)
    cropped = _cropped(sizes, kwargs.get("batch_num_images"))
    aspect = _aspect(lm, kwargs.get("vision_aspect_ratio"))
    images = [ctx.image_layout(lm, s, c, aspect) for s, c in zip(sizes, cropped)]  # host bookkeeping, cached
    host_sizes = [list(s) for s in sizes]  # the model reads them per image: hand it host values
    call = functools.partial(original, pixel_values, host_sizes, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if all(reduced_length(ctx.keep, image) == image.length for image in images):
        _record(ctx, MergeInfo(schedule=[0], tokens_per_layer=[sum(i.length for i in images)] * 2,
                               items=[(i.length, i.length) for i in images]))
        out = call(**kwargs)
        return out if return_dict else out.to_tuple()
    out = call(**_hidden_request(ctx, kwargs))
    tiles = [i.tiles for i in images]
    keys, score = keys_and_scores(lm, ctx.layout, out.hidden_states, ctx.method in SCORED)
    tokens = torch.cat(list(out.pooler_output))  # [L, C]: every image's packed tokens
    if tokens.shape[0] != sum(i.length for i in images) or keys.shape[0] != sum(tiles):
        raise RuntimeError(f"mmmerge.llava: the model packed {tokens.shape[0]} tokens from {keys.shape[0]} tiles, the "
                           f"layouts say {[i.length for i in images]} from {tiles}; this transformers version packs "
                           "anyres images differently")
    d = ctx.layout.drop
    keys = keys[:, d:]
    score = None if score is None else score[:, d:]
    plan = ragged_plan(ctx, images, keys.device)
    if plan.origin is not None:  # metric and score of the tower token behind each packed position
        metric = keys.flatten(0, 1)[plan.origin]
        score = None if score is None else score.flatten()[plan.origin]
    else:  # a resampled grid: pack them with the model's own code (its loop over images), as the features
        extras = keys.float() if score is None else torch.cat([keys.float(), score[..., None]], -1)
        packed = torch.cat(_pack(lm, extras.split(tiles), torch.tensor(sizes), extras.new_zeros(extras.shape[-1]),
                                 ctx.layout.strategy, aspect))
        width = keys.shape[-1]
        metric, score = packed[:, :width].to(keys.dtype), None if score is None else packed[:, width]
    query = item_queries(ctx, lm, lm.config.image_token_id, plan.counts_out)
    y, state = reduce_ragged(ctx, tokens, metric, score, plan, query)
    total_in = sum(i.length for i in images)
    _record(ctx, MergeInfo(schedule=[total_in - y.shape[0]], tokens_per_layer=[total_in, y.shape[0]], state=state,
                           items=plan.items))
    out.pooler_output = list(y.split(plan.lengths_out))
    return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------------------- video wrapper
def _video_tokens(ctx: LlavaContext, lm: nn.Module) -> int:
    """Pooled tokens per frame: NeXT-Video's ``spatial_pool_stride`` pooling, OneVision's 2x bilinear one."""
    rows, cols = ctx.layout.rows, ctx.layout.cols
    if ctx.kind.name == "llava_onevision":
        return math.ceil(rows / 2) * math.ceil(cols / 2)
    stride = lm.config.spatial_pool_stride
    return (rows // stride) * (cols // stride)


def _video_keep(ctx: LlavaContext, frames: int, per_frame: int) -> int:
    available = frames * per_frame
    keep = _resolve_keep(ctx.keep, available, "video")
    if ctx.time_mode == "within_frame" and keep % frames:
        raise ValueError(f"time_mode='within_frame' keeps the same count in every frame: keep={keep} must be a "
                         f"multiple of the {frames} frames (e.g. keep={keep - keep % frames or frames})")
    if ctx.time_mode not in ("global", "within_frame") and ctx.method in SCORED and keep < frames:
        raise ValueError(f"method '{ctx.method}' with time_mode='{ctx.time_mode}' keeps each frame's best token so "
                         f"that every token has an allowed host: keep={keep} must be at least the {frames} frames")
    return keep


def _video_counts(ctx: LlavaContext, lm: nn.Module, frames: int) -> Tuple[int, int]:
    """(placeholders of one unreduced video, of one reduced video), newline included."""
    n = _video_tokens(ctx, lm)
    return frames * n + ctx.kind.video_newline, _video_keep(ctx, frames, n) + ctx.kind.video_newline


def _pool_frames(ctx: LlavaContext, lm: nn.Module, x: Tensor) -> Tensor:
    """Pool per-frame tower tokens ``[B*T, rows*cols, c]`` like the model pools its video features."""
    if ctx.kind.name == "llava_onevision":
        return lm.apply_pooling(x)  # the model's own bilinear pooling (channel-agnostic)
    stride = lm.config.spatial_pool_stride
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], ctx.layout.rows, ctx.layout.cols)
    return F.avg_pool2d(grid, stride).flatten(2).transpose(1, 2)


def _video_features(lm: nn.Module, original: Callable, pixel_values_videos: Tensor, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``get_video_features`` (NeXT-Video, OneVision): ``keep`` tokens per video.

    The projected, pooled features ``[videos, frames * n, C]`` are reduced to ``[videos, keep, C]`` (OneVision's
    trailing newline token stays). Metric: the feature layer's keys, pooled like the features; score: [CLS]
    attention (CLIP) or the mean attention received (SigLIP), pooled likewise. ``within_frame`` reduces every
    frame to ``keep / frames`` on its own; ``adjacent``, ``window`` and ``global`` merge across frames under the
    matching constraint (frame spans stay contiguous).
    """
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", True)
    B, T = pixel_values_videos.shape[:2]
    n = _video_tokens(ctx, lm)
    keep = _video_keep(ctx, T, n)
    info = MergeInfo(schedule=[T * n - keep], tokens_per_layer=[T * n, keep])
    call = functools.partial(original, pixel_values_videos, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if keep == T * n:
        _record(ctx, info)
        out = call(**kwargs)
        return out if return_dict else out.to_tuple()
    out = call(**_hidden_request(ctx, kwargs))
    keys, score = keys_and_scores(lm, ctx.layout, out.hidden_states, ctx.method in SCORED)
    pooled = out.pooler_output
    split = isinstance(pooled, (tuple, list))  # transformers 5.17: one [T, n, C] tensor per video
    x = torch.stack(list(pooled)).flatten(1, 2) if split else pooled
    newline = x[:, T * n:]  # OneVision (transformers >= 5.24) appends one newline per video
    x = x[:, : T * n]
    d = ctx.layout.drop
    metric = _pool_frames(ctx, lm, keys[:, d:])  # [B*T, n, c]
    if score is not None:
        score = _pool_frames(ctx, lm, score[:, d:, None])[..., 0]  # [B*T, n]
    query = item_queries(ctx, lm, lm.config.video_token_id,
                          torch.full((B,), keep + newline.shape[1], device=x.device))
    if ctx.time_mode == "within_frame":
        query = None if query is None else tuple(q.repeat_interleave(T, dim=0) for q in query)  # per frame
        y, state = reduce_rows(ctx, x.reshape(B * T, n, -1), metric, score, keep // T, 0, query=query)
        y = y.reshape(B, keep, -1)
        # Per-frame states back to one [B, T * n] source map over the whole video.
        offsets = (torch.arange(T, device=x.device) * (keep // T)).repeat(B).unsqueeze(1)
        state = TokenState(size=state.size.reshape(B, keep), source=(state.source + offsets).reshape(B, T * n))
    else:
        t = torch.arange(T, device=x.device, dtype=torch.float32).repeat_interleave(n)
        state = init_state(B, T * n, device=x.device, coords={"t": t, "t_min": t, "t_max": t},
                           rules={"t_min": "min", "t_max": "max"})
        y, state = reduce_rows(ctx, x, metric.reshape(B, T * n, -1),
                           None if score is None else score.reshape(B, T * n), keep, 0, state=state,
                           constraint=parse_constraint(ctx.time_mode, steps={"t": T}), query=query)
    info.state = state
    _record(ctx, info)
    y = torch.cat([y, newline], 1)
    out.pooler_output = y.unsqueeze(1).unbind(0) if split else y
    return out if return_dict else out.to_tuple()


