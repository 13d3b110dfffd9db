"""MergePlan and the one merge operation that applies it to tokens and to their TokenState.

A plan says, for every current token, which output slot it goes to (``assign``) and with what
weight it is fused there (``weight``). Everything per-token goes through the same plan:
hidden states (weighted mean), size (sum), source (remap), coordinates (their rule), validity.

Output order: protected tokens first, then the surviving tokens in their current order. Every token has
a *representative*, the original token that survived every step (the host of each merge); tokens stay
sorted by their representative's original position. So a time-major grid keeps frames in order and
contiguous, a frame's tokens stay in raster order, and ``Partition`` groups stay static ranges.
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
    """

    assign: Tensor
    weight: Tensor
    num_out: int


def _with_protected(assign_m: Tensor, protected: int) -> Tensor:
    """Slots of the mergeable tokens ``[B, M]`` -> slots of all tokens ``[B, P + M]`` (protected first)."""
    if not protected:
        return assign_m
    B = assign_m.shape[0]
    head = torch.arange(protected, device=assign_m.device).unsqueeze(0).expand(B, -1)
    return torch.cat([head, assign_m + protected], dim=1)


def plan_from_pairs(src: Tensor, dst: Tensor, weight: Tensor, mergeable: int, protected: int,
                    removed: Optional[Tensor] = None) -> MergePlan:
    """A MergePlan from "token ``src[b, i]`` fuses into token ``dst[b, i]``" (mergeable indices).

    Args:
        src: ``[B, r]`` distinct removed tokens. dst: ``[B, r]`` their hosts, all survivors.
        weight: ``[B, P + M]`` fusion weights of all tokens (protected first).
        mergeable: M. protected: P. removed: ``[B, M]`` bool mask of ``src`` if the caller has it.
    """
    B, r = src.shape
    if removed is None:
        removed = torch.zeros(B, mergeable, dtype=torch.bool, device=src.device).scatter_(1, src, True)
    rank = (~removed).cumsum(dim=1) - 1  # slot of each survivor, in current order
    assign_m = rank.scatter(1, src, rank.gather(1, dst))
    return MergePlan(assign=_with_protected(assign_m, protected), weight=weight, num_out=protected + mergeable - r)


def plan_from_targets(target: Tensor, weight: Tensor, num_removed: int, protected: int) -> MergePlan:
    """A MergePlan from "who goes where" over the M mergeable tokens.

    Args:
        target: ``[B, M]`` long, index into the M mergeable tokens; ``target[i] == i`` for survivors,
            otherwise the survivor that token i is fused into.
        weight: ``[B, P + M]`` fusion weights for all tokens (protected first).
        num_removed: how many of the M tokens do not survive (same for every batch element).
        protected: P, the count of leading protected tokens.
    """
    B, M = target.shape
    survivor = target == torch.arange(M, device=target.device)
    rank = survivor.cumsum(dim=1) - 1
    return MergePlan(assign=_with_protected(rank.gather(1, target), protected), weight=weight,
                     num_out=protected + M - num_removed)


def _check_plan(x: Tensor, plan: MergePlan) -> None:
    if x.dim() != 3 or x.shape[:2] != plan.assign.shape:
        raise ValueError(f"tokens must be [B, N, C] with [B, N] = {list(plan.assign.shape)} as in the plan, "
                         f"got shape {tuple(x.shape)}; apply a plan only to the tokens it was made for")


def _accumulate(x: Tensor, plan: MergePlan, weight: Tensor, total: Optional[Tensor]) -> Tensor:
    """``sum(weight * x) / total`` per output slot; ``total`` defaults to the summed weights."""
    B, N, C = x.shape
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = weight.to(acc).unsqueeze(-1)  # [B, N, 1]
    num = x.new_zeros(B, plan.num_out, C, dtype=acc).scatter_add_(1, plan.assign.unsqueeze(-1).expand(B, N, C),
                                                                  x.to(acc) * w)
    if total is None:
        total = weight.new_zeros(B, plan.num_out).scatter_add_(1, plan.assign, weight)
    return (num / total.to(acc).unsqueeze(-1)).to(x.dtype)


def merge_weighted(x: Tensor, plan: MergePlan) -> Tensor:
    """Fuse tokens by the plan: each output is the ``plan.weight``-weighted mean of its inputs.

    Args:
        x: ``[B, N, C]`` tokens (any float dtype; accumulation is done in float32 for half types).
    Returns:
        ``[B, plan.num_out, C]`` in the dtype of ``x``. Differentiable with respect to ``x``.
    """
    _check_plan(x, plan)
    return _accumulate(x, plan, plan.weight, None)


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
    valid: Optional[Tensor] = None
    if state.valid is not None:
        # Constraints keep padding and real tokens apart, so any() == all() inside a group.
        valid = torch.zeros(size.shape[0], plan.num_out, dtype=torch.bool, device=size.device).scatter_reduce_(
            1, plan.assign, state.valid, reduce="amax", include_self=False)
    return state.replace(size=new_size, source=source, coords=coords, valid=valid), new_size


def merge_state(state: TokenState, plan: MergePlan) -> TokenState:
    """Apply the plan to the bookkeeping: sizes add, sources are remapped, coordinates follow their rule."""
    return _merge_state(state, plan)[0]


def merge_tokens(x: Tensor, state: TokenState, plan: MergePlan) -> Tuple[Tensor, TokenState]:
    """Apply a plan to tokens ``[B, N, C]`` and their state; returns ``([B, num_out, C], state)``.

    When the fusion weights are the sizes (ToMe, PiToMe) the new sizes are the normalisers, computed once.
    """
    _check_plan(x, plan)
    new_state, new_size = _merge_state(state, plan)
    total = new_size if plan.weight is state.size else None
    return _accumulate(x, plan, plan.weight, total), new_state


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
