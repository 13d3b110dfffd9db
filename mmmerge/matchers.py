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
    none      never merges (r must be 0)

The selection methods (dominant, divprune, cdpruner) are in ``selection.py``; what each method can remove in one
step, its options and the registry by name in ``methods.py``.

Why a step always succeeds. Tokens are kept in the order of their representatives (``merge.py``), and each
rule guarantees, for every input, at most ``runs`` runs of consecutive tokens in which neighbours may merge
and at most ``cliques`` sets of mutually mergeable tokens (``constraints.py``). A run of m >= 2 tokens holds
at least floor(m / 2) A tokens (even positions) with an allowed B neighbour, which bounds what a bipartite
step can always remove; the select-style matchers keep one anchor (the best token) per clique, so every
removed token has an allowed host among the kept ones.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .constraints import Constraint, Global, Partition, allowed_pairs, clique_cover, group_sorted
from .merge import MergePlan, plan_from_pairs
from .rows import best_with_quota, check_quota, tier_mask
from .state import TokenState

NEG_INF = float("-inf")
POS_INF = float("inf")


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
    order = group_sorted(values, ids, descending)
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
