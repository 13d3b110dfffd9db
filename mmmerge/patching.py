"""Model-agnostic patch dispatch. Adapters register the model classes they handle; the engine never
imports a model class itself."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch.nn as nn

# class name -> patch function; filled by mmmerge.adapters on import.
_PATCHERS: Dict[str, Callable[..., Any]] = {}


def register(class_name: str, patch_fn: Callable[..., Any]) -> None:
    _PATCHERS[class_name] = patch_fn


def supported_models() -> list[str]:
    import mmmerge.adapters  # noqa: F401  (registers the adapters)
    return sorted(_PATCHERS)


def patch(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Patch ``model`` for token merging, choosing the adapter by the model's class.

    Keyword arguments go to the adapter's ``patch`` (``r``, ``method``, ``time_mode``, ...).
    Raises TypeError listing the supported classes for any other model; the model is left untouched.
    """
    import mmmerge.adapters  # noqa: F401
    for cls in type(model).__mro__:
        if cls.__name__ in _PATCHERS:
            return _PATCHERS[cls.__name__](model, **kwargs)
    raise TypeError(
        f"mmmerge cannot patch {type(model).__name__}; supported classes: {', '.join(sorted(_PATCHERS))}"
    )


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the model's original classes, forwards and configs come back, bit for bit; a no-op on
    an unpatched model. Walks ``model.modules()``, so it works on a copy of a patched model too."""
    from mmmerge.adapters.encoder import unpatch_encoder

    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    unpatch_encoder(model)
    return model


def last_info(model: nn.Module):
    """What a forward of ``model`` does (``mmmerge.MergeInfo``): schedule and tokens per layer, and with
    ``trace_source=True`` the final state of this thread's last eager forward."""
    from mmmerge.adapters.encoder import merge_info, patch_spec

    if patch_spec(model) is not None:
        return merge_info(model)
    ctx = model.__dict__.get("_mmmerge")  # the LLaVA adapter keeps its own record
    if ctx is not None and hasattr(ctx, "info"):
        return ctx.info
    for module in model.modules():  # an encoder patched inside the model (LLaVA's where="vision_tower")
        if patch_spec(module) is not None:
            return merge_info(module)
    raise ValueError(f"{type(model).__name__} is not patched by mmmerge; call mmmerge.patch(model, ...) first")
