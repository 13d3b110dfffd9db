"""Per-row budgets: rows of different lengths and keeps reduced in one padded batch, each exactly as if alone.

A padded batch ``[B, W, C]`` holds in row b its ``lengths[b]`` real tokens first, then padding
(``TokenState.valid`` False). ``RowBudgets`` (made on the host by ``mmmerge.reduce.plan_rows``, once per layout)
says how many real tokens every row removes in every round: the rounds the row would take alone. Each round
removes the same count ``r`` from every row; what a row's real tokens do not give up, its padding does.

Inside a matcher a round's per-row count is its ``quota`` (``[B]`` long): the real tokens and the padding of a row
form two tiers that never meet (no pair across them merges, no choice in one depends on the other), and the row's
real tier removes ``quota[b]`` tokens, its padding ``r - quota[b]``. Real tokens then take exactly the choices
they take alone (up to exact ties and float rounding of sums over the row), so a batch of rows of different
sizes is one engine call: no loop over rows and no host read. The plan makes every padding budget feasible
(``step_limit`` of the padding), so padding needs no anchor and the real tier needs none either: a real token
always has a real host left.

Everything here runs on the device with shapes fixed by ``r`` and the row width.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .constraints import Constraint, Global, Partition, group_sorted
from .state import TokenState


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class RowBudgets:
    """How a padded batch of rows reaches each row's own keep (see the module docstring).

    Attributes:
        method: the method the rounds were planned for (their sizes follow its ``step_limit``).
        lengths: real tokens of each row (a prefix of the row). keeps: real tokens each row keeps.
        width: W, the padded row length (at least ``max(lengths)``, more where padding must absorb a round).
        steps: tokens every row removes in each round (real and padding together).
        removed: per round, the real tokens each row removes (host ints, the rounds of the row alone).
        valid: ``[B, W]`` bool, True for the real tokens.
        quotas: per round, ``removed`` as a ``[B]`` long tensor (on the device the batch runs on).
        tables: per round, the fused step's per-row tables ``(ids [B, W_k], sel [B, S_k])`` int32
            (``mmmerge.fused.row_tables``; W_k the row width entering round k), for ``dominant`` ``(counts [B, 2],)``
            int32 (real tokens, real tokens kept), empty for methods without a fused step. Static: a round keeps
            each tier's survivors in order, so row b always holds its real tokens first.
        valid_out: ``[B, out]`` bool, True for the real tokens of the output (row b's first ``keeps[b]``).
    """

    method: str
    lengths: Tuple[int, ...]
    keeps: Tuple[int, ...]
    width: int
    steps: Tuple[int, ...]
    removed: Tuple[Tuple[int, ...], ...]
    valid: Tensor
    quotas: Tuple[Tensor, ...]
    tables: Tuple[Tuple[Tensor, ...], ...]
    valid_out: Tensor

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def out(self) -> int:
        """Tokens per row after the reduction: row b's ``keeps[b]`` real tokens first, then padding."""
        return self.width - sum(self.steps)

    def moved(self, move: Callable[[Tensor], Tensor]) -> "RowBudgets":
        """The same budgets with every tensor passed through ``move`` (e.g. a copy to the device)."""
        return replace(self, valid=move(self.valid), quotas=tuple(move(q) for q in self.quotas),
                       tables=tuple(tuple(move(t) for t in tables) for tables in self.tables),
                       valid_out=move(self.valid_out))


def best_with_quota(values: Tensor, take: int, second: Tensor, quota: Tensor, descending: bool) -> Tensor:
    """Indices ``[B, take]`` of the best ``quota[b]`` entries of the first tier and the best ``take - quota[b]`` of
    the second, per row: the first tier's in order of value (best first), then the second's.

    One stable sort by value, one stable sort by tier; a row's first tier then sits at the front of its list, its
    second tier right after it, so the picks are a per-row shift of ``arange(take)`` (no data-dependent shape).

    Args:
        values: ``[B, K]``. second: ``[B, K]`` bool, True for the entries of the second tier (padding).
        quota: ``[B]`` long, entries of the first tier to take (each row has at least that many, and at least
            ``take - quota`` in the second tier).
    """
    order = group_sorted(values, second.to(torch.int8), descending)
    first_count = values.shape[1] - second.sum(1, keepdim=True)  # [B, 1]
    quota = quota.unsqueeze(1)
    j = torch.arange(take, device=values.device).unsqueeze(0)  # [1, take]
    return order.gather(1, j + (j >= quota) * (first_count - quota))


def tier_mask(tier: Tensor, idx_a: Tensor, idx_b: Tensor) -> Tensor:
    """``[B, Na, Nb]`` bool, True where token ``idx_a[b, i]`` and token ``idx_b[b, j]`` lie in different tiers.
    ``tier``: ``[B, M]`` bool (padding); ``idx_a`` ``[B, Na]``, ``idx_b`` ``[B, Nb]``."""
    return tier.gather(1, idx_a).unsqueeze(2) != tier.gather(1, idx_b).unsqueeze(1)


def check_quota(quota: Optional[Tensor], state: TokenState, constraint: Optional[Constraint],
                partition: Optional[Partition], method: str) -> None:
    """A quota needs padding to hold the rest, and stands alone: no protected tokens, coordinate rule or groups."""
    if quota is None:
        return
    if state.valid is None or state.protected or partition is not None or not isinstance(constraint or Global(), Global):
        raise ValueError(f"{method}: per-row budgets (quota=) need a padding mask (TokenState.valid), no protected "
                         "tokens, no constraint and no groups")
    if not isinstance(quota, Tensor) or tuple(quota.shape) != (state.batch_size,):
        raise ValueError(f"{method}: quota must be a [B={state.batch_size}] tensor")


class RowTiers:
    """The real/padding tiers of a padded batch for the greedy selections (DivPrune, CDPruner): ``same`` says which
    pairs share a tier, ``keep`` how many tokens each tier of each row keeps.

    Args:
        valid: ``[B, M]`` bool. kept: ``[B]`` long, real tokens each row keeps. total: tokens every row keeps
            (real and padding).
    """

    def __init__(self, valid: Tensor, kept: Tensor, total: int) -> None:
        self.tier = (~valid).long()  # [B, M]: 0 real, 1 padding
        self.same = valid.unsqueeze(2) == valid.unsqueeze(1)  # [B, M, M]
        self.keep = torch.stack([kept, total - kept], dim=1)  # [B, 2]

    def same_as(self, j: Tensor) -> Tensor:
        """``[B, M]``: the tokens in the tier of token ``j[b]`` of each row."""
        B, M, _ = self.same.shape
        return self.same.gather(1, j.view(B, 1, 1).expand(B, 1, M)).squeeze(1)
