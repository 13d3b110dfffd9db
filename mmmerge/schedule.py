"""Schedules: how many tokens each layer removes.

``resolve_schedule`` turns a user spec into an explicit per-layer list of ints (no hidden mutable
state) and validates it against the token counts, so an infeasible r fails before a model is touched.

Specs:
    8                     constant r per layer
    (8, -0.5)             ToMe's (r, inflect): r changes linearly with depth around a mean of 8; inflect < 0
                          removes more early ([12, 10, 8, 6, 4] for 5 layers), > 0 more late
    [0, 0, 16, 16, ...]   explicit list, one int per layer
    KeepRatio(0.9)        each layer keeps 90% of its mergeable tokens
    TargetTokens(200)     spread removals evenly so the last layer outputs 200 tokens
    TargetFlops(0.5)      smallest constant r whose estimated FLOPs are at most 50% of the unmerged model
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .matchers import max_r


@dataclass(frozen=True)
class KeepRatio:
    """Each layer keeps ``ratio`` of its mergeable tokens (0 < ratio <= 1)."""
    ratio: float


@dataclass(frozen=True)
class TargetTokens:
    """The encoder's output holds ``tokens`` tokens (protected included)."""
    tokens: int


@dataclass(frozen=True)
class TargetFlops:
    """Estimated encoder FLOPs are at most ``fraction`` of the unmerged encoder's."""
    fraction: float


ScheduleSpec = Union[int, Tuple[int, float], Sequence[int], KeepRatio, TargetTokens, TargetFlops]
# FLOPs of one layer whose attention sees n_attn tokens and whose MLP sees n_mlp (merge sits between).
LayerFlops = Callable[[int, int], float]


def transformer_layer_flops(hidden: int, mlp_ratio: float = 4.0) -> LayerFlops:
    """Multiply-accumulates of a ViT-style layer: QKV+out projections, attention matmuls, MLP."""
    def flops(n_attn: int, n_mlp: int) -> float:
        return 4 * n_attn * hidden * hidden + 2 * n_attn * n_attn * hidden + 2 * mlp_ratio * n_mlp * hidden * hidden
    return flops


def tokens_per_layer(schedule: Sequence[int], num_tokens: int) -> List[int]:
    """Input token count of each layer, plus the final output count as the last entry."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


def schedule_flops(schedule: Sequence[int], num_tokens: int, layer_flops: LayerFlops) -> float:
    counts = tokens_per_layer(schedule, num_tokens)
    return sum(layer_flops(counts[i], counts[i + 1]) for i in range(len(schedule)))


def _tome_inflect(r: int, inflect: float, num_layers: int) -> List[int]:
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _constant_feasible(num_layers: int, num_tokens: int, protected: int, method: str, multiple_of: int) -> int:
    """Largest constant r that every layer can take."""
    best = 0
    lo, hi = 0, num_tokens
    while lo <= hi:
        mid = (lo + hi) // 2
        r = mid - mid % multiple_of
        try:
            validate_schedule([r] * num_layers, num_tokens, protected, method, multiple_of)
            best, lo = r, mid + 1
        except ValueError:
            hi = mid - 1
    return best


def validate_schedule(schedule: Sequence[int], num_tokens: int, protected: int = 0, method: str = "tome",
                      multiple_of: int = 1) -> None:
    """Raise ValueError naming the first layer whose r is negative, not a multiple, or too large."""
    n = num_tokens
    for layer, r in enumerate(schedule):
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"schedule entries must be ints, layer {layer} has {r!r}")
        if r < 0:
            raise ValueError(f"r must be >= 0, layer {layer} has r={r}")
        if r % multiple_of:
            raise ValueError(f"layer {layer}: r={r} must be a multiple of {multiple_of} (one share per group)")
        limit = max_r(method, n - protected)
        if r > limit:
            raise ValueError(
                f"layer {layer}: r={r} is infeasible: it has {n} tokens ({n - protected} mergeable) and "
                f"'{method}' removes at most {limit} per layer"
            )
        n -= r


def _keep_ratio(ratio: float, num_layers: int, num_tokens: int, protected: int, method: str,
                multiple_of: int) -> List[int]:
    """Each layer keeps ``ratio`` of its mergeable tokens, capped by what the method can remove per step."""
    schedule, n = [], num_tokens
    for _ in range(num_layers):
        r = (n - protected) - round((n - protected) * ratio)
        r = min(r, max_r(method, n - protected))
        r -= r % multiple_of
        schedule.append(r)
        n -= r
    return schedule


def _target_flops(fraction: float, num_layers: int, num_tokens: int, protected: int, method: str,
                  multiple_of: int, layer_flops: LayerFlops) -> List[int]:
    """The gentlest schedule within ``fraction`` of the unmerged FLOPs.

    First the smallest constant r (ToMe's schedule). A constant r is capped by the last layer's token
    count (at most half its mergeable tokens for bipartite methods), so deep or short inputs may not reach
    the target that way; then the mildest keep-ratio schedule (more removed early, where tokens are many).
    """
    base = schedule_flops([0] * num_layers, num_tokens, layer_flops)
    budget = fraction * base
    top = _constant_feasible(num_layers, num_tokens, protected, method, multiple_of)
    for r in range(0, top + 1, multiple_of):
        if schedule_flops([r] * num_layers, num_tokens, layer_flops) <= budget:
            return [r] * num_layers
    for step in range(99, 0, -1):  # keep ratio 0.99, 0.98, ... 0.01: the first one inside the budget
        schedule = _keep_ratio(step / 100, num_layers, num_tokens, protected, method, multiple_of)
        if schedule_flops(schedule, num_tokens, layer_flops) <= budget:
            return schedule
    reached = schedule_flops([top] * num_layers, num_tokens, layer_flops) / base
    raise ValueError(
        f"TargetFlops({fraction}) is out of reach: the largest feasible constant r={top} gives {reached:.2f} "
        "of the baseline FLOPs and no keep-ratio schedule does better; aim higher or use fewer protected tokens"
    )


def resolve_schedule(spec: ScheduleSpec, num_layers: int, num_tokens: int, protected: int = 0, *,
                     method: str = "tome", multiple_of: int = 1,
                     layer_flops: Optional[LayerFlops] = None) -> List[int]:
    """Per-layer r list for ``num_layers`` layers over ``num_tokens`` input tokens.

    ``multiple_of`` > 1 rounds every r down to a multiple (per-frame or per-band budgets).
    Raises ValueError (naming the layer and the limit) if the spec cannot be met.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if method == "none":
        return [0] * num_layers

    def rounded(values: Sequence[int]) -> List[int]:
        return [int(v) - int(v) % multiple_of for v in values]

    if isinstance(spec, bool):
        raise TypeError("r must be an int, a (r, inflect) tuple, a list or a schedule object, not a bool")
    if isinstance(spec, int):
        schedule = [spec] * num_layers
        if spec % multiple_of:
            raise ValueError(f"r={spec} must be a multiple of {multiple_of} (one equal share per group)")
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], float):
        schedule = rounded(_tome_inflect(int(spec[0]), spec[1], num_layers))
    elif isinstance(spec, (list, tuple)):
        schedule = list(spec)
        if len(schedule) != num_layers:
            hint = ("; for ToMe's (r, inflect) give inflect as a float, e.g. (8, -0.5)"
                    if isinstance(spec, tuple) and len(spec) == 2 else "")
            raise ValueError(f"an explicit schedule needs one r per layer: got {len(schedule)} for {num_layers} "
                             f"layers{hint}")
    elif isinstance(spec, KeepRatio):
        if not 0.0 < spec.ratio <= 1.0:
            raise ValueError(f"KeepRatio must be in (0, 1], got {spec.ratio}")
        schedule = _keep_ratio(spec.ratio, num_layers, num_tokens, protected, method, multiple_of)
    elif isinstance(spec, TargetTokens):
        total = num_tokens - spec.tokens
        if spec.tokens < protected + 1 or total < 0:
            raise ValueError(f"TargetTokens({spec.tokens}) must lie in [{protected + 1}, {num_tokens}]")
        # Spread evenly, earlier layers first, in whole shares of multiple_of.
        shares, extra = divmod(total // multiple_of, num_layers)
        schedule = [(shares + (1 if i < extra else 0)) * multiple_of for i in range(num_layers)]
        if total % multiple_of:
            raise ValueError(f"TargetTokens({spec.tokens}) removes {total} tokens, not a multiple of {multiple_of}")
    elif isinstance(spec, TargetFlops):
        if not 0.0 < spec.fraction <= 1.0:
            raise ValueError(f"TargetFlops fraction must be in (0, 1], got {spec.fraction}")
        if layer_flops is None:
            raise ValueError("TargetFlops needs the model's layer_flops cost function (adapters supply it)")
        schedule = _target_flops(spec.fraction, num_layers, num_tokens, protected, method, multiple_of, layer_flops)
    else:
        raise TypeError(f"unsupported schedule spec {spec!r} ({type(spec).__name__})")

    try:
        validate_schedule(schedule, num_tokens, protected, method, multiple_of)
    except ValueError as err:
        if isinstance(spec, int):
            best = _constant_feasible(num_layers, num_tokens, protected, method, multiple_of)
            raise ValueError(f"{err}; the largest constant r for {num_layers} layers is {best}") from None
        raise
    return schedule
