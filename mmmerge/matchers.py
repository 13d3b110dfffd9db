"""Matchers: pure functions ``(metric, state, r, constraint, partition, **options) -> MergePlan``.

This is where tokens are *chosen*. Each matcher removes exactly ``r`` of the mergeable tokens
(everything after ``state.protected``) and says where each removed token goes. Pairs that the
constraint, the partition or the padding rule forbid score -inf before any argmax, so no forbidden pair
can merge. Every step's shapes depend only on ``r`` and the token count, never on data, and a step
within ``step_limit`` always succeeds (for every input, NaN included): nothing is checked on device.

    tome      ToMe bipartite soft matching (Bolya et al., ICLR 2023)
    pitome    PiToMe energy-score merging (Tran et al., NeurIPS 2024)
    tps       prune-and-squeeze (Wei et al., CVPR 2023)
    random    bipartite merging on random scores (baseline)
    prune     drop the least important tokens' values (baseline)
    dominant  VisionZip-style: keep the most important tokens, merge the rest into a few (Yang et al., 2025)
    none      never merges (r must be 0)

Why a step always succeeds. Tokens are kept in the order of their representatives (``merge.py``), and each
rule guarantees, for every input, at most ``runs`` runs of consecutive tokens in which neighbours may merge
and at most ``cliques`` sets of mutually mergeable tokens (``constraints.py``). A run of m >= 2 tokens holds
at least floor(m / 2) A tokens (even positions) with an allowed B neighbour, which bounds what a bipartite
step can always remove; the select-style matchers keep one anchor (the best token) per clique, so every
removed token has an allowed host among the kept ones.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .constraints import (Constraint, Global, Guarantee, Partition, allowed_pairs, clique_cover, first_positions,
                          padded_guarantee)
from .merge import MergePlan, plan_from_pairs, plan_from_targets
from .rows import RowTiers, best_with_quota, check_quota, tier_mask
from .state import TokenState

NEG_INF = float("-inf")
POS_INF = float("inf")


# ------------------------------------------------------------------------------------------ step limits
def _odd_runs(mergeable: int, runs: int) -> int:
    """Most runs of odd length that ``runs`` runs of ``mergeable`` tokens in total can have."""
    runs = min(runs, mergeable)
    return runs if (runs - mergeable) % 2 == 0 else runs - 1


def step_limit(method: str, mergeable: int, guarantee: Guarantee = Guarantee()) -> int:
    """Largest r one step of ``method`` can always remove from ``mergeable`` tokens with this guarantee.

    bipartite (tome, random): a run of m tokens gives floor(m / 2) A tokens with a neighbour B;
    pitome: 2r candidates besides one anchor per clique (none needed for a single clique);
    select-style (tps, prune, ...): everything but one anchor per clique.
    """
    kind = METHOD_KINDS.get(method, "select")
    if kind == "none" or mergeable <= 0:
        return 0
    if kind == "bipartite":
        return (mergeable - _odd_runs(mergeable, guarantee.runs)) // 2
    if kind == "pitome":
        return mergeable // 2 if guarantee.cliques <= 1 else max(mergeable - guarantee.cliques, 0) // 2
    return max(mergeable - guarantee.cliques, 0)


def group_limits(method: str, sizes: Sequence[int], guarantees: Sequence[Guarantee]) -> Tuple[int, ...]:
    """``step_limit`` of every group of a partition."""
    return tuple(step_limit(method, n, g) for n, g in zip(sizes, guarantees))


def _check_r(r: int, limit: int, mergeable: int, method: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if r > limit:
        raise ValueError(f"{method}: r={r} is too large: {mergeable} mergeable tokens allow at most r={limit} in "
                         "one step under this constraint")


def check_step(method: str, r: int, state: TokenState, constraint: Constraint,
               partition: Optional[Partition]) -> None:
    """Raise ValueError unless one step of ``method`` can remove ``r`` tokens for every input of this shape.

    With padding (``state.valid``) the mask is read on the host once (engine calls only)."""
    M = state.num_tokens - state.protected
    if partition is None:
        valid = None if state.valid is None else state.valid[:, state.protected:]
        _check_r(r, step_limit(method, M, padded_guarantee(constraint, valid)), M, method)
        return
    if sum(partition.sizes) != M:
        raise ValueError(f"the partition covers {sum(partition.sizes)} tokens but there are {M} mergeable tokens")
    if r != partition.removed:
        raise ValueError(f"r={r} differs from the partition's budgets {partition.budgets} (sum {partition.removed})")
    limits = group_limits(method, partition.sizes, partition.group_guarantees())
    for g, (n, budget, limit) in enumerate(zip(partition.sizes, partition.budgets, limits)):
        if budget > limit:
            raise ValueError(f"{method}: group {g} has {n} tokens and can give up at most {limit} in one step, "
                             f"not {budget}")


# ---------------------------------------------------------------------------------------------- helpers
def identity_plan(state: TokenState) -> MergePlan:
    B, N = state.size.shape
    assign = torch.arange(N, device=state.size.device).unsqueeze(0).expand(B, -1)
    return MergePlan(assign=assign, weight=state.size, num_out=N, kept=assign)


def _normalized(metric: Tensor, protected: int) -> Tensor:
    """Unit-norm mergeable metric ``[B, M, C]``; zero vectors stay zero (no NaN)."""
    m = metric[:, protected:] if protected else metric
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _arange(B: int, start: int, end: int, step: int, device: torch.device) -> Tensor:
    return torch.arange(start, end, step, device=device).unsqueeze(0).expand(B, -1)


def _mask(scores: Tensor, state: TokenState, constraint: Constraint, partition: Optional[Partition],
          idx_a: Tensor, idx_b: Tensor) -> Tensor:
    """Forbidden pairs to -inf. ``idx_a`` / ``idx_b`` index the mergeable tokens, ``[B, Na]`` / ``[B, Nb]``."""
    P = state.protected
    mask = allowed_pairs(state, constraint, idx_a + P, idx_b + P, partition)
    return scores if mask is None else scores.masked_fill(~mask, NEG_INF)


def _best_per_group(values: Tensor, take: int, partition: Optional[Partition], counts: Sequence[int],
                    budgets: Sequence[int], ids: Optional[Tensor], table: Optional[Tensor], descending: bool) -> Tensor:
    """Indices ``[B, take]`` of the best ``values`` (``[B, K]``): overall, or ``budgets[g]`` from each group.

    Per group: one stable sort by value, one stable sort by group id; group g's entries then sit in a
    static range of the list, so its first ``budgets[g]`` are picked with a static index (no data-dependent
    shape). ``ids``: ``[K]`` group of each entry; ``counts``: entries per group; ``table``: the static
    positions if made at patch time (``GroupTables``).
    """
    if partition is None:  # no sort: the best ``take`` (which of exactly tied values is taken may differ)
        return values.topk(take, dim=1, largest=descending).indices
    order = values.argsort(dim=1, descending=descending, stable=True)
    by_group = ids.expand_as(order).gather(1, order).argsort(dim=1, stable=True)
    order = order.gather(1, by_group)
    return order.index_select(1, partition.first_positions(counts, budgets, values.device, table))


def _a_counts(partition: Partition, a_first: int = 0) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """A tokens and B tokens in every group (A: the mergeable positions of parity ``a_first``)."""
    a, b, start = [], [], 0
    for n in partition.sizes:
        evens = (start + n + 1) // 2 - (start + 1) // 2
        a.append(n - evens if a_first else evens)
        b.append(evens if a_first else n - evens)
        start += n
    return tuple(a), tuple(b)


# ToMe's A/B split (``parity=``): "mergeable" alternates over the mergeable tokens, A first (this library's
# default: the split does not depend on how many tokens are protected); "official" alternates over all tokens as
# the official ToMe code does (A holds token 0, the [CLS], whose row is masked), so with an odd number of
# protected tokens the first mergeable token is a B token.
TOME_PARITIES = ("mergeable", "official")


def a_first(parity: str, protected: int) -> int:
    """Position, among the mergeable tokens, of the first A token (0 or 1) under ``parity``."""
    return int(parity == "official" and protected % 2 == 1)


def _elu_(y: Tensor, alpha: float) -> Tensor:
    """``elu(y, alpha)`` in place. One fused kernel on a GPU; torch's CPU elu is several times slower than its
    exp, so on the CPU it is composed of vectorised in-place steps (same values)."""
    if y.device.type != "cpu":
        return F.elu_(y, alpha=alpha)
    negative = y.clamp_max(0.0).exp_().sub_(1.0)
    if alpha != 1.0:
        negative.mul_(alpha)
    return y.clamp_min_(0.0).add_(negative)


def energy_score(m: Tensor, margin: float, alpha: float = 1.0, shift: bool = False,
                 valid: Optional[Tensor] = None) -> Tensor:
    """PiToMe energy: mean over j of ``f_m(cos(i, j))``; high energy = many similar neighbours = redundant.

    ``f_m(x) = x`` if ``x >= m`` else ``alpha * (exp(x - m) - 1)`` (paper). With ``shift=True`` the positive
    branch is ``x - m`` as well, i.e. ``elu(x - m, alpha)`` (the official code's energy shift).

    Args:
        m: ``[B, M, C]`` unit-norm metric. valid: ``[B, M]`` bool; padding is left out of the mean.
    Returns:
        ``[B, M]`` float32 energy.
    """
    # The energy is a mean over all pairs, so one [B, M, M] float32 matrix is written (cos - margin, straight
    # from one product) and the kernel runs on it in place; the paper's kernel adds m back where cos >= m,
    # counted from a bool mask (a quarter of the bytes) rather than a third float pass.
    m = m.float()
    f = torch.baddbmm(m.new_full((1, 1, 1), -margin), m, m.transpose(1, 2))  # [B, M, M] cos - margin
    f = _elu_(f, alpha)  # elu(cos - m): the official kernel, >= 0 exactly where cos >= m
    if valid is None:
        energy = f.mean(-1)
        return energy if shift else energy.add_((f >= 0).sum(-1), alpha=margin / f.shape[-1])
    w = valid.unsqueeze(-1).float()  # [B, M, 1]: the mean over real tokens only, as a matrix-vector product
    count = w.sum(1).clamp_min(1.0)
    energy = torch.bmm(f, w).squeeze(-1) / count
    return energy if shift else energy + margin * ((f >= 0) & valid.unsqueeze(1)).sum(-1) / count


def _needs_anchors(state: TokenState, constraint: Constraint) -> bool:
    """Anchors are needed under a coordinate rule or with padding. One clique needs none (any kept token is
    an allowed host), and neither does a partition alone: a group's best token is never among its budget."""
    return state.valid is not None or not isinstance(constraint, Global)


def _anchors(importance: Tensor, state: TokenState, constraint: Constraint,
             partition: Optional[Partition]) -> Tensor:
    """``[B, M]`` bool: the most important token of every clique (``importance`` ``[B, M]``, finite)."""
    P = state.protected
    B, M = importance.shape
    idx = _arange(B, P, P + M, 1, importance.device)
    cover = clique_cover(state, constraint, idx, partition)  # [B, M, K]
    best = importance.unsqueeze(-1).masked_fill(~cover, NEG_INF).argmax(dim=1)  # [B, K]
    present = cover.any(dim=1).float()  # [B, K]: an empty clique (no padding in this clip) names no anchor
    marks = torch.zeros(B, M, device=importance.device).scatter_reduce(1, best, present, "amax", include_self=True)
    return marks > 0


def _rows(m: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` ``[B, K]`` of ``m`` ``[B, M, C]``: ``[B, K, C]``."""
    return m.gather(1, idx.unsqueeze(-1).expand(-1, -1, m.shape[-1]))


# ---------------------------------------------------------------------------------------------- matchers
def _bipartite(scores_fn: Callable[[Tensor, Tensor, int], Tensor], metric: Tensor, state: TokenState, r: int,
               constraint: Constraint, partition: Optional[Partition], parity: str = "mergeable",
               quota: Optional[Tensor] = None) -> MergePlan:
    """Shared body of ToMe and the random baseline: alternating A/B split, best B per A, top-r edges.

    With a partition every group merges its own budget: the best edges of each group (static ranges). With a
    ``quota`` (``[B]``, ``mmmerge.rows``) row b merges its ``quota[b]`` best real edges, its padding the rest.
    """
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    a0 = a_first(parity, P)  # A tokens sit at mergeable positions a0, a0 + 2, ...; B tokens at 1 - a0, ...
    device = metric.device
    with torch.no_grad():
        scores = scores_fn(metric, state, a0)  # [B, Na, Nb]
        ids_a, counts, group_rule = None, (), partition
        if partition is not None:
            tables = partition.tables
            ids_a = partition.group_ids(device)[a0::2] if tables.ids_a is None else tables.ids_a
            counts = () if tables.sel_a is not None else _a_counts(partition, a0)[0]
            block = tables.block_ab  # [Na, Nb] True across groups: the static group rule
            if block is not None:
                scores, group_rule = scores.masked_fill(block, NEG_INF), None
        if group_rule is not None or state.valid is not None or not isinstance(constraint, Global):
            scores = _mask(scores, state, constraint, group_rule, _arange(B, a0, M, 2, device),
                           _arange(B, 1 - a0, M, 2, device))
        node_max, node_idx = scores.max(dim=-1)  # best B for each A
        if quota is not None:  # padding A tokens never have a real partner (masked above)
            src = best_with_quota(node_max, r, ~state.valid[:, a0::2], quota, descending=True)
        else:
            src = _best_per_group(node_max, r, partition, counts, partition.budgets if partition else (), ids_a,
                                  None if partition is None else partition.tables.sel_a,
                                  descending=True)  # [B, r] A tokens that merge
        dst = node_idx.gather(1, src)  # [B, r] their B partners
    return plan_from_pairs(src * 2 + a0 if a0 else src * 2, dst * 2 + (1 - a0), state.size, M, P)


def _cosine_scores(metric: Tensor, state: TokenState, a0: int = 0) -> Tensor:
    m = _normalized(metric, state.protected)
    return torch.bmm(m[:, a0::2], m[:, 1 - a0::2].transpose(1, 2))


def tome(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
         partition: Optional[Partition] = None, *, parity: str = "mergeable", quota: Optional[Tensor] = None
         ) -> MergePlan:
    """ToMe bipartite soft matching.

    Mergeable tokens alternate into sets A (even) and B (odd); each A token finds its most similar
    B token (cosine of ``metric``, e.g. head-averaged keys); the ``r`` most similar edges merge.
    Fusion weight: token size.

    Args:
        metric: ``[B, N, C]`` features used for similarity (all tokens, protected included).
        state: TokenState of the N tokens. r: tokens to remove.
        parity: ``"mergeable"`` (default: A starts at the first mergeable token) or ``"official"`` (A/B alternate
            over all tokens as in the official ToMe code, so published numbers on [CLS] models reproduce);
            they differ only with an odd number of protected tokens. See ``TOME_PARITIES``.
        quota: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``); None: any ``r``.
    """
    check_quota(quota, state, constraint, partition, "tome")
    if r == 0:
        return identity_plan(state)
    return _bipartite(_cosine_scores, metric, state, r, constraint or Global(), partition, parity, quota)


def _hash_scores(u_a: Tensor, u_b: Tensor) -> Tensor:
    """Uniform-looking scores ``[B, Na, Nb]`` in [0, 1) from per-token uniform draws: a fixed hash, so the
    same draws always give the same pairs (a gradient-checkpointing recompute makes the same plan)."""
    return torch.frac(torch.sin(u_a.unsqueeze(2) * 12.9898 + u_b.unsqueeze(1) * 78.233) * 43758.5453)


def random_merge(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
                 partition: Optional[Partition] = None, *, generator: Optional[torch.Generator] = None,
                 noise: Optional[Tensor] = None, parity: str = "mergeable", quota: Optional[Tensor] = None
                 ) -> MergePlan:
    """Baseline: ToMe's bipartite step on random scores (merges random allowed pairs).

    ``noise``: ``[B, N]`` uniform draws in [0, 1) that decide the pairs (default: drawn from ``generator``).
    ``quota``: per-row budgets of a padded batch (``mmmerge.rows``).
    """
    check_quota(quota, state, constraint, partition, "random")
    if r == 0:
        return identity_plan(state)
    B, N = metric.shape[:2]
    if noise is None:
        noise = torch.rand(B, N, device=metric.device, generator=generator)
    elif tuple(noise.shape) != (B, N):
        raise ValueError(f"random: noise must be [B, N]=[{B}, {N}], got {tuple(noise.shape)}")

    def scores(metric: Tensor, state: TokenState, a0: int) -> Tensor:
        u = noise[:, state.protected:]
        return _hash_scores(u[:, a0::2], u[:, 1 - a0::2])

    return _bipartite(scores, metric, state, r, constraint or Global(), partition, parity, quota)


# PiToMe presets: energy kernel and per-layer margin ``start - drop * layer_idx / num_layers``.
#   paper           f_m as printed in the paper (Eq. 4) and its margin 0.9 - 0.9 * l / L.
#   official        the official code's energy shift, elu(x - m, alpha), with the schedule of its MAE and
#                   CLIP/BLIP patches (0.9 - 0.9 * l / L).
#   official_deit   the energy shift with the schedule of its DeiT/timm-ViT patch (0.9 - 0.8 * l / L).
# ``margin=`` overrides the schedule of any preset.
PITOME_PRESETS: Dict[str, Dict[str, object]] = {
    "paper": {"shift": False, "margin_start": 0.9, "margin_drop": 0.9},
    "official": {"shift": True, "margin_start": 0.9, "margin_drop": 0.9},
    "official_deit": {"shift": True, "margin_start": 0.9, "margin_drop": 0.8},
}


def pitome_margin(layer_idx: int, num_layers: int, start: float = 0.9, drop: Optional[float] = None) -> float:
    """Margin schedule ``start - drop * layer_idx / num_layers`` (``drop`` defaults to ``start``).

    Loose early, strict late: deeper layers count only very similar neighbours as redundant.
    """
    drop = start if drop is None else drop
    return start - drop * layer_idx / max(num_layers, 1)


def pitome(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
           partition: Optional[Partition] = None, *, margin: Optional[float] = None, alpha: float = 1.0,
           preset: str = "paper", layer_idx: int = 0, num_layers: int = 1, quota: Optional[Tensor] = None
           ) -> MergePlan:
    """PiToMe: merge only among the high-energy (redundant) tokens; low-energy tokens are protected.

    The ``2r`` highest-energy tokens (per group with a partition) are the candidates; in energy order they
    alternate into A and B, and every A token merges into its most similar B. Under a constraint an A
    token with no allowed candidate B falls back to its most similar allowed non-candidate token (never
    to another A); each clique's lowest-energy token is kept out of the candidates, so such a fallback
    always exists.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens. r: tokens to remove.
        margin: energy margin m; default from the preset's schedule at ``layer_idx`` of ``num_layers``.
        alpha: slope of the negative (dissimilar) branch of the energy kernel.
        preset: ``"paper"`` (default), ``"official"`` or ``"official_deit"``; see ``PITOME_PRESETS``.
        quota: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``): the ``2 quota[b]``
            highest-energy real tokens and ``2 (r - quota[b])`` padding tokens are the candidates, each merging
            inside its tier.
    """
    check_quota(quota, state, constraint, partition, "pitome")
    if r == 0:
        return identity_plan(state)
    cfg = PITOME_PRESETS[preset]
    if margin is None:
        margin = pitome_margin(layer_idx, num_layers, float(cfg["margin_start"]), float(cfg["margin_drop"]))
    constraint = constraint or Global()
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    device = metric.device
    with torch.no_grad():
        m = _normalized(metric, P)
        valid = None if state.valid is None else state.valid[:, P:]
        energy = energy_score(m, margin, alpha, bool(cfg["shift"]), valid)  # [B, M]
        anchored = quota is None and _needs_anchors(state, constraint)
        if anchored:  # each clique's lowest-energy token is never a candidate: a fallback host
            energy = energy.masked_fill(_anchors(-energy.nan_to_num(0.0), state, constraint, partition), NEG_INF)
        if quota is not None:  # real candidates first (an even count), then padding ones
            cand = best_with_quota(energy, 2 * r, ~valid, 2 * quota, descending=True)
        else:
            ids = None if partition is None else partition.group_ids(device)
            pairs = tuple(2 * b for b in partition.budgets) if partition is not None else ()
            cand = _best_per_group(energy, 2 * r, partition, partition.sizes if partition else (), pairs, ids,
                                   partition.tables.sel_pairs if partition else None,
                                   descending=True)  # [B, 2r], per group consecutive
        src, cand_b = cand[:, 0::2], cand[:, 1::2]  # [B, r] each
        if not anchored:  # every candidate B of the same group is allowed: A merges into its best one
            scores = torch.bmm(_rows(m, src), _rows(m, cand_b).transpose(1, 2)).float()  # [B, r, r]
            if partition is not None:
                scores = scores.masked_fill(_pair_blocks(partition, device), NEG_INF)
            elif quota is not None:
                scores = scores.masked_fill(tier_mask(~valid, src, cand_b), NEG_INF)
            dst = cand_b.gather(1, scores.argmax(dim=-1))
        else:
            scores = torch.bmm(_rows(m, src), m.transpose(1, 2)).float()  # [B, r, M]
            # Prefer candidate B tokens: others get a -4 penalty (cosine lies in [-1, 1]), A tokens are excluded.
            role = torch.full((B, M), -4.0, device=device)
            role.scatter_(1, cand_b, 0.0).scatter_(1, src, NEG_INF)
            scores = _mask(scores + role.unsqueeze(1), state, constraint, partition, src,
                           _arange(B, 0, M, 1, device))
            dst = scores.argmax(dim=-1)
    return plan_from_pairs(src, dst, state.size, M, P)


def _pair_blocks(partition: Partition, device: torch.device) -> Tensor:
    """``[r, r]`` bool, True where PiToMe's i-th A and j-th B candidate lie in different groups (static)."""
    block = partition.tables.block_pairs
    if block is None:
        ids = torch.repeat_interleave(torch.arange(partition.num_groups), torch.tensor(partition.budgets))
        block = ids.unsqueeze(1) != ids.unsqueeze(0)
    return block.to(device)


def _select_and_assign(metric: Tensor, state: TokenState, r: int, constraint: Constraint,
                       partition: Optional[Partition], score: Optional[Tensor], quota: Optional[Tensor] = None):
    """Pick the r least important mergeable tokens (per group with a partition; with a ``quota`` row b's
    ``quota[b]`` least important real tokens and ``r - quota[b]`` padding tokens) and each one's most similar
    kept, allowed token.

    Importance is ``score`` (higher keeps) or, without one, low energy (the most redundant go first).
    Returns ``(removed [B, r], is_removed [B, M], host [B, r], host_sim [B, r])``.
    """
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    device = metric.device
    m = _normalized(metric, P)
    valid = None if state.valid is None else state.valid[:, P:]
    if score is None:
        values, descending = energy_score(m, margin=0.0, valid=valid), True  # remove the highest energy
    else:
        values, descending = score[:, P:].float(), False  # remove the lowest score
    if quota is None and _needs_anchors(state, constraint):
        importance = (-values if descending else values).nan_to_num(nan=0.0, posinf=1e30, neginf=-1e30)
        if valid is not None:  # padding is the least important of all: it goes first
            importance = importance.masked_fill(~valid, -1e30)
        # Keep each clique's best token, so every removed token has an allowed host.
        values = importance.masked_fill(_anchors(importance, state, constraint, partition), POS_INF)
        descending = False
    ids = None if partition is None else partition.group_ids(device)
    if quota is not None:  # the row's padding keeps a host of its own (the plan leaves one)
        removed = best_with_quota(values, r, ~valid, quota, descending)
    else:
        removed = _best_per_group(values, r, partition, partition.sizes if partition else (),
                                  partition.budgets if partition else (), ids,
                                  partition.tables.sel if partition else None, descending=descending)  # [B, r]
    sims = torch.bmm(_rows(m, removed), m.transpose(1, 2)).float()  # [B, r, M]
    is_removed = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, removed, True)
    sims = sims.masked_fill(is_removed.unsqueeze(1), NEG_INF)
    if partition is not None and isinstance(constraint, Global) and valid is None:  # the static group rule
        sims = sims.masked_fill(ids[removed].unsqueeze(-1) != ids, NEG_INF)
    elif partition is not None or not isinstance(constraint, Global) or valid is not None:
        sims = _mask(sims, state, constraint, partition, removed, _arange(B, 0, M, 1, device))
    host_sim, host = sims.max(dim=-1)
    return removed, is_removed, host, host_sim


# TPS presets: the fusion weight of a removed token relative to its host's own (inside one host's group).
#   paper      the paper's similarity softmax at temperature tau, the host taking part with its own similarity 1:
#              host exp(1 / tau), removed token exp(cos / tau), i.e. exp((cos - 1) / tau) relative to the host.
#   official   the released code (Wei et al., MegEngine): the host's weight is e whatever the temperature,
#              removed token exp(cos / tau), i.e. exp(cos / tau - 1) relative to the host.
# Both agree at temperature 1 (the released code has no temperature); below 1 the paper's host dominates more.
TPS_PRESETS: Dict[str, Dict[str, bool]] = {
    "paper": {"host_temperature": True},
    "official": {"host_temperature": False},
}


def tps(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
        partition: Optional[Partition] = None, *, score: Optional[Tensor] = None,
        temperature: float = 1.0, preset: str = "paper", quota: Optional[Tensor] = None) -> MergePlan:
    """TPS prune-and-squeeze: remove the r least important tokens, squeeze each into its host.

    Importance is ``score`` (``[B, N]``, e.g. CLS attention; higher keeps) or, if None, minus the
    energy (redundant tokens go first). Each removed token is fused into its most similar kept token;
    inside a group the weights are ``size * w`` normalised, with ``w = 1`` for the host and, for a removed
    token of cosine ``cos`` to it, ``exp((cos - 1) / temperature)`` (``preset="paper"``: a similarity softmax in
    which the host's own similarity is 1) or ``exp(cos / temperature - 1)`` (``preset="official"``: the released
    code's host weight e); see ``TPS_PRESETS``. Any r up to M - 1 works in one step (M - cliques under a rule).
    ``quota``: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``).
    """
    check_quota(quota, state, constraint, partition, "tps")
    if r == 0:
        return identity_plan(state)
    P = state.protected
    M = metric.shape[1] - P
    with torch.no_grad():
        removed, is_removed, host, host_sim = _select_and_assign(metric, state, r, constraint or Global(),
                                                                 partition, score, quota)
        if temperature == 1.0:
            logit = host_sim - 1.0
        elif TPS_PRESETS[preset]["host_temperature"]:
            logit = (host_sim - 1.0) / temperature
        else:
            logit = host_sim / temperature - 1.0
        slot = removed + P if P else removed
        weight = state.size.scatter(1, slot, state.size.gather(1, slot) * torch.exp(logit))
    return plan_from_pairs(removed, host, weight, M, P, is_removed)


def prune(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
          partition: Optional[Partition] = None, *, score: Optional[Tensor] = None,
          quota: Optional[Tensor] = None) -> MergePlan:
    """Baseline: drop the values of the r least important tokens (same choice as ``tps``).

    Only bookkeeping moves: the dropped tokens' size and source go to their most similar kept token, so
    sizes still sum to N0 and unmerge still covers every original position (with the host's value).
    ``quota``: ``[B]`` real tokens each row of a padded batch removes (``mmmerge.rows``).
    """
    check_quota(quota, state, constraint, partition, "prune")
    if r == 0:
        return identity_plan(state)
    P = state.protected
    M = metric.shape[1] - P
    with torch.no_grad():
        removed, is_removed, host, _ = _select_and_assign(metric, state, r, constraint or Global(), partition, score,
                                                          quota)
        weight = state.size.scatter(1, removed + P if P else removed, 0.0)
    return plan_from_pairs(removed, host, weight, M, P, is_removed, fuse=False)


def no_merge(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
             partition: Optional[Partition] = None) -> MergePlan:
    """Baseline that never merges; only r=0 is accepted."""
    if r != 0:
        raise ValueError(f"method 'none' never merges, so r must be 0 (got r={r})")
    return identity_plan(state)


MATCHERS: Dict[str, Callable[..., MergePlan]] = {
    "tome": tome,
    "pitome": pitome,
    "tps": tps,
    "random": random_merge,
    "prune": prune,
    "none": no_merge,
}

# How a method removes tokens, for step_limit: bipartite pairs, PiToMe's candidates, or select-and-assign.
METHOD_KINDS: Dict[str, str] = {"tome": "bipartite", "random": "bipartite", "pitome": "pitome", "tps": "select",
                                "prune": "select", "none": "none"}


def group_tables(method: str, partition: Partition, a0: int = 0) -> Dict[str, Tensor]:
    """The static index tensors ``method`` reads for ``partition`` (``GroupTables`` names), made once at patch
    time (``a0``: the first A token of a bipartite split, ``a_first``)."""
    ids = torch.repeat_interleave(torch.arange(partition.num_groups), torch.tensor(partition.sizes))
    tables = {"ids": ids}
    kind = METHOD_KINDS.get(method, "select")
    if kind == "bipartite":
        tables["ids_a"] = ids[a0::2].clone()
        tables["block_ab"] = tables["ids_a"].unsqueeze(1) != ids[1 - a0::2].unsqueeze(0)  # [Na, Nb] forbidden
        tables["sel_a"] = first_positions(_a_counts(partition, a0)[0], partition.budgets)
    elif kind == "pitome":
        tables["sel_pairs"] = first_positions(partition.sizes, [2 * b for b in partition.budgets])
        pair_ids = torch.repeat_interleave(torch.arange(partition.num_groups), torch.tensor(partition.budgets))
        tables["block_pairs"] = pair_ids.unsqueeze(1) != pair_ids.unsqueeze(0)
    else:
        tables["sel"] = first_positions(partition.sizes, partition.budgets)
        tables["quota"] = torch.tensor(partition.after())[ids]  # greedy selections: tokens each group keeps
    return tables


def get_matcher(method: str) -> Callable[..., MergePlan]:
    if not isinstance(method, str) or method not in MATCHERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MATCHERS)}")
    return MATCHERS[method]


# ------------------------------------------------------------------------------------------ options
def _number(name: str, positive: bool = False) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if positive and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return check


def _choice(name: str, choices: Sequence[str]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return check


def _optional(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def optional(value: Any) -> None:
        if value is not None:
            check(value)
    return optional


def _instance(name: str, cls: type, what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return check


def _positive_int(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return check


# Value checks of every matcher option (the names come from the matcher's signature); each raises
# TypeError (wrong type) or ValueError (bad value).
OPTION_CHECKS: Dict[str, Callable[[Any], None]] = {
    "margin": _optional(_number("margin")),
    "alpha": _number("alpha", positive=True),
    "temperature": _number("temperature", positive=True),
    "generator": _instance("generator", torch.Generator, "a torch.Generator"),
    "score": _instance("score", Tensor, "a [B, N] tensor"),
    "noise": _instance("noise", Tensor, "a [B, N] tensor of uniform draws"),
    "layer_idx": _number("layer_idx"),
    "num_layers": _number("num_layers", positive=True),
    "contextual": _positive_int("contextual"),
    "parity": _choice("tome parity", TOME_PARITIES),
}
# Checks of options whose values depend on the method (each method's own presets).
METHOD_OPTION_CHECKS: Dict[Tuple[str, str], Callable[[Any], None]] = {
    ("pitome", "preset"): _choice("pitome preset", tuple(PITOME_PRESETS)),
    ("tps", "preset"): _choice("tps preset", tuple(TPS_PRESETS)),
}
# Passed by the caller (plan_merge, the encoder patch), never options of their own.
SUPPLIED = ("metric", "state", "r", "constraint", "partition", "quota")


def matcher_options(method: str) -> Tuple[str, ...]:
    """Option names ``method`` accepts (besides metric, state, r, constraint, partition)."""
    params = inspect.signature(get_matcher(method)).parameters
    return tuple(name for name, p in params.items() if name not in SUPPLIED
                 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def check_options(method: str, options: Mapping[str, Any], supplied: Sequence[str] = ()) -> None:
    """The one validation path of matcher options: unknown names raise ValueError (a typo such as ``margn=``
    is never ignored), bad values ValueError, values of the wrong type TypeError. ``supplied``: names the
    caller fills in itself (not offered to the user in the message)."""
    known = matcher_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        users = sorted(k for k in known if k not in supplied)
        from .options import closest

        raise ValueError(f"method '{method}' takes no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(users) or 'none'}{closest(unknown[0], users)}")
    for name, value in options.items():
        check = METHOD_OPTION_CHECKS.get((method, name), OPTION_CHECKS.get(name))
        if check is not None:
            try:
                check(value)
            except (TypeError, ValueError) as err:
                raise type(err)(f"method '{method}': {err}") from None


# --------------------------------------------------------------------------------- selection: dominant
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
    C = max(1, round(K * 10 / 64)) if contextual is None else contextual
    if C > K:
        raise ValueError(f"dominant: contextual={C} is more than the {K} mergeable tokens kept; use contextual <= {K}")
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
        dom = importance.topk(D, dim=-1).indices  # [B, D]
        is_dom = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, dom, True)
        rest = torch.argsort(is_dom.to(torch.int8), dim=1, stable=True)[:, : M - D]  # [B, M - D] position order
        step = (M - D) // C
        priority = torch.zeros(B, M - D, device=device)
        priority[:, : step * C : step] = 1.0  # evenly spread picks
        if anchor is not None:
            priority = priority + 2.0 * anchor.gather(1, rest).float()
        targets = rest.gather(1, priority.topk(C, dim=-1).indices)  # [B, C]
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
        width = max(1, round((M - r) * 10 / 64))  # the most targets a row can have (static)
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


MATCHERS["dominant"] = dominant
METHOD_KINDS["dominant"] = "select"
WHOLE_SET_METHODS = frozenset({"dominant"})  # choose over all tokens at once: no per-group budgets


def check_partitionable(method: str) -> None:
    """Raise ValueError if ``method`` cannot share its r among static groups (per-frame / per-band budgets)."""
    if method in WHOLE_SET_METHODS:
        raise ValueError(f"method {method!r} selects over all tokens at once and takes no per-group budgets; "
                         "pass group_budget=False (one budget under the same time rule) or use another method")


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


def _flag(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    return check


MATCHERS["divprune"] = divprune
MATCHERS["cdpruner"] = cdpruner
METHOD_KINDS["divprune"] = "select"
METHOD_KINDS["cdpruner"] = "select"
# Methods that measure similarity on the tokens being reduced themselves, never on a separate metric (keys).
SELF_METRIC_METHODS = frozenset({"divprune", "cdpruner"})
OPTION_CHECKS["query"] = _instance("query", Tensor, "a [B, Q, C] tensor")
OPTION_CHECKS["query_mask"] = _instance("query_mask", Tensor, "a [B, Q] bool tensor")
OPTION_CHECKS["drop_unselected"] = _flag("drop_unselected")
