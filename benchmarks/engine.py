"""Cost of choosing and merging tokens, against one transformer layer of the same size.

    python -m benchmarks.engine            # full sweep: N in 197..3137, C in 768/1024, CPU
    python -m benchmarks.engine --quick
    python -m benchmarks.engine --repeats 3   # fewer timed pairs per row on a busy machine

For each (N, C) it times one pre-norm transformer layer (sdpa attention, MLP ratio 4, heads of 64)
and, for each matcher (timed interleaved with the layer; fraction = median of per-pair ratios), ``plan_merge`` + ``merge_tokens`` removing r = N // 10 tokens with head-averaged
keys ``[B, N, 64]`` as the metric, and prints the matcher's time as a fraction of the layer's.
The project's goal: tome <= 10% and pitome <= 20% of a layer at N=1568, C=768 on CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from mmmerge import init_state, merge_tokens, plan_merge

from .timing import SideBySide, machine, markdown_table

METHODS = ("tome", "pitome", "tps", "random", "prune")
SIZES = (197, 577, 1214, 1568, 3137)
WIDTHS = (768, 1024)


def transformer_layer(width: int) -> nn.Module:
    return nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True).eval()


COLUMNS = ["N", "C", "r", "method", "layer_ms", "merge_ms", "fraction"]


def run(out_dir: Optional[Path] = None, quick: bool = False, batch: int = 1, repeats: int = 5) -> List[Dict[str, object]]:
    """Rows: N, C, method, layer_ms, merge_ms, fraction (merge / layer)."""
    torch.manual_seed(0)
    sizes, widths = ((197, 1568), (768,)) if quick else (SIZES, WIDTHS)
    repeats = min(repeats, 2) if quick else repeats
    rows = []
    with torch.no_grad():
        for width in widths:
            layer = transformer_layer(width)
            for n in sizes:
                x = torch.randn(batch, n, width)
                metric = torch.randn(batch, n, 64)
                state = init_state(batch, n, protected=1, trace_source=True)
                timer = SideBySide(lambda: layer(x))
                r = n // 10

                for method in METHODS:
                    def step() -> None:
                        plan = plan_merge(metric, state, r, method)
                        merge_tokens(x, state, plan)

                    timed = timer.compare(step, repeats)
                    rows.append({"N": n, "C": width, "r": r, "method": method, "merge_ms": timed["ms"],
                                 "layer_ms": timed["base_ms"], "fraction": 1.0 / timed["speedup"]})
    return rows


# The project's goals: matcher + merge as a fraction of one layer at N=1568, C=768 (CPU).
GOALS = {"tome": 0.10, "pitome": 0.20}


def goal_lines(rows: List[Dict[str, object]]) -> List[str]:
    """One line per goal: the measured fraction at N=1568, C=768 against its limit."""
    lines = []
    for method, limit in GOALS.items():
        for row in rows:
            if row["N"] == 1568 and row["C"] == 768 and row["method"] == method:
                frac = float(row["fraction"])  # type: ignore[arg-type]
                verdict = "met" if frac <= limit else "MISSED"
                lines.append(f"goal {method} <= {limit:.0%} of a layer at N=1568, C=768: {frac:.1%} ({verdict})")
    return lines


def report(rows: List[Dict[str, object]]) -> str:
    return "\n\n".join([markdown_table(rows, COLUMNS), "\n".join(goal_lines(rows))])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed (matcher, layer) pairs per row")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    rows = run(quick=args.quick, batch=args.batch, repeats=args.repeats)
    print(f"machine: {machine()}, batch {args.batch}")
    print(report(rows))


if __name__ == "__main__":
    main()
