"""Triton kernels of the fused ``dominant`` step (``mmmerge.fused_selection``): VisionZip-style selection in three
launches.

    dominant_select   one program per batch row: the row's real tokens sorted by (importance descending, index); the
                      first D_b are dominant; the other real tokens, ranked in position order, give the C_b
                      contextual targets (ranks 0, step, ..., (C_b - 1) step), listed compactly in position order
    nearest_target    cosine tiles of tokens x targets, never written: each token's most similar target
    dominant_plan     one program per batch row: every token's host (itself where it stays, the row's first padding
                      token for padding that goes, its nearest target otherwise), the removed tokens compacted in
                      position order, then ``_slots`` (``mmmerge.triton_kernels``)

Every choice matches ``mmmerge.fused_selection.dominant_reference``: importance ties keep the lower index,
similarity ties the first target in position order. Imported only where a CUDA tensor meets an installed Triton
(or under ``TRITON_INTERPRET=1``, which runs these kernels on the CPU in the tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .selection import default_contextual
from .triton_kernels import _plan_outputs, _pow2, _running_best, _slots, _sort_key, _unit_rows, _unit_stride

# A token's fate (``flags``), written by dominant_select: it stays (dominant, target or staying padding), joins its
# nearest target, or joins its row's first padding token.
STAYS, JOINS_TARGET, JOINS_PADDING = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _counts(counts_ptr, b, M, r, ROWS: tl.constexpr):
    """Row b's (real tokens, kept real tokens): per row from ``counts`` ``[B, 2]``, or all M real and ``M - r``
    kept."""
    if ROWS:
        real = tl.load(counts_ptr + 2 * b)
        keep = tl.load(counts_ptr + 2 * b + 1)
    else:
        real = M
        keep = M - r
    return real, keep


@triton.jit
def _contextual(keep, CONTEXTUAL: tl.constexpr):
    """A row's contextual targets: ``min(keep, CONTEXTUAL)``, or without one (0) VisionZip's
    ``max(1, round(10 keep / 64))`` with Python's round (half to even; ``10 keep / 64`` is exact)."""
    if CONTEXTUAL > 0:
        context = tl.minimum(keep, CONTEXTUAL)
    else:
        q = (10 * keep) // 64
        rem = 10 * keep - 64 * q
        context = tl.maximum(q + ((rem > 32) | ((rem == 32) & (q % 2 == 1))).to(tl.int32), 1)
    return context


@triton.jit
def _dominant_select_kernel(score_ptr, counts_ptr, flags_ptr, targets_ptr, work_ptr, score_stride_b, work_stride_b,
                            M, P, r, width, ROWS: tl.constexpr, CONTEXTUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_W: tl.constexpr):
    """One program per batch row. ``flags`` ``[B, M]`` int32: each mergeable token's fate (``STAYS``: dominant,
    target or staying padding; ``JOINS_TARGET``; ``JOINS_PADDING``). ``targets`` ``[B, width]`` int32: the row's
    C_b targets in position order, then -1. ``work``: this row's ``BLOCK_M`` int32 scratch."""
    b = tl.program_id(0)
    real, keep = _counts(counts_ptr, b, M, r, ROWS)
    context = _contextual(keep, CONTEXTUAL)
    dominant = keep - context
    i = tl.arange(0, BLOCK_M)
    in_m = i < M
    s = tl.load(score_ptr + b * score_stride_b + P + i, mask=in_m, other=0.0).to(tl.float32)
    # the engine's nan_to_num(nan=0, posinf=1e30, neginf=-1e30); -0.0 equals 0.0 there, so it sorts as 0.0 here
    s = tl.where((s != s) | (s == 0.0), 0.0, s)
    s = tl.where(s == float("inf"), 1e30, tl.where(s == float("-inf"), -1e30, s))
    is_real = i < real
    key = tl.where(in_m, _sort_key(s, tl.where(is_real, 0, 1), i), 0x7FFFFFFFFFFFFFFF)  # padding last
    order = (tl.sort(key) & 0xFFFF).to(tl.int32)  # the token at each place of (importance descending, index)
    work = work_ptr + b * work_stride_b
    tl.store(work + order, i, mask=in_m)
    tl.debug_barrier()
    rank = tl.load(work + i, mask=in_m, other=BLOCK_M)
    other = is_real & (rank >= dominant)  # real, not dominant: in position order, every step-th is a target
    seen = tl.cumsum(other.to(tl.int32), axis=0) - 1
    step = (real - dominant) // context  # >= 1: the row removes its quota from these, and keeps context of them
    target = other & (seen % step == 0) & (seen < step * context)
    pad_stays = (i >= real) & (i < real + M - r - keep)  # the row's first M - r - keep padding tokens
    fate = tl.where(other & ~target, JOINS_TARGET, tl.where(is_real | pad_stays, STAYS, JOINS_PADDING))
    tl.store(flags_ptr + b * M + i, fate.to(tl.int32), mask=in_m)
    tl.store(targets_ptr + b * width + seen // step, i, mask=in_m & target)
    w = tl.arange(0, BLOCK_W)
    tl.store(targets_ptr + b * width + w, tl.full([BLOCK_W], -1, tl.int32), mask=(w >= context) & (w < width))


@triton.jit
def _nearest_target_kernel(metric_ptr, targets_ptr, best_ptr, stride_b, stride_n, M, P, width, D: tl.constexpr,
                           BLOCK_A: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (token blocks, batch): ``best`` ``[B, M]`` int32, each mergeable token's most similar target (its
    position; ties: the first target in position order)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = rows < M
    base = metric_ptr + b * stride_b
    a = _unit_rows(base, P + rows, in_a, stride_n, D, BLOCK_D)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_j = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, width, BLOCK_W):
        j = start + tl.arange(0, BLOCK_W)
        target = tl.load(targets_ptr + b * width + j, mask=j < width, other=-1)
        listed = target >= 0
        t = _unit_rows(base, P + target, listed, stride_n, D, BLOCK_D)
        cos = tl.dot(a, tl.trans(t), input_precision="ieee")  # [BLOCK_A, BLOCK_W]
        cos = tl.where(listed[None, :], cos, float("-inf"))
        best, best_j = _running_best(cos, start, best, best_j)
    tl.store(best_ptr + b * M + rows, tl.load(targets_ptr + b * width + best_j, mask=in_a, other=0), mask=in_a)


@triton.jit
def _dominant_plan_kernel(flags_ptr, best_ptr, counts_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr, work_ptr,
                          work_stride_b, N, M, P, r, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per batch row: every removed token with its host, compacted in position order, then the slots.
    ``work``: this row's ``2 * BLOCK_N + 2 * BLOCK_R`` int32 scratch (``_slots``'s, then the compact lists)."""
    b = tl.program_id(0)
    real, keep = _counts(counts_ptr, b, M, r, ROWS)
    i = tl.arange(0, BLOCK_M)
    in_m = i < M
    fate = tl.load(flags_ptr + b * M + i, mask=in_m, other=STAYS)
    host = tl.where(fate == JOINS_PADDING, real, tl.load(best_ptr + b * M + i, mask=in_m, other=0))
    removed = in_m & (fate != STAYS)
    place = tl.cumsum(removed.to(tl.int32), axis=0) - 1
    work = work_ptr + b * work_stride_b
    lists = work + 2 * BLOCK_N
    tl.store(lists + place, i, mask=removed & (place < r))  # exactly r by the counts; never past the row's lists
    tl.store(lists + BLOCK_R + place, host, mask=removed & (place < r))
    tl.debug_barrier()
    e = tl.arange(0, BLOCK_R)
    in_r = e < r
    src = tl.load(lists + e, mask=in_r, other=0)
    dst = tl.load(lists + BLOCK_R + e, mask=in_r, other=0)
    _slots(P + src, P + dst, in_r, e, b, work, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr, N, r, BLOCK_N)


def target_width(kept: int, contextual: int) -> int:
    """The most contextual targets a row has (static): ``min(contextual, kept)``, or VisionZip's default count for
    ``kept`` (0: no ``contextual`` given); ``kept = M - r`` bounds every row's kept real tokens."""
    return min(contextual, kept) if contextual else default_contextual(kept)


def dominant_plan(metric: Tensor, score: Tensor, protected: int, r: int, contextual: int,
                  counts: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """Kernel launches of ``torch.ops.mmmerge.dominant_plan`` (same contract)."""
    metric, score = _unit_stride(metric), _unit_stride(score)
    B, N, D = metric.shape
    M = N - protected
    width = target_width(M - r, contextual)
    device = metric.device
    rows = counts is not None
    block_n, block_m, block_r = _pow2(N), _pow2(M), _pow2(r)
    work = torch.empty(B, max(block_m, 2 * block_n + 2 * block_r), device=device, dtype=torch.int32)
    flags = torch.empty(B, M, device=device, dtype=torch.int32)
    counts = counts.contiguous() if rows else flags  # unread without per-row counts
    targets = torch.empty(B, width, device=device, dtype=torch.int32)
    _dominant_select_kernel[(B,)](score, counts, flags, targets, work, score.stride(0), work.stride(0), M, protected, r,
                                  width, ROWS=rows, CONTEXTUAL=int(contextual), BLOCK_M=block_m,
                                  BLOCK_W=_pow2(width), num_warps=8)
    best = torch.empty(B, M, device=device, dtype=torch.int32)
    _nearest_target_kernel[(triton.cdiv(M, 32), B)](metric, targets, best, metric.stride(0), metric.stride(1), M,
                                                    protected, width, D=D, BLOCK_A=32, BLOCK_W=min(_pow2(width), 64),
                                                    BLOCK_D=_pow2(D))
    kept, members, lo, hi, assign = _plan_outputs(B, N, r, device)
    _dominant_plan_kernel[(B,)](flags, best, counts, kept, members, lo, hi, assign, work, work.stride(0), N, M,
                                protected, r, ROWS=rows, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_R=block_r,
                                num_warps=8)
    return kept, members, lo, hi, assign
