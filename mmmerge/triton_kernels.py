"""Triton kernels of the fused ToMe step (``mmmerge.fused``): three launches per merging layer.

    best_partner   [B, Na, Nb] cosine tiles, never written: each A token's most similar allowed B token
    bipartite_plan one program per batch row: the best edges (per group), the slots, the survivor of each
                   slot and, per slot, the merged tokens it receives (``members[lo:hi]``)
    merge_slots    one program per (slot, batch row): the size-weighted mean of the slot's tokens

Imported only where a CUDA tensor meets an installed Triton (or under ``TRITON_INTERPRET=1``, which runs these
kernels on the CPU in the tests). Every choice matches the PyTorch reference in ``mmmerge.fused``: ties go to
the lower index, and groups pick their best ``budget`` edges at the static positions ``sel``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TOKENS = 1 << 15  # mergeable tokens one plan program sorts (index bits of the packed sort key)
MAX_GROUPS = 1 << 14  # group ids in the packed sort key


@triton.jit
def _best_partner_kernel(metric_ptr, ids_ptr, best_ptr, best_idx_ptr, stride_b, stride_n, Na, Nb, P, a0,
                         D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (A blocks, batch). A token i is mergeable token ``a0 + 2i``, B token j is ``1 - a0 + 2j``."""
    pid_a = tl.program_id(0)
    b = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    rows_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = rows_a < Na
    base = metric_ptr + b * stride_b
    a = tl.load(base + (P + a0 + 2 * rows_a)[:, None] * stride_n + d[None, :],
                mask=in_a[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-6)[:, None]  # unit rows; zero rows stay zero
    group_a = tl.load(ids_ptr + a0 + 2 * rows_a, mask=in_a, other=-1)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_A], tl.int32)
    for start in range(0, Nb, BLOCK_B):
        rows_b = start + tl.arange(0, BLOCK_B)
        in_b = rows_b < Nb
        m = tl.load(base + (P + 1 - a0 + 2 * rows_b)[:, None] * stride_n + d[None, :],
                    mask=in_b[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        m = m / tl.maximum(tl.sqrt(tl.sum(m * m, axis=1)), 1e-6)[:, None]
        group_b = tl.load(ids_ptr + 1 - a0 + 2 * rows_b, mask=in_b, other=-2)
        cos = tl.dot(a, tl.trans(m), input_precision="ieee")  # [BLOCK_A, BLOCK_B]
        allowed = (group_a[:, None] == group_b[None, :]) & in_b[None, :]
        cos = tl.where(allowed, cos, float("-inf"))
        block_best = tl.max(cos, axis=1)
        block_idx = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int32) + start
        better = block_best > best  # strict: ties keep the earlier (lower) index
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_best, best)
    tl.store(best_ptr + b * Na + rows_a, best, mask=in_a)
    tl.store(best_idx_ptr + b * Na + rows_a, best_idx, mask=in_a)


@triton.jit
def _plan_kernel(best_ptr, best_idx_ptr, ids_ptr, sel_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, assign_ptr,
                 work_ptr, N, P, a0, Na, r, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per batch row. ``work``: ``[B, 3 * BLOCK_N]`` int32 scratch (sorted A tokens, removal flags
    then slots, sorted member slots); barriers order its writes and reads inside the program."""
    b = tl.program_id(0)
    K = N - r
    work = work_ptr + b * 3 * BLOCK_N
    # 1. The best edges: sort A tokens by (group, score descending, index), take the static positions ``sel``.
    i = tl.arange(0, BLOCK_A)
    in_a = i < Na
    score = tl.load(best_ptr + b * Na + i, mask=in_a, other=0.0)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    ordered = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # unsigned, in float order
    group = tl.load(ids_ptr + a0 + 2 * i, mask=in_a, other=0).to(tl.int64)
    key = (group << 48) | ((0xFFFFFFFF - ordered) << 16) | i.to(tl.int64)
    key = tl.where(in_a, key, 0x7FFFFFFFFFFFFFFF)
    a_sorted = (tl.sort(key) & 0xFFFF).to(tl.int32)
    tl.store(work + i, a_sorted, mask=in_a)
    n = tl.arange(0, BLOCK_N)
    in_n = n < N
    tl.store(work + BLOCK_N + n, tl.zeros([BLOCK_N], tl.int32), mask=in_n)
    tl.debug_barrier()
    e = tl.arange(0, BLOCK_R)
    in_r = e < r
    src_a = tl.load(work + tl.load(sel_ptr + e, mask=in_r, other=0), mask=in_r, other=0)
    dst_b = tl.load(best_idx_ptr + b * Na + src_a, mask=in_r, other=0)
    src = P + a0 + 2 * src_a  # token positions
    dst = P + 1 - a0 + 2 * dst_b
    tl.store(work + BLOCK_N + src, tl.full([BLOCK_R], 1, tl.int32), mask=in_r)
    tl.debug_barrier()
    # 2. Slots: survivors keep their order; each survivor's slot is its rank.
    removed = tl.load(work + BLOCK_N + n, mask=in_n, other=1)
    survives = 1 - removed
    rank = tl.cumsum(survives, axis=0) - 1
    tl.debug_barrier()
    tl.store(work + BLOCK_N + n, rank, mask=in_n)
    tl.store(kept_ptr + b * K + rank, n.to(tl.int64), mask=in_n & (survives == 1))
    tl.store(lo_ptr + b * K + n, tl.zeros([BLOCK_N], tl.int32), mask=n < K)
    tl.store(hi_ptr + b * K + n, tl.zeros([BLOCK_N], tl.int32), mask=n < K)
    tl.debug_barrier()
    slot = tl.load(work + BLOCK_N + dst, mask=in_r, other=0)  # a merged token joins its host's slot
    tl.store(assign_ptr + b * N + n, rank.to(tl.int64), mask=in_n & (survives == 1))
    tl.store(assign_ptr + b * N + src, slot.to(tl.int64), mask=in_r)
    # 3. Members of each slot: merged tokens sorted by (slot, position); slot k holds members[lo[k]:hi[k]].
    key2 = tl.where(in_r, (slot.to(tl.int64) << 32) | src.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    sorted2 = tl.sort(key2)
    member_slot = (sorted2 >> 32).to(tl.int32)
    tl.store(members_ptr + b * r + e, sorted2 & 0xFFFFFFFF, mask=in_r)
    tl.store(work + 2 * BLOCK_N + e, member_slot, mask=in_r)
    tl.debug_barrier()
    before = tl.load(work + 2 * BLOCK_N + e - 1, mask=in_r & (e > 0), other=-1)
    after = tl.load(work + 2 * BLOCK_N + e + 1, mask=in_r & (e < r - 1), other=-1)
    tl.store(lo_ptr + b * K + member_slot, e, mask=in_r & (member_slot != before))
    tl.store(hi_ptr + b * K + member_slot, e + 1, mask=in_r & (member_slot != after))


@triton.jit
def _merge_slots_kernel(x_ptr, size_ptr, kept_ptr, members_ptr, lo_ptr, hi_ptr, out_ptr, new_size_ptr,
                        stride_xb, stride_xn, stride_ob, stride_on, N, K, r, C,
                        BLOCK_C: tl.constexpr):
    """Programs (slots, batch): slot k is its survivor's row, or with members the size-weighted mean."""
    k = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    in_c = c < C
    kept = tl.load(kept_ptr + b * K + k)
    lo = tl.load(lo_ptr + b * K + k)
    hi = tl.load(hi_ptr + b * K + k)
    row = tl.load(x_ptr + b * stride_xb + kept * stride_xn + c, mask=in_c, other=0.0)
    total = tl.load(size_ptr + b * N + kept)
    acc = row.to(tl.float32) * total
    for p in range(lo, hi):
        t = tl.load(members_ptr + b * r + p)
        s = tl.load(size_ptr + b * N + t)
        acc += tl.load(x_ptr + b * stride_xb + t * stride_xn + c, mask=in_c, other=0.0).to(tl.float32) * s
        total += s
    value = tl.where(hi > lo, (acc / total).to(row.dtype), row)  # a lone survivor is copied exactly
    tl.store(out_ptr + b * stride_ob + k * stride_on + c, value, mask=in_c)
    tl.store(new_size_ptr + b * K + k, total)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def bipartite_plan(metric: Tensor, ids: Tensor, sel: Tensor, protected: int, a0: int
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kernel launches of ``torch.ops.mmmerge.bipartite_plan`` (same contract)."""
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    B, N, D = metric.shape
    M = N - protected
    Na, Nb = (M - a0 + 1) // 2, (M - 1 + a0 + 1) // 2
    r = sel.shape[0]
    K = N - r
    device = metric.device
    best = torch.empty(B, Na, device=device, dtype=torch.float32)
    best_idx = torch.empty(B, Na, device=device, dtype=torch.int32)
    block_a = 32
    _best_partner_kernel[(triton.cdiv(Na, block_a), B)](
        metric, ids, best, best_idx, metric.stride(0), metric.stride(1), Na, Nb, protected, a0,
        D=D, BLOCK_A=block_a, BLOCK_B=64, BLOCK_D=_pow2(D))
    kept = torch.empty(B, K, device=device, dtype=torch.long)
    members = torch.empty(B, r, device=device, dtype=torch.long)
    lo = torch.empty(B, K, device=device, dtype=torch.int32)
    hi = torch.empty(B, K, device=device, dtype=torch.int32)
    assign = torch.empty(B, N, device=device, dtype=torch.long)
    block_n = _pow2(N)
    work = torch.empty(B, 3 * block_n, device=device, dtype=torch.int32)
    _plan_kernel[(B,)](best, best_idx, ids, sel, kept, members, lo, hi, assign, work, N, protected, a0, Na, r,
                       BLOCK_N=block_n, BLOCK_A=_pow2(Na), BLOCK_R=_pow2(r), num_warps=8)
    return kept, members, lo, hi, assign


def merge_slots(x: Tensor, size: Tensor, kept: Tensor, members: Tensor, lo: Tensor, hi: Tensor
                ) -> Tuple[Tensor, Tensor]:
    """Kernel launch of ``torch.ops.mmmerge.merge_slots`` (same contract)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    B, N, C = x.shape
    K = kept.shape[1]
    out = torch.empty(B, K, C, device=x.device, dtype=x.dtype)
    new_size = torch.empty(B, K, device=x.device, dtype=torch.float32)
    size = size.contiguous()
    _merge_slots_kernel[(K, B)](x, size, kept, members, lo, hi, out, new_size, x.stride(0), x.stride(1),
                                out.stride(0), out.stride(1), N, K, members.shape[1], C,
                                BLOCK_C=_pow2(C), num_warps=4)
    return out, new_size
