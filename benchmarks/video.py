"""Speed of merged ViViT-base and VideoMAE-base at real size (random weights, CPU).

    python -m benchmarks.video             # full sweep (about 25 min on 2 CPU cores)
    python -m benchmarks.video --quick     # the goal only: three settings on VideoMAE, tome at 50% on ViViT
    python -m benchmarks.video --quick --models videomae-base   # smoke run (about 3 min on 2 shared cores)

For each model: GFLOPs (torch's counter via mmmerge.count_flops) and wall time of one forward, batch 1,
for tome in every time mode over a sweep of FLOPs targets, and for every method at 50% FLOPs.
Each row's speedup is the median of per-pair ratios against unmerged runs interleaved with its own
(timing.SideBySide.compare), so load changing during the run cancels out.
The project's goal: at 50% of the baseline FLOPs, speedup >= 0.85x the FLOPs ratio (about 1.7x).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import mmmerge
from mmmerge.adapters import video

from .timing import SideBySide, machine, markdown_table

FRACTIONS = (0.75, 0.5, 0.35)
TIME_MODES = ("global", "within_frame", "adjacent", "window(2)")
METHODS = ("tome", "pitome", "tps", "random", "prune")


def build(name: str):
    """Real-size model from its config (random weights) and a matching input ``[1, T, 3, 224, 224]``."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VivitConfig, VivitForVideoClassification

    torch.manual_seed(0)
    if name == "videomae-base":  # 16 frames, tubelet 2, patch 16: 8 x 14 x 14 = 1568 tokens
        config = VideoMAEConfig(num_labels=400)
        config._attn_implementation = "sdpa"
        model = VideoMAEForVideoClassification(config)
    elif name == "vivit-base":  # 32 frames, tubelet 2x16x16: 16 x 14 x 14 + CLS = 3137 tokens
        config = VivitConfig(num_labels=400)
        config._attn_implementation = "sdpa"
        model = VivitForVideoClassification(config)
    else:
        raise ValueError(f"unknown model '{name}'")
    x = torch.randn(1, config.num_frames, 3, config.image_size, config.image_size)
    return model.eval(), x


def settings(quick: bool, fractions: Tuple[float, ...] = FRACTIONS,
             name: str = "videomae-base") -> List[Tuple[str, str, float]]:
    """(method, time_mode, FLOPs fraction) to measure."""
    if quick and name == "vivit-base":  # the goal's row only: ViViT-base is ~2.5x slower per forward
        return [("tome", "global", 0.5)]
    if quick:
        return [("tome", "global", 0.5), ("tome", "within_frame", 0.5), ("pitome", "global", 0.5)]
    grid = [("tome", mode, f) for mode in TIME_MODES for f in fractions]
    grid += [(m, "global", 0.5) for m in METHODS if m != "tome"]
    return grid


def run(out_dir: Optional[Path] = None, quick: bool = False, repeats: int = 3,
        models: Tuple[str, ...] = ("videomae-base", "vivit-base"), progress=None) -> List[Dict[str, object]]:
    """Rows: model, tokens, method, time_mode, target, gflops, flops_ratio, ms, speedup, efficiency."""
    rows: List[Dict[str, object]] = []
    # ViViT-base (3137 tokens) is ~3x slower per forward: only the 50% FLOPs column for it.
    grids = {name: settings(quick, FRACTIONS if name != "vivit-base" else (0.5,), name) for name in models}
    if progress is not None:
        progress.reset(total=sum(len(g) for g in grids.values()))
    for name in models:
        grid = grids[name]
        model, x = build(name)
        with torch.no_grad():
            base_flops = mmmerge.count_flops(model, pixel_values=x)
            reference = copy_of(model)
            timer = SideBySide(lambda: reference(pixel_values=x))
            layout = video.video_layout(model)
            for method, mode, fraction in grid:
                video.patch(model, r=mmmerge.TargetFlops(fraction), method=method, time_mode=mode)
                flops = mmmerge.count_flops(model, pixel_values=x)
                timed = timer.compare(lambda: model(pixel_values=x), 2 if quick else repeats)
                info = mmmerge.last_info(model)
                rows.append({"model": name, "tokens": layout.num_tokens, "method": method, "time_mode": mode,
                             "target": fraction, "r": info.schedule[0], "final_tokens": info.tokens_out,
                             "gflops": flops / 1e9, "flops_ratio": flops / base_flops, **timed})
                mmmerge.unpatch(model)
                if progress is not None:
                    progress.update(1)
        base_ms = timer.baseline_median * 1e3
        rows.insert(len(rows) - len(grid), {"model": name, "tokens": layout.num_tokens, "method": "none",
                    "time_mode": "-", "target": 1.0, "r": 0, "final_tokens": layout.num_tokens,
                    "gflops": base_flops / 1e9, "flops_ratio": 1.0, "ms": base_ms, "base_ms": base_ms, "speedup": 1.0})
        for row in rows:
            if row["model"] == name:
                row["efficiency"] = row["speedup"] * row["flops_ratio"]  # speedup / (1 / flops_ratio)
        del model, reference
    return rows


def copy_of(model):
    import copy
    return copy.deepcopy(model)


COLUMNS = ["model", "tokens", "method", "time_mode", "target", "r", "final_tokens", "gflops", "flops_ratio", "ms",
           "base_ms", "speedup", "efficiency"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["videomae-base", "vivit-base"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, repeats=args.repeats, models=tuple(args.models))
    print(f"machine: {machine()}, batch 1, random weights; efficiency = speedup x FLOPs ratio (goal >= 0.85)")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
