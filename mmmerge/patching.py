"""Model-agnostic patch dispatch. Adapters register the model classes they handle; the engine never
imports a model class itself."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch.nn as nn

# class name -> patch function; filled by mmmerge.adapters on import.
_PATCHERS: Dict[str, Callable[..., Any]] = {}
# What undoes a patch and what reports on one, registered by the adapters (the engine imports none of them).
_UNPATCHERS: List[Callable[[nn.Module], Any]] = []
_REPORTERS: List[Callable[[nn.Module], Any]] = []


def register(class_name: str, patch_fn: Callable[..., Any]) -> None:
    _PATCHERS[class_name] = patch_fn


def register_unpatch(unpatch_fn: Callable[[nn.Module], Any]) -> None:
    """``unpatch_fn(model)`` removes an adapter's patch from ``model`` and its submodules (a no-op without)."""
    if unpatch_fn not in _UNPATCHERS:
        _UNPATCHERS.append(unpatch_fn)


def register_info(info_fn: Callable[[nn.Module], Any]) -> None:
    """``info_fn(model)`` returns the MergeInfo of an adapter's patch on ``model``, or None if it has none."""
    if info_fn not in _REPORTERS:
        _REPORTERS.append(info_fn)


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
    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    for unpatch_fn in _UNPATCHERS:
        unpatch_fn(model)
    return model


def last_info(model: nn.Module):
    """What a forward of ``model`` does (``mmmerge.MergeInfo``): schedule and tokens per layer, and with
    ``trace_source=True`` the final state of this thread's last eager forward."""
    for info_fn in _REPORTERS:
        info = info_fn(model)
        if info is not None:
            return info
    raise ValueError(f"{type(model).__name__} is not patched by mmmerge; call mmmerge.patch(model, ...) first")
