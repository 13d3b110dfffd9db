"""Which tokens may merge: static partitions and coordinate constraints.

Two kinds of rule, both turned into a boolean "allowed" mask that every matcher applies as -inf on its
score matrix before any argmax, so no forbidden pair can ever merge:

``Partition`` (static groups)
    The mergeable tokens form contiguous groups (frames, bands, blocks of frames) and each group removes
    its own budget. Groups stay contiguous and in order (survivors keep their order), so the layout of
    every layer is known at patch time: no coordinates are needed and feasibility is decided once.
    ``within_frame``, ``same_band`` and ``window(k)`` run this way in the adapters.

``Constraint`` (coordinate rules)
    Decided per pair from span coordinates that travel in the TokenState (``{axis}_min`` / ``{axis}_max``,
    e.g. ``t_min``/``t_max`` in frames or columns): ``adjacent`` (spans touch), and ``within_frame`` /
    ``same_band`` / ``window(k)`` with one budget for all groups.

Feasibility. Tokens are kept in the order of their representatives (``merge.py``), so whatever the input,
a rule guarantees two static counts (``Guarantee``): at most ``runs`` maximal runs of consecutive tokens in
which neighbours may merge, and at most ``cliques`` cliques (tokens that may all merge with each other,
every token in at least one, e.g. the tokens covering frame t under ``adjacent``). From those the matchers
derive per-step limits that hold for every input (``mmmerge.methods.step_limit``): bipartite steps pair
neighbours inside runs, select-style steps keep one anchor per clique so every removed token has an
allowed host. Nothing is checked on device at run time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .state import TokenState

TIME_MODES = ("global", "within_frame", "adjacent", "window(k)", "same_band")


@dataclass(frozen=True)
class Guarantee:
    """What one merge step can count on for every input: at most ``runs`` runs of consecutive tokens in
    which neighbours may merge, and at most ``cliques`` cliques of tokens that may all merge together."""

    runs: int = 1
    cliques: int = 1

    def __mul__(self, other: "Guarantee") -> "Guarantee":
        return Guarantee(self.runs * other.runs, self.cliques * other.cliques)


# ---------------------------------------------------------------------------------------------- partition
class GroupTables:
    """A partition's static index tensors (``mmmerge.methods.group_tables`` makes them once, at patch time), so a
    forward builds nothing from Python lists. Read through ``source`` on every access: a mapping of these names
    to tensors, e.g. an encoder layer's buffers, so the tables follow ``.to()`` and copies. A table that is not
    there reads None (the matchers then derive it from the partition's sizes).
    """

    NAMES = ("ids", "ids_a", "block_ab", "sel_a", "sel_pairs", "block_pairs", "sel", "quota")

    def __init__(self, source: Optional[Mapping[str, Tensor]] = None) -> None:
        self._source = {} if source is None else source

    @property
    def ids(self) -> Optional[Tensor]:
        """``[M]`` long: the group of each mergeable token."""
        return self._source.get("ids")

    @property
    def ids_a(self) -> Optional[Tensor]:
        """``[Na]`` long: the group of each A token of a bipartite split."""
        return self._source.get("ids_a")

    @property
    def block_ab(self) -> Optional[Tensor]:
        """``[Na, Nb]`` bool: True where an A and a B token lie in different groups (the static group rule)."""
        return self._source.get("block_ab")

    @property
    def sel_a(self) -> Optional[Tensor]:
        """``[r]`` long: each group's first ``budget`` A tokens in a group-sorted list (the removed edges)."""
        return self._source.get("sel_a")

    @property
    def sel_pairs(self) -> Optional[Tensor]:
        """``[2r]`` long: each group's first ``2 * budget`` tokens in a group-sorted list (PiToMe's candidates)."""
        return self._source.get("sel_pairs")

    @property
    def block_pairs(self) -> Optional[Tensor]:
        """``[r, r]`` bool: True where PiToMe's i-th A and j-th B candidate lie in different groups."""
        return self._source.get("block_pairs")

    @property
    def sel(self) -> Optional[Tensor]:
        """``[r]`` long: each group's first ``budget`` tokens in a group-sorted list (select-style removals)."""
        return self._source.get("sel")

    @property
    def quota(self) -> Optional[Tensor]:
        """``[M]`` long: how many tokens each token's group keeps (greedy selections)."""
        return self._source.get("quota")


@dataclass(frozen=True)
class Partition:
    """Static contiguous groups of the mergeable tokens, each with its own removal budget.

    Attributes:
        sizes: tokens per group, in order (they sum to the mergeable count M).
        budgets: tokens each group removes in this step (same length as ``sizes``).
        guarantees: what each group's tokens guarantee (default: any two may merge). More runs or
            cliques when a coordinate rule applies inside the groups too (``adjacent`` within one band), or
            when a group can hold padding and real tokens, which never merge with each other.
        tables: its static index tensors (``GroupTables``), made at patch time by the adapters.
    """

    sizes: Tuple[int, ...]
    budgets: Tuple[int, ...]
    guarantees: Tuple[Guarantee, ...] = ()
    tables: GroupTables = field(default_factory=GroupTables, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.budgets) or (self.guarantees and len(self.guarantees) != len(self.sizes)):
            raise ValueError(f"a Partition needs one budget (and guarantee) per group: sizes {self.sizes}, "
                             f"budgets {self.budgets}, guarantees {self.guarantees}")
        if any(n < 1 for n in self.sizes) or any(r < 0 for r in self.budgets):
            raise ValueError(f"Partition sizes must be >= 1 and budgets >= 0: {self.sizes}, {self.budgets}")

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def removed(self) -> int:
        return sum(self.budgets)

    def group_guarantees(self) -> Tuple[Guarantee, ...]:
        return self.guarantees or (Guarantee(),) * len(self.sizes)

    def after(self) -> Tuple[int, ...]:
        """Group sizes after this step."""
        return tuple(n - r for n, r in zip(self.sizes, self.budgets))

    def group_ids(self, device: torch.device) -> Tensor:
        """``[M]`` long: the group of each mergeable token."""
        ids = self.tables.ids
        if ids is None:
            ids = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))
        return ids.to(device)

    def first_positions(self, counts: Sequence[int], take: Sequence[int], device: torch.device,
                        table: Optional[Tensor] = None) -> Tensor:
        """Static positions ``[sum(take)]`` selecting the first ``take[g]`` of each group's ``counts[g]``
        entries, in a list sorted by group (group 0's entries first). ``table``: the same, made at patch time."""
        if table is not None:
            return table.to(device)
        return first_positions(counts, take).to(device)


def group_sorted(values: Tensor, ids: Tensor, descending: bool) -> Tensor:
    """``[B, K]`` indices of ``values`` ``[B, K]`` sorted by (group, value, index): one stable sort by value, one
    stable sort by group, so each group's entries form a static range (``first_positions`` picks from them).
    ``ids``: the group of each entry, ``[K]`` or per row ``[B, K]``."""
    order = values.argsort(dim=1, descending=descending, stable=True)
    return order.gather(1, ids.expand_as(order).gather(1, order).argsort(dim=1, stable=True))


def first_positions(counts: Sequence[int], take: Sequence[int]) -> Tensor:
    """Positions of the first ``take[g]`` entries of each group in a group-sorted list of ``counts`` entries."""
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    parts = [torch.arange(s, s + t) for s, t in zip(starts, take)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_budget(r: int, sizes: Sequence[int], limits: Sequence[int]) -> Tuple[int, ...]:
    """Share ``r`` removals over groups: as even as possible, the larger groups giving up one token more,
    never more than a group's ``limits[g]``. Raises ValueError if the groups together cannot remove ``r``.

    Largest groups first keeps group sizes within one of each other layer after layer, so a frame never
    runs dry while another is still full.
    """
    if r > sum(limits):
        raise ValueError(f"r={r} is more than these {len(sizes)} groups can remove in one step ({sum(limits)})")
    budgets = [0] * len(sizes)
    left = list(sizes)
    for _ in range(r):  # one token at a time from the currently largest group that still has room
        g = max((g for g in range(len(sizes)) if budgets[g] < limits[g]), key=lambda g: (left[g], -g))
        budgets[g] += 1
        left[g] -= 1
    return tuple(budgets)


# ------------------------------------------------------------------------------------- coordinate rules
def _pair(state: TokenState, name: str, idx_a: Tensor, idx_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Coordinate ``name`` of the A tokens as ``[B, Na, 1]`` and of the B tokens as ``[B, 1, Nb]``."""
    c = state.coords[name]
    return c.gather(1, idx_a).unsqueeze(2), c.gather(1, idx_b).unsqueeze(1)


def _steps(steps: Optional[int], name: str) -> int:
    if steps is None:
        raise ValueError(f"constraint '{name}' needs the number of steps on its axis (frames, columns or bands) "
                         f"to guarantee that every merge step can be met: build it with steps=..., e.g. "
                         f"parse_constraint('{name}', steps={{'t': 8}})")
    return int(steps)


class Constraint:
    """Base class: a pair rule on span coordinates.

    ``allowed`` returns ``[B, Na, Nb]`` bool (None = every pair allowed); ``guarantee()`` the static runs
    and cliques; ``cover(state, idx)`` ``[B, M, cliques]`` bool: which cliques each token belongs to.
    """

    name = "global"
    required: Tuple[str, ...] = ()

    def check(self, state: TokenState) -> None:
        missing = [c for c in self.required if c not in state.coords]
        if missing:
            raise ValueError(
                f"constraint '{self}' needs coordinates {missing} in the TokenState (have {sorted(state.coords)}); "
                "use a modality adapter, or pass coords= to init_state"
            )

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Optional[Tensor]:
        return None

    def guarantee(self) -> Guarantee:
        return Guarantee()

    def cliques(self) -> int:
        return self.guarantee().cliques

    def cover(self, state: TokenState, idx: Tensor) -> Optional[Tensor]:
        return None

    def __repr__(self) -> str:
        return self.name


class Global(Constraint):
    """Any pair may merge."""


def _one_hot(values: Tensor, steps: int) -> Tensor:
    """``[B, M]`` step indices (float) -> ``[B, M, steps]`` bool."""
    return values.unsqueeze(-1) == torch.arange(steps, device=values.device, dtype=values.dtype)


@dataclass(repr=False)
class SameSpan(Constraint):
    """Merge only tokens with identical spans on ``axis``: ``within_frame`` (axis t), ``same_band`` (axis f).

    Equality is transitive, so a group never mixes two frames (or bands), however many tokens join it.
    """

    axis: str = "t"
    label: str = "within_frame"
    steps: Optional[int] = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        hi_a, hi_b = _pair(state, f"{self.axis}_max", idx_a, idx_b)
        return (lo_a == lo_b) & (hi_a == hi_b)

    def guarantee(self) -> Guarantee:
        steps = _steps(self.steps, self.label)  # one step per group: groups are runs and cliques
        return Guarantee(steps, steps)

    def cover(self, state: TokenState, idx: Tensor) -> Tensor:
        # Under this rule a token's span is one step (its members share it), so the start names its clique.
        return _one_hot(state.coords[f"{self.axis}_min"].gather(1, idx), self.cliques())


@dataclass(repr=False)
class Adjacent(Constraint):
    """Merge only tokens whose spans on ``axis`` overlap or touch (gap at most ``step``).

    The union of intervals that each touch a common interval is an interval, so every merged token
    covers one contiguous stretch, also when several tokens join one destination in the same step.
    Clique t: the tokens whose span covers step t (they all overlap).

    ``tiled``: the tokens start as one per step in step order in every row of the rule's order (all the tokens,
    or one band when combined with ``same_band`` / inside one band's group), e.g. AST's one patch per band and
    column. Merged tokens then tile the row's steps in order, neighbours always touch, and each row is one run.
    """

    axis: str = "t"
    step: float = 1.0
    steps: Optional[int] = None
    tiled: bool = False
    name = "adjacent"

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        hi_a, hi_b = _pair(state, f"{self.axis}_max", idx_a, idx_b)
        return (lo_a <= hi_b + self.step) & (lo_b <= hi_a + self.step)

    def guarantee(self) -> Guarantee:
        # Sorted by representative, tokens are sorted by the step their representative sits in; two tokens
        # whose representatives sit in the same or in neighbouring steps touch, so a run only breaks where
        # that step jumps by 2 or more: at most ceil(T / 2) runs (one when the tokens tile the steps, see
        # ``tiled``). Cliques: one per step.
        steps = _steps(self.steps, self.name)
        return Guarantee(1 if self.tiled else -(-steps // 2), steps)

    def cover(self, state: TokenState, idx: Tensor) -> Tensor:
        T = self.cliques()
        t = torch.arange(T, device=idx.device, dtype=state.coords[f"{self.axis}_min"].dtype)
        lo = state.coords[f"{self.axis}_min"].gather(1, idx).unsqueeze(-1)
        hi = state.coords[f"{self.axis}_max"].gather(1, idx).unsqueeze(-1)
        return (lo <= t) & (t <= hi)


@dataclass(repr=False)
class Window(Constraint):
    """Merge only inside the same block of ``k`` consecutive steps on ``axis`` ([0,k), [k,2k), ...).

    Fixed blocks rather than a sliding window: "within k of each other" is not transitive, and when
    several tokens join one destination in a step a sliding rule could build a group wider than k.
    With blocks no merged token ever spans more than k steps. ``window(1)`` equals ``within_frame``.
    """

    k: int = 1
    axis: str = "t"
    steps: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"window size k must be a positive integer, got {self.k!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"window({self.k})"

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return (f"{self.axis}_min", f"{self.axis}_max")

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Tensor:
        lo_a, lo_b = _pair(state, f"{self.axis}_min", idx_a, idx_b)
        return torch.div(lo_a, self.k, rounding_mode="floor") == torch.div(lo_b, self.k, rounding_mode="floor")

    def guarantee(self) -> Guarantee:
        blocks = math.ceil(_steps(self.steps, self.name) / self.k)
        return Guarantee(blocks, blocks)

    def cover(self, state: TokenState, idx: Tensor) -> Tensor:
        block = torch.div(state.coords[f"{self.axis}_min"].gather(1, idx), self.k, rounding_mode="floor")
        return _one_hot(block, self.cliques())


class AllOf(Constraint):
    """Pairs allowed by every one of ``parts`` (e.g. same band AND adjacent in time)."""

    def __init__(self, *parts: Constraint) -> None:
        if not parts:
            raise ValueError("AllOf needs at least one constraint")
        self.parts = parts

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(p.name for p in self.parts)

    @property
    def required(self) -> Tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(c for p in self.parts for c in p.required))

    def allowed(self, state: TokenState, idx_a: Tensor, idx_b: Tensor) -> Optional[Tensor]:
        mask = None
        for part in self.parts:
            m = part.allowed(state, idx_a, idx_b)
            if m is not None:
                mask = m if mask is None else mask & m
        return mask

    def guarantee(self) -> Guarantee:
        total = Guarantee()
        for part in self.parts:
            total = total * part.guarantee()
        return total

    def cover(self, state: TokenState, idx: Tensor) -> Optional[Tensor]:
        cover = None
        for part in self.parts:  # a clique of the combination is one clique of every part
            c = part.cover(state, idx)
            if c is not None:
                cover = c if cover is None else (cover.unsqueeze(-1) & c.unsqueeze(-2)).flatten(-2)
        return cover


# ------------------------------------------------------------------------------------------- the parser
ConstraintSpec = Union[None, str, Constraint]


def parse_time_mode(time_mode: object, allowed: Sequence[str] = TIME_MODES, *, steps: Optional[int] = None,
                    unit: str = "steps") -> Tuple[str, int]:
    """The one parser of time-mode names: returns ``(mode, k)`` with ``mode`` one of ``global``,
    ``within_frame``, ``adjacent``, ``window``, ``same_band`` and ``k`` the window size (1 otherwise).

    Accepts ``"window(k)"`` (k a positive integer). ``allowed`` restricts the names (an adapter's modes).
    ``steps``: the time steps of the model's input (tubelets, columns); a window at least that wide holds the
    whole input, so it would be ``global`` under another name: refused.
    """
    names = ", ".join(allowed)
    if not isinstance(time_mode, str):
        raise TypeError(f"time_mode must be a string ({names}), got {time_mode!r} ({type(time_mode).__name__})")
    spec = time_mode.replace(" ", "")
    match = re.fullmatch(r"window\((.*)\)", spec)
    if match:
        if "window(k)" not in allowed:
            raise ValueError(f"time_mode '{time_mode}' is not available here; choose one of {names}")
        if not match.group(1).isdigit() or int(match.group(1)) < 1:
            raise ValueError(f"time_mode '{time_mode}': k in window(k) must be a positive integer, e.g. 'window(4)'")
        k = int(match.group(1))
        if steps is not None and k >= steps:
            raise ValueError(f"time_mode '{time_mode}': a window of {k} {unit} holds the whole input ({steps} {unit}), "
                             f"so it constrains nothing and is time_mode='global'; pass 'global', or k < {steps} "
                             "for windows")
        return "window", k
    if spec not in allowed or spec == "window(k)":
        hint = " (for a window write 'window(k)', e.g. 'window(2)')" if spec == "window" else ""
        raise ValueError(f"unknown time_mode '{time_mode}'; choose one of {names}{hint}")
    return spec, 1


def parse_constraint(spec: ConstraintSpec, *, steps: Optional[Mapping[str, int]] = None, time_axis: str = "t",
                     band_axis: str = "f") -> Constraint:
    """A constraint from a name (``global``, ``within_frame``, ``adjacent``, ``window(k)``, ``same_band``) or
    as given. ``steps`` gives the number of steps per axis (e.g. ``{"t": 8}``), which every rule but
    ``global`` needs to know its cliques."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return Global()
    if not isinstance(spec, str):
        raise TypeError(f"constraint must be a name or a Constraint, got {type(spec).__name__}")
    try:
        mode, k = parse_time_mode(spec)
    except ValueError:
        raise ValueError(f"unknown constraint '{spec}'; choose one of {', '.join(TIME_MODES)}") from None
    steps = dict(steps or {})
    if mode == "global":
        return Global()
    if mode == "within_frame":
        return SameSpan(axis=time_axis, label="within_frame", steps=steps.get(time_axis))
    if mode == "same_band":
        return SameSpan(axis=band_axis, label="same_band", steps=steps.get(band_axis))
    if mode == "adjacent":
        return Adjacent(axis=time_axis, steps=steps.get(time_axis))
    return Window(k=k, axis=time_axis, steps=steps.get(time_axis))


# ----------------------------------------------------------------------------------------------- masks
def allowed_pairs(state: TokenState, constraint: Constraint, idx_a: Tensor, idx_b: Tensor,
                  partition: Optional[Partition] = None) -> Optional[Tensor]:
    """``[B, Na, Nb]`` bool: the constraint's mask, the partition's groups and the padding rule together
    (valid tokens never meet padding). ``idx_a``/``idx_b`` index ALL tokens (protected included); None
    means every pair is allowed."""
    mask = constraint.allowed(state, idx_a, idx_b)
    if partition is not None:
        ids = partition.group_ids(idx_a.device)
        P = state.protected
        same = ids[idx_a - P].unsqueeze(2) == ids[idx_b - P].unsqueeze(1)
        mask = same if mask is None else mask & same
    if state.valid is not None:
        va = state.valid.gather(1, idx_a).unsqueeze(2)
        vb = state.valid.gather(1, idx_b).unsqueeze(1)
        same = va == vb
        mask = same if mask is None else mask & same
    return mask




def check_layout(state: TokenState, constraint: Constraint) -> None:
    """Raise ValueError unless the tokens are in the order the rule's guarantee assumes.

    The guarantees count runs of consecutive tokens, so they hold for tokens sorted along the rule's axis
    (time-major for ``within_frame`` / ``adjacent`` / ``window(k)``, band-major for ``same_band``): the order
    every adapter builds and merging keeps. One host read; the engine's checked entry points call it
    (``plan_merge``, ``reduce_tokens``), adapters that build the order themselves pass ``check_layout=False``.
    """
    g = constraint.guarantee()
    P, N = state.protected, state.num_tokens
    if isinstance(constraint, Global) or N - P < 2:
        return
    B = state.batch_size
    idx = torch.arange(P, N - 1, device=state.size.device).unsqueeze(0).expand(B, -1)
    neighbours = torch.diagonal(constraint.allowed(state, idx, idx + 1), dim1=1, dim2=2)  # [B, M - 1]
    runs = 1 + int((~neighbours).sum(1).max())
    if runs > g.runs:
        raise ValueError(f"constraint '{constraint}': the tokens fall into {runs} runs of neighbours that may merge, "
                         f"more than the {g.runs} its guarantee assumes; sort the tokens along the rule's axis "
                         "(time-major for time rules, band-major for same_band) before merging")


# ------------------------------------------------------------------------------------------------ padding
# Padding never merges with real tokens (``allowed_pairs``). It is whole time steps (audio columns), trailing in
# the adapters: a step is all padding or all real. What that does to a rule's guarantee is decided here, once,
# for the engine (which reads a mask, ``padded_guarantee``) and for the adapters (which know their padding at
# patch time, ``static_guarantee`` / ``group_guarantee``).
PADDING_AXIS = "t"  # padding is whole trailing time steps (audio columns)


def _per_step(constraint: Constraint, axis: str = PADDING_AXIS) -> bool:
    """Every clique lies inside one step of the padding axis (a step is all padding or all real)."""
    if isinstance(constraint, AllOf):
        return any(_per_step(p, axis) for p in constraint.parts)
    return isinstance(constraint, (Adjacent, SameSpan)) and constraint.axis == axis


def _runs_end_at_steps(constraint: Constraint, axis: str = PADDING_AXIS) -> bool:
    """Neighbours in different steps of the padding axis never merge (``within_frame``, alone or combined), so
    every run already ends where the step changes, and with it every change between padding and real."""
    if isinstance(constraint, AllOf):
        return any(_runs_end_at_steps(p, axis) for p in constraint.parts)
    return isinstance(constraint, SameSpan) and constraint.axis == axis


def _classes(constraint: Constraint) -> bool:
    """The rule is an equivalence (any pair, same span, same block, and combinations of these): its cliques are
    disjoint classes, one per run in the rule's order (``runs == cliques``)."""
    if isinstance(constraint, AllOf):
        return all(_classes(p) for p in constraint.parts)
    return isinstance(constraint, (Global, SameSpan, Window))


def guarantee_with_padding(constraint: Constraint, breaks: int, *, axis: str = PADDING_AXIS) -> Guarantee:
    """The constraint's guarantee on tokens in its order whose rows change between padding and real at most
    ``breaks`` times (padding: whole steps of ``axis``). The one rule behind ``padded_guarantee`` (breaks read
    from a mask) and ``static_guarantee`` (breaks known at patch time).

    Runs: padding and real never merge, so a change between them ends a run: one run more per change, except
    under a rule that never merges across steps (``within_frame``), where every change between steps, and so
    every change between padding and real, already ends a run.
    Cliques: a clique that holds both splits in two (real part, padding part). Never under a rule whose cliques
    lie inside one step (``adjacent``, ``within_frame``): a step is all padding or all real. Under an
    equivalence rule (``global``, ``same_band``, ``window(k)``) each clique is one run of the tokens, so a
    change splits only the clique it falls in: at most one clique more per change, and never more than double.
    Otherwise every clique may hold both: double.
    """
    g = constraint.guarantee()
    if breaks < 0:
        raise ValueError(f"breaks between padding and real tokens must be >= 0, got {breaks}")
    if breaks == 0:
        return g
    runs = g.runs if _runs_end_at_steps(constraint, axis) else g.runs + breaks
    if _per_step(constraint, axis):
        cliques = g.cliques
    elif _classes(constraint):
        cliques = g.cliques + min(breaks, g.cliques)
    else:
        cliques = 2 * g.cliques
    return Guarantee(runs, cliques)


def _padding_rows(constraint: Constraint, axis: str) -> int:
    """Rows of steps of the padding axis in the rule's order: one per step of the ``same_band`` parts (tokens
    band-major, each band a row), else one."""
    rows = 1
    for part in constraint.parts if isinstance(constraint, AllOf) else (constraint,):
        if isinstance(part, Global) or getattr(part, "axis", axis) == axis:
            continue
        if not isinstance(part, SameSpan):
            raise ValueError(f"constraint '{constraint}': padding is whole steps of '{axis}', and the rows of "
                             f"those steps under '{part}' (a rule on axis '{part.axis}') are not known; combine "
                             f"rules on other axes only as same-span rules (same_band)")
        rows *= _steps(part.steps, part.name)
    return rows


def static_guarantee(constraint: Constraint, padded: bool = False, *, axis: str = PADDING_AXIS) -> Guarantee:
    """What the constraint guarantees for every input, with ``padded``: trailing padding steps of ``axis``
    (the same steps in every row), known at patch time, so no mask is read.

    In the rule's order each row of steps (all the tokens; one band under ``same_band``) changes once from real
    to padding; the change from one band's padding to the next band's real tokens lies between two bands,
    where the rule already ends a run and a clique, so it counts for nothing. Hence one break per row, and
    ``guarantee_with_padding`` says what those do (e.g. none for ``within_frame``: the break lies between two
    frames; one run for ``adjacent``; one run and one clique for ``global`` and ``window(k)``).
    """
    return guarantee_with_padding(constraint, _padding_rows(constraint, axis) if padded else 0, axis=axis)


def group_guarantee(padded: bool = False, *, spans_steps: bool = True, inside: Optional[Constraint] = None,
                    axis: str = PADDING_AXIS) -> Guarantee:
    """What one static group (a ``Partition`` group: a frame, a band, a block) guarantees: the guarantee of the
    rule ``inside`` it (default: any pair) on the group's tokens, a row of steps with trailing padding when
    ``padded``. A group inside one step (``spans_steps=False``, e.g. a frame) is all padding or all real: the
    padding changes nothing there."""
    return static_guarantee(Global() if inside is None else inside, padded and spans_steps, axis=axis)


def padded_guarantee(constraint: Constraint, valid: Optional[Tensor]) -> Guarantee:
    """The constraint's guarantee on tokens with a padding mask ``valid`` ``[B, M]`` (None: no padding).

    Counts the changes between padding and real along each row (the most of any row) and applies
    ``guarantee_with_padding``. Reads the mask on the host (one sync): for engine calls; the adapters know
    their padding at patch time and call ``static_guarantee``. On time-major tokens with trailing padding
    (one change) both agree; band-major rows also change from one band's padding to the next band's real
    tokens, which this count includes (a looser, still safe, run count).
    """
    if valid is None or valid.shape[1] < 2:
        return constraint.guarantee()
    breaks = int((valid[:, 1:] != valid[:, :-1]).sum(1).max())
    return guarantee_with_padding(constraint, breaks)


def clique_cover(state: TokenState, constraint: Constraint, idx: Tensor,
                 partition: Optional[Partition] = None) -> Optional[Tensor]:
    """``[B, M, K]`` bool: the cliques each of the tokens ``idx`` (``[B, M]``, all-token indices) belongs to,
    combining the constraint, the partition's groups and padding; None when everything is one clique."""
    cover = constraint.cover(state, idx)
    if partition is not None:
        ids = partition.group_ids(idx.device)[idx - state.protected]  # [B, M]
        groups = ids.unsqueeze(-1) == torch.arange(partition.num_groups, device=idx.device)
        cover = groups if cover is None else (groups.unsqueeze(-1) & cover.unsqueeze(-2)).flatten(-2)
    if state.valid is not None:
        v = state.valid.gather(1, idx).unsqueeze(-1)
        real_pad = torch.cat([v, ~v], dim=-1)  # [B, M, 2]
        cover = real_pad if cover is None else (cover.unsqueeze(-1) & real_pad.unsqueeze(-2)).flatten(-2)
    return cover
