"""The fused steps: choose and merge as two custom ops (``torch.ops.mmmerge``), for the GPU's host.

A merging layer of the engine path dispatches 45-60 small ops (normalise, score, max, top-r, ranks, gathers, the
weighted mean); at small batch on a GPU each costs microseconds of launch, more than its kernel. Here a ToMe,
PiToMe or TPS step is two ops:

    kept, members, lo, hi, assign[, weight] = *_plan(metric, ..., ids, sel, protected, ...)   (choose)
    x, size = merge_slots(x, size, weight, kept, members, lo, hi, assign)                     (merge)

Each op has a PyTorch reference (the CPU, float64, any device without Triton), Triton kernels on CUDA
(``mmmerge.triton_kernels``) and a fake implementation (``torch.compile`` and the simulated-CUDA tier trace through
it). ``merge_slots`` is differentiable in ``x``.

The plan, over ``N`` tokens of which the first ``protected`` never merge: ``ids`` (``[M]`` int32, the group of each
of the ``M`` mergeable tokens, all 0 without groups) and ``sel`` (static positions, each group's first entries in a
list sorted by (group, score descending, index)) are the static tables (``fused_tables``). Outputs: ``kept``
``[B, K]`` the survivor of each slot (ascending), ``members`` ``[B, r]`` the removed tokens sorted by slot, slot
``k`` receiving ``members[lo[k]:hi[k]]`` (``lo``/``hi`` ``[B, K]`` int32, 0/0 for none), ``assign`` ``[B, N]`` the
slot of every token, and for TPS the fusion weights. ``K = N - r``.

Per-row tables (rows with budgets of their own, ``mmmerge.rows``): every plan op also takes ``ids`` ``[B, M]`` and
``sel`` ``[B, S]`` int32 (``S``: r for ToMe and TPS, 2r for PiToMe). Tier 0 then marks a row's real tokens, tier 1
its padding: nothing pairs across tiers, and an energy (PiToMe's; TPS's without a score) is the mean over the
row's real tokens only, as ``energy_score(..., valid=(ids == 0))`` of the engine's ``quota=`` path. With ``[M]``
ids the energy is the mean over all mergeable tokens.

Where it applies (``fused_choice``, decided at patch time): ToMe, PiToMe and TPS without a coordinate rule (global,
or static groups such as ``within_frame``) and without padding, and ``reduce_tokens`` over rows with budgets of
their own (``mmmerge.rows``: the per-row tier tables of ``row_tables``); everything else takes the engine path
(``mmmerge.matchers`` + ``mmmerge.merge``), which this path equals up to ties and float rounding of the mean.
``dominant`` with a given score has a fused step of its own in ``reduce_tokens`` (``mmmerge.fused_selection``).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .matchers import PITOME_PRESETS, TPS_PRESETS, _normalized, _rows, a_first, energy_score, pitome_margin
from .constraints import GroupTables, group_sorted
from .merge import MergePlan, _fuse, plan_from_pairs
from .rows import RowBudgets
from .state import TokenState

PlanTensors = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
# One plan program sorts a layer's tokens in registers; the packed sort key holds 16 bits of token index and 15 of
# group id. Larger layers take the engine path.
MAX_TOKENS = 8192
MAX_GROUPS = 1 << 15
FUSED_METHODS = ("tome", "pitome", "tps")  # the methods with a fused step (``fused_choice``)
ROW_TABLE_METHODS = (*FUSED_METHODS, "dominant")  # rows with budgets take their fused step (``row_tables``)
# Entries a plan takes from the sorted list per removed token: ToMe's edges, PiToMe's candidates (an A and a B
# token each), TPS's removed tokens.
PICKS_PER_REMOVED = {"tome": 1, "pitome": 2, "tps": 1}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 takes the reference
FUSED_ENV = "MMMERGE_FUSED"  # "0": every layer takes the engine path (for side-by-side measurements)


def fused_enabled() -> bool:
    """Whether patches made now use the fused step where it applies (read at patch time, never per call)."""
    value = os.environ.get(FUSED_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{FUSED_ENV} must be '0' (engine path everywhere) or '1' (fused ToMe step where it "
                         f"applies, the default), got {value!r}")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _triton(module: str = "triton_kernels") -> Optional[object]:
    """A Triton kernels module of this package (``triton_kernels``, ``triton_selection``), or None where Triton is
    not installed."""
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return None


_FAILED: Dict[str, str] = {}  # kernel -> the error that made it fall back to its reference (once per process)


def _launch(name: str, reference: Callable[..., Any], on: Tensor, *args: Any,
            module: str = "triton_kernels") -> Any:
    """Run kernel ``name`` of ``mmmerge.<module>`` (``triton_kernels``, or ``triton_selection``) where tensor ``on``
    is a CUDA tensor of a dtype the kernels take (or with ``MMMERGE_TRITON_ON_CPU=1`` and ``TRITON_INTERPRET=1``, a
    CPU one: Triton's interpreter, for tests), else the PyTorch ``reference``. A kernel that fails to build or
    launch (an unsupported Triton or GPU) warns once and falls back to the reference, which gives the same
    plans."""
    device = on.device.type
    runs = (device == "cuda" or device == "cpu" and os.environ.get("MMMERGE_TRITON_ON_CPU") == "1") \
        and on.dtype in KERNEL_DTYPES and name not in _FAILED
    kernels = _triton(module) if runs else None
    if kernels is None:
        return reference(*args)
    try:
        return getattr(kernels, name)(*args)
    except Exception as err:  # noqa: BLE001 - any build or launch failure: the reference is always correct
        _FAILED[name] = f"{type(err).__name__}: {err}"
        warnings.warn(f"mmmerge: the Triton kernel {name} failed ({_FAILED[name][:300]}); using the PyTorch "
                      "path for it from now on", RuntimeWarning, stacklevel=2)
        return reference(*args)


# ------------------------------------------------------------------------------------------------ choose
@torch.library.custom_op("mmmerge::bipartite_plan", mutates_args=())
def bipartite_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    """The ToMe plan (see the module docstring). ``metric``: ``[B, N, d]`` (float32 head-averaged keys). ``ids`` and
    ``sel`` may also be per row, ``[B, M]`` and ``[B, r]`` (the real/padding tiers of rows with budgets of their
    own, ``mmmerge.rows``)."""
    return _launch("bipartite_plan", plan_reference, metric, metric, ids, sel, protected, a0)


def _unit(metric: Tensor, protected: int) -> Tensor:
    """The mergeable metric as unit float32 vectors (what the kernels compute on)."""
    return _normalized(metric.float(), protected)


def _real(ids: Tensor) -> Optional[Tensor]:
    """``[B, M]`` bool, a row's real tokens (tier 0) with per-row ``ids``; None (every token counts) with ``[M]``."""
    return ids == 0 if ids.dim() == 2 else None


def _group_of(ids: Tensor, idx: Tensor) -> Tensor:
    """``[B, K]`` long, the group of token ``idx[b, k]`` (``ids`` ``[M]`` shared or ``[B, M]`` per row)."""
    return ids.long()[idx] if ids.dim() == 1 else ids.long().gather(1, idx)


def _pick_by_group(values: Tensor, ids: Tensor, sel: Tensor) -> Tensor:
    """``[B, len(sel)]`` indices: entries sorted by (group, value descending, index), at the positions ``sel``
    (``ids`` ``[K]`` or per row ``[B, K]``; ``sel`` ``[S]`` or ``[B, S]``)."""
    order = group_sorted(values, ids.long(), descending=True)
    return order.index_select(1, sel.long()) if sel.dim() == 1 else order.gather(1, sel.long())


def _plan_tensors(src: Tensor, dst: Tensor, N: int, protected: int) -> PlanTensors:
    """The plan tensors of "mergeable token ``src[b, i]`` joins ``dst[b, i]``"."""
    B, r = src.shape
    plan = plan_from_pairs(src, dst, src.new_ones(B, N, dtype=torch.float32), N - protected, protected)
    slot = plan.assign.gather(1, plan.merged)  # [B, r]
    order = (slot * N + plan.merged).argsort(dim=1)
    members, slot = plan.merged.gather(1, order), slot.gather(1, order)
    slots = torch.arange(N - r, device=src.device).expand(B, -1).contiguous()
    lo = torch.searchsorted(slot, slots, out_int32=True)
    hi = torch.searchsorted(slot, slots, right=True, out_int32=True)
    received = hi > lo  # a slot without members has lo = hi = 0, as the kernels write it
    return plan.kept, members, lo * received, hi * received, plan.assign


def plan_reference(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    """``bipartite_plan`` in PyTorch ops (the CPU implementation, and the kernels' reference)."""
    with torch.no_grad():
        m = _unit(metric, protected)
        ids_a, ids_b = ids[..., a0::2], ids[..., 1 - a0::2]
        cos = torch.bmm(m[:, a0::2], m[:, 1 - a0::2].transpose(1, 2))  # [B, Na, Nb]
        cos = cos.masked_fill(ids_a.unsqueeze(-1) != ids_b.unsqueeze(-2), float("-inf"))
        best, partner = cos.max(dim=-1)  # [B, Na]
        src = _pick_by_group(best, ids_a, sel)  # [B, r] A tokens that merge
        dst = partner.gather(1, src)
        return _plan_tensors(src * 2 + a0, dst * 2 + (1 - a0), metric.shape[1], protected)


def _plan_like(metric: Tensor, r: int) -> PlanTensors:
    B, N, _ = metric.shape
    K = N - r
    index = dict(device=metric.device, dtype=torch.long)
    return (metric.new_empty(B, K, **index), metric.new_empty(B, r, **index),
            metric.new_empty(B, K, device=metric.device, dtype=torch.int32),
            metric.new_empty(B, K, device=metric.device, dtype=torch.int32), metric.new_empty(B, N, **index))


@bipartite_plan.register_fake
def _(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    return _plan_like(metric, sel.shape[-1])


@torch.library.custom_op("mmmerge::pitome_plan", mutates_args=())
def pitome_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, margin: float, alpha: float,
                shift: bool) -> PlanTensors:
    """The PiToMe plan: the ``2r`` highest-energy tokens of each group (``sel``: ``[2r]`` static positions, each
    group's first ``2 * budget``) alternate into A and B in energy order; each A token joins its most similar B
    candidate of its group. Energy: ``mmmerge.matchers.energy_score(margin, alpha, shift)``. Per row (``ids``
    ``[B, M]``, ``sel`` ``[B, 2r]``: the row's ``2 quota[b]`` real candidates, then its padding ones): the energy
    is the mean over the row's real tokens (tier 0), and A and B candidates pair within their tier."""
    return _launch("pitome_plan", pitome_reference, metric, metric, ids, sel, protected, margin, alpha, shift)


def pitome_reference(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, margin: float, alpha: float,
                     shift: bool) -> PlanTensors:
    """``pitome_plan`` in PyTorch ops (the CPU implementation, and the kernels' reference)."""
    with torch.no_grad():
        m = _unit(metric, protected)
        cand = _pick_by_group(energy_score(m, margin, alpha, shift, _real(ids)), ids, sel)  # [B, 2r]
        src, cand_b = cand[:, 0::2], cand[:, 1::2]
        cos = torch.bmm(_rows(m, src), _rows(m, cand_b).transpose(1, 2))  # [B, r, r]
        cos = cos.masked_fill(_group_of(ids, src).unsqueeze(2) != _group_of(ids, cand_b).unsqueeze(1), float("-inf"))
        dst = cand_b.gather(1, cos.argmax(dim=-1))
        return _plan_tensors(src, dst, metric.shape[1], protected)


@pitome_plan.register_fake
def _(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, margin: float, alpha: float,
      shift: bool) -> PlanTensors:
    return _plan_like(metric, sel.shape[-1] // 2)


@torch.library.custom_op("mmmerge::tps_plan", mutates_args=())
def tps_plan(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, sub: float, temperature: float,
             after: float, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The TPS plan: the ``r`` least important tokens of each group (``sel``: ``[r]`` static positions) are removed,
    each into its most similar kept token of its group; the plan tensors and the fusion weights ``[B, N]``:
    ``size``, a removed token's times ``exp((cos - sub) / temperature - after)``. Importance: ``score`` ``[B, N]``
    (higher keeps), or without one minus the energy at margin 0 (the most redundant go first). Per row (``ids``
    ``[B, M]``, ``sel`` ``[B, r]``: the row's ``quota[b]`` real tokens, then its padding ones): the energy is the
    mean over the row's real tokens (tier 0), and a removed token's host lies in its own tier."""
    return _launch("tps_plan", tps_reference, metric, metric, size, ids, sel, protected, sub, temperature, after,
                   score)


def _removal_order(m: Tensor, ids: Tensor, protected: int, score: Optional[Tensor]) -> Tensor:
    """``[B, M]`` float32, higher goes first: the energy at margin 0 (over a row's real tokens with per-row
    ``ids``), or minus a given importance score."""
    return energy_score(m, 0.0, valid=_real(ids)) if score is None else -score[:, protected:].float()


def tps_reference(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, sub: float,
                  temperature: float, after: float, score: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """``tps_plan`` in PyTorch ops (the CPU implementation, and the kernels' reference)."""
    P = protected
    with torch.no_grad():
        m = _unit(metric, P)
        B, M, _ = m.shape
        removed = _pick_by_group(_removal_order(m, ids, P, score), ids, sel)  # [B, r]
        cos = torch.bmm(_rows(m, removed), m.transpose(1, 2))  # [B, r, M]
        is_removed = torch.zeros(B, M, dtype=torch.bool, device=m.device).scatter_(1, removed, True)
        # ids.unsqueeze(-2): [1, M] shared or [B, 1, M] per row, against the removed tokens' [B, r, 1]
        forbidden = is_removed.unsqueeze(1) | (_group_of(ids, removed).unsqueeze(2) != ids.long().unsqueeze(-2))
        host_sim, host = cos.masked_fill(forbidden, float("-inf")).max(dim=-1)
        slot = removed + P
        weight = size.scatter(1, slot, size.gather(1, slot) * torch.exp((host_sim - sub) / temperature - after))
        return (*_plan_tensors(removed, host, metric.shape[1], P), weight)


@tps_plan.register_fake
def _(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, sub: float, temperature: float,
      after: float, score: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    return (*_plan_like(metric, sel.shape[-1]), size.new_empty(size.shape))


# ------------------------------------------------------------------------------------------------- merge
@torch.library.custom_op("mmmerge::merge_slots", mutates_args=())
def merge_slots(x: Tensor, size: Tensor, weight: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor,
                assign: Tensor) -> Tuple[Tensor, Tensor]:
    """``([B, K, C], [B, K])``: every slot's ``weight``-weighted mean (a lone survivor exactly its row) and its total
    ``size``. ``weight`` is ``size`` for ToMe and PiToMe. ``assign`` is read by the backward only."""
    return _launch("merge_slots", _merge_reference_from_slots, x, x, size, weight, kept, members, lo, hi, assign)


def _merge_reference_from_slots(x: Tensor, size: Tensor, weight: Tensor, kept: Tensor, members: Tensor, lo: Tensor,
                                hi: Tensor, assign: Tensor) -> Tuple[Tensor, Tensor]:
    return merge_reference(x, size, weight, kept, members, assign)


def merge_reference(x: Tensor, size: Tensor, weight: Tensor, kept: Tensor, members: Tensor, assign: Tensor
                    ) -> Tuple[Tensor, Tensor]:
    """``merge_slots`` through the engine's merge (``mmmerge.merge._fuse``)."""
    K = kept.shape[1]
    new_size = size.new_zeros(size.shape[0], K).scatter_add_(1, assign, size)
    plan = MergePlan(assign=assign, weight=weight, num_out=K, kept=kept, merged=members)
    return _fuse(x, plan, new_size if weight is size else None), new_size


@merge_slots.register_fake
def _(x: Tensor, size: Tensor, weight: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor,
      assign: Tensor) -> Tuple[Tensor, Tensor]:
    B, K = kept.shape
    return x.new_empty(B, K, x.shape[-1]), size.new_empty(B, K)


def _merge_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2], inputs[7])
    ctx.mark_non_differentiable(output[1])  # sizes count tokens: no gradient flows through them


def _merge_backward(ctx, grad_out: Tensor, grad_size: Optional[Tensor]):
    weight, assign = ctx.saved_tensors
    totals = weight.new_zeros(grad_out.shape[:2]).scatter_add_(1, assign, weight)
    share = weight / totals.gather(1, assign)  # [B, N]: each token's weight in its slot's mean
    rows = grad_out.gather(1, assign.unsqueeze(-1).expand(-1, -1, grad_out.shape[-1]))
    return rows * share.unsqueeze(-1).to(rows.dtype), None, None, None, None, None, None, None


merge_slots.register_autograd(_merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------------------------------------- the step
# ``choose(metric, size, ids, sel, protected) -> (kept, members, lo, hi, assign, weight)``, options bound.
def choose_tome(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, *, a0: int) -> Tuple:
    return (*torch.ops.mmmerge.bipartite_plan(metric, ids, sel, protected, a0), size)


def choose_pitome(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, *, margin: float,
                  alpha: float, shift: bool) -> Tuple:
    return (*torch.ops.mmmerge.pitome_plan(metric, ids, sel, protected, margin, alpha, shift), size)


def choose_tps(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, *, sub: float,
               temperature: float, after: float, score: Optional[Tensor] = None) -> Tuple:
    return torch.ops.mmmerge.tps_plan(metric, size, ids, sel, protected, sub, temperature, after, score)


def fused_step(x: Tensor, state: TokenState, metric: Tensor, choose: Callable[..., Tuple], ids: Tensor,
               sel: Tensor) -> Tuple[Tensor, TokenState]:
    """One fused step on tokens ``[B, N, C]``: ``([B, K, C], state)``. ``choose``: from ``fused_choice``."""
    return _apply(x, state, choose(metric, state.size, ids, sel, state.protected))


def _apply(x: Tensor, state: TokenState, plan: Tuple) -> Tuple[Tensor, TokenState]:
    """Merge ``x`` and its state by a fused plan ``(kept, members, lo, hi, assign, weight)``."""
    kept, members, lo, hi, assign, weight = plan
    x, size = torch.ops.mmmerge.merge_slots(x, state.size, weight, kept, members, lo, hi, assign)
    source = None if state.source is None else assign.gather(1, state.source)
    valid = None if state.valid is None else state.valid.gather(1, kept)  # a slot is its survivor's tier
    return x, TokenState(size=size, source=source, rules=state.rules, protected=state.protected, valid=valid)


def fused_reduce(x: Tensor, metric: Optional[Tensor], state: TokenState, steps: Sequence[int],
                 choose: Callable[..., Tuple], method: str, rows: Optional[RowBudgets] = None
                 ) -> Tuple[Tensor, TokenState]:
    """``mmmerge.reduce_tokens`` in fused steps: rounds removing ``steps`` tokens each; ``metric`` (if given, else
    ``x`` itself) is merged along with ``x``. Without groups, or over rows with budgets of their own (``rows``:
    each round's static per-row tables, ``RowBudgets.tables``). Returns ``(tokens, state)``."""
    P = state.protected
    if rows is not None:  # the tiers are static (RowBudgets.tables): no per-round gather of the padding mask
        state = state.replace(valid=None)
    else:  # one group, the first entries: every round's tables are views of these two (no launch per round)
        per = PICKS_PER_REMOVED[method]
        picks = per * max(steps, default=0)
        zeros = torch.zeros(x.shape[1] - P, dtype=torch.int32, device=x.device)
        first = torch.arange(picks, dtype=torch.int32, device=x.device)
    for k, r in enumerate(steps):
        if rows is None:
            ids, sel = zeros[: x.shape[1] - P], first[: per * r]
        else:
            ids, sel = rows.tables[k]
        scored = x if metric is None else metric
        plan = choose(scored.detach() if scored.requires_grad else scored, state.size, ids, sel, P)  # no gradient
        if metric is not None and k + 1 < len(steps):  # the last round's merged metric would go unread
            metric = torch.ops.mmmerge.merge_slots(metric, state.size, plan[5], *plan[:5])[0]
        x, state = _apply(x, state, plan)
    return x, state if rows is None else state.replace(valid=rows.valid_out)


def row_tables(method: str, real: Sequence[int], quota: Sequence[int], width: int, r: int
               ) -> Tuple[Tensor, ...]:
    """The per-row tables of one fused round over rows with budgets of their own (``mmmerge.rows``; host
    arithmetic, CPU tensors). Row b holds ``real[b]`` real tokens, then padding, ``width`` in all, and removes
    ``quota[b]`` real tokens and ``r - quota[b]`` padding ones. ``ids`` ``[B, width]`` int32 is each token's tier
    (0 real, 1 padding: the two never merge); ``sel`` ``[B, S]`` int32 the row's positions in its (tier, score)
    order: the best of its real tier, then the best of its padding. Ranked are ToMe's A tokens (even positions:
    rows have no protected tokens), PiToMe's candidates (two per removed token) or TPS's removed tokens.
    ``dominant``: ``(counts,)``, ``[B, 2]`` int32 (real tokens, real tokens kept) per row
    (``mmmerge.fused_selection``; its contextual count follows from the kept one and the option)."""
    if method == "dominant":
        return (torch.tensor([[n, n - q] for n, q in zip(real, quota)], dtype=torch.int32),)
    real_count = torch.tensor(real).unsqueeze(1)  # [B, 1]
    ids = (torch.arange(width).unsqueeze(0) >= real_count).to(torch.int32)
    ranked = (real_count + 1) // 2 if method == "tome" else real_count  # [B, 1] real entries of the first tier
    per = PICKS_PER_REMOVED[method]
    q = per * torch.tensor(quota).unsqueeze(1)
    picks = torch.arange(per * r).unsqueeze(0)
    return ids, (picks + (picks >= q) * (ranked - q)).to(torch.int32)


def fused_choice(method: str, options: Mapping[str, Any], protected: int, tokens: int, groups: int,
                 global_rule: bool, padded: bool, carried: bool, layer_idx: int, num_layers: int
                 ) -> Optional[Callable[..., PlanTensors]]:
    """The fused plan op of one layer (``tokens`` entering it, ``groups`` static groups) with its options bound
    (picklable), or None where the engine path is taken: another method, a coordinate rule, padding or carried
    spans, a layer over ``MAX_TOKENS``, or ``MMMERGE_FUSED=0``. Decided at patch time; the static tables (``ids``,
    ``sel``) come from ``fused_tables``."""
    fits = global_rule and not padded and not carried and tokens <= MAX_TOKENS and groups <= MAX_GROUPS
    if not (fused_enabled() and fits):
        return None
    if method == "tome":
        return functools.partial(choose_tome, a0=a_first(options.get("parity", "mergeable"), protected))
    if method == "pitome":
        preset = PITOME_PRESETS[options.get("preset", "paper")]
        margin = options.get("margin")
        if margin is None:
            margin = pitome_margin(layer_idx, num_layers, float(preset["margin_start"]), float(preset["margin_drop"]))
        return functools.partial(choose_pitome, margin=float(margin), alpha=float(options.get("alpha", 1.0)),
                                 shift=bool(preset["shift"]))
    if method == "tps":  # logit (cos - 1) / T (paper) or cos / T - 1 (official; the same at T = 1)
        temperature = float(options.get("temperature", 1.0))
        paper = TPS_PRESETS[options.get("preset", "paper")]["host_temperature"] or temperature == 1.0
        return functools.partial(choose_tps, sub=1.0 if paper else 0.0, temperature=temperature,
                                 after=0.0 if paper else 1.0)
    return None


def fused_tables(method: str, mergeable: int, r: int, tables: GroupTables) -> Dict[str, Tensor]:
    """The static tables of a fused step: every mergeable token's group (int32; all 0 without groups) and the
    positions ``sel`` of what it takes in the (group, score) order: r edges (ToMe), 2r candidates (PiToMe), r
    removed tokens (TPS). ``tables``: the partition's (``mmmerge.methods.group_tables``), or empty without
    groups."""
    if tables.ids is not None:
        positions = {"tome": tables.sel_a, "pitome": tables.sel_pairs, "tps": tables.sel}[method]
        return {"fused_ids": tables.ids.to(torch.int32), "fused_sel": positions.to(torch.int32)}
    taken = PICKS_PER_REMOVED[method] * r
    return {"fused_ids": torch.zeros(mergeable, dtype=torch.int32), "fused_sel": torch.arange(taken, dtype=torch.int32)}
