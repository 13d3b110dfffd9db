"""Patch and undo: ``reduce_visual_tokens`` validates everything, then installs the replacements, hooks and the
processor patch atomically; ``restore_visual_tokens`` removes them, bit for bit."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mmmerge.constraints import parse_time_mode
from mmmerge.methods import check_options
from mmmerge.options import check_entry_options
from mmmerge.reduce import reduce_tokens
from mmmerge.schedule import TargetTokens, resolve_schedule

from ..qwen_vl.kinds import is_qwen_vl
from ..vlm import check_keep, remove_replacements
from ..encoder import TokenGrid, layer_parts, patch_encoder, plan_layout, unpatch_encoder
from ..video import TIME_MODES
from .context import LlavaContext, Replacement
from .features import _anyres_image_features, _image_features, _projector_input_hook, _tower_output_hook, \
    _video_features
from .kinds import METHODS, SCORED, WHERE, KeepSpec, _resolve_keep, inner_model, model_kind, \
    tower_layers, tower_layout
from .placeholders import _check_placeholder_runs, _placeholder_mask
from .processor import _check_processor, _patch_processor
from .query import _check_query_options, _generate_with_prompt, _hold_prompt, _release_prompt
from .reduction import _select_hidden


# ------------------------------------------------------------------------------------------- options
def _check_method_options(method: str, hyper: Dict[str, Any], device: torch.device) -> None:
    """Every matcher option is checked now, by the engine: names by ``check_options``, values by one tiny call
    of the engine's own reduction with these options (temperature <= 0, an unknown preset, contextual=0 ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    check_options(method, hyper)
    if "score" in hyper:
        raise ValueError("score is computed by the adapter ([CLS] attention, or the mean attention received for "
                         "towers without [CLS]); remove score=")
    generator = hyper.get("generator")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the model on {device}: make it with "
                             f"torch.Generator(device='{device.type}')")
    contextual = hyper.get("contextual")
    kept = contextual if isinstance(contextual, int) and not isinstance(contextual, bool) and contextual > 4 else 4
    # The trial runs on the host, whatever the model's device (the option checks do not depend on it, and a patch
    # touches no device stream): the user's generator is stood in for by a fresh host one, and torch's default
    # host stream is forked, so no random stream moves.
    trial = dict(hyper, generator=torch.Generator()) if generator is not None else hyper
    with torch.random.fork_rng(devices=[]):
        try:
            x = torch.linspace(-1.0, 1.0, 2 * kept * 4, device="cpu").view(1, 2 * kept, 4)
            extra = {"score": x[..., 0]} if method in SCORED else {}
            reduce_tokens(x, kept, method, metric=x, **extra, **trial)
        except (TypeError, ValueError) as err:
            raise type(err)(f"method '{method}' rejects its options {sorted(hyper)}: {err}") from None


def _where(where: str, hyper: Dict[str, Any]) -> str:
    if "stage" in hyper:
        raise TypeError("stage= was merged into where=: use where='post_projector' (default) or "
                        "where='pre_projector' (or where='vision_tower')")
    if where == "pre_llm":
        warnings.warn("where='pre_llm' is now where='post_projector' (reduce after the projector, the default) or "
                      "where='pre_projector'", FutureWarning, stacklevel=3)
        where = "post_projector"
    if where not in WHERE:
        raise ValueError(f"unknown where='{where}'; choose one of {', '.join(WHERE)}")
    return where


_HOOKS = (_check_placeholder_runs, _tower_output_hook, _projector_input_hook, _hold_prompt, _release_prompt)  # all the patch registers


def _remove_hooks(root: nn.Module) -> None:
    """Remove every hook of this adapter from ``root`` and its submodules (found by function, so it works on a
    copy, whose hook dictionaries are copies of the original's)."""
    for module in root.modules():
        for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                              (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                       module._forward_hooks_always_called))):
            for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


def _unpatch_model(model: nn.Module) -> None:
    """Undo what ``reduce_visual_tokens`` installed on ``model`` (or on a copy of it): replacements, hooks, the
    encoder patch of the tower, the attributes, and the processors patched with it (the original's only)."""
    lm = inner_model(model)
    ctx = lm.__dict__.get("_mmmerge_llava")
    if ctx is not None:
        for undo in reversed(ctx.processor_undo):
            undo()
        ctx.processor_undo.clear()
        if ctx.where == "vision_tower":
            unpatch_encoder(getattr(lm.vision_tower, "vision_model", lm.vision_tower))
    remove_replacements(model, lm)
    _remove_hooks(lm)
    for module in {id(model): model, id(lm): lm}.values():
        for key in ("_mmmerge_llava", "_mmmerge", "_mmmerge_undo"):
            module.__dict__.pop(key, None)


def reduce_visual_tokens(model: nn.Module, keep: Optional[KeepSpec] = None, method: str = "tome", processor: Any = None,
                         where: str = "post_projector", time_mode: Optional[str] = None,
                         prop_attn: Optional[bool] = None, **hyper: Any) -> nn.Module:
    """Make a LLaVA model hand its language model fewer visual tokens per image (per video); in place.

    Args:
        model: a LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video or LLaVA-OneVision model (``...ForConditionalGeneration``
            or ``...Model``); see the module docstring for what each reduces. A Qwen2-VL, Qwen2.5-VL or Qwen3-VL
            model goes to ``mmmerge.adapters.qwen_vl.reduce_visual_tokens`` with the same arguments (its
            defaults: keep=0.25, each model's own time mode).
        keep: default 144. An int (tokens per image / video; anyres images: a budget spread over base view and crops, an image
            with fewer features keeps all), or a float in (0, 1]: each item keeps ``ceil(keep * its tokens)``.
            Keeping everything is an exact no-op.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune``, ``dominant`` (VisionZip-style), ``divprune``
            or ``cdpruner`` (its query is each image's prompt, taken from ``forward`` / ``generate``).
        processor: the model's processor; patched to emit the reduced count per image (video).
        where: ``post_projector`` (default), ``pre_projector`` (LLaVA-1.5) or ``vision_tower`` (LLaVA-1.5).
        time_mode: videos: ``global`` (default), ``within_frame``, ``adjacent`` or ``window(k)`` (blocks of k frames).
        prop_attn: ``vision_tower`` only: proportional attention in the merged layers; default on, except for
            ``prune`` (as in the video and audio adapters).
        **hyper: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``, dominant ``contextual``, divprune / cdpruner ``drop_unselected``), checked now.
    Returns:
        the model. ``restore_visual_tokens(model, processor)`` undoes everything. The reduced model can be
        deep-copied, pickled, called from several threads and compiled (see the module docstring).
    Raises:
        TypeError (unsupported model or processor, wrong option type), ValueError (bad keep, method, where,
        time_mode, option value, or a processor that does not match): checked before any change, so the model
        (and processor) are left as they were.
    """
    if is_qwen_vl(model):  # M-RoPE positions, its own placeholders: the Qwen-VL package
        from mmmerge.adapters import qwen_vl

        given = {"keep": keep} if keep is not None else {}
        return qwen_vl.reduce_visual_tokens(model, method=method, processor=processor, where=where,
                                            time_mode=time_mode, prop_attn=prop_attn, **given, **hyper)
    keep = 144 if keep is None else keep
    time_mode = "global" if time_mode is None else time_mode
    if "window" in hyper:
        raise ValueError("reduce_visual_tokens takes no option 'window'; use time_mode='window(k)'")
    if "r" in hyper:
        raise TypeError("LLaVA models take keep= (visual tokens kept per image, or a fraction such as keep=0.25), "
                        "not r= (tokens removed per encoder layer, for the video and audio encoders)")
    kind = model_kind(model)
    lm = inner_model(model)
    layout = tower_layout(lm)
    where = _where(where, hyper)
    check_entry_options("reduce_visual_tokens", reduce_visual_tokens, method, hyper,
                        optional_flags={"prop_attn": (prop_attn, "on, except for prune")})
    device = next(lm.parameters()).device
    _check_query_options(method, where, hyper)
    _check_method_options(method, hyper, device)
    if kind.videos:  # the engine's parser: TypeError / ValueError naming the valid modes
        mode, k = parse_time_mode(time_mode, TIME_MODES)
        time_mode = f"window({k})" if mode == "window" else mode
    elif time_mode != "global":
        raise ValueError("time_mode is for video models; images have no time axis")
    if (kind.images == "anyres" or kind.videos) and not layout.square:
        raise ValueError(f"{type(model).__name__} packs (pools) a square grid of features per crop (frame): a tower "
                         "with [CLS] needs vision_feature_select_strategy='default', one without needs 'full'")
    keep_tokens = None
    if kind.images == "uniform":
        keep_tokens = _resolve_keep(keep, layout.num_features)
        if keep_tokens < layout.protected + 1:
            raise ValueError(f"keep={keep_tokens} leaves no room next to the [CLS] token the 'full' strategy keeps")
    else:
        check_keep(keep, "image" if kind.images else "video")
    if where != "post_projector" and kind.name != "llava":
        # The model packs every crop's full rows x cols grid (anyres: unpadding to the aspect ratio, a newline
        # after each row, OneVision's resampling of large grids) and pools every frame's full grid (videos):
        # tokens merged in the tower, or before the projector, have no grid left to pack or pool.
        raise ValueError(f"where='{where}' is implemented for LLaVA-1.5; {type(model).__name__} packs (pools) every "
                         "crop's / frame's full token grid after the projector, so tokens cannot be merged before "
                         "it: use where='post_projector' (the default), which reduces each image's packed tokens")
    if where == "vision_tower" and method == "dominant":
        raise ValueError("method 'dominant' selects from the tower's output: use where='post_projector'")
    ctx = LlavaContext(kind, keep, keep_tokens, method, where, layout, time_mode, dict(hyper))

    schedule = None
    layers = tower_layers(lm)
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
                             f"feature layer ({err}); use a larger keep or where='post_projector'") from None
        schedule = sched + [0] * (len(layers) - depth)
        for layer in layers:
            layer_parts(layer)  # raises TypeError for an unknown layer, before any change
    if processor is not None:
        _check_processor(processor, model, kind, layout)

    previous = inner_model(model).__dict__.get("_mmmerge_llava")
    if previous is not None and previous.layout == layout:  # host-side memos outlive a re-patch
        ctx.image_layouts, ctx.plans = previous.image_layouts, previous.plans
    wrappers: List[Tuple[str, Callable]] = []
    if where != "vision_tower":
        if kind.images == "uniform":
            wrappers.append(("get_image_features", _image_features))
        elif kind.images == "anyres":
            wrappers.append(("get_image_features", _anyres_image_features))
        if kind.videos:
            wrappers.append(("get_video_features", _video_features))
        ctx.select_hidden = _select_hidden(layout, getattr(type(lm), wrappers[0][0]))
    if callable(getattr(type(lm), "get_placeholder_mask", None)):  # mmmerge's error for mismatched placeholders
        wrappers.append(("get_placeholder_mask", _placeholder_mask))
    # Everything is validated: replace any previous patch, then apply; any failure undoes what was done.
    restore_visual_tokens(model)
    try:
        lm._mmmerge_llava = ctx
        if schedule is not None:
            tower = getattr(lm.vision_tower, "vision_model", lm.vision_tower)
            grid = TokenGrid(layout.cls, (("row", layout.rows), ("col", layout.cols)))
            patch_encoder(tower, layers, grid=grid, layout=plan_layout(grid, "global"), r=schedule, method=method,
                          options=hyper, prop_attn=prop_attn,
                          trace_source=True, family="llava")
        for name, wrapper in wrappers:
            lm.__dict__[name] = Replacement(lm, name, wrapper, lm.__dict__.get(name))
        if where == "pre_projector" and keep_tokens < layout.num_features:
            lm.vision_tower.register_forward_hook(_tower_output_hook)
            lm.multi_modal_projector.register_forward_pre_hook(_projector_input_hook)
        lm.register_forward_pre_hook(_check_placeholder_runs, with_kwargs=True)
        if method == "cdpruner":  # the prompt of each call is the query (see "the prompt as CDPruner's query")
            lm.register_forward_pre_hook(_hold_prompt, with_kwargs=True)
            lm.register_forward_hook(_release_prompt, with_kwargs=True, always_call=True)
            if model is not lm and callable(getattr(type(model), "generate", None)):
                model.__dict__["generate"] = Replacement(model, "generate", _generate_with_prompt,
                                                          model.__dict__.get("generate"))
        if processor is not None:
            ctx.processor_undo.append(_patch_processor(processor, ctx, lm))
        if schedule is None:
            model._mmmerge = ctx
        model._mmmerge_undo = functools.partial(_unpatch_model, model)  # copies and pickles with the model
    except Exception:
        _unpatch_model(model)
        raise
    return model


def restore_visual_tokens(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo ``reduce_visual_tokens``: model (and processor) behave bit-identically to before. A no-op on an
    unpatched model; ``processor`` is restored even if it was patched with another call."""
    if is_qwen_vl(model):
        from mmmerge.adapters import qwen_vl

        return qwen_vl.restore_visual_tokens(model, processor)
    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    if processor is not None:
        for attr in ("replace_image_token", "replace_video_token"):
            processor.__dict__.pop(attr, None)
    return model


patch = reduce_visual_tokens
unpatch = restore_visual_tokens
