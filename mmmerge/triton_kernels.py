"""Triton kernels of the fused steps (``mmmerge.fused``): ToMe in three launches per merging layer, PiToMe and TPS
in five.

    ToMe    best_partner       cosine tiles of A x B tokens, never written: each A token's best allowed B token
            tome_plan          one program per batch row: the best edges (per group), then ``_slots``
    PiToMe  energy             cosine tiles of all pairs, never written: each token's energy
            select             one program per batch row: the 2r highest-energy candidates (per group)
            candidate_partner  each A candidate's most similar B candidate
            pairs_plan         one program per batch row: ``_slots``
    TPS     energy, select     the r highest-energy (or lowest-score) tokens are removed (per group)
            host               each removed token's most similar kept token
            pairs_plan         ``_slots``, and the fusion weights (size x exp of the scaled similarity)
    all     merge_slots        one program per (slot, batch row): the weighted mean of the slot's tokens

``_slots`` turns removed tokens and their hosts into the plan: the slot of every token, the survivor of every slot
and, per slot, the removed tokens it receives (``members[lo:hi]``).

Imported only where a CUDA tensor meets an installed Triton (or under ``TRITON_INTERPRET=1``, which runs these
kernels on the CPU in the tests). Every choice matches the PyTorch reference in ``mmmerge.fused``: ties go to
the lower index, and groups pick their best entries at the static positions ``sel``. Tables shared by the batch
(``ids`` ``[M]``, ``sel`` ``[S]``) reach the kernels with a batch stride of 0, per-row ones (``[B, M]``, ``[B, S]``:
real and padding tiers) with their own; with per-row ids an energy averages over the row's real tokens (tier 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor



@triton.jit
def _unit_rows(base, positions, valid, stride_n, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``positions`` of one clip's metric as unit float32 vectors ``[len(positions), BLOCK_D]`` (zero rows stay
    zero, as ``v / max(|v|, 1e-6)`` in the references)."""
    d = tl.arange(0, BLOCK_D)
    v = tl.load(base + positions[:, None] * stride_n + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                other=0.0).to(tl.float32)
    return v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), 1e-6)[:, None]


@triton.jit
def _running_best(cos, start, best, best_idx):
    """Fold a tile of similarities ``[A, B]`` (columns ``start ..``) into the running best per row; ties keep the
    lower column."""
    block_best = tl.max(cos, axis=1)
    block_idx = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + start
    better = block_best > best  # strict: an equal later column never replaces an earlier one
    return tl.where(better, block_best, best), tl.where(better, block_idx, best_idx)


@triton.jit
def _best_partner_kernel(metric_ptr, ids_ptr, best_ptr, best_idx_ptr, stride_b, stride_n, ids_stride_b, Na, Nb, P, a0,
                         D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (A blocks, batch). A token i is mergeable token ``a0 + 2i``, B token j is ``1 - a0 + 2j``."""
    pid_a = tl.program_id(0)
    b = tl.program_id(1)
    rows_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = rows_a < Na
    base = metric_ptr + b * stride_b
    a = _unit_rows(base, P + a0 + 2 * rows_a, in_a, stride_n, D, BLOCK_D)
    ids_ptr += b * ids_stride_b  # a row's own groups (per-row tiers), or the shared ones (stride 0)
    group_a = tl.load(ids_ptr + a0 + 2 * rows_a, mask=in_a, other=-1)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, Nb, BLOCK_B):
        rows_b = start + tl.arange(0, BLOCK_B)
        in_b = rows_b < Nb
        m = _unit_rows(base, P + 1 - a0 + 2 * rows_b, in_b, stride_n, D, BLOCK_D)
        group_b = tl.load(ids_ptr + 1 - a0 + 2 * rows_b, mask=in_b, other=-2)
        cos = tl.dot(a, tl.trans(m), input_precision="ieee")  # [BLOCK_A, BLOCK_B]
        cos = tl.where((group_a[:, None] == group_b[None, :]) & in_b[None, :], cos, float("-inf"))
        best, best_idx = _running_best(cos, start, best, best_idx)
    tl.store(best_ptr + b * Na + rows_a, best, mask=in_a)
    tl.store(best_idx_ptr + b * Na + rows_a, best_idx, mask=in_a)


@triton.jit
def _sort_key(score, group, index):
    """int64 keys that sort by (group, score descending, index); NaN scores first, as ``argsort`` puts them."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    ordered = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # unsigned, in float order
    return (group.to(tl.int64) << 48) | ((0xFFFFFFFF - ordered) << 16) | index.to(tl.int64)


@triton.jit
def _slots(src, dst, in_r, e, b, work, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr, N, r,
           BLOCK_N: tl.constexpr):
    """From the removed tokens ``src`` and their hosts ``dst`` (``[BLOCK_R]`` token positions, valid where
    ``in_r``): each token's slot, each slot's survivor and, sorted by slot, the removed tokens each slot receives.
    ``work``: this row's ``2 * BLOCK_N`` int32 scratch."""
    K = N - r
    n = tl.arange(0, BLOCK_N)
    in_n = n < N
    tl.store(work + n, tl.zeros([BLOCK_N], tl.int32), mask=in_n)
    tl.debug_barrier()
    tl.store(work + src, (tl.zeros_like(src) + 1).to(tl.int32), mask=in_r)
    tl.debug_barrier()
    # Survivors keep their order: each survivor's slot is its rank among them.
    survives = 1 - tl.load(work + n, mask=in_n, other=1)
    rank = tl.cumsum(survives, axis=0) - 1
    tl.debug_barrier()
    tl.store(work + n, rank, mask=in_n)
    tl.store(kept_ptr + b * K + rank, n.to(tl.int64), mask=in_n & (survives == 1))
    tl.store(lo_ptr + b * K + n, tl.zeros([BLOCK_N], tl.int32), mask=n < K)
    tl.store(hi_ptr + b * K + n, tl.zeros([BLOCK_N], tl.int32), mask=n < K)
    tl.debug_barrier()
    slot = tl.load(work + dst, mask=in_r, other=0)  # a removed token joins its host's slot
    tl.store(assign_ptr + b * N + n, rank.to(tl.int64), mask=in_n & (survives == 1))
    tl.store(assign_ptr + b * N + src, slot.to(tl.int64), mask=in_r)
    # Members of each slot: removed tokens sorted by (slot, position); slot k holds members[lo[k]:hi[k]].
    order = tl.sort(tl.where(in_r, (slot.to(tl.int64) << 32) | src.to(tl.int64), 0x7FFFFFFFFFFFFFFF))
    member_slot = (order >> 32).to(tl.int32)
    tl.store(members_ptr + b * r + e, order & 0xFFFFFFFF, mask=in_r)
    tl.store(work + BLOCK_N + e, member_slot, mask=in_r)
    tl.debug_barrier()
    before = tl.load(work + BLOCK_N + e - 1, mask=in_r & (e > 0), other=-1)
    after = tl.load(work + BLOCK_N + e + 1, mask=in_r & (e < r - 1), other=-1)
    tl.store(lo_ptr + b * K + member_slot, e, mask=in_r & (member_slot != before))
    tl.store(hi_ptr + b * K + member_slot, e + 1, mask=in_r & (member_slot != after))


@triton.jit
def _tome_plan_kernel(best_ptr, best_idx_ptr, ids_ptr, sel_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr,
                      work_ptr, ids_stride_b, sel_stride_b, N, P, a0, Na, r, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """One program per batch row: the best edges (A tokens by (group, score), the static positions ``sel``),
    then the slots. ``work``: ``[B, 3 * BLOCK_N]`` int32 scratch."""
    b = tl.program_id(0)
    work = work_ptr + b * 3 * BLOCK_N
    i = tl.arange(0, BLOCK_A)
    in_a = i < Na
    score = tl.load(best_ptr + b * Na + i, mask=in_a, other=0.0)
    group = tl.load(ids_ptr + b * ids_stride_b + a0 + 2 * i, mask=in_a, other=0)
    key = tl.where(in_a, _sort_key(score, group, i), 0x7FFFFFFFFFFFFFFF)
    tl.store(work + 2 * BLOCK_N + i, (tl.sort(key) & 0xFFFF).to(tl.int32), mask=in_a)
    tl.debug_barrier()
    e = tl.arange(0, BLOCK_R)
    in_r = e < r
    src_a = tl.load(work + 2 * BLOCK_N + tl.load(sel_ptr + b * sel_stride_b + e, mask=in_r, other=0), mask=in_r,
                    other=0)
    dst_b = tl.load(best_idx_ptr + b * Na + src_a, mask=in_r, other=0)
    _slots(P + a0 + 2 * src_a, P + 1 - a0 + 2 * dst_b, in_r, e, b, work, kept_ptr, members_ptr, lo_ptr, hi_ptr,
           assign_ptr, N, r, BLOCK_N)


@triton.jit
def _energy_kernel(metric_ptr, ids_ptr, energy_ptr, stride_b, stride_n, ids_stride_b, M, P, margin, alpha,
                   SHIFT: tl.constexpr, VALID: tl.constexpr, D: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (row blocks, batch): PiToMe's energy of every mergeable token, the mean over all j of
    ``elu(cos(i, j) - margin, alpha)`` (plus ``margin`` where ``cos >= margin`` unless ``SHIFT``); the
    ``M x M`` cosines live in tiles only. ``VALID``: the mean runs over the row's real j only (``ids == 0``, per
    row), divided by their count (at least 1), as the engine's ``energy_score(valid=)``."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = rows < M
    base = metric_ptr + b * stride_b
    a = _unit_rows(base, P + rows, in_i, stride_n, D, BLOCK_D)
    total = tl.zeros([BLOCK_I], tl.float32)
    above = tl.zeros([BLOCK_I], tl.float32)
    count = tl.zeros([BLOCK_J], tl.float32)  # real j seen, per column lane (summed once at the end)
    for start in range(0, M, BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        in_j = cols < M
        if VALID:  # padding j is left out of the mean
            in_j = in_j & (tl.load(ids_ptr + b * ids_stride_b + cols, mask=in_j, other=1) == 0)
        count += tl.where(in_j, 1.0, 0.0)
        m = _unit_rows(base, P + cols, in_j, stride_n, D, BLOCK_D)
        f = tl.dot(a, tl.trans(m), input_precision="ieee") - margin  # [BLOCK_I, BLOCK_J]
        f = tl.where(f > 0, f, alpha * (tl.exp(tl.minimum(f, 0.0)) - 1.0))
        total += tl.sum(tl.where(in_j[None, :], f, 0.0), axis=1)
        above += tl.sum(tl.where(in_j[None, :] & (f >= 0), 1.0, 0.0), axis=1)
    n = tl.maximum(tl.sum(count, axis=0), 1.0)  # M without VALID; a row without real tokens divides by 1
    energy = total / n
    if not SHIFT:  # each in the engine's order of rounding
        if VALID:
            energy += above * margin / n
        else:
            energy += above * (margin / n)
    tl.store(energy_ptr + b * M + rows, energy, mask=in_i)


@triton.jit
def _select_kernel(energy_ptr, ids_ptr, sel_ptr, picked_ptr, flags_ptr, work_ptr, ids_stride_b, sel_stride_b, M,
                   count, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FLAGS: tl.constexpr):
    """One program per batch row: ``count`` tokens by (group, energy descending, index) at the static positions
    ``sel`` (PiToMe's 2r candidates, consecutive per group; TPS's r removed tokens). ``FLAGS``: also mark the picked
    tokens in ``flags`` ``[B, M]`` int32. ``work``: ``[B, >= BLOCK_M]`` int32 scratch."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK_M)
    in_m = i < M
    energy = tl.load(energy_ptr + b * M + i, mask=in_m, other=0.0)
    group = tl.load(ids_ptr + b * ids_stride_b + i, mask=in_m, other=0)
    key = tl.where(in_m, _sort_key(energy, group, i), 0x7FFFFFFFFFFFFFFF)
    work = work_ptr + b * BLOCK_M
    tl.store(work + i, (tl.sort(key) & 0xFFFF).to(tl.int32), mask=in_m)
    if FLAGS:
        tl.store(flags_ptr + b * M + i, tl.zeros([BLOCK_M], tl.int32), mask=in_m)
    tl.debug_barrier()
    c = tl.arange(0, BLOCK_C)
    in_c = c < count
    picked = tl.load(work + tl.load(sel_ptr + b * sel_stride_b + c, mask=in_c, other=0), mask=in_c, other=0)
    tl.store(picked_ptr + b * count + c, picked, mask=in_c)
    if FLAGS:
        tl.store(flags_ptr + b * M + picked, tl.full([BLOCK_C], 1, tl.int32), mask=in_c)


@triton.jit
def _host_kernel(metric_ptr, removed_ptr, flags_ptr, ids_ptr, host_ptr, host_sim_ptr, stride_b, stride_n, ids_stride_b,
                 P, M, r, D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (removed blocks, batch): TPS's host of each removed token, its most similar kept token of its
    group (ties: the lower index), and that similarity."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = rows < r
    base = metric_ptr + b * stride_b
    src = tl.load(removed_ptr + b * r + rows, mask=in_a, other=0)
    a = _unit_rows(base, P + src, in_a, stride_n, D, BLOCK_D)
    ids_ptr += b * ids_stride_b  # a row's own tiers, or the shared groups (stride 0)
    group_a = tl.load(ids_ptr + src, mask=in_a, other=-1)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, M, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        in_b = cols < M
        m = _unit_rows(base, P + cols, in_b, stride_n, D, BLOCK_D)
        kept = tl.load(flags_ptr + b * M + cols, mask=in_b, other=1) == 0
        group_b = tl.load(ids_ptr + cols, mask=in_b, other=-2)
        cos = tl.dot(a, tl.trans(m), input_precision="ieee")
        cos = tl.where((group_a[:, None] == group_b[None, :]) & (kept & in_b)[None, :], cos, float("-inf"))
        best, best_idx = _running_best(cos, start, best, best_idx)
    tl.store(host_ptr + b * r + rows, best_idx, mask=in_a)
    tl.store(host_sim_ptr + b * r + rows, best, mask=in_a)


@triton.jit
def _candidate_partner_kernel(metric_ptr, cand_ptr, ids_ptr, dst_ptr, stride_b, stride_n, ids_stride_b, P, r,
                              D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Programs (A blocks, batch): A candidate ``cand[2i]`` merges into its most similar B candidate
    ``cand[2j + 1]`` of its own group (ties: the lower j)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = rows < r
    base = metric_ptr + b * stride_b
    src = tl.load(cand_ptr + b * 2 * r + 2 * rows, mask=in_a, other=0)
    a = _unit_rows(base, P + src, in_a, stride_n, D, BLOCK_D)
    ids_ptr += b * ids_stride_b  # a row's own tiers, or the shared groups (stride 0)
    group_a = tl.load(ids_ptr + src, mask=in_a, other=-1)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_j = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, r, BLOCK_B):
        cols = start + tl.arange(0, BLOCK_B)
        in_b = cols < r
        cand_b = tl.load(cand_ptr + b * 2 * r + 2 * cols + 1, mask=in_b, other=0)
        m = _unit_rows(base, P + cand_b, in_b, stride_n, D, BLOCK_D)
        group_b = tl.load(ids_ptr + cand_b, mask=in_b, other=-2)
        cos = tl.dot(a, tl.trans(m), input_precision="ieee")
        cos = tl.where((group_a[:, None] == group_b[None, :]) & in_b[None, :], cos, float("-inf"))
        best, best_j = _running_best(cos, start, best, best_j)
    tl.store(dst_ptr + b * r + rows, tl.load(cand_ptr + b * 2 * r + 2 * best_j + 1, mask=in_a, other=0), mask=in_a)


@triton.jit
def _pairs_plan_kernel(src_ptr, dst_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr, work_ptr, N, P, r,
                       sim_ptr, size_ptr, weight_ptr, sub, temperature, after, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, SRC_STRIDE: tl.constexpr, WEIGHTS: tl.constexpr):
    """One program per batch row: the slots of "mergeable token ``src[SRC_STRIDE * i]`` joins ``dst[i]``".
    ``WEIGHTS`` (TPS): ``weight`` is ``size`` with each removed token's scaled by
    ``exp((sim - sub) / temperature - after)`` (``sim``: its similarity to its host)."""
    b = tl.program_id(0)
    e = tl.arange(0, BLOCK_R)
    in_r = e < r
    src = P + tl.load(src_ptr + b * SRC_STRIDE * r + SRC_STRIDE * e, mask=in_r, other=0)
    dst = P + tl.load(dst_ptr + b * r + e, mask=in_r, other=0)
    _slots(src, dst, in_r, e, b, work_ptr + b * 2 * BLOCK_N, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr,
           N, r, BLOCK_N)
    if WEIGHTS:
        n = tl.arange(0, BLOCK_N)
        tl.store(weight_ptr + b * N + n, tl.load(size_ptr + b * N + n, mask=n < N, other=0.0), mask=n < N)
        tl.debug_barrier()
        sim = tl.load(sim_ptr + b * r + e, mask=in_r, other=0.0)
        scale = tl.exp((sim - sub) / temperature - after)
        tl.store(weight_ptr + b * N + src, tl.load(size_ptr + b * N + src, mask=in_r, other=0.0) * scale, mask=in_r)


@triton.jit
def _merge_slots_kernel(x_ptr, size_ptr, weight_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, out_ptr, new_size_ptr,
                        stride_xb, stride_xn, stride_ob, stride_on, N, K, r, C, BLOCK_C: tl.constexpr):
    """Programs (slots, batch): slot k is its survivor's row or, with members, the ``weight``-weighted mean of its
    tokens (float32 accumulation); its size is the sum of their sizes."""
    k = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    kept = tl.load(kept_ptr + b * K + k)
    lo = tl.load(lo_ptr + b * K + k)
    hi = tl.load(hi_ptr + b * K + k)
    row = tl.load(x_ptr + b * stride_xb + kept * stride_xn + c, mask=in_c, other=0.0)
    size = tl.load(size_ptr + b * N + kept)
    weight = tl.load(weight_ptr + b * N + kept)
    acc = row.to(tl.float32) * weight
    for p in range(lo, hi):
        t = tl.load(members_ptr + b * r + p)
        w = tl.load(weight_ptr + b * N + t)
        acc += tl.load(x_ptr + b * stride_xb + t * stride_xn + c, mask=in_c, other=0.0).to(tl.float32) * w
        weight += w
        size += tl.load(size_ptr + b * N + t)
    value = tl.where(hi > lo, (acc / weight).to(row.dtype), row)  # a lone survivor is copied exactly
    tl.store(out_ptr + b * stride_ob + k * stride_on + c, value, mask=in_c)
    tl.store(new_size_ptr + b * K + k, size)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _plan_outputs(B: int, N: int, r: int, device: torch.device) -> Tuple[Tensor, ...]:
    K = N - r
    index = dict(device=device, dtype=torch.long)
    return (torch.empty(B, K, **index), torch.empty(B, r, **index), torch.empty(B, K, device=device, dtype=torch.int32),
            torch.empty(B, K, device=device, dtype=torch.int32), torch.empty(B, N, **index))


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(ids: Tensor, sel: Tensor) -> Tuple[Tensor, Tensor, int, int]:
    """Contiguous ``ids`` and ``sel`` and their batch strides: 0 for tables the batch shares (``[M]``, ``[S]``)."""
    ids, sel = ids.contiguous(), sel.contiguous()
    return ids, sel, (ids.stride(0) if ids.dim() == 2 else 0), (sel.stride(0) if sel.dim() == 2 else 0)


def bipartite_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int) -> Tuple[Tensor, ...]:
    """Kernel launches of ``torch.ops.mmmerge.bipartite_plan`` (same contract)."""
    metric = _unit_stride(metric)
    B, N, D = metric.shape
    M = N - protected
    Na, Nb = (M - a0 + 1) // 2, (M + a0) // 2
    r = sel.shape[-1]
    ids, sel, ids_stride, sel_stride = _tables(ids, sel)
    device = metric.device
    best = torch.empty(B, Na, device=device, dtype=torch.float32)
    best_idx = torch.empty(B, Na, device=device, dtype=torch.int32)
    _best_partner_kernel[(triton.cdiv(Na, 32), B)](
        metric, ids, best, best_idx, metric.stride(0), metric.stride(1), ids_stride, Na, Nb, protected, a0,
        D=D, BLOCK_A=32, BLOCK_B=64, BLOCK_D=_pow2(D))
    kept, members, lo, hi, assign = _plan_outputs(B, N, r, device)
    block_n = _pow2(N)
    work = torch.empty(B, 3 * block_n, device=device, dtype=torch.int32)
    _tome_plan_kernel[(B,)](best, best_idx, ids, sel, kept, members, lo, hi, assign, work, ids_stride, sel_stride, N,
                            protected, a0, Na, r,
                            BLOCK_N=block_n, BLOCK_A=_pow2(Na), BLOCK_R=_pow2(r), num_warps=8)
    return kept, members, lo, hi, assign


def _energy(metric: Tensor, ids: Tensor, ids_stride: int, protected: int, margin: float, alpha: float,
            shift: bool) -> Tensor:
    """``[B, M]`` float32 energies; with per-row ``ids`` ``[B, M]`` the mean over each row's real tokens."""
    B, N, D = metric.shape
    M = N - protected
    energy = torch.empty(B, M, device=metric.device, dtype=torch.float32)
    _energy_kernel[(triton.cdiv(M, 32), B)](metric, ids, energy, metric.stride(0), metric.stride(1), ids_stride, M,
                                            protected, float(margin), float(alpha), SHIFT=bool(shift),
                                            VALID=ids.dim() == 2, D=D, BLOCK_I=32, BLOCK_J=64, BLOCK_D=_pow2(D))
    return energy


def pitome_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, margin: float, alpha: float,
                shift: bool) -> Tuple[Tensor, ...]:
    """Kernel launches of ``torch.ops.mmmerge.pitome_plan`` (same contract)."""
    metric = _unit_stride(metric)
    B, N, D = metric.shape
    M = N - protected
    r2 = sel.shape[-1]
    r = r2 // 2
    ids, sel, ids_stride, sel_stride = _tables(ids, sel)
    device = metric.device
    energy = _energy(metric, ids, ids_stride, protected, margin, alpha, shift)
    block_n, block_m = _pow2(N), _pow2(M)
    work = torch.empty(B, max(2 * block_n, block_m), device=device, dtype=torch.int32)
    cand = torch.empty(B, r2, device=device, dtype=torch.int32)
    _select_kernel[(B,)](energy, ids, sel, cand, cand, work, ids_stride, sel_stride, M, r2, BLOCK_M=block_m,
                         BLOCK_C=_pow2(r2), FLAGS=False, num_warps=8)
    dst = torch.empty(B, r, device=device, dtype=torch.int32)
    _candidate_partner_kernel[(triton.cdiv(r, 32), B)](metric, cand, ids, dst, metric.stride(0), metric.stride(1),
                                                       ids_stride, protected, r, D=D, BLOCK_A=32, BLOCK_B=64,
                                                       BLOCK_D=_pow2(D))
    kept, members, lo, hi, assign = _plan_outputs(B, N, r, device)
    _pairs_plan_kernel[(B,)](cand, dst, kept, members, lo, hi, assign, work, N, protected, r, energy, energy, energy,
                             0.0, 1.0, 0.0, BLOCK_N=block_n, BLOCK_R=_pow2(r), SRC_STRIDE=2, WEIGHTS=False,
                             num_warps=8)
    return kept, members, lo, hi, assign


def tps_plan(metric: Tensor, size: Tensor, ids: Tensor, sel: Tensor, protected: int, sub: float, temperature: float,
             after: float, score: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """Kernel launches of ``torch.ops.mmmerge.tps_plan`` (same contract)."""
    metric = _unit_stride(metric)
    size = size.contiguous()
    B, N, D = metric.shape
    M = N - protected
    r = sel.shape[-1]
    ids, sel, ids_stride, sel_stride = _tables(ids, sel)
    device = metric.device
    if score is None:  # the most redundant go first (per row: by the energy over its real tokens)
        energy = _energy(metric, ids, ids_stride, protected, 0.0, 1.0, False)
    else:  # the least important go first
        energy = score[:, protected:].float().neg().contiguous()
    block_n, block_m = _pow2(N), _pow2(M)
    work = torch.empty(B, max(2 * block_n, block_m), device=device, dtype=torch.int32)
    removed = torch.empty(B, r, device=device, dtype=torch.int32)
    flags = torch.empty(B, M, device=device, dtype=torch.int32)
    _select_kernel[(B,)](energy, ids, sel, removed, flags, work, ids_stride, sel_stride, M, r, BLOCK_M=block_m,
                         BLOCK_C=_pow2(r), FLAGS=True, num_warps=8)
    host = torch.empty(B, r, device=device, dtype=torch.int32)
    host_sim = torch.empty(B, r, device=device, dtype=torch.float32)
    _host_kernel[(triton.cdiv(r, 32), B)](metric, removed, flags, ids, host, host_sim, metric.stride(0),
                                          metric.stride(1), ids_stride, protected, M, r, D=D, BLOCK_A=32, BLOCK_B=64,
                                          BLOCK_D=_pow2(D))
    kept, members, lo, hi, assign = _plan_outputs(B, N, r, device)
    weight = torch.empty(B, N, device=device, dtype=torch.float32)
    _pairs_plan_kernel[(B,)](removed, host, kept, members, lo, hi, assign, work, N, protected, r, host_sim, size,
                             weight, float(sub), float(temperature), float(after), BLOCK_N=block_n, BLOCK_R=_pow2(r),
                             SRC_STRIDE=1, WEIGHTS=True, num_warps=8)
    return kept, members, lo, hi, assign, weight


def merge_slots(x: Tensor, size: Tensor, weight: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor,
                assign: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Kernel launch of ``torch.ops.mmmerge.merge_slots`` (same contract)."""
    x = _unit_stride(x)
    B, N, C = x.shape
    K = kept.shape[1]
    out = torch.empty(B, K, C, device=x.device, dtype=x.dtype)
    new_size = torch.empty(B, K, device=x.device, dtype=torch.float32)
    _merge_slots_kernel[(K, B)](x, size.contiguous(), weight.contiguous(), kept, members, lo, hi, out, new_size,
                                x.stride(0), x.stride(1), out.stride(0), out.stride(1), N, K, members.shape[1], C,
                                BLOCK_C=_pow2(C), num_warps=4)
    return out, new_size
