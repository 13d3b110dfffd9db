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
    """Undo ``patch``: the model's original forwards and configs come back; a no-op on an unpatched model."""
    undo = getattr(model, "_mmmerge_undo", None)
    if undo is not None:
        undo()
    return model


def last_info(model: nn.Module):
    """What the last forward did (tokens per layer, and final size/source when tracing)."""
    ctx = getattr(model, "_mmmerge", None)
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched by mmmerge; call mmmerge.patch(model, ...) first")
    return ctx.info
