"""What the vision-language adapters (LLaVA, Qwen-VL) share: the ``keep`` spec, and methods replaced on one
instance while a model is patched (the class is untouched; restoring puts the instance back as it was).

    check_keep                  keep= is an int (tokens per item) or a fraction in (0, 1]
    Replacement                 a model method replaced by a module-level wrapper ``fn(owner, original, ...)``
    remove_replacements         every Replacement of some modules undone (what each replaced comes back)
    replace_processor_methods   a processor's placeholder-expansion methods replaced, with the undo
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Dict

import torch.nn as nn


def check_keep(keep: Any, what: str) -> None:
    """Raise TypeError / ValueError unless ``keep`` is an int >= 1 (visual tokens kept per ``what``) or a float
    fraction in (0, 1] (of each item's tokens)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (tokens per {what}) or a float fraction in (0, 1], got "
                        f"{type(keep).__name__}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep}: a fraction must lie in (0, 1]")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep={keep}: at least one visual token per {what} must remain (keep >= 1)")


class Replacement:
    """A method of a model replaced while patched (an instance attribute; the class is untouched).

    Calling it calls ``fn(owner, original, *args, **kwargs)``, ``fn`` a module-level wrapper and ``original`` the
    model's own method. It holds only its owner, the wrapper and the method's name, so ``copy.deepcopy`` of the
    model gives the copy a replacement bound to the copy, and pickle stores the wrapper by reference (a bound
    method would not do: it pickles as ``getattr(owner, fn.__name__)``). Its signature is the original's:
    ``generate()`` routes pixel inputs by it.
    """

    def __init__(self, owner: nn.Module, name: str, fn: Callable, previous: Callable | None = None) -> None:
        self.owner = owner
        self.name = name
        self.fn = fn
        self.previous = previous  # an instance attribute of that name the patch replaced (restored with it)

    @property
    def original(self) -> Callable:
        if self.previous is not None:
            return self.previous
        # The class's own function with its owner as a partial, never a bound method: torch.compile calls a
        # module's bound method by looking its name up on the instance again, which finds this replacement
        # (endless recursion in a compiled whole model).
        for cls in type(self.owner).__mro__:
            if self.name in cls.__dict__:
                attr = cls.__dict__[self.name]
                if isinstance(attr, types.FunctionType):
                    return functools.partial(attr, self.owner)
                return attr.__get__(self.owner, type(self.owner))  # a staticmethod, classmethod, other descriptor
        raise AttributeError(f"{type(self.owner).__name__} has no method {self.name}")

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.owner, self.original, *args, **kwargs)

    def __repr__(self) -> str:
        adapter = self.fn.__module__.rsplit(".adapters.", 1)[-1].split(".")[0]
        return f"<{self.name} of {type(self.owner).__name__}, reduced by mmmerge.{adapter} ({self.fn.__name__})>"


def remove_replacements(*owners: nn.Module) -> None:
    """Undo every ``Replacement`` installed on ``owners`` (each once): the instance attribute it replaced comes
    back, or none (the class's method again)."""
    for owner in {id(o): o for o in owners}.values():
        for name, value in list(owner.__dict__.items()):
            if isinstance(value, Replacement) and value.owner is owner:
                if value.previous is not None:
                    owner.__dict__[name] = value.previous
                else:
                    del owner.__dict__[name]


def replace_processor_methods(processor: Any, replacements: Dict[str, Callable]) -> Callable[[], None]:
    """Set ``replacements`` (name -> function of the processor) as methods of this processor instance; returns
    the undo, which puts back what the instance had (its own attribute, or none: the class's method again)."""
    saved = {attr: (attr in processor.__dict__, processor.__dict__.get(attr)) for attr in replacements}
    for attr, fn in replacements.items():
        setattr(processor, attr, types.MethodType(fn, processor))

    def undo() -> None:
        for attr, (had, old) in saved.items():
            if had:
                setattr(processor, attr, old)
            else:
                processor.__dict__.pop(attr, None)
    return undo
