"""Matchers: pure functions ``(metric, state, r, constraint, **hyper) -> MergePlan``.

This is where tokens are *chosen*. Each matcher removes exactly ``r`` of the mergeable tokens
(everything after ``state.protected``) and says where each removed token goes. Scores of pairs the
constraint forbids are -inf before any argmax, so no forbidden pair can merge; if a batch element has
fewer than ``r`` allowed pairs the matcher fails loudly (device-side assert, no host sync) instead.

    tome    ToMe bipartite soft matching (Bolya et al., ICLR 2023)
    pitome  PiToMe energy-score merging (Tran et al., NeurIPS 2024)
    tps     prune-and-squeeze (Wei et al., CVPR 2023)
    random  bipartite merging on random scores (baseline)
    prune   drop the least important tokens' values (baseline)
    none    never merges (r must be 0)
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .constraints import Constraint, Global, allowed_pairs
from .merge import MergePlan, plan_from_targets
from .state import TokenState

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- helpers
def identity_plan(state: TokenState) -> MergePlan:
    B, N = state.size.shape
    assign = torch.arange(N, device=state.size.device).unsqueeze(0).expand(B, -1)
    return MergePlan(assign=assign, weight=state.size, num_out=N)


def _normalized(metric: Tensor, protected: int) -> Tensor:
    """Unit-norm mergeable metric ``[B, M, C]``; zero vectors stay zero (no NaN)."""
    return F.normalize(metric[:, protected:], dim=-1, eps=1e-6)


def _indices(B: int, idx: Tensor) -> Tensor:
    return idx.unsqueeze(0).expand(B, -1) if idx.dim() == 1 else idx


def _mask_scores(scores: Tensor, state: TokenState, constraint: Constraint, idx_a: Tensor, idx_b: Tensor) -> Tensor:
    """Set forbidden pairs to -inf. ``idx_a``/``idx_b`` index the *mergeable* tokens ``[B, Na]``/``[B, Nb]``."""
    P = state.protected
    mask = allowed_pairs(state, constraint, idx_a + P, idx_b + P)
    return scores if mask is None else scores.masked_fill(~mask, NEG_INF)


def _assert_allowed(chosen_scores: Tensor, method: str) -> None:
    # Device-side check: on CUDA it does not synchronise; on CPU it raises at once.
    torch._assert_async(
        torch.isfinite(chosen_scores).all(),
        f"mmmerge.{method}: fewer allowed pairs than tokens to remove under this constraint; "
        "lower r, use per-group budgets (groups=...), or a looser constraint",
    )


def _check_r(r: int, mergeable: int, limit: int, method: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if r > limit:
        raise ValueError(
            f"{method}: r={r} is too large: {mergeable} mergeable tokens allow at most r={limit} in one step"
        )


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
    sim = (m @ m.transpose(1, 2)).float()  # [B, M, M]
    if shift:
        f = F.elu(sim - margin, alpha=alpha)
    else:
        f = torch.where(sim >= margin, sim, alpha * (torch.exp(sim - margin) - 1.0))
    if valid is None:
        return f.mean(-1)
    w = valid.unsqueeze(1).float()
    return (f * w).sum(-1) / w.sum(-1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- matchers
def _bipartite(scores_fn: Callable[[Tensor, Tensor], Tensor], metric: Tensor, state: TokenState, r: int,
               constraint: Constraint, method: str) -> MergePlan:
    """Shared body of ToMe and the random baseline: alternating A/B split, best B per A, top-r edges."""
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    _check_r(r, M, M // 2, method)
    if r == 0:
        return identity_plan(state)
    device = metric.device
    with torch.no_grad():
        idx_a = _indices(B, torch.arange(0, M, 2, device=device))  # [B, Na] positions among mergeable
        idx_b = _indices(B, torch.arange(1, M, 2, device=device))  # [B, Nb]
        scores = _mask_scores(scores_fn(idx_a, idx_b), state, constraint, idx_a, idx_b)  # [B, Na, Nb]
        node_max, node_idx = scores.max(dim=-1)  # best B for each A
        edge_order = node_max.argsort(dim=-1, descending=True)
        src = edge_order[:, :r]  # [B, r] A tokens that merge
        _assert_allowed(node_max.gather(1, src), method)
        dst = node_idx.gather(1, src)  # [B, r] their B partners
        target = torch.arange(M, device=device).unsqueeze(0).repeat(B, 1)
        target.scatter_(1, idx_a.gather(1, src), idx_b.gather(1, dst))
    return plan_from_targets(target, state.size, r, P)


def tome(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, **_) -> MergePlan:
    """ToMe bipartite soft matching.

    Mergeable tokens alternate into sets A (even) and B (odd); each A token finds its most similar
    B token (cosine of ``metric``, e.g. head-averaged keys); the ``r`` most similar edges merge.
    At most half of the mergeable tokens can merge per step. Fusion weight: token size.

    Args:
        metric: ``[B, N, C]`` features used for similarity (all tokens, protected included).
        state: TokenState of the N tokens. r: tokens to remove.
    """
    def scores(a: Tensor, b: Tensor) -> Tensor:
        m = _normalized(metric, state.protected)  # called under no_grad: matching builds no graph
        return m[:, ::2] @ m[:, 1::2].transpose(1, 2)

    return _bipartite(scores, metric, state, r, constraint or Global(), "tome")


def random_merge(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None,
                 generator: Optional[torch.Generator] = None, **_) -> MergePlan:
    """Baseline: ToMe's bipartite step on random scores (merges random allowed pairs)."""
    B = metric.shape[0]

    def scores(a: Tensor, b: Tensor) -> Tensor:
        return torch.rand(B, a.shape[1], b.shape[1], device=metric.device, generator=generator)

    return _bipartite(scores, metric, state, r, constraint or Global(), "random")


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


def pitome(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, *,
           margin: Optional[float] = None, alpha: float = 1.0, preset: str = "paper",
           layer_idx: int = 0, num_layers: int = 1, **_) -> MergePlan:
    """PiToMe: merge only among the high-energy (redundant) tokens; low-energy tokens are protected.

    The ``2r`` highest-energy tokens are the candidates; in energy order they alternate into A and B,
    and every A token merges into its most similar B. Under a constraint an A token with no allowed
    candidate B falls back to its most similar allowed non-candidate token (never to another A); each
    token's lowest-energy allowed partner is kept out of the candidates, so such a fallback always exists.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens. r: tokens to remove.
        margin: energy margin m; default from the preset's schedule at ``layer_idx`` of ``num_layers``.
        alpha: slope of the negative (dissimilar) branch of the energy kernel.
        preset: ``"paper"`` (default), ``"official"`` or ``"official_deit"``; see ``PITOME_PRESETS``.
    """
    if preset not in PITOME_PRESETS:
        raise ValueError(f"unknown pitome preset '{preset}'; choose one of {sorted(PITOME_PRESETS)}")
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    _check_r(r, M, M // 2, "pitome")
    if r == 0:
        return identity_plan(state)
    cfg = PITOME_PRESETS[preset]
    if margin is None:
        margin = pitome_margin(layer_idx, num_layers, float(cfg["margin_start"]), float(cfg["margin_drop"]))
    constraint = constraint or Global()
    device = metric.device
    with torch.no_grad():
        m = _normalized(metric, P)
        valid = None if state.valid is None else state.valid[:, P:]
        energy = energy_score(m, margin, alpha, bool(cfg["shift"]), valid)  # [B, M]
        all_idx = _indices(B, torch.arange(M, device=device))
        allowed = allowed_pairs(state, constraint, all_idx + P, all_idx + P)  # [B, M, M] or None
        if allowed is not None:  # each neighbourhood's lowest-energy token is never a candidate: a fallback host
            energy = energy.masked_fill(neighbourhood_best(-energy, allowed), NEG_INF)
        cand = energy.argsort(dim=-1, descending=True)[:, : 2 * r]  # [B, 2r]
        src, cand_b = cand[:, 0::2], cand[:, 1::2]  # [B, r] each
        scores = (m.gather(1, src.unsqueeze(-1).expand(-1, -1, m.shape[-1])) @ m.transpose(1, 2)).float()
        # Prefer candidate B tokens: others get a -4 penalty (cosine lies in [-1, 1]), A tokens are excluded.
        role = torch.full((B, M), -4.0, device=device)
        role.scatter_(1, cand_b, 0.0).scatter_(1, src, NEG_INF)
        scores = _mask_scores(scores + role.unsqueeze(1), state, constraint, src, all_idx)
        best, dst = scores.max(dim=-1)
        _assert_allowed(best, "pitome")
        target = all_idx.clone()
        target.scatter_(1, src, dst)
    return plan_from_targets(target, state.size, r, P)


def neighbourhood_best(importance: Tensor, allowed: Tensor) -> Tensor:
    """``[B, M]`` bool: tokens that are the most important of everything they may merge with.

    Each token's "anchor" is the most important token it is allowed to merge with (itself included);
    anchors are kept. Then every other token has a kept, allowed host however many are removed around
    it: a whole window or silent stretch of redundant tokens keeps its best one. Without a constraint
    the only anchor is the most important token overall.
    ``importance``: ``[B, M]`` (ties and +-inf allowed). ``allowed``: ``[B, M, M]`` bool pair mask.
    """
    B, M = importance.shape
    order = importance.argsort(dim=-1)
    # Rank by importance: finite and distinct even where importance is +-inf or tied.
    rank = torch.empty(B, M, device=importance.device).scatter_(
        1, order, torch.arange(M, device=importance.device, dtype=torch.float32).expand(B, M))
    anchor = rank.unsqueeze(1).masked_fill(~allowed, -1.0).argmax(dim=-1)  # [B, M]
    return torch.zeros(B, M, dtype=torch.bool, device=importance.device).scatter_(1, anchor, True)


def _select_and_assign(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint],
                       score: Optional[Tensor], method: str):
    """Pick the r least important mergeable tokens and each one's most similar kept (allowed) token.

    Returns ``(target [B, M], host_sim [B, r], removed [B, r])``.
    """
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    device = metric.device
    m = _normalized(metric, P)
    if score is None:
        importance = -energy_score(m, margin=0.0, valid=None if state.valid is None else state.valid[:, P:])
    else:
        if score.shape != (B, N):
            raise ValueError(f"{method}: score must be [B, N]=[{B}, {N}], got {tuple(score.shape)}")
        importance = score[:, P:].float()
    if state.valid is not None:
        # Padding is the least important of all: drop it first, but keep its first token as the sink
        # the rest of the padding is squeezed into (padding may only merge with padding).
        pad = ~state.valid[:, P:]
        first_pad = pad & (pad.cumsum(dim=1) == 1)
        importance = importance.masked_fill(pad, NEG_INF).masked_fill(first_pad, float("inf"))
    all_idx = _indices(B, torch.arange(M, device=device))
    allowed = allowed_pairs(state, constraint or Global(), all_idx + P, all_idx + P)  # [B, M, M] or None
    if allowed is not None:  # keep each neighbourhood's best token, so every removed token has a host
        importance = importance.masked_fill(neighbourhood_best(importance, allowed), float("inf"))
    removed = importance.argsort(dim=-1)[:, :r]  # [B, r]
    sims = (m.gather(1, removed.unsqueeze(-1).expand(-1, -1, m.shape[-1])) @ m.transpose(1, 2)).float()
    is_removed = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, removed, True)
    sims = sims.masked_fill(is_removed.unsqueeze(1), NEG_INF)
    sims = _mask_scores(sims, state, constraint or Global(), removed, all_idx)
    host_sim, host = sims.max(dim=-1)
    _assert_allowed(host_sim, method)
    target = all_idx.clone().scatter_(1, removed, host)
    return target, host_sim, removed


def tps(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, *,
        score: Optional[Tensor] = None, temperature: float = 1.0, **_) -> MergePlan:
    """TPS prune-and-squeeze: remove the r least important tokens, squeeze each into its host.

    Importance is ``score`` (``[B, N]``, e.g. CLS attention; higher keeps) or, if None, minus the
    energy (redundant tokens go first). Each removed token is fused into its most similar kept token;
    inside a group the weights are ``size * exp((cos - 1) / temperature)`` normalised (a similarity
    softmax; the host's own similarity is 1). Any r up to M - 1 works in one step.
    """
    P = state.protected
    M = metric.shape[1] - P
    _check_r(r, M, M - 1, "tps")
    if temperature <= 0:
        raise ValueError(f"tps: temperature must be > 0, got {temperature}")
    if r == 0:
        return identity_plan(state)
    with torch.no_grad():
        target, host_sim, removed = _select_and_assign(metric, state, r, constraint, score, "tps")
        sim = torch.ones_like(state.size[:, P:]).scatter_(1, removed, host_sim)
        w = torch.exp((sim - 1.0) / temperature)
        weight = torch.cat([state.size[:, :P], state.size[:, P:] * w], dim=1)
    return plan_from_targets(target, weight, r, P)


def prune(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, *,
          score: Optional[Tensor] = None, **_) -> MergePlan:
    """Baseline: drop the values of the r least important tokens (same choice as ``tps``).

    Only bookkeeping moves: the dropped tokens' size and source go to their most similar kept token, so
    sizes still sum to N0 and unmerge still covers every original position (with the host's value).
    """
    P = state.protected
    M = metric.shape[1] - P
    _check_r(r, M, M - 1, "prune")
    if r == 0:
        return identity_plan(state)
    with torch.no_grad():
        target, _, removed = _select_and_assign(metric, state, r, constraint, score, "prune")
        keep = torch.ones_like(state.size[:, P:]).scatter_(1, removed, 0.0)
        weight = torch.cat([state.size[:, :P], state.size[:, P:] * keep], dim=1)
    return plan_from_targets(target, weight, r, P)


def no_merge(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, **_) -> MergePlan:
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

# Methods that pair tokens bipartitely can remove at most half of the mergeable tokens per step.
HALF_LIMITED = frozenset({"tome", "pitome", "random"})


def get_matcher(method: str) -> Callable[..., MergePlan]:
    if method not in MATCHERS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(MATCHERS)}")
    return MATCHERS[method]


def max_r(method: str, mergeable: int) -> int:
    """Largest r one step of ``method`` accepts for ``mergeable`` tokens."""
    get_matcher(method)
    if method == "none":
        return 0
    return mergeable // 2 if method in HALF_LIMITED else max(mergeable - 1, 0)


# ------------------------------------------------------------------------------------------ dominant
# Self-contained block (added with the LLaVA adapter): VisionZip-style selection as an engine matcher. It uses
# only plan_from_targets, allowed_pairs, energy_score, identity_plan and _normalized from the engine.
def dominant(metric: Tensor, state: TokenState, r: int, constraint: Optional[Constraint] = None, *,
             score: Optional[Tensor] = None, contextual: Optional[int] = None, **_) -> MergePlan:
    """VisionZip-style (Yang et al., CVPR 2025): keep the most important tokens as they are, merge the rest
    into a few contextual tokens.

    Of the ``K = M - r`` mergeable tokens that remain, ``D = K - C`` are the "dominant" ones (highest
    ``score``, kept unchanged) and ``C`` are contextual targets spread evenly, in position order, over the
    tokens that are not dominant; every other token joins its most similar allowed target (cosine of
    ``metric``), size-weighted. Under a constraint (or padding) each token's best allowed partner (highest
    score among the tokens it may merge with, itself included) is kept, as dominant or else as a target, so
    every removed token has an allowed host: a token with no allowed target joins its most similar allowed
    dominant token instead. Needs ``K`` at least the number of such anchors (at most one per frame for the
    time modes). Without a constraint this is VisionZip's rule exactly.

    Args:
        metric: ``[B, N, C]`` similarity features. state: TokenState of the N tokens. r: tokens to remove.
        score: ``[B, N]`` importance, higher stays ([CLS] attention in VisionZip; the LLaVA adapter passes the
            [CLS] attention or, for towers without [CLS], the mean attention each token receives).
            Default: minus the PiToMe energy (margin 0), as ``tps``.
        contextual: C, the number of contextual tokens (default ``max(1, round(10 / 64 * K))``, VisionZip's
            10 contextual of 64 kept); ``1 <= C <= K``.
    """
    if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 1):
        raise ValueError(f"dominant: contextual must be a positive int (contextual tokens), got {contextual!r}")
    P = state.protected
    B, N = metric.shape[:2]
    M = N - P
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= M - 1:
        raise ValueError(f"dominant: r={r!r} must be an int in [0, {M - 1}] for {M} mergeable tokens")
    if r == 0:
        return identity_plan(state)
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
            if score.shape != (B, N):
                raise ValueError(f"dominant: score must be [B, N]=[{B}, {N}], got {tuple(score.shape)}")
            importance = score[:, P:].float()
        all_idx = torch.arange(M, device=device).unsqueeze(0).expand(B, -1)
        allowed = allowed_pairs(state, constraint or Global(), all_idx + P, all_idx + P)  # [B, M, M] or None
        anchor = None
        if allowed is not None:  # each token's best allowed partner stays: dominant first, else a target
            rank = torch.empty(B, M, device=device).scatter_(  # finite, distinct ranks (ties and +-inf allowed)
                1, importance.argsort(dim=-1), torch.arange(M, device=device, dtype=torch.float32).expand(B, M))
            best = rank.unsqueeze(1).masked_fill(~allowed, -1.0).argmax(dim=-1)  # [B, M]
            anchor = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, best, True)
            importance = importance.masked_fill(anchor, float("inf"))
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
        sim = (m @ m.gather(1, hosts.unsqueeze(-1).expand(-1, -1, m.shape[-1])).transpose(1, 2)).float()
        if anchor is not None:
            sim[:, :, C:] -= 4.0  # cosine lies in [-1, 1]: an allowed target always wins over a dominant host
            mask = allowed_pairs(state, constraint or Global(), all_idx + P, hosts + P)
            sim = sim.masked_fill(~mask, NEG_INF)
        choice = sim.argmax(dim=-1)
        target = torch.where(is_dom | is_target, all_idx, hosts.gather(1, choice))
    return plan_from_targets(target, state.size, r, P)


MATCHERS["dominant"] = dominant
