"""Schedules: how many tokens each layer removes, and whether every layer can always do it.

``resolve_schedule`` turns a user spec into an explicit per-layer list of ints (no hidden mutable
state) and checks it against what each layer can remove for every input (``Grouping``: the static
groups or cliques the time mode puts the tokens in), so an infeasible r fails before a model is touched
and an accepted one runs for every input of the declared shape. ``layer_partitions`` then shares each
layer's r over the static groups (uneven shares when r does not divide).

Specs:
    8                     constant r per layer
    (8, -0.5)             ToMe's (r, inflect): r changes linearly with depth around a mean of 8; inflect < 0
                          removes more early ([12, 10, 8, 6, 4] for 5 layers), > 0 more late
    [0, 0, 16, 16, ...]   explicit list, one int per layer
    KeepRatio(0.9)        each layer keeps 90% of its mergeable tokens (capped by what a layer can remove)
    TargetTokens(200)     spread removals evenly so the last layer outputs 200 tokens
    TargetFlops(0.5)      smallest constant r whose estimated FLOPs are at most 50% of the unmerged model,
                          else the mildest keep-ratio schedule that is
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from .constraints import Guarantee, Partition, split_budget
from .methods import check_partitionable, get_matcher, group_limits, step_limit


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


@dataclass(frozen=True)
class Grouping:
    """How the mergeable tokens are organised, for what one step can always remove.

    Attributes:
        sizes: static groups of the first layer (frames, bands, blocks), each with its own budget; empty
            for one budget over all tokens.
        guarantee: what every group's tokens guarantee (runs, cliques; see ``mmmerge.constraints``), or with
            no groups what all the tokens guarantee.
    """

    sizes: Tuple[int, ...] = ()
    guarantee: Guarantee = Guarantee()


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


class _Layers:
    """Walks the layers of a schedule: the tokens (and static group sizes) each layer starts with."""

    def __init__(self, num_tokens: int, protected: int, method: str, grouping: Grouping) -> None:
        self.n, self.protected, self.method, self.grouping = num_tokens, protected, method, grouping
        self.sizes = grouping.sizes

    def limit(self) -> int:
        """What this layer can remove for every input."""
        if self.sizes:
            return sum(group_limits(self.method, self.sizes, self._guarantees()))
        return step_limit(self.method, self.n - self.protected, self.grouping.guarantee)

    def _guarantees(self) -> Tuple[Guarantee, ...]:
        return (self.grouping.guarantee,) * len(self.sizes)

    def partition(self, r: int) -> Optional[Partition]:
        if not self.sizes:
            return None
        guarantees = self._guarantees()
        budgets = split_budget(r, self.sizes, group_limits(self.method, self.sizes, guarantees))
        return Partition(sizes=self.sizes, budgets=budgets, guarantees=guarantees)

    def advance(self, r: int) -> None:
        part = self.partition(r)
        if part is not None:
            self.sizes = part.after()
        self.n -= r


def _check_grouping(num_tokens: int, protected: int, grouping: Grouping) -> None:
    if grouping.sizes and sum(grouping.sizes) != num_tokens - protected:
        raise ValueError(f"the groups {grouping.sizes} cover {sum(grouping.sizes)} tokens, but there are "
                         f"{num_tokens - protected} mergeable tokens")


def validate_schedule(schedule: Sequence[int], num_tokens: int, protected: int = 0, method: str = "tome",
                      grouping: Optional[Grouping] = None) -> None:
    """Raise ValueError naming the first layer whose r is negative or more than it can always remove."""
    grouping = grouping or Grouping()
    _check_grouping(num_tokens, protected, grouping)
    if grouping.sizes and any(r != 0 for r in schedule):
        check_partitionable(method)
    walk = _Layers(num_tokens, protected, method, grouping)
    for layer, r in enumerate(schedule):
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"schedule entries must be ints, layer {layer} has {r!r}")
        if r < 0:
            raise ValueError(f"r must be >= 0, layer {layer} has r={r}")
        limit = walk.limit()
        if r > limit:
            where = f" in {len(walk.sizes)} groups of {min(walk.sizes)}-{max(walk.sizes)}" if walk.sizes else ""
            raise ValueError(
                f"layer {layer}: r={r} is infeasible: it has {walk.n} tokens ({walk.n - protected} mergeable"
                f"{where}) and '{method}' can remove at most {limit} there under this time mode"
            )
        walk.advance(r)


def layer_partitions(schedule: Sequence[int], num_tokens: int, protected: int, method: str,
                     grouping: Grouping) -> List[Optional[Partition]]:
    """Per layer: the static groups it starts with and each group's share of its r (None without groups).

    Shares are as even as possible; the larger groups give up one token more (``split_budget``).
    """
    validate_schedule(schedule, num_tokens, protected, method, grouping)
    walk = _Layers(num_tokens, protected, method, grouping)
    parts = []
    for r in schedule:
        parts.append(walk.partition(r))
        walk.advance(r)
    return parts


def _feasible(schedule: Sequence[int], num_tokens: int, protected: int, method: str, grouping: Grouping) -> bool:
    try:
        validate_schedule(schedule, num_tokens, protected, method, grouping)
    except ValueError:
        return False
    return True


def _constant_feasible(num_layers: int, num_tokens: int, protected: int, method: str,
                       grouping: Optional[Grouping] = None) -> int:
    """Largest constant r that every layer can take (feasibility is monotone in r)."""
    grouping = grouping or Grouping()
    lo, hi = 0, num_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _feasible([mid] * num_layers, num_tokens, protected, method, grouping):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _keep_ratio(ratio: float, num_layers: int, num_tokens: int, protected: int, method: str,
                grouping: Grouping) -> List[int]:
    """Each layer keeps ``ratio`` of its mergeable tokens, capped by what the layer can remove."""
    walk = _Layers(num_tokens, protected, method, grouping)
    schedule = []
    for _ in range(num_layers):
        mergeable = walk.n - protected
        r = min(mergeable - round(mergeable * ratio), walk.limit())
        schedule.append(r)
        walk.advance(r)
    return schedule


def _target_flops(fraction: float, num_layers: int, num_tokens: int, protected: int, method: str,
                  grouping: Grouping, layer_flops: LayerFlops) -> List[int]:
    """The gentlest feasible schedule within ``fraction`` of the unmerged FLOPs.

    First the smallest constant r (ToMe's schedule). A constant r is capped by the last layer's token
    count, so deep or short inputs may not reach the target that way; then the mildest keep-ratio
    schedule (more removed early, where tokens are many), capped layer by layer by what can be removed.
    """
    base = schedule_flops([0] * num_layers, num_tokens, layer_flops)
    budget = fraction * base
    top = _constant_feasible(num_layers, num_tokens, protected, method, grouping)
    for r in range(0, top + 1):
        if schedule_flops([r] * num_layers, num_tokens, layer_flops) <= budget:
            return [r] * num_layers
    for step in range(99, 0, -1):  # keep ratio 0.99, 0.98, ... 0.01: the first one inside the budget
        schedule = _keep_ratio(step / 100, num_layers, num_tokens, protected, method, grouping)
        if schedule_flops(schedule, num_tokens, layer_flops) <= budget:
            return schedule
    reached = schedule_flops([top] * num_layers, num_tokens, layer_flops) / base
    best = min(schedule_flops(_keep_ratio(0.01, num_layers, num_tokens, protected, method, grouping), num_tokens,
                              layer_flops) / base, reached)
    if best >= 1.0:
        raise OutOfReach(f"TargetFlops({fraction}) is out of reach for '{method}' under this time mode: it cannot "
                         "remove any token there", best)
    raise OutOfReach(f"TargetFlops({fraction}) is out of reach for '{method}' under this time mode: the most any "
                     f"feasible schedule removes gives {best:.2f} of the baseline FLOPs (largest constant r={top})", best)


class OutOfReach(ValueError):
    """A schedule spec no feasible schedule meets; ``best``: the lowest FLOPs fraction that one reaches."""

    def __init__(self, message: str, best: float) -> None:
        super().__init__(message)
        self.best = best


# Methods offered as advice when a spec is out of reach (each one checked to meet it before it is named).
ADVISED_METHODS = ("tome", "pitome", "tps", "prune", "random")
# The loosest grouping of any time mode (``global``, with padding at most two runs and two cliques): a spec that
# meets it meets time_mode='global'.
LOOSEST = Grouping((), Guarantee(2, 2))


def resolve_schedule(spec: ScheduleSpec, num_layers: int, num_tokens: int, protected: int = 0, *,
                     method: str = "tome", grouping: Optional[Grouping] = None,
                     layer_flops: Optional[LayerFlops] = None) -> List[int]:
    """Per-layer r list for ``num_layers`` layers over ``num_tokens`` input tokens.

    Raises ValueError (naming the layer and the limit) if the spec cannot be met for every input; its advice
    (another method, ``time_mode='global'``, a milder target) names only what was checked to meet the spec.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    get_matcher(method)
    grouping = grouping or Grouping()
    args = (num_layers, num_tokens, protected)
    try:
        return _resolve(spec, *args, method, grouping, layer_flops)
    except ValueError as err:
        advice = _advice(spec, args, method, grouping, layer_flops, err)
        if not advice:
            raise
        raise ValueError(f"{err}; {advice}") from None


def _meets(spec: ScheduleSpec, args: Tuple[int, int, int], method: str, grouping: Grouping,
           layer_flops: Optional[LayerFlops]) -> bool:
    try:
        _resolve(spec, *args, method, grouping, layer_flops)
    except (ValueError, TypeError):
        return False
    return True


def _advice(spec: ScheduleSpec, args: Tuple[int, int, int], method: str, grouping: Grouping,
            layer_flops: Optional[LayerFlops], err: ValueError) -> str:
    """What meets ``spec`` instead (each checked), for an infeasible r or an out-of-reach target; "" otherwise."""
    num_layers, num_tokens, protected = args
    if isinstance(spec, TargetFlops) and not isinstance(err, OutOfReach):
        return ""  # a bad fraction, not an infeasible one
    if not isinstance(spec, (TargetFlops, TargetTokens, KeepRatio, int, list, tuple)) or isinstance(spec, bool):
        return ""
    if "infeasible" not in str(err) and not isinstance(err, OutOfReach):
        return ""
    ways = [f"method '{m}'" for m in ADVISED_METHODS if m != method and _meets(spec, args, m, grouping, layer_flops)]
    if grouping != LOOSEST and grouping != Grouping() and _meets(spec, args, method, LOOSEST, layer_flops):
        ways.append("time_mode='global' (no time or band rule)")
    if isinstance(err, OutOfReach) and err.best < 1.0:
        ways.append(f"a target of TargetFlops({math.ceil(err.best * 100) / 100:g}) or more")
    largest = ""
    if isinstance(spec, (int, list, tuple)):
        best = _constant_feasible(num_layers, num_tokens, protected, method, grouping)
        largest = (f"the largest constant r for {num_layers} layers is {best}" if best else
                   f"the largest constant r for {num_layers} layers is 0: '{method}' cannot remove any token here")
    if not ways:
        return "; ".join(filter(None, [largest, "nothing else meets it under this time mode for these tokens"]))
    return "; ".join(filter(None, [largest, "what meets it instead: " + ", or ".join(ways)]))


def _resolve(spec: ScheduleSpec, num_layers: int, num_tokens: int, protected: int, method: str, grouping: Grouping,
             layer_flops: Optional[LayerFlops]) -> List[int]:
    if method == "none":
        return [0] * num_layers
    _check_grouping(num_tokens, protected, grouping)
    merges_off = (isinstance(spec, int) and spec == 0) or (isinstance(spec, list) and not any(spec))
    if grouping.sizes and not merges_off:  # before any search, so the reason is not "out of reach"
        check_partitionable(method)

    inflect = None
    if isinstance(spec, bool):
        raise TypeError("r must be an int, a (r, inflect) tuple, a list or a schedule object, not a bool")
    if isinstance(spec, int):
        schedule = [spec] * num_layers
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], float):
        r, inflect = spec
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r={spec!r}: ToMe's (r, inflect) needs r, the mean tokens removed per layer, as an int "
                             f">= 0, got {r!r}")
        if not -1.0 <= inflect <= 1.0:
            schedule = _tome_inflect(r, inflect, num_layers)
            raise ValueError(f"r={spec!r}: ToMe's inflect rule runs r linearly from r * (1 - inflect) at the first layer "
                             f"to r * (1 + inflect) at the last, here {schedule[0]} to {schedule[-1]}; inflect must lie "
                             "in [-1, 1] so that no layer gets a negative r (-1: 2r at the first layer and none at the "
                             "last; 1: the reverse)")
        schedule = _tome_inflect(r, inflect, num_layers)
    elif isinstance(spec, (list, tuple)):
        schedule = list(spec)
        if len(schedule) != num_layers:
            hint = ("; for ToMe's (r, inflect) give inflect as a float, e.g. (8, -0.5)"
                    if isinstance(spec, tuple) and len(spec) == 2 else "")
            raise ValueError(f"an explicit schedule needs one r per layer: got {len(schedule)} for {num_layers} "
                             f"layers{hint}")
    elif isinstance(spec, KeepRatio):
        if isinstance(spec.ratio, bool) or not isinstance(spec.ratio, (int, float)) or not 0.0 < spec.ratio <= 1.0:
            raise ValueError(f"KeepRatio must be in (0, 1], got {spec.ratio!r}")
        schedule = _keep_ratio(spec.ratio, num_layers, num_tokens, protected, method, grouping)
    elif isinstance(spec, TargetTokens):
        total = num_tokens - spec.tokens
        if not isinstance(spec.tokens, int) or spec.tokens < protected + 1 or total < 0:
            raise ValueError(f"TargetTokens({spec.tokens}) must lie in [{protected + 1}, {num_tokens}]")
        shares, extra = divmod(total, num_layers)  # spread evenly, earlier layers first
        schedule = [shares + (1 if i < extra else 0) for i in range(num_layers)]
    elif isinstance(spec, TargetFlops):
        if isinstance(spec.fraction, bool) or not isinstance(spec.fraction, (int, float)) \
                or not 0.0 < spec.fraction <= 1.0:
            raise ValueError(f"TargetFlops fraction must be in (0, 1], got {spec.fraction!r}")
        if layer_flops is None:
            raise ValueError("TargetFlops needs the model's layer_flops cost function (adapters supply it)")
        schedule = _target_flops(spec.fraction, num_layers, num_tokens, protected, method, grouping, layer_flops)
    else:
        raise TypeError(f"unsupported schedule spec {spec!r} ({type(spec).__name__}); use an int, (r, inflect), a "
                        "list, KeepRatio, TargetTokens or TargetFlops")

    try:
        validate_schedule(schedule, num_tokens, protected, method, grouping)
    except ValueError as err:
        if inflect is not None:
            raise ValueError(f"{err} (r={spec!r} is the schedule {schedule} by ToMe's inflect rule)") from None
        raise
    return schedule
