"""LLaVA adapter: fewer visual tokens reach the language model.

``reduce_visual_tokens(model, keep=144)`` makes a LLaVA model hand the LM ``keep`` tokens per image (per
video for LLaVA-NeXT-Video) instead of all of them (576 for LLaVA-1.5), so prefill is faster and the KV
cache smaller; ``generate()`` works as before (KV cache, left padding, several images per prompt).
LLaVA-NeXT and LLaVA-OneVision (anyres crops, newline tokens, a size-dependent count per image) are not
supported: they are rejected with a TypeError before anything changes.

Where the tokens are reduced (``where``):
    pre_llm       (default) the vision tower runs as usual; its selected features ``[images, N, C]`` are
                  reduced to ``[images, keep, C]`` with the core engine (``mmmerge.reduce_tokens``), in
                  original raster order. ``stage="post_projector"`` (default) reduces the projected tokens, so
                  a merged token is exactly the size-weighted mean of the LM inputs it replaces;
                  ``"pre_projector"`` reduces the CLIP features and projects only ``keep`` tokens. Measured
                  (benchmarks/llava.py, ViT-L/336, random weights): same speed within noise (the projector
                  is ~1% of the tower), clearly closer to keep-all after the projector (cosine of the LM's
                  last hidden state 0.93 vs 0.74 at keep=144 with tome), hence the default.
    vision_tower  ToMe/PiToMe-style merging inside the CLIP layers (the shared encoder patch), spread over
                  the layers up to the feature layer so that it outputs ``keep`` tokens.

Methods: the engine's ``tome``, ``pitome``, ``tps``, ``random``, ``prune``, and ``dominant`` (VisionZip-style:
keep the tokens with the highest [CLS] attention, merge the rest into a few contextual tokens). The [CLS]
attention and the keys used as the similarity metric are computed from the feature layer's own query/key
projections, captured by hooks: the tower keeps its attention backend (sdpa, flash), nothing is forced eager.

How it is wired: the model's own ``get_image_features`` / ``get_video_features`` is wrapped by an instance
attribute (the class is untouched); the projector gets a pre-hook only for the duration of that call.
``restore_visual_tokens`` removes every attribute and hook, so outputs are bit-identical to before.

The LM must see exactly ``keep`` placeholders per image: pass ``processor=`` and it emits that count, or
rewrite already expanded inputs with ``compact_image_tokens``. While patched, every forward checks on device
(``torch._assert_async``: no host sync on GPU) that each run of placeholders is a whole number of images.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmmerge.matchers import MATCHERS
from mmmerge.merge import merge_weighted, plan_from_targets
from mmmerge.merge import merge_state
from mmmerge.patching import register
from mmmerge.reduce import reduce_tokens
from mmmerge.schedule import TargetTokens, resolve_schedule
from mmmerge.state import TokenState, init_state

from .encoder import TokenGrid, encoder_layers, layer_parts, patch_encoder, plan_layout, unpatch_encoder
from .video import TIME_MODES


def time_constraint(time_mode: str, window: int = 1, frames: Optional[int] = None):
    """The engine constraint of a video time mode over ``frames`` frames (``window(k)`` or window=k)."""
    from mmmerge.constraints import parse_constraint, parse_time_mode

    mode, k = parse_time_mode(time_mode, TIME_MODES + ("window",) if time_mode == "window" else TIME_MODES)
    spec = f"window({window if time_mode == 'window' else k})" if mode == "window" else mode
    return parse_constraint(spec, steps=None if frames is None else {"t": frames})

IMAGE_MODELS = ("LlavaForConditionalGeneration", "LlavaModel")
VIDEO_MODELS = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
SUPPORTED = IMAGE_MODELS + VIDEO_MODELS
UNSUPPORTED_LLAVA = ("LlavaNextForConditionalGeneration", "LlavaNextModel", "LlavaOnevisionForConditionalGeneration",
                     "LlavaOnevisionModel")  # anyres: rejected with a clear TypeError
METHODS = tuple(m for m in MATCHERS if m != "none") + ("dominant",)
WHERE = ("pre_llm", "vision_tower")
STAGES = ("pre_projector", "post_projector")
KeepSpec = Union[int, float]


# ------------------------------------------------------------------------------------------------ model
def _family(model: nn.Module) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if names & set(VIDEO_MODELS):
        return "video"
    if names & set(IMAGE_MODELS):
        return "image"
    if names & set(UNSUPPORTED_LLAVA):
        raise TypeError(
            f"reduce_visual_tokens does not support {type(model).__name__} yet: its anyres crops and newline tokens "
            "give every image a different, size-dependent token count. Supported: "
            f"{', '.join(SUPPORTED)} (LLaVA-1.5 and LLaVA-NeXT-Video checkpoints)"
        )
    raise TypeError(f"reduce_visual_tokens supports {', '.join(SUPPORTED)}; got {type(model).__name__}")


def _inner(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` / ``LlavaNextVideoModel`` that owns the vision tower, projector and LM."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model


def _feature_index(layer: int, num_layers: int) -> int:
    """``hidden_states`` index (0 = embeddings, i = output of layer i-1) as a non-negative int."""
    total = num_layers + 1
    if not -total <= layer < total:
        raise ValueError(f"vision_feature_layer={layer} is out of range for a tower with {num_layers} layers")
    return layer % total


@dataclass
class Layout:
    """Token layout of one image as the vision tower sees it."""

    rows: int
    cols: int
    cls: int  # leading [CLS] tokens in the tower (1 for CLIP)
    strategy: str  # "default" drops [CLS] from the features, "full" keeps it
    feature_layers: Tuple[int, ...]  # hidden_states indices, non-negative
    num_layers: int  # layers in the tower

    @property
    def tower_tokens(self) -> int:
        return self.cls + self.rows * self.cols

    @property
    def num_features(self) -> int:
        """Feature tokens per image handed to the projector (N)."""
        return self.rows * self.cols + (self.cls if self.strategy == "full" else 0)

    @property
    def protected(self) -> int:
        """Leading feature tokens that never merge: [CLS] when the strategy keeps it."""
        return self.cls if self.strategy == "full" else 0

    @property
    def drop(self) -> int:
        """Leading tower tokens not in the features."""
        return self.cls if self.strategy == "default" else 0


def _layout(lm: nn.Module) -> Layout:
    vcfg = lm.config.vision_config
    if getattr(vcfg, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
        raise TypeError(f"vision tower '{getattr(vcfg, 'model_type', '?')}' is not supported; mmmerge knows CLIP "
                        "and SigLIP towers")
    grid = vcfg.image_size // vcfg.patch_size
    cls = 1 if vcfg.model_type == "clip_vision_model" else 0
    strategy = lm.config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy '{strategy}'")
    layers = lm.config.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    num_layers = len(_tower_layers(lm))
    return Layout(grid, grid, cls, strategy, tuple(_feature_index(i, num_layers) for i in layers), num_layers)


def _tower_layers(lm: nn.Module) -> nn.ModuleList:
    tower = lm.vision_tower
    return encoder_layers(getattr(tower, "vision_model", tower))


def _resolve_keep(keep: KeepSpec, available: int, what: str = "image") -> int:
    """``keep`` as a token count: an int as is, a float in (0, 1] as a fraction of ``available``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (tokens per {what}) or a float fraction, got {type(keep).__name__}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep}: a fraction must lie in (0, 1]")
        return max(1, round(keep * available))
    if keep < 1:
        raise ValueError(f"keep={keep}: at least one visual token per {what} must remain (keep >= 1)")
    if keep > available:
        raise ValueError(f"keep={keep} is larger than the {available} visual tokens per {what} this model makes; "
                         f"use keep <= {available} or a fraction such as keep=0.25")
    return keep


# ------------------------------------------------------------------------------------------ the context
@dataclass
class LlavaInfo:
    """What the last reduction did: ``tokens_in``/``tokens_out`` per image (per video), and the engine
    state of the reduced tokens (``size`` ``[images, keep]``, ``source`` ``[images, N]``) for unmerging."""

    tokens_in: int = 0
    tokens_out: int = 0
    state: Optional[TokenState] = None

    @property
    def size(self) -> Optional[Tensor]:
        return None if self.state is None else self.state.size

    @property
    def source(self) -> Optional[Tensor]:
        return None if self.state is None else self.state.source


@dataclass
class LlavaContext:
    family: str
    keep: KeepSpec  # as given (a fraction of video tokens resolves per forward: frames vary)
    keep_tokens: Optional[int]  # resolved per image; None for video fractions
    method: str
    where: str
    stage: str
    layout: Layout
    time_mode: str
    window: int
    contextual: Optional[int]
    hyper: Dict[str, Any]
    info: LlavaInfo = field(default_factory=LlavaInfo)
    processors: List[Any] = field(default_factory=list)
    undo: List[Callable[[], None]] = field(default_factory=list)


# ------------------------------------------------------------------------------------- scores and metric
class _Capture:
    """Forward hooks on the feature layer's query/key projections, registered for one call only."""

    def __init__(self, lm: nn.Module, layout: Layout, need: bool) -> None:
        self.q: List[Tensor] = []
        self.k: List[Tensor] = []
        self.handles = []
        self.attn = None
        if need:
            # The layer that produced hidden_states[f] is layer f-1 (layer 0 for the embeddings).
            layer = _tower_layers(lm)[max(layout.feature_layers[-1] - 1, 0)]
            self.attn = layer_parts(layer).attention
            self.handles = [self.attn.q_proj.register_forward_hook(lambda m, i, o: self.q.append(o)),
                            self.attn.k_proj.register_forward_hook(lambda m, i, o: self.k.append(o))]

    def __enter__(self) -> "_Capture":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def keys_and_cls_attention(self, images: int) -> Tuple[Tensor, Tensor]:
        """Head-averaged keys ``[images, T, d]`` and head-averaged [CLS] attention ``[images, T]`` (float32) of
        the last ``images`` tower inputs (T = tower tokens)."""
        if not self.k:
            raise RuntimeError("mmmerge.llava: the feature layer's key projection did not run")
        q, k = self.q[-1][-images:], self.k[-1][-images:]
        B, T, D = k.shape
        heads = self.attn.num_heads
        kh = k.detach().view(B, T, heads, D // heads)
        qh = q.detach()[:, :1].view(B, 1, heads, D // heads)
        logits = torch.einsum("bqhd,bthd->bht", qh.float(), kh.float()) * (D // heads) ** -0.5
        return kh.mean(2), logits.softmax(-1).mean(1)


def _dominant(x: Tensor, metric: Tensor, score: Tensor, keep: int, protected: int,
              contextual: Optional[int]) -> Tuple[Tensor, TokenState]:
    """VisionZip-style selection: the ``keep - protected - C`` tokens with the highest ``score`` stay as they
    are; the others are merged into ``C`` contextual tokens (targets spread evenly over the remaining tokens
    in raster order, every other token joins its most similar target by cosine of ``metric``).

    Args:
        x: ``[B, N, C]`` tokens. metric: ``[B, N, c]``. score: ``[B, N]`` ([CLS] attention, higher stays).
        keep: output tokens, protected included. contextual: C (default ``max(1, round(10 / 64 * keep))``).
    Returns:
        ``([B, keep, C], state)``; output order as everywhere in mmmerge (earliest original position).
    """
    B, N, _ = x.shape
    P = protected
    M, K = N - P, keep - P
    state = init_state(B, N, device=x.device, protected=P)
    if keep == N:
        return x, state
    C = max(1, round(K * 10 / 64)) if contextual is None else int(contextual)
    if not 1 <= C <= K:
        raise ValueError(f"dominant: contextual={C} must lie in [1, keep - protected = {K}]")
    D = K - C
    device = x.device
    with torch.no_grad():
        dom = score[:, P:].float().topk(D, dim=-1).indices if D > 0 else torch.zeros(B, 0, dtype=torch.long,
                                                                                      device=device)
        is_dom = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, dom, True)
        rest = torch.argsort(is_dom.to(torch.int8), dim=1, stable=True)[:, : M - D]  # remaining, raster order
        step = (M - D) // C
        targets = rest[:, ::step][:, :C]  # [B, C]
        is_target = torch.zeros_like(is_dom).scatter_(1, targets, True)
        m = F.normalize(metric[:, P:].float(), dim=-1, eps=1e-6)
        sim = m @ m.gather(1, targets.unsqueeze(-1).expand(-1, -1, m.shape[-1])).transpose(1, 2)  # [B, M, C]
        host = targets.gather(1, sim.argmax(-1))
        own = torch.arange(M, device=device).unsqueeze(0).expand(B, -1)
        target = torch.where(is_dom | is_target, own, host)
    plan = plan_from_targets(target, state.size, M - D - C, P)
    return merge_weighted(x, plan), merge_state(state, plan)


def _reduce(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], keep: int, protected: int,
            state: Optional[TokenState] = None, constraint=None) -> Tuple[Tensor, TokenState]:
    """Reduce ``x`` ``[B, N, C]`` to ``[B, keep, C]`` with ``ctx.method`` (all batched, no host sync)."""
    if ctx.method == "dominant":
        return _dominant(x, metric, score, keep, protected, ctx.contextual)
    hyper = dict(ctx.hyper)
    if ctx.method in ("tps", "prune") and score is not None and "score" not in hyper:
        hyper["score"] = score  # [CLS] attention decides what stays, as in TPS
    return reduce_tokens(x, keep, ctx.method, metric=metric, protected=protected, state=state,
                         constraint=constraint, check_layout=False, **hyper)  # time-major by construction


# ------------------------------------------------------------------------------------- image wrapper
def _image_features(lm: nn.Module, ctx: LlavaContext, original: Callable, pixel_values: Tensor,
                    vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaModel.get_image_features``: the original call, with ``keep`` tokens per image.

    ``pre_projector``: a one-call pre-hook on the projector reduces its input ``[images, N, C_vision]``.
    ``post_projector``: the projected ``pooler_output`` (images x ``[N, C_text]``) is reduced.
    """
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    if kwargs.get("image_sizes") is not None:
        raise ValueError("mmmerge.llava: image_sizes (variable-resolution towers) is not supported")
    return_dict = kwargs.pop("return_dict", True)
    keep, layout = ctx.keep_tokens, ctx.layout
    images = pixel_values.shape[0]
    ctx.info = LlavaInfo(tokens_in=layout.num_features, tokens_out=keep)
    needs_capture = keep < layout.num_features
    handle = None
    with _Capture(lm, layout, needs_capture) as cap:
        def reduce(x: Tensor) -> Tensor:
            keys, cls_attn = cap.keys_and_cls_attention(images)
            d = layout.drop
            out, ctx.info.state = _reduce(ctx, x, keys[:, d:], cls_attn[:, d:], keep, layout.protected)
            return out

        if needs_capture and ctx.stage == "pre_projector":
            handle = lm.multi_modal_projector.register_forward_pre_hook(lambda m, args: (reduce(args[0]),))
        try:
            out = original(pixel_values, vision_feature_layer=vision_feature_layer,
                           vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if needs_capture and ctx.stage == "post_projector":
            out.pooler_output = list(reduce(torch.stack(list(out.pooler_output))))
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


# ------------------------------------------------------------------------------------- video wrapper
def _video_keep(ctx: LlavaContext, frames: int, per_frame: int) -> int:
    available = frames * per_frame
    keep = _resolve_keep(ctx.keep, available, "video")
    if ctx.time_mode == "within_frame" and keep % frames:
        raise ValueError(f"time_mode='within_frame' keeps the same count in every frame: keep={keep} must be a "
                         f"multiple of the {frames} frames (e.g. keep={keep - keep % frames or frames})")
    return keep


def _video_features(lm: nn.Module, ctx: LlavaContext, original: Callable, pixel_values_videos: Tensor,
                    vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaNextVideoModel.get_video_features``: ``keep`` tokens per video.

    The projected features ``[videos, frames * n, C]`` (n tokens per frame after the spatial pooling) are
    reduced to ``[videos, keep, C]``. Metric: the pooled vision features (a one-call hook on the resampler);
    score: [CLS] attention of the feature layer, pooled like the features. Time modes as in the video
    adapter: ``within_frame`` reduces every frame to ``keep / frames`` on its own; ``adjacent``, ``window``
    and ``global`` merge across frames under the matching constraint (frame spans stay contiguous).
    """
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", True)
    B, T = pixel_values_videos.shape[:2]
    layout = ctx.layout
    stride = lm.config.spatial_pool_stride
    rows, cols = layout.rows // stride, layout.cols // stride
    n = rows * cols
    keep = _video_keep(ctx, T, n)
    ctx.info = LlavaInfo(tokens_in=T * n, tokens_out=keep)
    if keep == T * n:
        out = original(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True, **kwargs)
        return out if return_dict else out.to_tuple()
    pooled: List[Tensor] = []
    handle = lm.vision_resampler.register_forward_hook(lambda m, i, o: pooled.append(o))
    with _Capture(lm, layout, ctx.method in ("dominant", "tps", "prune")) as cap:
        try:
            out = original(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                           vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True, **kwargs)
        finally:
            handle.remove()
        x = out.pooler_output  # [B, T * n, C_text]
        metric = pooled[-1].detach()  # [B * T, n, C_vision]
        score = None
        if cap.handles:
            _, cls_attn = cap.keys_and_cls_attention(B * T)
            grid = cls_attn[:, layout.cls:].view(B * T, 1, layout.rows, layout.cols)
            score = F.avg_pool2d(grid, stride).view(B * T, n)
    if ctx.time_mode == "within_frame":
        y, state = _reduce(ctx, x.reshape(B * T, n, -1), metric, score, keep // T, 0)
        y = y.reshape(B, keep, -1)
        # Per-frame states back to one [B, T * n] source map over the whole video.
        offsets = (torch.arange(T, device=x.device) * (keep // T)).repeat(B).unsqueeze(1)
        state = TokenState(size=state.size.reshape(B, keep), source=(state.source + offsets).reshape(B, T * n))
    else:
        t = torch.arange(T, device=x.device, dtype=torch.float32).repeat_interleave(n)
        state = init_state(B, T * n, device=x.device, coords={"t": t, "t_min": t, "t_max": t},
                           rules={"t_min": "min", "t_max": "max"})
        y, state = _reduce(ctx, x, metric.reshape(B, T * n, -1),
                           None if score is None else score.reshape(B, T * n), keep, 0, state=state,
                           constraint=time_constraint(ctx.time_mode, ctx.window, T))
    ctx.info.state = state
    out.pooler_output = y
    return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------------------ placeholder counts
def _runs(ids: Tensor, token_id: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Placeholder runs of ``ids`` ``[B, L]``: ``(is_placeholder, position_in_run, is_run_end)``, all ``[B, L]``."""
    m = ids == token_id
    prev = F.pad(m[:, :-1], (1, 0), value=False)
    nxt = F.pad(m[:, 1:], (0, 1), value=False)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start = torch.where(m & ~prev, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return m, pos - start, m & ~nxt


def _count_check(ctx: LlavaContext, lm: nn.Module) -> Callable:
    """Forward pre-hook on the inner model: every placeholder run is a whole number of reduced images
    (transformers only compares totals). Device-side assert: no host sync on GPU."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        checks = []
        encoded = kwargs.get("mm_encoder_outputs") or {}  # generate() runs the tower before the prefill
        if ctx.family == "image" and (kwargs.get("pixel_values") is not None or encoded.get("image") is not None):
            checks.append((lm.config.image_token_id, ctx.keep_tokens, "image"))
        videos = kwargs.get("pixel_values_videos")
        if ctx.family == "video" and videos is not None:
            n = (ctx.layout.rows // lm.config.spatial_pool_stride) * (ctx.layout.cols // lm.config.spatial_pool_stride)
            checks.append((lm.config.video_token_id, _video_keep(ctx, videos.shape[1], n), "video"))
        elif ctx.family == "video" and encoded.get("video") is not None:
            checks.append((lm.config.video_token_id, encoded["video"].pooler_output.shape[1], "video"))
        for token_id, keep, what in checks:
            m, pos, end = _runs(ids, token_id)
            torch._assert_async((((pos + 1) % keep == 0) | ~end).all(),
                                f"mmmerge.llava: a run of {what} placeholders is not a multiple of keep={keep}; "
                                f"the processor or input_ids were made for another keep: pass processor= to "
                                f"reduce_visual_tokens or rewrite input_ids with compact_image_tokens")
        return None
    return hook


def check_placeholder_counts(input_ids: Tensor, model: nn.Module, num_frames: Optional[int] = None) -> None:
    """Raise ValueError unless every image (video) has exactly the reduced count of placeholders.

    Host-side check (one sync), for use outside the forward path. Checks that each run of placeholders is
    a whole number of ``keep`` blocks.
    """
    ctx = _context(model)
    lm = _inner(model)
    token_id, keep, what = _placeholder(ctx, lm, num_frames)
    m, pos, end = _runs(input_ids, token_id)
    lengths = (pos + 1)[end]
    bad = lengths[lengths % keep != 0]
    if bad.numel():
        raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of keep={keep}; "
                         "use the patched processor or compact_image_tokens")


def _placeholder(ctx: LlavaContext, lm: nn.Module, num_frames: Optional[int]) -> Tuple[int, int, str]:
    if ctx.family == "image":
        return lm.config.image_token_id, ctx.keep_tokens, "image"
    if num_frames is None:
        raise ValueError("this is a video model: pass num_frames= (frames per video) to count video placeholders")
    n = (ctx.layout.rows // lm.config.spatial_pool_stride) * (ctx.layout.cols // lm.config.spatial_pool_stride)
    return lm.config.video_token_id, _video_keep(ctx, num_frames, n), "video"


def compact_image_tokens(input_ids: Tensor, attention_mask: Optional[Tensor], model: nn.Module,
                         num_frames: Optional[int] = None, pad_token_id: Optional[int] = None
                         ) -> Tuple[Tensor, Tensor]:
    """Rewrite inputs expanded for the unpatched model so every image (video) has ``keep`` placeholders.

    Each run of placeholders must hold a whole number of full images (N each, 576 for LLaVA-1.5; frames x
    tokens per frame for video); of every image's N placeholders the first ``keep`` remain. Rows are then
    re-padded on the side the input was padded on (left if any row starts with padding).

    Args:
        input_ids: ``[B, L]`` long. attention_mask: ``[B, L]`` or None (no padding). model: a model patched
            by ``reduce_visual_tokens``. num_frames: frames per video (video models only).
        pad_token_id: id for new padding (default: the model's pad id, else 0).
    Returns:
        ``(input_ids [B, L'], attention_mask [B, L'])`` on the input's device. One host sync (L' is data
        dependent): call it once per batch, outside the model's forward.
    Raises:
        ValueError if the model is not patched or a run is not a whole number of unreduced images.
    """
    ctx = _context(model)
    lm = _inner(model)
    token_id, keep, what = _placeholder(ctx, lm, num_frames)
    if ctx.family == "image":
        full = ctx.layout.num_features
    else:
        n = (ctx.layout.rows // lm.config.spatial_pool_stride) * (ctx.layout.cols // lm.config.spatial_pool_stride)
        full = num_frames * n
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    m, pos, end = _runs(input_ids, token_id)
    lengths = (pos + 1)[end]
    bad = lengths[lengths % full != 0]
    if bad.numel():
        raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of the {full} "
                         f"an unreduced {what} has; compact_image_tokens expects inputs from the unpatched "
                         "processor (already compacted inputs need no rewrite)")
    real = attention_mask.bool()
    kept = real & (~m | (pos % full < keep))  # [B, L]
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


# ------------------------------------------------------------------------------------------- processors
def _check_processor(processor: Any, model: nn.Module, family: str, layout: Layout) -> None:
    lm = _inner(model)
    cfg = lm.config
    expected = "LlavaNextVideoProcessor" if family == "video" else "LlavaProcessor"
    names = [c.__name__ for c in type(processor).__mro__]
    if expected not in names:
        raise TypeError(f"processor is a {type(processor).__name__}, but a {type(model).__name__} needs a {expected}")
    problems = []
    patch = cfg.vision_config.patch_size
    if getattr(processor, "patch_size", None) != patch:
        problems.append(f"patch_size {getattr(processor, 'patch_size', None)} vs the tower's {patch}")
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if strategy is not None and strategy != cfg.vision_feature_select_strategy:
        problems.append(f"vision_feature_select_strategy '{strategy}' vs the model's "
                        f"'{cfg.vision_feature_select_strategy}'")
    if getattr(processor, "image_token_id", cfg.image_token_id) != cfg.image_token_id:
        problems.append(f"image_token_id {processor.image_token_id} vs the model's {cfg.image_token_id}")
    if family == "video" and getattr(processor, "video_token_id", cfg.video_token_id) != cfg.video_token_id:
        problems.append(f"video_token_id {processor.video_token_id} vs the model's {cfg.video_token_id}")
    # The pixels the processor makes for what gets reduced: images (LLaVA) or video frames (LLaVA-NeXT-Video).
    what = "video" if family == "video" else "image"
    pixels_processor = getattr(processor, f"{what}_processor", None)
    crop = getattr(pixels_processor, "crop_size", None)
    if crop is not None:
        h, w = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop.height, crop.width)
        size = cfg.vision_config.image_size
        if (h, w) != (size, size):
            problems.append(f"{what} crop {h}x{w} vs the tower's {size}x{size}")
    if problems:
        raise ValueError("processor does not match the model: " + "; ".join(problems) +
                         ". Load the processor saved with this model (AutoProcessor.from_pretrained(same path))")


def _patch_processor(processor: Any, ctx: LlavaContext, lm: nn.Module) -> Callable[[], None]:
    """Make the processor expand each ``<image>`` (``<video>``) to the reduced count."""
    attr = "replace_video_token" if ctx.family == "video" else "replace_image_token"
    if not hasattr(type(processor), attr):
        raise TypeError(f"{type(processor).__name__} has no {attr} (this transformers version expands tokens "
                        "differently); use compact_image_tokens on its output instead")
    had, old = attr in processor.__dict__, processor.__dict__.get(attr)

    if ctx.family == "image":
        def replace(self, *args, **kwargs) -> str:
            return self.image_token * ctx.keep_tokens
    else:
        stride = lm.config.spatial_pool_stride
        n = (ctx.layout.rows // stride) * (ctx.layout.cols // stride)

        def replace(self, video_inputs=None, video_idx: int = 0, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])
            return self.video_token * _video_keep(ctx, frames, n)

    setattr(processor, attr, types.MethodType(replace, processor))

    def undo() -> None:
        if had:
            setattr(processor, attr, old)
        else:
            processor.__dict__.pop(attr, None)
    return undo


# ---------------------------------------------------------------------------------------- patch / undo
def _context(model: nn.Module) -> LlavaContext:
    ctx = model.__dict__.get("_mmmerge_llava")
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched: call reduce_visual_tokens(model, keep=...) first")
    return ctx


def reduce_visual_tokens(model: nn.Module, keep: KeepSpec = 144, method: str = "tome", processor: Any = None,
                         where: str = "pre_llm", stage: Optional[str] = None, time_mode: str = "global",
                         window: int = 1, contextual: Optional[int] = None, prop_attn: bool = True,
                         **hyper: Any) -> nn.Module:
    """Make a LLaVA model hand its language model ``keep`` visual tokens per image (per video); in place.

    Args:
        model: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (``keep`` per image) or
            ``LlavaNextVideoForConditionalGeneration`` / ``LlavaNextVideoModel`` (``keep`` per video; images of
            that model are left as they are).
        keep: tokens per image (video): an int, or a float in (0, 1] as a fraction of the N tokens
            (576 for LLaVA-1.5 at 336 px; frames x 144 for LLaVA-NeXT-Video). ``keep = N`` is an exact no-op.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune`` or ``dominant`` (VisionZip-style).
        processor: the model's processor; patched to emit ``keep`` placeholders per image (video).
        where: ``pre_llm`` (reduce the tower's output) or ``vision_tower`` (merge inside the CLIP layers; images).
        stage: ``post_projector`` (default: closer to keep-all at the same speed, see benchmarks/llava.py) or
            ``pre_projector`` (images only; video is pooled before its projector, so always post).
        time_mode: video only: ``global``, ``within_frame``, ``adjacent``, ``window`` (``window`` frames).
        contextual: ``dominant`` only: number of contextual tokens (default ``round(keep * 10 / 64)``).
        prop_attn: ``vision_tower`` only: proportional attention in the merged layers.
        **hyper: matcher options (pitome ``margin``/``alpha``, tps ``temperature``).
    Returns:
        the model. ``restore_visual_tokens(model, processor)`` undoes everything.
    Raises:
        TypeError (unsupported model or processor), ValueError (bad keep, method, where, stage, time_mode, or a
        processor that does not match): checked before any change, so the model is left as it was.
    """
    family = _family(model)
    lm = _inner(model)
    layout = _layout(lm)
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if where not in WHERE:
        raise ValueError(f"unknown where='{where}'; choose one of {', '.join(WHERE)}")
    if stage is None:
        stage = "post_projector"
    if stage not in STAGES:
        raise ValueError(f"unknown stage='{stage}'; choose one of {', '.join(STAGES)}")
    if family == "video":
        if stage != "post_projector":
            raise ValueError("video features are pooled before the projector; only stage='post_projector' applies")
        if where != "pre_llm":
            raise ValueError("where='vision_tower' would merge inside each frame before the spatial pooling, which "
                             "needs the full grid; use where='pre_llm' for LLaVA-NeXT-Video")
        time_constraint(time_mode, window)
        if method == "dominant" and time_mode not in ("global", "within_frame"):
            raise ValueError("method 'dominant' selects in one step over the whole video; use time_mode "
                             "'global' or 'within_frame' with it (or a merging method for 'adjacent'/'window')")
        if layout.strategy != "default":
            raise ValueError("LLaVA-NeXT-Video pools a square grid: vision_feature_select_strategy must be 'default'")
        keep_tokens = None
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep must be an int (tokens per video) or a float fraction, got {type(keep).__name__}")
        if (isinstance(keep, float) and not 0.0 < keep <= 1.0) or (isinstance(keep, int) and keep < 1):
            _resolve_keep(keep, 10 ** 9, "video")  # raises the usual message
        if isinstance(keep, int):
            keep_tokens = keep
    else:
        if time_mode != "global":
            raise ValueError("time_mode is for video models; images have no time axis")
        keep_tokens = _resolve_keep(keep, layout.num_features)
        if keep_tokens < layout.protected + 1:
            raise ValueError(f"keep={keep_tokens} leaves no room next to the [CLS] token the 'full' strategy keeps")
    if method == "dominant":
        if layout.cls == 0:
            raise ValueError("method 'dominant' ranks tokens by [CLS] attention; this tower has no [CLS]")
        if where != "pre_llm":
            raise ValueError("method 'dominant' selects from the tower's output: use where='pre_llm'")
    if where == "vision_tower" and method not in ("tome", "pitome", "tps", "random", "prune"):
        raise ValueError(f"method '{method}' cannot merge inside the tower")
    ctx = LlavaContext(family, keep, keep_tokens, method, where, stage, layout, time_mode, window, contextual,
                       dict(hyper))

    schedule = None
    layers = _tower_layers(lm)
    if where == "vision_tower" and keep_tokens < layout.num_features:
        if len(layout.feature_layers) != 1:
            raise ValueError("where='vision_tower' needs one vision_feature_layer (features of several layers "
                             "would have different token counts)")
        depth = layout.feature_layers[0]  # layers 0..depth-1 produce the features
        if depth == 0:
            raise ValueError("the features are the embeddings (vision_feature_layer=0): nothing to merge in the tower")
        target = keep_tokens + layout.drop
        try:
            sched = resolve_schedule(TargetTokens(target), depth, layout.tower_tokens, layout.cls, method=method)
        except ValueError as err:
            raise ValueError(f"where='vision_tower' cannot reach keep={keep_tokens} in the {depth} layers before the "
                             f"feature layer ({err}); use a larger keep or where='pre_llm'") from None
        schedule = sched + [0] * (len(layers) - depth)
        for layer in layers:
            layer_parts(layer)  # raises TypeError for an unknown layer, before any change
    if processor is not None:
        _check_processor(processor, model, family, layout)
        attr = "replace_video_token" if family == "video" else "replace_image_token"
        if not hasattr(type(processor), attr):
            raise TypeError(f"{type(processor).__name__} has no {attr}; use compact_image_tokens instead")

    # Everything is validated: replace any previous patch, then apply; any failure undoes what was done.
    restore_visual_tokens(model)
    undo = ctx.undo
    try:
        if schedule is not None:
            tower = getattr(lm.vision_tower, "vision_model", lm.vision_tower)
            grid = TokenGrid(layout.cls, (("row", layout.rows), ("col", layout.cols)))
            patch_encoder(tower, layers, grid=grid, layout=plan_layout(grid, "global"), r=schedule, method=method,
                          options=hyper, prop_attn=prop_attn, trace_source=True, family="llava")
            undo.append(lambda: unpatch_encoder(tower))
        elif where == "pre_llm":
            name = "get_video_features" if family == "video" else "get_image_features"
            wrapper = _video_features if family == "video" else _image_features
            had, old = name in lm.__dict__, lm.__dict__.get(name)
            original = getattr(lm, name)
            # generate() reads the signature to route pixel_values: keep the original's (via __wrapped__).
            bound = functools.wraps(original)(lambda *a, **k: wrapper(lm, ctx, original, *a, **k))
            setattr(lm, name, bound)
            undo.append(lambda: setattr(lm, name, old) if had else lm.__dict__.pop(name, None))
        handle = lm.register_forward_pre_hook(_count_check(ctx, lm), with_kwargs=True)
        undo.append(handle.remove)
        if processor is not None:
            undo.append(_patch_processor(processor, ctx, lm))
            ctx.processors.append(processor)

        def restore() -> None:
            for step in reversed(undo):
                step()
            undo.clear()
            for key in ("_mmmerge_llava", "_mmmerge", "_mmmerge_undo"):
                model.__dict__.pop(key, None)

        model._mmmerge_llava = ctx
        if schedule is None:
            model._mmmerge = ctx
        model._mmmerge_undo = restore
    except Exception:
        for step in reversed(undo):
            step()
        for key in ("_mmmerge_llava", "_mmmerge", "_mmmerge_undo"):
            model.__dict__.pop(key, None)
        raise
    return model


def restore_visual_tokens(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo ``reduce_visual_tokens``: model (and processor) behave bit-identically to before. A no-op on an
    unpatched model; ``processor`` is restored even if it was patched with another call."""
    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    if processor is not None:
        for attr in ("replace_image_token", "replace_video_token"):
            processor.__dict__.pop(attr, None)
    return model


patch = reduce_visual_tokens
unpatch = restore_visual_tokens

for _name in SUPPORTED:
    register(_name, reduce_visual_tokens)
