"""Check the fused steps' Triton kernels (ToMe, PiToMe, TPS, dominant) against their PyTorch references, on fresh
random inputs.

    TRITON_INTERPRET=1 python -m mmmerge.kernel_check          (on the CPU, Triton's interpreter; the tests run it)
    python -m mmmerge.kernel_check --device cuda               (on a GPU: benchmarks/gpu_check.sh runs it)

Plans must be identical (inputs without ties); the merged rows within one rounding of the tokens' dtype (the
kernel keeps the weights in float32, the reference rounds them to the dtype); the sizes within float32 rounding.
On CUDA the allocator's cached memory is poisoned before each launch (the kernels' outputs come from it), so an
unwritten element fails. Exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

import torch

from .fused import merge_reference, pitome_reference, plan_reference, tps_reference
from .fused_selection import dominant_reference

METHODS = ("tome", "pitome", "tps")
ROW_METHODS = ("tome", "pitome", "tps", "tps_score", "dominant")  # per-row tables; TPS by energy and by a score
# (batch, tokens, metric width, channels, protected, a0, groups, removed per group, dtype)
CASES: List[Tuple[int, int, int, int, int, int, int, int, torch.dtype]] = [
    (2, 64, 16, 32, 0, 0, 1, 20, torch.float32),
    (2, 65, 20, 48, 1, 0, 1, 32, torch.float32),  # ToMe: r = every A token; PiToMe: every token a candidate
    (2, 66, 16, 40, 2, 1, 4, 5, torch.bfloat16),  # official parity, 4 groups
    (1, 130, 64, 96, 0, 0, 2, 30, torch.bfloat16),
    (3, 37, 8, 24, 1, 0, 3, 1, torch.float16),  # odd sizes: groups of 12
]
CUDA_CASES = CASES + [(8, 1568, 64, 768, 0, 0, 1, 120, torch.bfloat16),  # VideoMAE-base's first layer
                      (4, 1568, 64, 768, 0, 0, 8, 20, torch.bfloat16),  # within_frame: 8 tubelet groups
                      (2, 1177, 64, 768, 1, 0, 1, 300, torch.float32)]
# dominant: (batch, tokens, metric width, channels, protected, removed, contextual (0: the default), dtype)
DOMINANT_CASES: List[Tuple[int, int, int, int, int, int, int, torch.dtype]] = [
    (2, 64, 16, 32, 0, 20, 0, torch.float32),
    (2, 65, 20, 48, 1, 48, 0, torch.float32),  # 16 kept: the default 2.5 contextual rounds to 2 (half to even)
    (2, 66, 16, 40, 2, 20, 5, torch.bfloat16),
    (1, 130, 64, 96, 0, 100, 30, torch.bfloat16),  # every kept token a target: no dominant token
    (3, 37, 8, 24, 1, 3, 1, torch.float16),
]
DOMINANT_CUDA_CASES = DOMINANT_CASES + [(1, 577, 64, 1024, 1, 512, 0, torch.bfloat16),  # LLaVA-1.5: 576 -> 64
                                        (4, 577, 64, 1024, 1, 432, 16, torch.float32)]


def _tables(M: int, a0: int, groups: int, per_group: int, pitome: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group ids ``[M]`` (contiguous, nearly equal groups) and the positions of each group's first ``per_group``
    entries in the (group, score) order: A tokens (ToMe) or all tokens (PiToMe's candidates, TPS's removed)."""
    sizes = [M // groups + (1 if g < M % groups else 0) for g in range(groups)]
    ids = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes)).to(torch.int32)
    ranked = ids if pitome else ids[a0::2]
    counts = [int((ranked == g).sum()) for g in range(groups)]
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    sel = torch.cat([torch.arange(per_group) + int(s) for s in starts]).to(torch.int32)
    return ids, sel


def _poison(device: torch.device) -> None:
    """Fill freed cached device memory with NaN bits (-1 as int32), where the next outputs will be allocated."""
    if device.type == "cuda":
        torch.full((1 << 26,), -1, dtype=torch.int32, device=device)  # 256 MiB, freed back to the cache


def check_case(case, device: torch.device, seed: int, method: str) -> List[str]:
    """Mismatches of one case (empty when the kernels agree with the references)."""
    from . import triton_kernels

    B, N, D, C, P, a0, groups, per_group, dtype = case
    case = (method,) + case
    gen = torch.Generator().manual_seed(seed)
    pitome = method == "pitome"
    ids, sel = _tables(N - P, a0, groups, 2 * per_group if pitome else per_group, method != "tome")
    metric = torch.randn(B, N, D, generator=gen)
    x = torch.randn(B, N, C, generator=gen).to(dtype)
    size = torch.randint(1, 5, (B, N), generator=gen).float()
    on = [t.to(device) for t in (metric, ids, sel)]
    weight = size
    if pitome:  # margins of the paper's schedule: loose (first layer) and strict (late), with and without the shift
        args = (0.9, 1.0, False) if seed % 2 == 0 else (0.3, 0.5, True)
        want = pitome_reference(metric, ids, sel, P, *args)
        _poison(device)
        got = triton_kernels.pitome_plan(*on, P, *args)
    elif method == "tps":  # the paper's logit at temperature 0.5 by energy; the official one at 1 by a given score
        args = (1.0, 0.5, 0.0) if seed % 2 == 0 else (0.0, 1.0, 1.0)
        score = None if seed % 2 == 0 else torch.randn(B, N, generator=gen)
        want = tps_reference(metric, size, ids, sel, P, *args, score)
        _poison(device)
        got = triton_kernels.tps_plan(on[0], size.to(device), *on[1:], P, *args,
                                      None if score is None else score.to(device))
        weight = want[5]
        if not torch.allclose(got[5].cpu(), weight, rtol=1e-5):
            return [f"{case}: fusion weights differ"]
    else:
        want = plan_reference(metric, ids, sel, P, a0)
        _poison(device)
        got = triton_kernels.bipartite_plan(*on, P, a0)
    return _compare(case, want, got, x, size, weight, device)


def check_dominant_case(case, device: torch.device, seed: int) -> List[str]:
    """Mismatches of one ``dominant`` case without padding (empty when the kernels agree with the reference)."""
    from . import triton_selection

    B, N, D, C, P, r, contextual, dtype = case
    gen = torch.Generator().manual_seed(seed)
    metric, score = torch.randn(B, N, D, generator=gen).to(dtype), torch.randn(B, N, generator=gen)  # keys in dtype
    x = torch.randn(B, N, C, generator=gen).to(dtype)
    size = torch.randint(1, 5, (B, N), generator=gen).float()
    want = dominant_reference(metric, score, P, r, contextual)
    _poison(device)
    got = triton_selection.dominant_plan(metric.to(device), score.to(device), P, r, contextual)
    return _compare(("dominant",) + case, want, got, x, size, size, device)


def _compare(case, want, got, x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor, device: torch.device
             ) -> List[str]:
    """Mismatches of a kernel plan ``got`` against the reference plan ``want`` (identical), then of the merge by it:
    the kernel's rows and sizes against the reference's."""
    from . import triton_kernels

    errors = [f"{case}: plan {name} differs" for name, w, g in zip(("kept", "members", "lo", "hi", "assign"), want, got)
              if w.shape != g.shape or not torch.equal(w.long(), g.cpu().long())]
    if errors:
        return errors
    kept, members, lo, hi, assign = want[:5]
    out_want, size_want = merge_reference(x, size, weight, kept, members, assign)
    _poison(device)
    out_got, size_got = triton_kernels.merge_slots(*(t.to(device) for t in (x, size, weight, kept, members, lo, hi)))
    out_got, size_got = out_got.cpu(), size_got.cpu()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    if not torch.isfinite(out_got.float()).all():
        errors.append(f"{case}: merged rows not finite (unwritten?)")
    elif not torch.allclose(out_got.float(), out_want.float(), rtol=tolerance, atol=tolerance):
        errors.append(f"{case}: merged rows differ by {(out_got.float() - out_want.float()).abs().max():.3g}")
    if not torch.allclose(size_got, size_want, rtol=1e-6):
        errors.append(f"{case}: sizes differ")
    lone = (hi == lo).unsqueeze(-1).expand_as(out_got)
    if not torch.equal(out_got[lone], out_want[lone]):
        errors.append(f"{case}: a lone survivor's row is not copied exactly")
    return errors


def check_rows_case(device: torch.device, seed: int, method: str = "tome", B: int = 3, W: int = 48,
                    r: int = 10) -> List[str]:
    """A plan with per-row tables (rows of their own lengths and budgets, real tokens first, then padding:
    ``fused.row_tables``)."""
    from . import triton_kernels, triton_selection
    from .fused import row_tables

    gen = torch.Generator().manual_seed(seed)
    lengths, quota = [W, W - 9, W - 20][:B], [r, r - 4, r - 7][:B]
    tables = row_tables("tps" if method == "tps_score" else method, lengths, quota, W, r)
    ids, sel = tables if method != "dominant" else (None, None)
    metric = torch.randn(B, W, 16, generator=gen)
    size = torch.randint(1, 5, (B, W), generator=gen).float()
    case = f"rows case {method} (seed {seed})"
    if method == "dominant":  # by the default contextual count, and by a given one (some rows keep fewer)
        score, (counts,), contextual = torch.randn(B, W, generator=gen), tables, 0 if seed % 2 == 0 else 3
        want = dominant_reference(metric, score, 0, r, contextual, counts)
        _poison(device)
        got = triton_selection.dominant_plan(metric.to(device), score.to(device), 0, r, contextual, counts.to(device))
    elif method == "tome":
        want = plan_reference(metric, ids, sel, 0, 0)
        _poison(device)
        got = triton_kernels.bipartite_plan(metric.to(device), ids.to(device), sel.to(device), 0, 0)
    elif method == "pitome":  # the paper's energy at a loose margin, the official shift at a strict one
        args = (0.3, 1.0, False) if seed % 2 == 0 else (0.6, 0.5, True)
        want = pitome_reference(metric, ids, sel, 0, *args)
        _poison(device)
        got = triton_kernels.pitome_plan(metric.to(device), ids.to(device), sel.to(device), 0, *args)
    else:  # the paper's logit by energy, the official one by a given score, both at temperature 0.5
        score = torch.randn(B, W, generator=gen) if method == "tps_score" else None
        args = (1.0, 0.5, 0.0) if score is None else (0.0, 0.5, 1.0)
        want = tps_reference(metric, size, ids, sel, 0, *args, score)
        _poison(device)
        got = triton_kernels.tps_plan(metric.to(device), size.to(device), ids.to(device), sel.to(device), 0, *args,
                                      None if score is None else score.to(device))
        if not torch.allclose(got[5].cpu(), want[5], rtol=1e-5):
            return [f"{case}: fusion weights differ"]
    return [f"{case}: plan {name} differs" for name, w, g in
            zip(("kept", "members", "lo", "hi", "assign"), want, got) if not torch.equal(w.long(), g.cpu().long())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = CUDA_CASES if device.type == "cuda" else CASES
    dominant_cases = DOMINANT_CUDA_CASES if device.type == "cuda" else DOMINANT_CASES
    errors = [e for method in METHODS for case in cases for seed in range(args.seeds)
              for e in check_case(case, device, seed, method)]
    errors += [e for case in dominant_cases for seed in range(args.seeds)
               for e in check_dominant_case(case, device, seed)]
    errors += [e for method in ROW_METHODS for seed in range(args.seeds) for e in check_rows_case(device, seed, method)]
    for error in errors:
        print("MISMATCH", error)
    total = (len(METHODS) * len(cases) + len(dominant_cases) + len(ROW_METHODS)) * args.seeds
    print(f"kernel_check: {total} cases on {device}, {len(errors)} mismatches")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
