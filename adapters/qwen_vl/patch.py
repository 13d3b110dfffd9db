"""Patch and undo: ``reduce_visual_tokens`` and ``restore_visual_tokens`` for Qwen-VL models.

What a patch installs (nothing else; the classes are untouched): on the inner ``Qwen*VLModel`` the context
``_mmmerge_qwen`` and four instance attributes (``Replacement``) in place of the model's own
``get_image_features``, ``get_video_features``, ``get_rope_index`` and ``forward``; on the outer model (or the inner
one when it is given) ``_mmmerge`` (read by ``mmmerge.last_info``) and ``_mmmerge_undo``, and for ``cdpruner`` a
``generate`` that holds the prompt for the call. No hook is registered. A replacement holds only its owner, a
module-level function and the method's name, so ``copy.deepcopy`` gives the copy its own reduced methods and pickle
stores the functions by reference.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from mmmerge.constraints import parse_time_mode
from mmmerge.methods import MATCHERS, check_options
from mmmerge.options import check_entry_options
from mmmerge.reduce import reduce_tokens

from ..vlm import Replacement, check_keep, remove_replacements
from .features import forward, generate_with_prompt, image_features, video_features
from .kinds import SUPPORTED, QwenContext, inner, model_kind
from .placeholders import check_processor, patch_processor, unpatch_processor
from .positions import reduced_rope_index

METHODS = tuple(m for m in MATCHERS if m != "none")
TIME_MODES = ("global", "within_frame", "adjacent", "window(k)")


_WRAPPERS = (("get_image_features", image_features), ("get_video_features", video_features),
             ("get_rope_index", reduced_rope_index), ("forward", forward))


def _check_method(method: str, hyper: Dict[str, Any]) -> None:
    """Names by the engine's ``check_options``, values by one tiny call of the engine with these options."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    for name in ("score", "query", "query_mask", "metric"):
        if name in hyper:
            raise ValueError(f"{name}= is made by the adapter for every image / video; remove {name}=")
    check_options(method, hyper)
    generator = hyper.get("generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    state = generator.get_state() if generator is not None else None
    contextual = hyper.get("contextual")
    kept = contextual if isinstance(contextual, int) and not isinstance(contextual, bool) and contextual > 4 else 4
    with torch.random.fork_rng(devices=[]):
        try:
            x = torch.linspace(-1.0, 1.0, 2 * kept * 4, device=generator.device if generator else "cpu")
            x = x.view(1, 2 * kept, 4)
            reduce_tokens(x, kept, method, metric=x, **hyper)
        except (TypeError, ValueError) as err:
            raise type(err)(f"method '{method}' rejects its options {sorted(hyper)}: {err}") from None
        finally:
            if generator is not None:
                generator.set_state(state)


def _time_mode(kind_name: str, time_mode: Optional[str]) -> str:
    if kind_name == "qwen3_vl":
        if time_mode not in (None, "within_frame"):
            parse_time_mode(time_mode, TIME_MODES)  # a misspelling gets the parser's message first
            raise ValueError(f"time_mode='{time_mode}' is not available for Qwen3-VL: its processor writes a "
                             "timestamp before every temporal patch, so each patch's placeholder count is fixed "
                             "before the tower runs; use time_mode='within_frame' (the default for Qwen3-VL)")
        return "within_frame"
    mode, k = parse_time_mode("global" if time_mode is None else time_mode, TIME_MODES)
    return f"window({k})" if mode == "window" else mode


def unpatch_model(model: nn.Module) -> None:
    """Undo what ``reduce_visual_tokens`` installed on ``model`` (or on a copy of it), processors included."""
    lm = inner(model)
    ctx = lm.__dict__.get("_mmmerge_qwen")
    if ctx is not None:
        for undo in reversed(ctx.processor_undo):
            undo()
        ctx.processor_undo.clear()
    remove_replacements(model, lm)
    for owner in {id(model): model, id(lm): lm}.values():
        for key in ("_mmmerge_qwen", "_mmmerge", "_mmmerge_undo"):
            owner.__dict__.pop(key, None)


def reduce_visual_tokens(model: nn.Module, keep: Any = 0.25, method: str = "tome", processor: Any = None,
                         where: str = "post_projector", time_mode: Optional[str] = None,
                         prop_attn: Optional[bool] = None, **hyper: Any) -> nn.Module:
    """Make a Qwen-VL model hand its language model fewer visual tokens per image (per video); in place.

    Args:
        model: ``Qwen2VL``, ``Qwen2_5_VL`` or ``Qwen3VL`` ``...ForConditionalGeneration`` or ``...Model``.
        keep: an int (tokens per image / video, at most its count) or a float in (0, 1] (each item keeps
            ``ceil(keep * its tokens)``). Keeping everything is an exact no-op.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune``, ``dominant``, ``divprune`` or ``cdpruner``
            (its query is the prompt of each item).
        processor: the model's processor; patched to emit the reduced count per image (video).
        where: ``post_projector`` only (the tokens the patch merger hands the LM), as named for LLaVA.
        time_mode: videos: ``global`` (default), ``within_frame``, ``adjacent`` or ``window(k)`` over the
            temporal patches; Qwen3-VL takes ``within_frame`` only (its default). None: the kind's default.
        prop_attn: LLaVA's option for merging inside a tower; must stay None here (nothing merges in the tower).
        **hyper: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``, dominant ``contextual``, divprune / cdpruner ``drop_unselected``), checked now.
    Returns:
        the model; ``restore_visual_tokens(model)`` undoes everything.
    Raises:
        TypeError / ValueError before any change (unsupported model or processor, bad keep, method, time_mode or
        option), so the model (and processor) are left as they were.
    """
    kind = model_kind(model)
    if kind is None:
        raise TypeError(f"mmmerge.qwen_vl supports {', '.join(SUPPORTED)}; got {type(model).__name__}")
    if where != "post_projector":
        raise ValueError(f"where='{where}': Qwen-VL reduces the tokens its patch merger hands the language model "
                         "(where='post_projector', the default); its tower packs every image into one sequence")
    if prop_attn is not None:
        raise ValueError("prop_attn applies to merging inside a vision tower; Qwen-VL reduces after the patch "
                         "merger: leave prop_attn=None")
    if "r" in hyper:
        raise TypeError("Qwen-VL models take keep= (visual tokens kept per image, or a fraction such as "
                        "keep=0.25), not r=")
    check_entry_options("reduce_visual_tokens", reduce_visual_tokens, method, hyper)
    check_keep(keep, "image / video")
    lm = inner(model)
    _check_method(method, hyper)
    mode = _time_mode(kind.name, time_mode)
    cfg = lm.config
    ctx = QwenContext(kind, keep, method, mode, int(cfg.vision_config.spatial_merge_size), int(cfg.image_token_id),
                      int(cfg.video_token_id), dict(hyper))
    if processor is not None:
        check_processor(processor, model, ctx)
    restore_visual_tokens(model)
    try:
        lm.__dict__["_mmmerge_qwen"] = ctx
        for name, fn in _WRAPPERS:
            lm.__dict__[name] = Replacement(lm, name, fn, lm.__dict__.get(name))
        if method == "cdpruner" and model is not lm and callable(getattr(type(model), "generate", None)):
            model.__dict__["generate"] = Replacement(model, "generate", generate_with_prompt,
                                                      model.__dict__.get("generate"))
        if processor is not None:
            ctx.processor_undo.append(patch_processor(processor, ctx))
        model.__dict__["_mmmerge"] = ctx
        model.__dict__["_mmmerge_undo"] = functools.partial(unpatch_model, model)
    except Exception:
        unpatch_model(model)
        raise
    return model


def restore_visual_tokens(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo ``reduce_visual_tokens``: model (and processor) behave bit-identically to before. A no-op on an
    unpatched model; ``processor`` is restored even if it was patched with another call."""
    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    if processor is not None:
        unpatch_processor(processor)
    return model
