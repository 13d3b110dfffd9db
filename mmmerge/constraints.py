"""Merge constraints: which token pairs may merge.

A constraint turns the coordinates in a TokenState into a boolean ``[B, Na, Nb]`` "allowed" mask that
every matcher applies as -inf on its score matrix before any argmax. Span coordinates are named
``{axis}_min`` / ``{axis}_max`` (e.g. ``t_min``, ``t_max`` in frames or columns; ``f_min``, ``f_max`` in bands).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .state import TokenState


def _pair(state: TokenState, name: str, idx_a: Tensor, idx_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Coordinate ``name`` of the A tokens as ``[B, Na, 1]`` and of the B tokens as ``[B, 1, Nb]``."""
    c = state.coords[name]
    return c.gather(1, idx_a).unsqueeze(2), c.gather(1, idx_b).unsqueeze(1)


class Constraint:
    """Base class. ``allowed`` returns ``[B, Na, Nb]`` bool, or None when every pair is allowed."""

    name = "global"
    required: Tuple[str, ...] = ()

    def check(self, state: TokenState) -> None:
        missing = [c for c in self.required if c not in state.coords]
        if missing:
            raise ValueError(
                f"constraint '{self}' needs coordinates {missing} in the TokenState (have {sorted(state.coords)}); "
                "use a modality adapter, or pass coords= to init_state"
            )

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Optional[Tensor]:
        return None

    def __repr__(self) -> str:
        return self.name


class Global(Constraint):
    """Any pair may merge."""


@dataclass(repr=False)
class SameSpan(Constraint):
    """Merge only tokens with identical spans on ``axis``: ``within_frame`` (axis t), ``same_band`` (axis f).

    Equality is transitive, so a group never mixes two frames (or bands), however many tokens join it.
    """

    axis: str = "t"
    label: str = "within_frame"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        hi_a, hi_b = _pair(state, f"{self.axis}_max", idx_a, idx_b)
        return (lo_a == lo_b) & (hi_a == hi_b)


@dataclass(repr=False)
class Adjacent(Constraint):
    """Merge only tokens whose spans on ``axis`` overlap or touch (gap at most ``step``).

    The union of intervals that each touch a common interval is an interval, so every merged token
    covers one contiguous stretch, also when several tokens join one destination in the same step.
    """

    axis: str = "t"
    step: float = 1.0
    name = "adjacent"

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        hi_a, hi_b = _pair(state, f"{self.axis}_max", idx_a, idx_b)
        return (lo_a <= hi_b + self.step) & (lo_b <= hi_a + self.step)


@dataclass(repr=False)
class Window(Constraint):
    """Merge only inside the same block of ``k`` consecutive steps on ``axis`` ([0,k), [k,2k), ...).

    Fixed blocks rather than a sliding window: "within k of each other" is not transitive, and when
    several tokens join one destination in a step a sliding rule could build a group wider than k.
    With blocks no merged token ever spans more than k steps. ``window(1)`` equals ``within_frame``.
    """

    k: int = 1
    axis: str = "t"

    def __post_init__(self) -> None:
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"window size k must be a positive integer, got {self.k!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"window({self.k})"

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        return torch.div(lo_a, self.k, rounding_mode="floor") == torch.div(lo_b, self.k, rounding_mode="floor")


ConstraintSpec = Union[None, str, Constraint]
CONSTRAINT_NAMES = ("global", "within_frame", "adjacent", "window(k)", "same_band")


def parse_constraint(spec: ConstraintSpec, *, time_axis: str = "t", band_axis: str = "f") -> Constraint:
    """Build a constraint from a name: ``global``, ``within_frame``, ``adjacent``, ``window(k)``, ``same_band``."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None or spec == "global":
        return Global()
    if not isinstance(spec, str):
        raise TypeError(f"constraint must be a name or a Constraint, got {type(spec).__name__}")
    if spec == "within_frame":
        return SameSpan(axis=time_axis, label="within_frame")
    if spec == "same_band":
        return SameSpan(axis=band_axis, label="same_band")
    if spec == "adjacent":
        return Adjacent(axis=time_axis)
    match = re.fullmatch(r"window\((\d+)\)", spec.replace(" ", ""))
    if match:
        return Window(k=int(match.group(1)), axis=time_axis)
    raise ValueError(f"unknown constraint '{spec}'; choose one of {', '.join(CONSTRAINT_NAMES)}")


def allowed_pairs(state: TokenState, constraint: Constraint, idx_a: Tensor, idx_b: Tensor) -> Optional[Tensor]:
    """The constraint's mask combined with the padding rule (valid tokens never meet padding)."""
    mask = constraint.allowed(state, idx_a, idx_b)
    if state.valid is not None:
        va = state.valid.gather(1, idx_a).unsqueeze(2)
        vb = state.valid.gather(1, idx_b).unsqueeze(1)
        same = va == vb
        mask = same if mask is None else mask & same
    return mask
