"""Where tokens sit and how a time mode organises them: ``TokenGrid`` (the static layout of an encoder's tokens),
``MergeLayout`` and ``plan_layout`` (merge order, static groups, the coordinate rule and what each step can always
remove), decided at patch time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmmerge.constraints import (AllOf, Adjacent, Constraint, Global, SameSpan, Window, group_guarantee,
                                 static_guarantee)
from mmmerge.schedule import Grouping

# --------------------------------------------------------------------------------- token layout planner
@dataclass(frozen=True)
class TokenGrid:
    """Static layout of an encoder's tokens: ``protected`` leading tokens, then a grid whose axes are
    listed in memory order, e.g. ``(("t", 8), ("row", 14), ("col", 14))`` (time-major video) or
    ``(("f", 12), ("t", 101))`` (AST: frequency-major)."""

    protected: int
    axes: Tuple[Tuple[str, int], ...]

    @property
    def cells(self) -> int:
        n = 1
        for _, s in self.axes:
            n *= s
        return n

    @property
    def num_tokens(self) -> int:
        return self.protected + self.cells

    def steps(self, axis: str) -> int:
        return dict(self.axes)[axis]

    def positions(self) -> Dict[str, Tensor]:
        """``[cells]`` long: each grid cell's index along every axis, in memory order."""
        shape = [s for _, s in self.axes]
        grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
        return {name: g.reshape(-1) for (name, _), g in zip(self.axes, grids)}

    def order(self, leading: Sequence[str]) -> Optional[Tensor]:
        """Permutation of the cells that puts ``leading`` axes first (then the rest in memory order), or
        None when they already lead. ``x[:, order]`` is the reordered grid."""
        names = [a for a, _ in self.axes]
        target = list(leading) + [a for a in names if a not in leading]
        if target == names:
            return None
        index = torch.arange(self.cells).view(*[s for _, s in self.axes])
        return index.permute(*[names.index(a) for a in target]).reshape(-1)


@dataclass(frozen=True)
class MergeLayout:
    """How a time mode organises the tokens: the order they merge in, the static groups (each with its
    own budget), the coordinate rule (and the spans it reads), and what one step can always remove."""

    order: Optional[Tensor]  # [cells] permutation of the grid cells into merge order, or None
    grouping: Grouping
    constraint: Constraint
    carried: Tuple[str, ...]  # axes whose spans travel in the state

    def grid_order(self, grid: TokenGrid) -> Tensor:
        return torch.arange(grid.cells) if self.order is None else self.order


def plan_layout(grid: TokenGrid, mode: str, k: int = 1, budget: bool = True, *, time_axis: str = "t",
                band_axis: Optional[str] = None, within_band: bool = False, padded: bool = False) -> MergeLayout:
    """The merge layout of a time mode on ``grid`` (see ``mmmerge.constraints`` for the two kinds of rule).

    Static groups (``budget=True``): ``within_frame`` (one group per step of ``time_axis``), ``window``
    (blocks of ``k`` steps), ``same_band`` (one per band), and with ``within_band`` the bands (``adjacent``
    inside each) or band x block groups (``window``). Otherwise one budget under a coordinate rule.
    Tokens are reordered (once, before the first patched layer) so that groups and cliques are runs of
    consecutive tokens and padding (``padded``: trailing time steps) ends every row of steps. What each step
    can always remove comes from the engine: ``static_guarantee`` for a coordinate rule, ``group_guarantee``
    for a static group (both count the padding); this function only says which rule or group applies.
    """
    if mode == "global" and not padded and not within_band:  # any pair, in the model's own order
        return MergeLayout(None, Grouping(), Global(), ())
    T = grid.steps(time_axis)
    per_step = grid.cells // T
    band_rule = mode == "same_band" or within_band
    if band_rule and band_axis is None:
        raise ValueError(f"time mode '{mode}' needs a band axis (audio); this model has none")
    F = grid.steps(band_axis) if band_axis else 1
    leading = (band_axis, time_axis) if band_rule else (time_axis,)
    needs_order = band_rule or mode in ("adjacent", "window", "within_frame") or padded
    order = grid.order(leading) if needs_order else None

    def rule_layout(rule: Constraint, carried: Tuple[str, ...]) -> MergeLayout:  # one budget under ``rule``
        return MergeLayout(order, Grouping((), static_guarantee(rule, padded, axis=time_axis)), rule, carried)

    def groups_layout(sizes: Tuple[int, ...], rule: Constraint = Global(), carried: Tuple[str, ...] = (),
                      **group) -> MergeLayout:  # static groups, each with its own budget
        return MergeLayout(order, Grouping(sizes, group_guarantee(padded, axis=time_axis, **group)), rule, carried)

    if mode == "global" and not band_rule:
        return rule_layout(Global(), ())
    bands = SameSpan(band_axis, "same_band", F) if band_axis else None
    if mode == "within_frame":
        if budget:  # a frame is one step: all padding or all real
            return groups_layout((per_step,) * T, spans_steps=False)
        return rule_layout(SameSpan(time_axis, "within_frame", T), (time_axis,))
    if mode == "same_band" or (mode == "global" and band_rule):
        if budget:
            return groups_layout((T,) * F)
        return rule_layout(bands, (band_axis,))
    if mode == "adjacent":
        adjacent = Adjacent(time_axis, steps=T)
        if not band_rule:
            return rule_layout(adjacent, (time_axis,))
        # Inside one band, with one token per band and step the tokens tile the band's steps (Adjacent.tiled).
        in_band = Adjacent(time_axis, steps=T, tiled=per_step == F)
        if budget:
            return groups_layout((T * (per_step // F),) * F, adjacent, (time_axis,), inside=in_band)
        return rule_layout(AllOf(bands, in_band), (band_axis, time_axis))
    if mode == "window":
        window = Window(k, time_axis, steps=T)
        if budget:  # blocks of k steps (per band with within_band); a block may hold real and padding steps
            blocks = -(-T // k)
            block_steps = tuple(min(k, T - b * k) for b in range(blocks))
            cells_per_step = per_step // F if band_rule else per_step
            return groups_layout(tuple(b * cells_per_step for b in block_steps) * (F if band_rule else 1))
        if not band_rule:
            return rule_layout(window, (time_axis,))
        return rule_layout(AllOf(bands, window), (band_axis, time_axis))
    raise ValueError(f"unknown time mode '{mode}'")
