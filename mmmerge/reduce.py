"""One merge step (choose + apply) and ``reduce_tokens``, the one-shot reduction to exactly K tokens."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .constraints import ConstraintSpec, parse_constraint
from .matchers import HALF_LIMITED, get_matcher, max_r
from .merge import MergePlan, merge_state, merge_weighted
from .state import TokenState, init_state


def _group_state(state: TokenState, groups: int) -> TokenState:
    """View the mergeable tokens as ``groups`` contiguous blocks: ``[B, P + G*n] -> [B*G, n]``, no protected."""
    P = state.protected
    B, N = state.size.shape
    n = (N - P) // groups

    def split(t: Tensor) -> Tensor:
        return t[:, P:].reshape(B * groups, n)

    return TokenState(
        size=split(state.size),
        coords={k: split(v) for k, v in state.coords.items()},
        rules=state.rules,
        protected=0,
        valid=None if state.valid is None else split(state.valid),
    )


def plan_merge(metric: Tensor, state: TokenState, r: int, method: str = "tome",
               constraint: ConstraintSpec = None, groups: int = 1, **hyper) -> MergePlan:
    """Choose which tokens merge: run the matcher, optionally with an equal budget per group.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens.
        r: tokens to remove in total. groups: if > 1, the mergeable tokens are ``groups`` contiguous
            equal blocks (frames, bands) and each removes ``r / groups`` inside itself.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    state.validate(metric.shape[1])
    matcher = get_matcher(method)
    constraint = parse_constraint(constraint)
    constraint.check(state)
    if groups == 1:
        return matcher(metric, state, r, constraint, **hyper)

    P = state.protected
    B, N, C = metric.shape
    if (N - P) % groups or r % groups:
        raise ValueError(
            f"per-group budgets need equal groups: {N - P} mergeable tokens and r={r} must both divide "
            f"into {groups} groups"
        )
    n, r_g = (N - P) // groups, r // groups
    if hyper.get("score") is not None:  # per-token importance [B, N] (tps, prune) follows the tokens
        score = hyper["score"]
        if score.shape != (B, N):
            raise ValueError(f"{method}: score must be [B, N]=[{B}, {N}], got {tuple(score.shape)}")
        hyper = {**hyper, "score": score[:, P:].reshape(B * groups, n)}
    sub_plan = matcher(metric[:, P:].reshape(B * groups, n, C), _group_state(state, groups), r_g, constraint, **hyper)
    # Group g's outputs follow group g-1's: groups stay contiguous and in order.
    offsets = torch.arange(groups, device=metric.device).repeat(B).unsqueeze(1) * (n - r_g) + P  # [B*G, 1]
    assign_m = (sub_plan.assign + offsets).reshape(B, N - P)
    weight_m = sub_plan.weight.reshape(B, N - P)
    head = torch.arange(P, device=metric.device).unsqueeze(0).expand(B, -1)
    return MergePlan(
        assign=torch.cat([head, assign_m], dim=1),
        weight=torch.cat([state.size[:, :P], weight_m], dim=1),
        num_out=P + groups * (n - r_g),
    )


def merge_tokens(x: Tensor, state: TokenState, plan: MergePlan) -> Tuple[Tensor, TokenState]:
    """Apply a plan to tokens ``[B, N, C]`` and their state; returns ``([B, num_out, C], state)``."""
    return merge_weighted(x, plan), merge_state(state, plan)


def reduce_tokens(x: Tensor, keep: int, method: str = "tome", metric: Optional[Tensor] = None,
                  protected: int = 0, constraint: ConstraintSpec = None, state: Optional[TokenState] = None,
                  **hyper) -> Tuple[Tensor, TokenState]:
    """Reduce a token set to exactly ``keep`` tokens in one call.

    Bipartite methods (tome, pitome, random) run rounds of at most half the mergeable tokens; tps and
    prune select-and-assign in one step. The number of rounds depends only on shapes (no host sync).

    Args:
        x: ``[B, N, C]`` tokens. keep: tokens to return, ``protected + 1 <= keep <= N``.
        metric: ``[B, N, C']`` similarity features (default: ``x``); merged along with ``x``.
        protected: leading tokens that never merge (with ``state``: leave 0 or match ``state.protected``).
        state: optional TokenState with coordinates (needed by time/band constraints).
    Returns:
        ``(tokens [B, keep, C], state)`` with ``state.size`` ``[B, keep]`` and ``state.source`` ``[B, N]``
        (original position -> output token); protected first, then groups in original order.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, N, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, N, _ = x.shape
    if state is None:
        if not isinstance(protected, int) or protected < 0 or protected >= N:
            raise ValueError(f"protected must be an int in [0, N-1]={N - 1}, got {protected}")
        state = init_state(B, N, device=x.device, protected=protected)
    elif protected not in (0, state.protected):
        raise ValueError(f"protected={protected} disagrees with state.protected={state.protected}; "
                         "pass one or the other")
    state.validate(N)
    if state.source is None:
        raise ValueError("reduce_tokens needs a state with a source map (init_state(trace_source=True))")
    P = state.protected
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if not P + 1 <= keep <= N:
        raise ValueError(f"keep={keep} must be between protected+1={P + 1} and the {N} tokens given")
    if metric is not None and (metric.dim() != 3 or metric.shape[:2] != x.shape[:2]):
        raise ValueError(f"metric must be [B, N, C'] with B, N = {B}, {N}; got {tuple(metric.shape)}")
    get_matcher(method)
    if method == "none" and keep != N:
        raise ValueError("method 'none' cannot reduce tokens; use keep=N or another method")

    n = N
    while n > keep:
        r = min(n - keep, max_r(method, n - P)) if method in HALF_LIMITED else n - keep
        plan = plan_merge(x if metric is None else metric, state, r, method, constraint, **hyper)
        if metric is not None:
            metric = merge_weighted(metric, plan)
        x, state = merge_tokens(x, state, plan)
        n -= r
    return x, state
