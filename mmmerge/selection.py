"""Selection methods: keep chosen tokens as they are, merge (or drop) the rest into them.

    dominant  VisionZip-style: keep the most important tokens, merge the rest into a few (Yang et al., 2025)
    divprune  keep a maximally diverse set (max-min distance, Alvar et al., CVPR 2025)
    cdpruner  keep a diverse and question-relevant set (a DPP, Zhang et al., 2025)

Same contract as ``matchers.py``: pure functions ``(metric, state, r, constraint, partition, **options) ->
MergePlan`` whose shapes depend only on ``r`` and the token count.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .constraints import Constraint, Global, Partition, allowed_pairs
from .matchers import (NEG_INF, POS_INF, _anchors, _arange, _mask, _needs_anchors, _normalized, _rows, energy_score,
                       identity_plan)
from .merge import MergePlan, plan_from_targets
from .rows import RowTiers, check_quota
from .state import TokenState

WHOLE_SET_METHODS = frozenset({"dominant"})  # choose over all tokens at once: no per-group budgets


def check_partitionable(method: str) -> None:
    """Raise ValueError if ``method`` cannot share its r among static groups (per-frame / per-band budgets)."""
    if method in WHOLE_SET_METHODS:
        raise ValueError(f"method {method!r} selects over all tokens at once and takes no per-group budgets; "
                         "pass group_budget=False (one budget under the same time rule) or use another method")


# --------------------------------------------------------------------------------- selection: dominant
def default_contextual(kept: int) -> int:
    """VisionZip's contextual token count for ``kept`` tokens: 10 of every 64 kept (round half to even), at least
    1."""
    return max(1, round(kept * 10 / 64))


def check_contextual(contextual: Optional[int], kept: int) -> None:
    """Raise ValueError if ``contextual`` targets do not fit in the ``kept`` mergeable tokens (None: the default
    count, which always fits)."""
    if contextual is not None and contextual > kept:
        raise ValueError(f"dominant: contextual={contextual} is more than the {kept} mergeable tokens kept; use "
                         f"contextual <= {kept}")


def dominant(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
             partition: Optional[Partition] = None, *, score: Optional[Tensor] = None,
             contextual: Optional[int] = None, quota: Optional[Tensor] = None) -> MergePlan:
    """VisionZip-style (Yang et al., CVPR 2025): keep the most important tokens as they are, merge the rest
    into a few contextual tokens.

    Of the ``K = M - r`` mergeable tokens that remain, ``D = K - C`` are the "dominant" ones (highest
    ``score``, kept unchanged) and ``C`` are contextual targets spread evenly, in position order, over the
    tokens that are not dominant; every other token joins its most similar allowed target (cosine of
    ``metric``), size-weighted. Under a rule (or padding) each clique's most important token is kept, as
    dominant or else as a target, so every removed token has an allowed host: a token with no allowed target
    joins its most similar allowed dominant token instead. Without a rule this is VisionZip's rule exactly.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens. r: tokens to remove.
        score: ``[B, N]`` importance, higher stays ([CLS] attention in VisionZip; the LLaVA adapter passes the
            [CLS] attention or, for towers without [CLS], the mean attention each token receives).
            Default: minus the PiToMe energy (margin 0), as ``tps``.
        contextual: C, the number of contextual tokens (default ``max(1, round(10 / 64 * K))``, VisionZip's
            10 contextual of 64 kept); ``1 <= C <= K``.
        quota: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``): each row's K, D and C
            follow from its own kept count, as alone (``contextual`` at most every row's K).
    """
    if partition is not None:
        check_partitionable("dominant")
    check_quota(quota, state, constraint, partition, "dominant")
    if r == 0:
        return identity_plan(state)
    constraint = constraint or Global()
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    K = M - r
    check_contextual(contextual, K)
    C = default_contextual(K) if contextual is None else contextual
    D = K - C
    device = metric.device
    with torch.no_grad():
        m = _normalized(metric, P)
        if score is None:
            importance = -energy_score(m, margin=0.0, valid=None if state.valid is None else state.valid[:, P:])
        else:
            importance = score[:, P:].float()
        importance = importance.nan_to_num(nan=0.0, posinf=1e30, neginf=-1e30)
        if quota is not None:
            return plan_from_targets(_dominant_rows(m, importance, state.valid, r, quota, contextual), state.size,
                                     r, P)
        all_idx = _arange(B, 0, M, 1, device)
        anchor = None
        if _needs_anchors(state, constraint):  # each clique's best token stays: dominant first, else a target
            anchor = _anchors(importance, state, constraint, None)
            importance = importance.masked_fill(anchor, POS_INF)
        # Ties keep the lower index (a stable sort, as _dominant_rows and the fused op): topk's pick among equal
        # scores is unspecified and may differ between devices.
        dom = importance.argsort(dim=-1, descending=True, stable=True)[:, :D]  # [B, D]
        is_dom = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, dom, True)
        rest = torch.argsort(is_dom.to(torch.int8), dim=1, stable=True)[:, : M - D]  # [B, M - D] position order
        step = (M - D) // C
        if anchor is None:  # evenly spread picks, in position order (similarity ties go to the first of them)
            targets = rest[:, : step * C : step]  # [B, C]
        else:  # the anchors first, then the first of the evenly spread picks; in position order
            priority = torch.zeros(B, M - D, device=device)
            priority[:, : step * C : step] = 1.0
            priority = priority + 2.0 * anchor.gather(1, rest).float()
            picks = priority.argsort(dim=-1, descending=True, stable=True)[:, :C].sort(dim=-1).values
            targets = rest.gather(1, picks)  # [B, C]
        is_target = torch.zeros_like(is_dom).scatter_(1, targets, True)
        hosts = targets if anchor is None else torch.cat([targets, dom], dim=1)  # [B, C (+ D)]
        sim = torch.bmm(m, _rows(m, hosts).transpose(1, 2)).float()
        if anchor is not None:
            sim[:, :, C:] -= 4.0  # cosine lies in [-1, 1]: an allowed target always wins over a dominant host
            sim = _mask(sim, state, constraint, None, all_idx, hosts)
        choice = sim.argmax(dim=-1)
        target = torch.where(is_dom | is_target, all_idx, hosts.gather(1, choice))
    return plan_from_targets(target, state.size, r, P)


def _dominant_rows(m: Tensor, importance: Tensor, valid: Tensor, r: int, quota: Tensor,
                   contextual: Optional[int]) -> Tensor:
    """``dominant``'s targets ``[B, M]`` in a padded batch with per-row budgets: row b keeps ``K_b`` of its real
    tokens (``D_b`` dominant, ``C_b`` contextual targets spread over the rest, as alone) and its first
    ``M - r - K_b`` padding tokens; the rest of its padding joins its first padding token.

    Args:
        m: ``[B, M, C]`` unit-norm metric. importance: ``[B, M]`` finite. valid: ``[B, M]`` bool, real tokens
            first. quota: ``[B]`` real tokens each row removes.
    """
    B, M = importance.shape
    device = m.device
    real = valid.sum(1)
    kept = real - quota  # [B] K_b
    if contextual is None:  # round half to even, as Python's round
        C = (kept.float() * (10 / 64)).round().long().clamp_min(1)
        width = default_contextual(M - r)  # the most targets a row can have (static)
    else:
        C, width = kept.clamp_max(contextual), min(contextual, M - r)
    D = kept - C
    pad = ~valid
    order = importance.masked_fill(pad, NEG_INF).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, _arange(B, 0, M, 1, device))  # importance rank of each token
    is_dom = rank < D.unsqueeze(1)
    rest = torch.argsort(is_dom.to(torch.int8), dim=1, stable=True)  # the others in position order, real first
    step, C = ((real - D) // C).unsqueeze(1), C.unsqueeze(1)
    j = _arange(B, 0, M, 1, device)
    picked = (j % step == 0) & (j < step * C)  # evenly spread over the row's real non-dominant tokens
    is_target = torch.zeros_like(is_dom).scatter_(1, rest, picked)
    hosts = is_target.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]  # targets first
    sim = torch.bmm(m, _rows(m, hosts).transpose(1, 2)).float()  # [B, M, width]
    sim = sim.masked_fill((j[:, :width] >= C).unsqueeze(1), NEG_INF)
    real_target = hosts.gather(1, sim.argmax(dim=-1))
    stays = is_dom | is_target | (pad & (pad.cumsum(1) <= (M - r - kept).unsqueeze(1)))
    first_pad = pad.to(torch.int8).argmax(dim=1, keepdim=True).expand(B, M)
    return torch.where(stays, j, torch.where(pad, first_pad, real_target))


# ------------------------------------------------------------------ diversity and question-aware selection
# DivPrune (Alvar et al., CVPR 2025) and CDPruner (Zhang et al., 2025) select the ``keep = M - r`` mergeable
# tokens to keep with a greedy loop of ``keep`` batched steps (no loop over tokens or batch, no host sync); every
# other token then merges into its most similar allowed kept token (size-weighted, so sizes and the source map
# stay exact) or, with ``drop_unselected=True``, only its bookkeeping moves there (its value is dropped, as in
# the papers). Rules, partitions and padding:
# - A token is "covered" once a kept token may host it. Tokens not covered yet are taken first (the best of
#   them by the method's own score), so each such pick covers at least one whole clique that had no kept
#   token: at most ``cliques`` picks cover everything, and any r within ``step_limit`` (select kind: M minus
#   one token per clique) leaves every removed token an allowed host. Without a rule nothing changes.
# - With a partition every group keeps its own ``size - budget`` tokens and the greedy runs inside each group
#   (similarities across groups are not looked at): the same picks as one greedy per group.
# - Padding (``state.valid``) is taken only to host other padding (one kept token per clique of padding) or
#   when no real token is left.
# - With a ``quota`` (per-row budgets, ``mmmerge.rows``) a row's real tokens and its padding are two groups of
#   their own sizes, each keeping its own count: the real tokens make the picks they make alone.
_TIER = 4.0  # larger than any gain (cosine distance <= 2, DPP gain <= 1): one tier of priority


class _Greedy:
    """Bookkeeping of one greedy selection: taken tokens, coverage under the rule, per-group quotas."""

    def __init__(self, state: TokenState, constraint: Constraint, partition: Optional[Partition], M: int,
                 device: torch.device, tiers: Optional[RowTiers] = None) -> None:
        B, P = state.size.shape[0], state.protected
        self.taken = torch.zeros(B, M, dtype=torch.bool, device=device)
        self.group = None  # [M] group of each token, and per-group counts / quotas
        self.tiers = tiers
        if tiers is not None:  # per-row budgets: a row's real tokens and its padding keep their own counts
            self.allowed, self.valid, self.covered = tiers.same, None, None
            self.counts = torch.zeros(B, 2, dtype=torch.long, device=device)
            return
        idx = _arange(B, P, P + M, 1, device)
        needs = partition is not None or state.valid is not None or not isinstance(constraint, Global)
        self.allowed = allowed_pairs(state, constraint, idx, idx, partition) if needs else None  # [B, M, M]
        self.valid = None if state.valid is None else state.valid[:, P:]
        self.covered = None if self.allowed is None else torch.zeros_like(self.taken)
        if partition is not None:
            self.group = partition.group_ids(device)
            quota = partition.tables.quota  # static: made at patch time by the encoders
            self.quota = (torch.tensor(partition.after(), device=device)[self.group] if quota is None
                          else quota.to(device))  # [M] tokens the own group keeps
            self.counts = torch.zeros(B, partition.num_groups, dtype=torch.long, device=device)

    def same_group(self) -> Optional[Tensor]:
        """``[M, M]`` bool (static; ``[B, M, M]`` with per-row tiers), or None without a partition."""
        if self.tiers is not None:
            return self.tiers.same
        return None if self.group is None else self.group.unsqueeze(0) == self.group.unsqueeze(1)

    def same_as(self, same: Tensor, j: Tensor) -> Tensor:
        """``[B, M]``: the tokens in the group of token ``j[b]`` (``same`` from ``same_group``)."""
        return self.tiers.same_as(j) if self.tiers is not None else same[j]

    def pick(self, score: Tensor) -> Tensor:
        """``[B]`` the best token not taken (and whose group has room), by tiers: real tokens without an allowed
        kept host, padding without one, real tokens, padding; by ``score`` inside a tier."""
        if self.covered is not None:
            score = score + 2 * _TIER * (~self.covered).float()
        if self.valid is not None:
            score = score - _TIER * (~self.valid).float()
        blocked = self.taken
        if self.group is not None:
            B = self.taken.shape[0]
            blocked = blocked | (self.counts.gather(1, self.group.expand(B, -1)) >= self.quota)
        if self.tiers is not None:  # a row's padding waits until its real tokens are all picked, as alone
            tier, full = self.tiers.tier, self.counts >= self.tiers.keep  # [B, M], [B, 2]
            blocked = blocked | full.gather(1, tier) | (tier.bool() & ~full[:, :1])
        return score.masked_fill(blocked, NEG_INF).argmax(dim=-1)

    def take(self, j: Tensor) -> None:
        """Mark the picked tokens ``j`` ``[B]``: taken, their hosts' coverage, their group's count."""
        B, M = self.taken.shape
        self.taken.scatter_(1, j.unsqueeze(1), True)
        if self.covered is not None:
            self.covered |= self.allowed.gather(2, j.view(B, 1, 1).expand(B, M, 1)).squeeze(2)
        if self.group is not None:
            self.counts.scatter_add_(1, self.group[j].unsqueeze(1), torch.ones_like(j).unsqueeze(1))
        if self.tiers is not None:
            self.counts.scatter_add_(1, self.tiers.tier.gather(1, j.unsqueeze(1)), torch.ones_like(j).unsqueeze(1))


def _row(sim: Tensor, j: Tensor) -> Tensor:
    """Row ``j`` ``[B]`` of ``sim`` ``[B, M, M]``: ``[B, M]``."""
    B, M, _ = sim.shape
    return sim.gather(1, j.view(B, 1, 1).expand(B, 1, M)).squeeze(1)


def max_min_select(sim: Tensor, keep: int, greedy: Optional[_Greedy] = None) -> Tensor:
    """DivPrune's greedy max-min selection: ``[B, keep]`` indices (in the order picked).

    First the token whose nearest other token is farthest (cosine distance ``1 - sim``), then, ``keep - 1``
    times, the token farthest from everything picked so far (largest minimum distance to the picked set).
    ``greedy``: rules, groups and padding (see the block comment); None: plain DivPrune.

    Args:
        sim: ``[B, M, M]`` cosine similarity. keep: tokens to pick, ``1 <= keep <= M``.
    """
    B, M, _ = sim.shape
    greedy = greedy or _Greedy(_plain_state(B, M, sim.device), Global(), None, M, sim.device)
    unseen = torch.eye(M, dtype=torch.bool, device=sim.device)
    same = greedy.same_group()
    if same is not None:
        unseen = unseen | ~same
    nearest = 1.0 - sim.masked_fill(unseen, NEG_INF).amax(dim=-1)  # [B, M] distance to the nearest other token
    min_dist = torch.full_like(nearest, POS_INF)  # to the picked tokens (of the same group)
    picks = []
    for _ in range(keep):
        j = greedy.pick(torch.where(torch.isinf(min_dist), nearest, min_dist))  # no pick in the group yet: nearest
        picks.append(j)
        greedy.take(j)
        dist = 1.0 - _row(sim, j)
        if same is not None:
            dist = dist.masked_fill(~greedy.same_as(same, j), POS_INF)
        min_dist = torch.minimum(min_dist, dist)
    return torch.stack(picks, dim=1)


def dpp_select(sim: Tensor, keep: int, quality: Optional[Tensor] = None, greedy: Optional[_Greedy] = None,
               eps: float = 1e-10) -> Tensor:
    """Greedy MAP of the DPP with kernel ``L = diag(q) S diag(q)``: ``[B, keep]`` indices (in the order picked).

    The fast greedy of Chen et al. (NeurIPS 2018): each step takes the token with the largest marginal gain
    ``d_j^2`` (the log-det increase) and updates every gain with one Cholesky row, ``O(keep^2 M)`` in all.
    Once the gains are exhausted (``keep`` above the kernel's rank) the rest have zero gain and are taken in
    order of their residual. ``greedy``: rules, groups and padding (see the block comment).

    Args:
        sim: ``[B, M, M]`` cosine similarity S (positive semi-definite). quality: ``[B, M]`` q >= 0, or None (1).
    """
    B, M, _ = sim.shape
    greedy = greedy or _Greedy(_plain_state(B, M, sim.device), Global(), None, M, sim.device)
    same = greedy.same_group()
    if same is not None:  # block-diagonal kernel: the groups' selections do not interact
        sim = sim.masked_fill(~same, 0.0)
    q = torch.ones(B, M, device=sim.device) if quality is None else quality.float()
    unit = (sim.diagonal(dim1=1, dim2=2) > 0.5).float()  # S_jj: exactly 1 (0 for zero vectors), ties stay ties
    gain = q * q * unit  # [B, M] d_j^2 = L_jj
    # Cholesky rows of the picked tokens, token-major ([B, M, keep]): each token's sum over the picks so far is a
    # contiguous inner reduction, whose rounding does not depend on M (a padded row sums as the row alone does).
    columns = sim.new_zeros(B, M, keep)
    picks = []
    for step in range(keep):
        j = greedy.pick(gain)
        picks.append(j)
        greedy.take(j)
        kernel_j = q.gather(1, j.unsqueeze(1)) * _row(sim, j) * q  # [B, M] row L_j
        if step:
            c_j = columns[:, :, :step].gather(1, j.view(B, 1, 1).expand(B, 1, step))  # [B, 1, step]
            kernel_j = kernel_j - (c_j * columns[:, :, :step]).sum(-1)
        d_j = gain.gather(1, j.unsqueeze(1))  # [B, 1]
        e = torch.where(d_j > eps, kernel_j / d_j.clamp_min(eps).sqrt(), torch.zeros_like(kernel_j))
        columns[:, :, step] = e
        gain = gain - e * e
    return torch.stack(picks, dim=1)


def _plain_state(B: int, M: int, device: torch.device) -> TokenState:
    return TokenState(size=torch.ones(B, M, device=device))


def query_relevance(metric: Tensor, query: Tensor, query_mask: Optional[Tensor] = None,
                    valid: Optional[Tensor] = None) -> Tensor:
    """CDPruner's relevance: each token's best cosine to the query tokens, min-max normalised per sample.

    Args:
        metric: ``[B, M, C]`` tokens. query: ``[B, Q, C]``. query_mask: ``[B, Q]`` bool, False for query tokens
            to ignore (padding). valid: ``[B, M]`` bool, False for padding tokens.
    Returns:
        ``[B, M]`` float32 in (0, 1] (1: the most relevant real token of its sample; padding 0).
    """
    B, M, C = metric.shape
    if query.dim() != 3 or query.shape[0] != B or query.shape[-1] != C:
        raise ValueError(f"query must be [B, Q, C] = [{B}, Q, {C}] (the metric's batch and width), got "
                         f"{tuple(query.shape)}; for LLaVA pass text embeddings against projected visual tokens")
    if query_mask is not None and tuple(query_mask.shape) != tuple(query.shape[:2]):
        raise ValueError(f"query_mask must be [B, Q]={list(query.shape[:2])}, got {tuple(query_mask.shape)}")
    qn = _normalized(query.float(), 0)
    cos = torch.bmm(_normalized(metric.float(), 0), qn.transpose(1, 2))  # [B, M, Q]
    if query_mask is not None:
        cos = cos.masked_fill(~query_mask.bool().unsqueeze(1), NEG_INF)
    rel = cos.amax(dim=-1).clamp_min(-1.0).nan_to_num(nan=-1.0)  # an all-masked query gives -1 everywhere
    real = torch.ones_like(rel, dtype=torch.bool) if valid is None else valid
    lo = rel.masked_fill(~real, POS_INF).amin(dim=-1, keepdim=True)
    hi = rel.masked_fill(~real, NEG_INF).amax(dim=-1, keepdim=True)
    out = ((rel - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    # The least relevant real token keeps a small quality (as in the official code), so it can still be taken.
    return out.clamp_min(1e-6).masked_fill(~real, 0.0)


def _select_plan(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint],
                 partition: Optional[Partition], select: Callable[[Tensor, int, _Greedy], Tensor],
                 drop_unselected: bool, quota: Optional[Tensor] = None) -> MergePlan:
    """Shared body: select ``M - r`` tokens, every other one joins its most similar allowed selected token.
    ``quota``: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``)."""
    if r == 0:
        return identity_plan(state)
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    keep = M - r
    device = metric.device
    with torch.no_grad():
        m = _normalized(metric, P).float()
        sim = torch.bmm(m, m.transpose(1, 2))  # [B, M, M]
        tiers = None if quota is None else RowTiers(state.valid, state.valid.sum(1) - quota, keep)
        greedy = _Greedy(state, constraint or Global(), partition, M, device, tiers)
        selected = select(sim, keep, greedy)  # [B, keep]
        host_sim = sim.gather(2, selected.unsqueeze(1).expand(B, M, keep))  # [B, M, keep]
        if greedy.allowed is not None:
            host_sim = host_sim.masked_fill(~greedy.allowed.gather(2, selected.unsqueeze(1).expand(B, M, keep)),
                                            NEG_INF)
        slot = host_sim.argmax(dim=-1)  # [B, M]
        target = torch.where(greedy.taken, _arange(B, 0, M, 1, device), selected.gather(1, slot))
        weight = state.size
        if drop_unselected:
            kept = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), greedy.taken], dim=1)
            weight = state.size * kept
    return plan_from_targets(target, weight, r, P, fuse=not drop_unselected)


def divprune(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
             partition: Optional[Partition] = None, *, drop_unselected: bool = False,
             quota: Optional[Tensor] = None) -> MergePlan:
    """DivPrune: keep the ``M - r`` most diverse tokens (greedy max-min cosine distance, ``max_min_select``).

    Every other token merges into its most similar kept token (size-weighted mean), or with
    ``drop_unselected=True`` is dropped as in the paper (its size and source still go to that token).
    Any r up to M - 1 in one step (M - cliques under a rule).

    Args:
        metric: ``[B, N, C]`` similarity features (all tokens, protected included). state: TokenState of the
            N tokens. r: tokens to remove. constraint / partition / quota: see the block comment.
    """
    check_quota(quota, state, constraint, partition, "divprune")
    return _select_plan(metric, state, r, constraint, partition, max_min_select, drop_unselected, quota)


def cdpruner(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
             partition: Optional[Partition] = None, *, query: Optional[Tensor] = None,
             query_mask: Optional[Tensor] = None, drop_unselected: bool = False,
             quota: Optional[Tensor] = None) -> MergePlan:
    """CDPruner: keep the ``M - r`` tokens of the greedy MAP of a conditional DPP (``dpp_select``).

    Kernel ``L = diag(q) S diag(q)``: S the cosine similarity of ``metric``, q each token's relevance to
    ``query`` (``query_relevance``: best cosine to the query tokens, min-max normalised per sample). Without a
    query q = 1: plain DPP diversity. Unselected tokens merge into their most similar kept token, or with
    ``drop_unselected=True`` are dropped as in the paper. Any r up to M - 1 in one step (M - cliques under a
    rule).

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens. r: tokens to remove.
        query: ``[B, Q, C]`` query tokens of the metric's width (e.g. a prompt's text embeddings against
            projected visual tokens). query_mask: ``[B, Q]`` bool, False for query tokens to ignore.
        quota: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``).
    """
    check_quota(quota, state, constraint, partition, "cdpruner")
    if query is None and query_mask is not None:
        raise ValueError("cdpruner: query_mask given without a query")
    quality = None
    if query is not None and r > 0:
        P = state.protected
        with torch.no_grad():
            quality = query_relevance(metric[:, P:] if P else metric, query, query_mask,
                                      None if state.valid is None else state.valid[:, P:])

    def select(sim: Tensor, keep: int, greedy: _Greedy) -> Tensor:
        return dpp_select(sim, keep, quality, greedy)

    return _select_plan(metric, state, r, constraint, partition, select, drop_unselected, quota)
