"""The fused ToMe step: choose and merge as two custom ops (``torch.ops.mmmerge``), for the GPU's host.

A merging layer of the engine path dispatches some 40 small ops (normalise, score, max, top-r, ranks, gathers,
the weighted mean); at small batch on a GPU each costs microseconds of launch, more than its kernel. Here the
same ToMe step is two ops:

    kept, members, lo, hi, assign = bipartite_plan(metric, ids, sel, protected, a0)   (choose)
    x, size = merge_slots(x, size, kept, members, lo, hi, assign)                      (merge)

Each op has a PyTorch reference (CPU, and any device without Triton), fused Triton kernels on CUDA
(``mmmerge.triton_kernels``) and a fake implementation (``torch.compile`` and the simulated-CUDA tier trace through
it). ``merge_slots`` is differentiable in ``x``.

The plan, over ``N`` tokens of which the first ``protected`` never merge and the ``M`` others alternate into A
(mergeable position ``a0``, ``a0 + 2``, ...) and B: each A token's most similar B token of its own group
(``ids``: ``[M]`` int32 group of every mergeable token, all 0 without groups) is its partner; A tokens sorted by
(group, best similarity descending, index) give the ``r`` removed ones at the static positions ``sel`` (``[r]``:
each group's first ``budget`` entries). Outputs: ``kept`` ``[B, K]`` the survivor of each slot (ascending),
``members`` ``[B, r]`` the removed tokens sorted by slot, slot ``k`` receiving ``members[lo[k]:hi[k]]``
(``lo``/``hi`` ``[B, K]`` int32), ``assign`` ``[B, N]`` the slot of every token. ``K = N - r``.

Where it applies (``fused_step_fits``): ToMe without a coordinate rule (global, or static groups such as
``within_frame``), without padding; everything else takes the engine path (``mmmerge.matchers`` +
``mmmerge.merge``), which this path equals up to ties and float rounding of the weighted mean.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .merge import MergePlan, _fuse, plan_from_pairs
from .state import TokenState

PlanTensors = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
FUSED_ENV = "MMMERGE_FUSED"  # "0": every layer takes the engine path (for side-by-side measurements)


def fused_enabled() -> bool:
    """Whether patches made now use the fused step where it applies (read at patch time, never per call)."""
    value = os.environ.get(FUSED_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{FUSED_ENV} must be '0' (engine path everywhere) or '1' (fused ToMe step where it "
                         f"applies, the default), got {value!r}")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _triton() -> Optional[object]:
    """The Triton kernels module, or None where Triton is not installed."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _use_kernels(t: Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                                       and os.environ.get("MMMERGE_TRITON_ON_CPU") == "1")


# ------------------------------------------------------------------------------------------------ choose
@torch.library.custom_op("mmmerge::bipartite_plan", mutates_args=())
def bipartite_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    """The ToMe plan (see the module docstring). ``metric``: ``[B, N, d]`` (float32 head-averaged keys)."""
    kernels = _triton() if _use_kernels(metric) else None
    if kernels is not None:
        return kernels.bipartite_plan(metric, ids, sel, protected, a0)
    return plan_reference(metric, ids, sel, protected, a0)


def plan_reference(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    """``bipartite_plan`` in PyTorch ops (the CPU implementation, and the kernels' reference)."""
    B, N, _ = metric.shape
    P, r = protected, sel.shape[0]
    M = N - P
    with torch.no_grad():
        m = metric[:, P:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        ids_a, ids_b = ids[a0::2], ids[1 - a0::2]
        cos = torch.bmm(m[:, a0::2], m[:, 1 - a0::2].transpose(1, 2))  # [B, Na, Nb]
        cos = cos.masked_fill(ids_a.unsqueeze(1) != ids_b.unsqueeze(0), float("-inf"))
        best, partner = cos.max(dim=-1)  # [B, Na]
        order = best.argsort(dim=1, descending=True, stable=True)  # ties: lower index first
        order = order.gather(1, ids_a[order].argsort(dim=1, stable=True))  # then by group (stable)
        src = order.index_select(1, sel.long())  # [B, r] A tokens that merge
        dst = partner.gather(1, src)
        plan = plan_from_pairs(src * 2 + a0, dst * 2 + (1 - a0), metric.new_ones(B, N), M, P)
        slot = plan.assign.gather(1, plan.merged)  # [B, r]
        order = (slot * N + plan.merged).argsort(dim=1)
        members, slot = plan.merged.gather(1, order), slot.gather(1, order)
        slots = torch.arange(N - r, device=metric.device).expand(B, -1).contiguous()
        lo = torch.searchsorted(slot, slots, out_int32=True)
        hi = torch.searchsorted(slot, slots, right=True, out_int32=True)
        received = hi > lo  # a slot without members has lo = hi = 0, as the kernel writes it
        lo, hi = lo * received, hi * received
    return plan.kept, members, lo, hi, plan.assign


@bipartite_plan.register_fake
def _(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> PlanTensors:
    B, N, _ = metric.shape
    K = N - sel.shape[0]
    index = dict(device=metric.device, dtype=torch.long)
    return (metric.new_empty(B, K, **index), metric.new_empty(B, sel.shape[0], **index),
            metric.new_empty(B, K, device=metric.device, dtype=torch.int32),
            metric.new_empty(B, K, device=metric.device, dtype=torch.int32), metric.new_empty(B, N, **index))


# ------------------------------------------------------------------------------------------------- merge
@torch.library.custom_op("mmmerge::merge_slots", mutates_args=())
def merge_slots(x: Tensor, size: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor,
                assign: Tensor) -> Tuple[Tensor, Tensor]:
    """``([B, K, C], [B, K])``: every slot's size-weighted mean (a lone survivor exactly its row) and total size.
    ``assign`` is read by the backward only."""
    kernels = _triton() if _use_kernels(x) else None
    if kernels is not None:
        return kernels.merge_slots(x, size, kept, members, lo, hi)
    return merge_reference(x, size, kept, members, assign)


def merge_reference(x: Tensor, size: Tensor, kept: Tensor, members: Tensor, assign: Tensor) -> Tuple[Tensor, Tensor]:
    """``merge_slots`` through the engine's merge (``mmmerge.merge._fuse``)."""
    K = kept.shape[1]
    new_size = size.new_zeros(size.shape[0], K).scatter_add_(1, assign, size)
    plan = MergePlan(assign=assign, weight=size, num_out=K, kept=kept, merged=members)
    return _fuse(x, plan, new_size), new_size


@merge_slots.register_fake
def _(x: Tensor, size: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor,
      assign: Tensor) -> Tuple[Tensor, Tensor]:
    B, K = kept.shape
    return x.new_empty(B, K, x.shape[-1]), size.new_empty(B, K)


def _merge_setup(ctx, inputs, output) -> None:
    x, size, _, _, _, _, assign = inputs
    ctx.save_for_backward(size, assign, output[1])


def _merge_backward(ctx, grad_out: Tensor, grad_size: Optional[Tensor]):
    size, assign, new_size = ctx.saved_tensors
    share = size / new_size.gather(1, assign)  # [B, N]: each token's weight in its slot's mean
    rows = grad_out.gather(1, assign.unsqueeze(-1).expand(-1, -1, grad_out.shape[-1]))
    return (rows * share.unsqueeze(-1).to(rows.dtype)), None, None, None, None, None, None


merge_slots.register_autograd(_merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------------------------------------- the step
def fused_tome_step(x: Tensor, state: TokenState, metric: Tensor, ids: Tensor, sel: Tensor, a0: int
                    ) -> Tuple[Tensor, TokenState]:
    """One ToMe step on tokens ``[B, N, C]``: ``([B, N - r, C], state)``, ``r = len(sel)``."""
    kept, members, lo, hi, assign = torch.ops.mmmerge.bipartite_plan(metric, ids, sel, state.protected, a0)
    x, size = torch.ops.mmmerge.merge_slots(x, state.size, kept, members, lo, hi, assign)
    source = None if state.source is None else assign.gather(1, state.source)
    return x, TokenState(size=size, source=source, rules=state.rules, protected=state.protected)


def fused_step_fits(method: str, global_rule: bool, padded: bool, carried: bool) -> bool:
    """Whether a layer takes the fused step: ToMe, no coordinate rule, no padding, no carried spans."""
    return method == "tome" and global_rule and not padded and not carried and fused_enabled()
