"""MergePlan and the one merge operation that applies it to tokens and to their TokenState.

A plan says, for every current token, which output slot it goes to (``assign``) and with what
weight it is fused there (``weight``). Everything per-token goes through the same plan:
hidden states (weighted mean), size (sum), source (remap), coordinates (their rule), validity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from .state import TokenState


@dataclass
class MergePlan:
    """Output of a matcher.

    Attributes:
        assign: ``[B, N]`` long in ``[0, num_out)``: output slot of each input token. Protected tokens
            map to themselves; surviving tokens map to their own slot; merged tokens to their destination.
        weight: ``[B, N]`` float: fusion weight of each input token inside its slot (size for ToMe and
            PiToMe, size * similarity-softmax for TPS, 0 for pruned values).
        num_out: output token count (a Python int: shapes never depend on data).
    """

    assign: Tensor
    weight: Tensor
    num_out: int


def plan_from_targets(target: Tensor, weight: Tensor, num_removed: int, protected: int) -> MergePlan:
    """Turn "who goes where" over the mergeable tokens into a MergePlan with the documented order.

    Args:
        target: ``[B, M]`` long, index into the M mergeable tokens; ``target[i] == i`` for survivors,
            otherwise the survivor that token i is fused into.
        weight: ``[B, P + M]`` fusion weights for all tokens (protected first).
        num_removed: how many of the M tokens do not survive (same for every batch element).
        protected: P, the count of leading protected tokens.

    Output order: protected tokens first, then survivors sorted by the smallest position in their
    group. Current positions are ordered by earliest source (inductively), so this keeps groups in
    order of their earliest original token: grids and time order survive merging.
    """
    B, M = target.shape
    positions = torch.arange(M, device=target.device).unsqueeze(0).expand(B, -1)
    # Smallest member position of each group, stored at the survivor; non-survivors keep M (sort last).
    first_member = torch.full_like(target, M).scatter_reduce(1, target, positions, reduce="amin", include_self=True)
    order = torch.argsort(first_member, dim=1, stable=True)  # [B, M]; first M - r are survivors
    rank = torch.empty_like(order).scatter_(1, order, positions)  # inverse permutation
    assign_m = rank.gather(1, target) + protected  # [B, M]
    if protected:
        head = torch.arange(protected, device=target.device).unsqueeze(0).expand(B, -1)
        assign = torch.cat([head, assign_m], dim=1)
    else:
        assign = assign_m
    return MergePlan(assign=assign, weight=weight, num_out=protected + M - num_removed)


def merge_weighted(x: Tensor, plan: MergePlan) -> Tensor:
    """Fuse tokens by the plan: each output is the ``plan.weight``-weighted mean of its inputs.

    Args:
        x: ``[B, N, C]`` tokens (any float dtype; accumulation is done in float32 for half types).
    Returns:
        ``[B, plan.num_out, C]`` in the dtype of ``x``. Differentiable with respect to ``x``.
    """
    if x.dim() != 3 or x.shape[:2] != plan.assign.shape:
        raise ValueError(f"tokens must be [B, N, C] with [B, N] = {list(plan.assign.shape)} as in the plan, "
                         f"got shape {tuple(x.shape)}; apply a plan only to the tokens it was made for")
    B, N, C = x.shape
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = plan.weight.to(acc_dtype).unsqueeze(-1)  # [B, N, 1]
    index = plan.assign.unsqueeze(-1).expand(B, N, C)
    num = x.new_zeros(B, plan.num_out, C, dtype=acc_dtype).scatter_add(1, index, x.to(acc_dtype) * w)
    den = x.new_zeros(B, plan.num_out, 1, dtype=acc_dtype).scatter_add(1, plan.assign.unsqueeze(-1), w)
    return (num / den.clamp_min(torch.finfo(acc_dtype).tiny)).to(x.dtype)


def _merge_coord(c: Tensor, rule: str, plan: MergePlan, size: Tensor, new_size: Tensor) -> Tensor:
    B = c.shape[0]
    if rule == "mean":
        num = c.new_zeros(B, plan.num_out).scatter_add(1, plan.assign, c * size)
        return num / new_size
    reduce = "amin" if rule == "min" else "amax"
    return c.new_zeros(B, plan.num_out).scatter_reduce(1, plan.assign, c, reduce=reduce, include_self=False)


def merge_state(state: TokenState, plan: MergePlan) -> TokenState:
    """Apply the plan to the bookkeeping: sizes add, sources are remapped, coordinates follow their rule."""
    size = state.size
    new_size = size.new_zeros(size.shape[0], plan.num_out).scatter_add(1, plan.assign, size)
    source = None if state.source is None else plan.assign.gather(1, state.source)
    coords: Dict[str, Tensor] = {
        name: _merge_coord(c, state.rule(name), plan, size, new_size) for name, c in state.coords.items()
    }
    valid: Optional[Tensor] = None
    if state.valid is not None:
        # Constraints keep padding and real tokens apart, so any() == all() inside a group.
        valid = torch.zeros(size.shape[0], plan.num_out, dtype=torch.bool, device=size.device).scatter_reduce(
            1, plan.assign, state.valid, reduce="amax", include_self=False)
    return state.replace(size=new_size, source=source, coords=coords, valid=valid)


def unmerge(tokens: Tensor, state: TokenState) -> Tensor:
    """Spread merged tokens back to the original positions: ``[B, N, C] -> [B, N0, C]``.

    Each original position receives the value of the merged token that holds it.
    """
    if state.source is None:
        raise ValueError("this TokenState has no source map; create it with trace_source=True to unmerge")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, C], got shape {tuple(tokens.shape)}")
    state.validate(tokens.shape[1])
    B, _, C = tokens.shape
    return tokens.gather(1, state.source.unsqueeze(-1).expand(B, state.source.shape[1], C))
