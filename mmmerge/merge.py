"""MergePlan and the one merge operation that applies it to tokens and to their TokenState.

A plan says, for every current token, which output slot it goes to (``assign``) and with what
weight it is fused there (``weight``). Everything per-token goes through the same plan:
hidden states (weighted mean), size (sum), source (remap), coordinates (their rule), validity.

Output order: protected tokens first, then the surviving tokens in their current order. Every token has
a *representative*, the original token that survived every step (the host of each merge); tokens stay
sorted by their representative's original position. So a time-major grid keeps frames in order and
contiguous, a frame's tokens stay in raster order, and ``Partition`` groups stay static ranges.

Moving only what merges: the survivors are gathered in the tokens' own dtype (``plan.kept``), and only the
slots that receive merged tokens are recomputed, as one small matrix product over the tokens of those slots
(float32 accumulation, one rounding; no float32 copy of the hidden states, no atomics on them). A slot's
value is written once per member with identical values, so the result does not depend on write order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .state import TokenState


@dataclass
class MergePlan:
    """Output of a matcher.

    Attributes:
        assign: ``[B, N]`` long in ``[0, num_out)``: output slot of each input token. Protected tokens
            map to themselves; surviving tokens map to their own slot; merged tokens to their host's.
        weight: ``[B, N]`` float: fusion weight of each input token inside its slot (size for ToMe and
            PiToMe, size * similarity-softmax for TPS, 0 for pruned values).
        num_out: output token count (a Python int: shapes never depend on data).
        kept: ``[B, num_out]`` long: the input token that survives in each slot (its representative),
            ascending; None: derived from ``assign`` when the plan is applied.
        merged: ``[B, N - num_out]`` long: the removed tokens whose values join their slot; None when no
            removed token carries weight (pruning: the slots keep their survivors' values).
    """

    assign: Tensor
    weight: Tensor
    num_out: int
    kept: Optional[Tensor] = None
    merged: Optional[Tensor] = None


def _first_positions(flags: Tensor, count: int) -> Tensor:
    """``[B, count]`` positions of the first ``count`` True entries of ``flags`` ``[B, N]`` (every row has at
    least ``count``), ascending: a running count and a binary search, no sort."""
    return torch.searchsorted(flags.cumsum(dim=1), _slots(flags.shape[0], count, flags.device) + 1)


def _slots(batch: int, count: int, device: torch.device) -> Tensor:
    """``[batch, count]`` contiguous ``0 .. count - 1`` per row (binary-search values must be contiguous)."""
    return torch.arange(count, device=device).repeat(batch, 1)


def plan_from_pairs(src: Tensor, dst: Tensor, weight: Tensor, mergeable: int, protected: int,
                    removed: Optional[Tensor] = None, fuse: bool = True) -> MergePlan:
    """A MergePlan from "token ``src[b, i]`` fuses into token ``dst[b, i]``" (mergeable indices).

    Args:
        src: ``[B, r]`` distinct removed tokens. dst: ``[B, r]`` their hosts, all survivors.
        weight: ``[B, P + M]`` fusion weights of all tokens (protected first).
        mergeable: M. protected: P. removed: ``[B, M]`` bool mask of ``src`` if the caller has it.
        fuse: False when every removed token has weight 0 (pruning).
    """
    B, r = src.shape
    N = protected + mergeable
    if protected:
        src, dst = src + protected, dst + protected
    if removed is None or protected:
        survives = torch.ones(B, N, dtype=torch.bool, device=src.device).scatter_(1, src, False)
    else:
        survives = ~removed
    rank = survives.cumsum(dim=1) - 1  # slot of each survivor, in current order
    kept = torch.searchsorted(rank, _slots(B, N - r, src.device))
    assign = rank.scatter(1, src, rank.gather(1, dst))
    return MergePlan(assign=assign, weight=weight, num_out=N - r, kept=kept, merged=src if fuse else None)


def plan_from_targets(target: Tensor, weight: Tensor, num_removed: int, protected: int,
                      fuse: bool = True) -> MergePlan:
    """A MergePlan from "who goes where" over the M mergeable tokens.

    Args:
        target: ``[B, M]`` long, index into the M mergeable tokens; ``target[i] == i`` for survivors,
            otherwise the survivor that token i is fused into.
        weight: ``[B, P + M]`` fusion weights for all tokens (protected first).
        num_removed: how many of the M tokens do not survive (same for every batch element).
        protected: P, the count of leading protected tokens.
        fuse: False when every removed token has weight 0 (pruning).
    """
    B, M = target.shape
    N = protected + M
    positions = torch.arange(N, device=target.device)
    if protected:
        target = torch.cat([positions[:protected].expand(B, protected), target + protected], dim=1)
    survives = target == positions
    rank = survives.cumsum(dim=1) - 1
    kept = torch.searchsorted(rank, _slots(B, N - num_removed, target.device))
    merged = _first_positions(~survives, num_removed) if fuse and num_removed else None
    return MergePlan(assign=rank.gather(1, target), weight=weight, num_out=N - num_removed, kept=kept,
                     merged=merged)


def _check_plan(x: Tensor, plan: MergePlan) -> None:
    if x.dim() != 3 or x.shape[:2] != plan.assign.shape:
        raise ValueError(f"tokens must be [B, N, C] with [B, N] = {list(plan.assign.shape)} as in the plan, "
                         f"got shape {tuple(x.shape)}; apply a plan only to the tokens it was made for")


def _kept(plan: MergePlan) -> Tensor:
    """``[B, num_out]`` survivor of each slot: the plan's, or for a hand-made plan the first token of each
    slot (a survivor precedes the tokens merged into it)."""
    if plan.kept is not None:
        return plan.kept
    B, N = plan.assign.shape
    positions = torch.arange(N, device=plan.assign.device).expand(B, N)
    return torch.full((B, plan.num_out), N, device=plan.assign.device).scatter_reduce(
        1, plan.assign, positions, "amin", include_self=True)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``[B, K]`` of ``x`` ``[B, N, C]``: ``[B, K, C]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _fuse(x: Tensor, plan: MergePlan, totals: Optional[Tensor] = None) -> Tensor:
    """``[B, num_out, C]``: each slot the ``plan.weight``-weighted mean of its tokens.

    The survivors are gathered as they are; the slots holding merged tokens are recomputed with one
    ``[B, R, N] x [B, N, C]`` matrix product (R merged tokens, each row the normalised weights of the
    tokens in its slot; float32 accumulation) and written back, each slot once per member with the same
    value. ``totals``: ``[B, num_out]`` summed weights per slot, if the caller has them (the new sizes).
    """
    merged = plan.merged
    if merged is None and plan.kept is not None:  # pruning (or nothing removed): the survivors' values
        return _rows(x, plan.kept)
    out = _rows(x, _kept(plan))
    if merged is None:  # a hand-made plan: every slot is recomputed
        merged = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    if totals is None:
        totals = plan.weight.new_zeros(plan.assign.shape[0], plan.num_out).scatter_add_(1, plan.assign,
                                                                                         plan.weight)
    share = (plan.weight / totals.gather(1, plan.assign)).to(x.dtype)  # [B, N] each token's share of its slot
    slot = plan.assign.gather(1, merged)  # [B, R] the slot each merged token joins
    mixing = (plan.assign.unsqueeze(1) == slot.unsqueeze(2)) * share.unsqueeze(1)  # [B, R, N], x's dtype
    values = torch.bmm(mixing, x)  # [B, R, C]: float32 accumulation for half types
    if values.requires_grad:  # a slot is written once per member: only its first write carries the gradient
        R = slot.shape[1]
        order = torch.arange(R, device=x.device).expand_as(slot)
        first = torch.full_like(out[..., 0], R, dtype=torch.long).scatter_reduce(1, slot, order, "amin")
        values = torch.where((first.gather(1, slot) == order).unsqueeze(-1), values, values.detach())
    return out.scatter(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values)


def merge_weighted(x: Tensor, plan: MergePlan) -> Tensor:
    """Fuse tokens by the plan: each output is the ``plan.weight``-weighted mean of its inputs.

    Args:
        x: ``[B, N, C]`` tokens (any float dtype; accumulation is done in float32 for half types).
    Returns:
        ``[B, plan.num_out, C]`` in the dtype of ``x``. Differentiable with respect to ``x``.
    """
    _check_plan(x, plan)
    return _fuse(x, plan)


def _merge_coord(c: Tensor, rule: str, plan: MergePlan, size: Tensor, new_size: Tensor) -> Tensor:
    B = c.shape[0]
    if rule == "mean":
        return c.new_zeros(B, plan.num_out).scatter_add_(1, plan.assign, c * size) / new_size
    reduce = "amin" if rule == "min" else "amax"
    return c.new_zeros(B, plan.num_out).scatter_reduce_(1, plan.assign, c, reduce=reduce, include_self=False)


def _merge_state(state: TokenState, plan: MergePlan) -> Tuple[TokenState, Tensor]:
    size = state.size
    new_size = size.new_zeros(size.shape[0], plan.num_out).scatter_add_(1, plan.assign, size)
    source = None if state.source is None else plan.assign.gather(1, state.source)
    coords: Dict[str, Tensor] = {
        name: _merge_coord(c, state.rule(name), plan, size, new_size) for name, c in state.coords.items()
    }
    valid = None if state.valid is None else state.valid.gather(1, _kept(plan))
    return state.replace(size=new_size, source=source, coords=coords, valid=valid), new_size


def merge_state(state: TokenState, plan: MergePlan) -> TokenState:
    """Apply the plan to the bookkeeping: sizes add, sources are remapped, coordinates follow their rule,
    validity is the survivor's (padding and real tokens never share a slot)."""
    return _merge_state(state, plan)[0]


def merge_tokens(x: Tensor, state: TokenState, plan: MergePlan) -> Tuple[Tensor, TokenState]:
    """Apply a plan to tokens ``[B, N, C]`` and their state; returns ``([B, num_out, C], state)``.

    When the fusion weights are the sizes (ToMe, PiToMe) the new sizes are the slots' totals, computed once.
    """
    _check_plan(x, plan)
    new_state, new_size = _merge_state(state, plan)
    return _fuse(x, plan, new_size if plan.weight is state.size else None), new_state


def unmerge(tokens: Tensor, state: TokenState) -> Tensor:
    """Spread merged tokens back to the original positions: ``[B, N, C] -> [B, N0, C]``.

    Each original position receives the value of the merged token that holds it.
    """
    if state.source is None:
        raise ValueError("this TokenState has no source map; create it with trace_source=True to unmerge")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] != state.batch_size:
        raise ValueError(f"tokens hold {tokens.shape[0]} batch elements but the state describes "
                         f"{state.batch_size}; pass the state returned together with these tokens")
    state.validate(tokens.shape[1])
    B, _, C = tokens.shape
    return tokens.gather(1, state.source.unsqueeze(-1).expand(B, state.source.shape[1], C))
