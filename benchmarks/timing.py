"""Timing helpers shared by the speed benchmarks: warm-up, medians, side-by-side measurement.

Wall-clock ratios are only meaningful when both sides run in the same process, on the same inputs,
interleaved (so drift and noise from other processes hit both); these helpers do exactly that.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call, in seconds (synchronising CUDA if it is in use)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class SideBySide:
    """Times a baseline and any number of variants interleaved: B, v, v, ..., B, v, v, ...

    ``measure(fn, repeats)`` runs one warm-up of ``fn``, then ``repeats`` timed calls each followed by a
    baseline call; the baseline's median is pooled over the whole benchmark, so every variant's ratio
    is taken against baseline runs made around it.
    """

    def __init__(self, baseline: Callable[[], object]) -> None:
        self.baseline = baseline
        self.baseline_times: List[float] = []
        baseline()  # warm-up
        self.baseline_times.append(seconds(baseline))

    def measure(self, fn: Callable[[], object], repeats: int = 3) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            times.append(seconds(fn))
            self.baseline_times.append(seconds(self.baseline))
        return statistics.median(times)

    def compare(self, fn: Callable[[], object], repeats: int = 3) -> Dict[str, float]:
        """Variant against the baseline runs made right next to it.

        Returns ``ms`` (variant median), ``base_ms`` (median of the interleaved baseline runs) and
        ``speedup``: the median of the per-pair ratios ``baseline_i / variant_i``, which cancels load that
        changes during a long benchmark (other processes on a shared CPU).
        """
        fn()  # warm-up
        pairs = []
        for _ in range(repeats):
            variant = seconds(fn)
            base = seconds(self.baseline)
            self.baseline_times.append(base)
            pairs.append((variant, base))
        return {"ms": statistics.median(v for v, _ in pairs) * 1e3,
                "base_ms": statistics.median(b for _, b in pairs) * 1e3,
                "speedup": statistics.median(b / v for v, b in pairs)}

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline_times)


def machine() -> Dict[str, object]:
    """What the figures were measured on."""
    info: Dict[str, object] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """Rows as a markdown table; floats get 3 significant decimals."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
