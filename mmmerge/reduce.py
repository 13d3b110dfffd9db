"""One merge step (choose + apply) and ``reduce_tokens``, the one-shot reduction to exactly K tokens.

``plan_merge`` is the checked entry point of the engine: it validates shapes, options, the constraint
and the step's feasibility (all static: no host sync) and then runs the matcher. ``plan_rows`` plans a padded
batch of rows with a keep each (``RowBudgets``, ``mmmerge.rows``), which ``reduce_tokens`` reduces in one call.
"""
from __future__ import annotations

import functools
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .constraints import (ConstraintSpec, Global, Guarantee, Partition, guarantee_with_padding, padded_guarantee,
                          parse_constraint, split_budget)
from .constraints import check_layout as _check_layout
from .methods import check_options, check_step, get_matcher, group_limits, step_limit
from .fused import ROW_TABLE_METHODS, fused_choice, fused_reduce, row_tables
from .fused_selection import dominant_fused, fused_dominant
from .merge import MergePlan, merge_tokens, merge_weighted
from .rows import RowBudgets
from .state import TokenState, init_state


def _check_token_tensor(name: str, value: Any, B: int, N: int, method: str) -> None:
    if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != (B, N)):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{method}: {name} must be [B, N]=[{B}, {N}], got {shape}")


def equal_groups(state: TokenState, groups: int, r: int, method: str) -> Partition:
    """``groups`` contiguous groups of (nearly) equal size over the mergeable tokens, sharing ``r``."""
    M = state.num_tokens - state.protected
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= M:
        raise ValueError(f"groups must be an int in [1, {M}] (the mergeable tokens), got {groups!r}")
    base, extra = divmod(M, groups)
    sizes = tuple(base + (1 if g < extra else 0) for g in range(groups))
    guarantees = (Guarantee(),) * groups
    if state.valid is not None:  # a group may hold padding and real tokens, in any order: count them
        valid = state.valid[:, state.protected:]
        changes = F.pad((valid[:, 1:] != valid[:, :-1]).long().cumsum(1), (1, 0))  # [B, M] changes before i
        ends = torch.tensor(sizes, device=valid.device).cumsum(0)
        inside = changes[:, ends - 1] - changes[:, ends - torch.tensor(sizes, device=valid.device)]  # [B, groups]
        # a group is one clique of any pair; the padding rule says what its changes do (one host read, setup time)
        guarantees = tuple(guarantee_with_padding(Global(), n) for n in inside.amax(0).tolist())
    try:
        budgets = split_budget(r, sizes, group_limits(method, sizes, guarantees))
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
    return Partition(sizes=sizes, budgets=budgets, guarantees=guarantees)


def plan_merge(metric: Tensor, state: TokenState, r: int, method: str = "tome", constraint: ConstraintSpec = None,
               groups: Union[None, int, Partition] = None, *, check_layout: bool = True, **options) -> MergePlan:
    """Choose which tokens merge: run the matcher, optionally with a budget per group.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens.
        r: tokens to remove in total.
        constraint: a coordinate rule (name or Constraint built with its ``steps``; ``mmmerge.constraints``).
        groups: static groups with a budget each: an int (that many contiguous, nearly equal groups sharing
            ``r`` as evenly as possible) or a ``Partition``.
        check_layout: verify (one host read) that the tokens are in the order the rule assumes; pass False
            where the order is known (adapters), to keep a GPU forward free of host syncs.
        **options: the matcher's options (checked: unknown names and bad values raise ValueError).
    """
    if not isinstance(metric, Tensor) or metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(getattr(metric, 'shape', ()))}")
    state.validate(metric.shape[1])
    matcher = get_matcher(method)
    check_options(method, options)
    B, N = metric.shape[:2]
    for name in ("score", "noise"):
        _check_token_tensor(name, options.get(name), B, N, method)
    constraint = parse_constraint(constraint)
    constraint.check(state)
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    partition = equal_groups(state, groups, r, method) if isinstance(groups, int) else groups
    if partition is not None and not isinstance(partition, Partition):
        raise TypeError(f"groups must be an int or a Partition, got {type(groups).__name__}")
    if check_layout:
        _check_layout(state, constraint)
    check_step(method, r, state, constraint, partition)
    return matcher(metric, state, r, constraint, partition, **options)


def reduction_steps(method: str, num_tokens: int, keep: int, protected: int,
                    guarantee: Guarantee = Guarantee()) -> List[int]:
    """Tokens removed by each step of a one-shot reduction from ``num_tokens`` to ``keep`` (static).

    Bipartite methods (tome, pitome, random) take rounds of what one step can always remove; the
    select-style ones one step. Raises ValueError if ``keep`` is out of reach under the constraint.
    """
    steps, n = [], num_tokens
    while n > keep:
        r = min(n - keep, step_limit(method, n - protected, guarantee))
        if r <= 0:
            raise ValueError(f"keep={keep} is out of reach for '{method}' under this constraint: it stops at "
                             f"{n} tokens ({guarantee.runs} runs, {guarantee.cliques} cliques of tokens that may "
                             "merge); use a larger keep or a looser constraint")
        steps.append(r)
        n -= r
    return steps


def _least_padding(method: str, removed: int) -> int:
    """Fewest padding tokens from which one step of ``method`` can remove ``removed`` (``step_limit`` grows with
    the token count: at most ``2 * removed + 1`` tokens are ever needed)."""
    if removed == 0:
        return 0
    return next(n for n in range(removed, 2 * removed + 2) if step_limit(method, n) >= removed)


def plan_rows(method: str, lengths: Sequence[int], keeps: Sequence[int]) -> RowBudgets:
    """Plan one padded batch of rows that each reduce as if alone: row b, ``lengths[b]`` real tokens, keeps
    ``keeps[b]`` (host arithmetic on the counts only; callers cache it per layout, tensors on the CPU).

    Every row takes its own rounds (``reduction_steps``); a round removes the most any row removes in it, the
    padding of the other rows the difference, and the rows are padded to the width where every such padding
    budget fits one step (``step_limit`` of the padding alone). Returns a ``RowBudgets`` for ``reduce_tokens``;
    move its tensors with ``RowBudgets.moved``.
    """
    lengths, keeps = tuple(int(n) for n in lengths), tuple(int(k) for k in keeps)
    if not lengths or len(lengths) != len(keeps):
        raise ValueError(f"plan_rows needs one keep per row, got {len(lengths)} lengths and {len(keeps)} keeps")
    for n, k in zip(lengths, keeps):
        if not 1 <= k <= n:
            raise ValueError(f"a row of {n} tokens must keep between 1 and {n}, got keep={k}")
    own = [reduction_steps(method, n, k, 0) for n, k in zip(lengths, keeps)]
    rounds = max(len(s) for s in own)
    removed = tuple(tuple(s[t] if t < len(s) else 0 for s in own) for t in range(rounds))  # [round][row]
    steps = tuple(max(r) for r in removed)
    width = max(lengths)
    for b, n in enumerate(lengths):
        used = 0  # padding the row has given up before this round
        for t in range(rounds):
            d = steps[t] - removed[t][b]
            width = max(width, n + used + _least_padding(method, d))
            used += d
    valid = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    quotas = tuple(torch.tensor(r) for r in removed)
    tables, real = [], lengths
    for quota, r in zip(removed, steps):  # the fused step's tables of each round (real tokens stay in front)
        if method in ROW_TABLE_METHODS:
            tables.append(row_tables(method, real, quota, width, r))
        real, width = tuple(n - q for n, q in zip(real, quota)), width - r
    valid_out = torch.arange(width).unsqueeze(0) < torch.tensor(keeps).unsqueeze(1)
    return RowBudgets(method, lengths, keeps, valid.shape[1], steps, removed, valid, quotas, tuple(tables), valid_out)


def _check_rows(rows: RowBudgets, x: Tensor, keep: int, method: str, protected: int, state: Optional[TokenState],
                constraint, options) -> None:
    if not isinstance(rows, RowBudgets):
        raise TypeError(f"rows must be a RowBudgets (mmmerge.reduce.plan_rows), got {type(rows).__name__}")
    if rows.method != method:
        raise ValueError(f"these row budgets were planned for '{rows.method}', not '{method}'")
    if tuple(x.shape[:2]) != (rows.rows, rows.width) or keep != rows.out:
        raise ValueError(f"row budgets: x must be [{rows.rows}, {rows.width}, C] and keep={rows.out}, got "
                         f"{tuple(x.shape)} and keep={keep}")
    if protected or state is not None or constraint is not None:
        raise ValueError("row budgets take no protected tokens, state or constraint")
    contextual = options.get("contextual")
    if contextual is not None and contextual > min(rows.keeps):
        raise ValueError(f"{method}: contextual={contextual} is more than the {min(rows.keeps)} tokens a row keeps")


def reduce_tokens(x: Tensor, keep: int, method: str = "tome", metric: Optional[Tensor] = None,
                  protected: int = 0, constraint: ConstraintSpec = None, state: Optional[TokenState] = None,
                  *, check_layout: bool = True, rows: Optional[RowBudgets] = None,
                  **options) -> Tuple[Tensor, TokenState]:
    """Reduce a token set to exactly ``keep`` tokens in one call.

    Bipartite methods (tome, pitome, random) run rounds of at most what one step can remove; tps and
    prune select-and-assign in one step. The number of rounds depends only on shapes (no host sync). ToMe,
    PiToMe and TPS (also with a given score), and ``dominant`` with a given score, without a rule or padding, or
    over rows with budgets of their own, take the fused steps (``mmmerge.fused``, ``mmmerge.fused_selection``: two
    custom ops per round, the same plans).

    Args:
        x: ``[B, N, C]`` tokens. keep: tokens to return, ``protected + 1 <= keep <= N``.
        metric: ``[B, N, C']`` similarity features (default: ``x``); merged along with ``x``.
        protected: leading tokens that never merge (with ``state``: leave 0 or match ``state.protected``).
        state: optional TokenState with coordinates (needed by time/band constraints).
        check_layout: verify the token order the constraint assumes (one host read; see ``plan_merge``).
        rows: per-row budgets (``plan_rows``): ``x`` is a padded batch ``[rows, width, C]``, row b's real tokens
            first, and row b keeps ``rows.keeps[b]`` of them in ``rows.steps`` rounds, as alone; ``keep`` is
            ``rows.out`` (row b's output: its real tokens, then padding). No protected tokens, state or
            constraint. The returned state's ``valid`` marks the real output tokens.
        **options: the matcher's options (checked once, before anything runs).
    Returns:
        ``(tokens [B, keep, C], state)`` with ``state.size`` ``[B, keep]`` and ``state.source`` ``[B, N]``
        (original position -> output token); protected first, then the survivors in original order.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, N, C] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, N, _ = x.shape
    if rows is not None:
        _check_rows(rows, x, keep, method, protected, state, constraint, options)
        state = init_state(B, N, device=x.device, valid=rows.valid)
    if state is None:
        if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0 or protected >= N:
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
    check_options(method, options)
    if method == "none" and keep != N:
        raise ValueError("method 'none' cannot reduce tokens; use keep=N or another method")
    constraint = parse_constraint(constraint)
    constraint.check(state)
    if check_layout:
        _check_layout(state, constraint)
    if rows is not None:
        steps, quotas = rows.steps, [{"quota": q} for q in rows.quotas]
    else:
        steps = reduction_steps(method, N, keep, P,
                                padded_guarantee(constraint, None if state.valid is None else state.valid[:, P:]))
        quotas = [{}] * len(steps)
    for name in ("score", "noise"):
        _check_token_tensor(name, options.get(name), B, N, method)
    if len(steps) > 1 and any(options.get(name) is not None for name in ("score", "noise")):
        raise ValueError(f"{method}: a per-token score or noise applies to one step; this reduction takes "
                         f"{len(steps)} rounds")
    choose, score = None, options.get("score")
    if method == "dominant" and score is not None and dominant_fused(N, isinstance(constraint, Global),
                                                                     state.valid is not None, bool(state.coords), rows):
        return fused_dominant(x, x if metric is None else metric, state, steps, score, options.get("contextual"),
                              rows)
    if options.get("noise") is None and (score is None or method == "tps") and (rows is None or rows.tables):
        # the fused steps? Over rows with budgets, their static per-row tier tables stand for the padding mask
        choose = fused_choice(method, options, P, N, 1, isinstance(constraint, Global),
                              rows is None and state.valid is not None, bool(state.coords),
                              options.get("layer_idx", 0), options.get("num_layers", 1))
    if choose is not None:
        if score is not None:
            choose = functools.partial(choose, score=score)
        return fused_reduce(x, metric, state, steps, choose, method, rows)
    matcher = get_matcher(method)
    for k, (r, quota) in enumerate(zip(steps, quotas)):
        plan = matcher(x if metric is None else metric, state, r, constraint, None, **options, **quota)
        if metric is not None and k + 1 < len(steps):  # the state is merged once, with x; the last metric unread
            metric = merge_weighted(metric, plan)
        x, state = merge_tokens(x, state, plan)
    return x, state
