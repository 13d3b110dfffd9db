"""The fused ``dominant`` step (VisionZip-style selection, ``mmmerge.selection.dominant``): one plan op and
``merge_slots`` (``mmmerge.fused``), where the engine's plan and merge dispatch some 60 small ops (some 100 over
padded rows with budgets of their own), each a kernel launch on a GPU.

    kept, members, lo, hi, assign = dominant_plan(metric, score, protected, r, contextual, counts)   (choose)
    x, size = merge_slots(x, size, size, kept, members, lo, hi, assign)                              (merge)

The plan op, over ``N`` tokens of which the first ``protected`` (P) never merge and ``M = N - P`` are mergeable:

- ``metric`` ``[B, N, d]`` (similarity features), ``score`` ``[B, N]`` (importance, higher stays; taken as the
  engine takes it: ``score[:, P:].float().nan_to_num(nan=0, posinf=1e30, neginf=-1e30)``), ``r`` tokens removed
  from every row.
- ``counts``: None, every row's M mergeable tokens are real and keep ``K = M - r``; or per row ``[B, 2]`` int32
  ``(M_b, K_b)``: row b's first ``M_b`` mergeable tokens are real (the rest padding), ``K_b`` of them stay, and so
  do its first ``M - r - K_b`` padding tokens; the rest of its padding joins its first padding token
  (``RowBudgets.tables``, ``fused.row_tables``; static per layout). Feasible counts are the caller's (the op does
  not check them): ``plan_rows``'s rows hold ``r - (M_b - K_b)`` padding tokens to give up and one more to host
  them.
- ``contextual``: ``C_b = min(K_b, contextual)`` contextual targets per row, or with 0 VisionZip's default
  ``max(1, round(10 K_b / 64))``. Static (an option), so nothing is built per call; ``D_b = K_b - C_b``.

Row b keeps its ``D_b`` most important real tokens (ties: the lower index), then ranks its other real tokens in
position order and keeps those at ranks ``0, step, ..., (C_b - 1) step`` (``step = (M_b - D_b) // C_b``) as
targets; every other real token joins its most similar target (cosine of the unit metric; ties: the first target
in position order), size-weighted. Outputs as ``mmmerge.fused``'s plan ops. This is the engine's ``dominant``
with a given score exactly: without padding (Global rule) and with ``quota=`` (``_dominant_rows``). Without a
score, under a rule, with padding of a non-row batch or coordinates, the engine path is taken.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .fused import MAX_TOKENS, PlanTensors, _apply, _launch, _plan_like, _plan_tensors, _unit, fused_enabled
from .matchers import _arange
from .merge import _first_positions
from .rows import RowBudgets
from .selection import _dominant_rows, check_contextual
from .state import TokenState


@torch.library.custom_op("mmmerge::dominant_plan", mutates_args=())
def dominant_plan(metric: Tensor, score: Tensor, protected: int, r: int, contextual: int,
                  counts: Optional[Tensor] = None) -> PlanTensors:
    """The ``dominant`` plan (see the module docstring): ``(kept [B, K], members [B, r], lo [B, K], hi [B, K],
    assign [B, N])``, ``K = N - r``."""
    return _launch("dominant_plan", dominant_reference, metric, metric, score, protected, r, contextual, counts,
                   module="triton_selection")


def dominant_reference(metric: Tensor, score: Tensor, protected: int, r: int, contextual: int,
                       counts: Optional[Tensor] = None) -> PlanTensors:
    """``dominant_plan`` in PyTorch ops (the CPU implementation, and the kernels' reference): the engine's per-row
    selection (``_dominant_rows``), a batch without padding being rows whose tokens are all real."""
    P = protected
    with torch.no_grad():
        m = _unit(metric, P)
        B, M, _ = m.shape
        importance = score[:, P:].float().nan_to_num(nan=0.0, posinf=1e30, neginf=-1e30)
        if counts is None:
            real = torch.full((B,), M, dtype=torch.long, device=m.device)
            kept = real - r
        else:
            real, kept = counts[:, 0].long(), counts[:, 1].long()
        valid = torch.arange(M, device=m.device) < real.unsqueeze(1)
        target = _dominant_rows(m, importance, valid, r, real - kept, contextual or None)  # [B, M]
        src = _first_positions(target != _arange(B, 0, M, 1, m.device), r)  # [B, r] ascending
        return _plan_tensors(src, target.gather(1, src), metric.shape[1], P)


@dominant_plan.register_fake
def _(metric: Tensor, score: Tensor, protected: int, r: int, contextual: int,
      counts: Optional[Tensor] = None) -> PlanTensors:
    return _plan_like(metric, r)


# ---------------------------------------------------------------------------------------------- the step
def dominant_fused(tokens: int, global_rule: bool, padded: bool, carried: bool, rows: Optional[RowBudgets]) -> bool:
    """Whether ``reduce_tokens``'s ``dominant`` with a given score takes the fused step: no coordinate rule, no
    padding (or rows with budgets of their own, ``rows``), no coordinates to carry, at most ``MAX_TOKENS`` tokens,
    and not ``MMMERGE_FUSED=0``."""
    if rows is not None:
        return fused_enabled() and bool(rows.tables) and tokens <= MAX_TOKENS
    return fused_enabled() and global_rule and not padded and not carried and tokens <= MAX_TOKENS


def fused_dominant(x: Tensor, metric: Tensor, state: TokenState, steps: Sequence[int], score: Tensor,
                   contextual: Optional[int], rows: Optional[RowBudgets] = None) -> Tuple[Tensor, TokenState]:
    """``reduce_tokens(x, ..., "dominant", score=score, contextual=contextual)`` in one fused step: ``x`` ``[B, N, C]``
    to ``[B, N - r, C]`` and its state. ``metric`` ``[B, N, d]`` is only read (the step is the reduction's last).
    ``rows``: rows with budgets of their own (its per-row counts, ``RowBudgets.tables``)."""
    if not steps:
        return x, state
    (r,) = steps  # a select method: one step removes everything
    counts = None
    if rows is None:
        check_contextual(contextual, x.shape[1] - state.protected - r)
    else:
        (counts,), state = rows.tables[0], state.replace(valid=None)  # the tiers are in the counts
    metric, score = (t.detach() if t.requires_grad else t for t in (metric, score))  # the choice has no gradient
    plan = torch.ops.mmmerge.dominant_plan(metric, score, state.protected, r, contextual or 0, counts)
    x, state = _apply(x, state, (*plan, state.size))
    return x, state if rows is None else state.replace(valid=rows.valid_out)
