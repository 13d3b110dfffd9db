"""Speed of merged AST-base at real size (1214 tokens; random weights, CPU).

    python -m benchmarks.audio               # full sweep (about 6-10 min on 2 CPU cores)
    python -m benchmarks.audio --quick       # smoke run: a narrow AST (same 1214 tokens), three settings

GFLOPs (torch's counter via mmmerge.count_flops) and wall time of one forward, batch 1, for
  * tome in every time mode over a sweep of FLOPs targets, and every other method at 50% FLOPs,
    on a full 10.24 s input (1024 frames, no padding);
  * clips of 2, 5 and 10 s, padded to 1024 frames as transformers does: padding dropped (r=0), and
    padding dropped + tome at 50% of the remaining FLOPs.
All ratios are against the unmerged model on the padded 1024-frame input, timed side by side in the
same run (timing.SideBySide.compare: warm-up, interleaved, median of per-pair ratios against the unmerged
runs made right next to each variant run), with a fixed thread count.
Targets a constant r cannot reach use the engine's TargetFlops fallback, the largest KeepRatio schedule whose
estimated FLOPs meet them (``schedule`` column). The project's goal: at 50% FLOPs, efficiency
(= speedup x FLOPs ratio) >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import mmmerge
from mmmerge.adapters import audio

from .timing import SideBySide, machine, markdown_table

FRACTIONS = (0.75, 0.5, 0.35)
TIME_MODES = ("global", "same_band", "adjacent", "window(4)")
METHODS = ("tome", "pitome", "tps", "random", "prune")
CLIP_SECONDS = (2.0, 5.0, 10.0)


def build(quick: bool):
    """AST-base from its config (random weights, sdpa); ``quick``: a narrow 4-layer AST with the same tokens."""
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    if quick:
        config = ASTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                           num_labels=527)
    else:
        config = ASTConfig(num_labels=527)  # 128 mel x 1024 frames, patch 16, strides 10: 12 x 101 + 2 tokens
    config._attn_implementation = "sdpa"
    return ASTForAudioClassification(config).eval()


def clip(seconds: float, rate: int = 16000) -> torch.Tensor:
    """A synthetic clip: tone, chirp and noise bursts ``[S]``."""
    t = torch.arange(int(seconds * rate)) / rate
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return (0.2 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * (200 * t + 300 * t ** 2))
            + 0.3 * ((t % 1.3) < 0.15).float() * noise)


def schedule_for(model, fraction: float, method: str, time_mode: str, lengths=None) -> Tuple[List[int], str]:
    """The audio adapter's TargetFlops schedule for ``fraction`` at these real lengths (padding dropped), and a
    short description of it (a constant r when one reaches the target, else the mildest keep-ratio schedule)."""
    audio.patch(model, r=mmmerge.TargetFlops(fraction), method=method, time_mode=time_mode, lengths=lengths,
                drop_padding=lengths is not None)
    schedule = mmmerge.last_info(model).schedule
    mmmerge.unpatch(model)
    return schedule, f"const r={schedule[0]}" if len(set(schedule)) == 1 else "keep-ratio"


def settings(quick: bool, fractions: Sequence[float] = FRACTIONS) -> List[Tuple[str, str, float]]:
    """(method, time_mode, FLOPs fraction) on the full-length input."""
    if quick:
        return [("tome", "global", 0.5), ("tome", "same_band", 0.5)]
    grid = [("tome", mode, f) for mode in TIME_MODES for f in fractions]
    grid += [(m, "global", 0.5) for m in METHODS if m != "tome"]
    return grid


def clip_settings(quick: bool) -> List[Tuple[float, Optional[float]]]:
    """(clip seconds, FLOPs fraction of the padding-free model or None for no merging)."""
    seconds = CLIP_SECONDS[:1] if quick else CLIP_SECONDS
    return [(s, f) for s in seconds for f in (None, 0.5)]


def run(out_dir: Optional[Path] = None, quick: bool = False, repeats: int = 3, threads: Optional[int] = 1,
        sections: Sequence[str] = ("full", "clips"), fractions: Sequence[float] = FRACTIONS,
        progress=None) -> List[Dict[str, object]]:
    """Rows: input, tokens, method, time_mode, target, schedule, final_tokens, gflops, flops_ratio, ms, base_ms,
    speedup, efficiency. ``speedup`` is the median of the per-pair ratios unmerged / merged over that row's
    interleaved runs (SideBySide.compare: load changing during the run cancels out); ``base_ms`` is the median
    of those unmerged runs (the first row's base_ms is the whole run's).
    ``sections``: "full" (10.24 s input sweep) and/or "clips" (2/5/10 s, padding dropped); ``fractions``: the
    FLOPs targets of the tome time-mode sweep (the other methods run at 0.5).
    ``out_dir`` is accepted for the ``python -m benchmarks`` entry point, which writes the files itself."""
    if threads:
        torch.set_num_threads(threads)
    repeats = 2 if quick else repeats
    model = build(quick)
    reference = build(quick)  # the unmerged model, timed around every variant
    full_x, _ = audio.features(clip(10.5))  # 1024 real frames (cut from 1048)
    layout = audio.ast_layout(model)
    rows: List[Dict[str, object]] = []
    full_grid = settings(quick, fractions) if "full" in sections else []
    clip_grid = clip_settings(quick) if "clips" in sections else []
    if progress is not None:
        progress.reset(total=len(full_grid) + len(clip_grid))

    def record(x: torch.Tensor, label: str, method: str, mode: str, target: object, described: str,
               lengths=None, **patch) -> None:
        audio.patch(model, method=method, time_mode=mode, lengths=lengths, **patch)
        flops = mmmerge.count_flops(model, input_values=x)
        timed = timer.compare(lambda: model(input_values=x), repeats)  # ms, base_ms, per-pair speedup
        info = mmmerge.last_info(model)
        rows.append({"input": label, "tokens": info.tokens_per_layer[0], "method": method, "time_mode": mode,
                     "target": target, "schedule": described,
                     "final_tokens": info.tokens_out, "gflops": flops / 1e9,
                     "flops_ratio": flops / base_flops, **timed})
        mmmerge.unpatch(model)
        if progress is not None:
            progress.set_postfix_str(f"{label} {method} {mode} {target}")
            progress.update(1)

    with torch.no_grad():
        base_flops = mmmerge.count_flops(reference, input_values=full_x)
        timer = SideBySide(lambda: reference(input_values=full_x))
        for method, mode, fraction in full_grid:
            spec, described = schedule_for(model, fraction, method, mode)
            record(full_x, "10.24 s", method, mode, fraction, described, r=spec)
        for seconds, fraction in clip_grid:
            x, lengths = audio.features(clip(seconds))  # padded to 1024 frames; lengths = real frames
            if fraction is None:
                record(x, f"{seconds:g} s", "none", "global", "drop padding", "r=0", lengths=lengths, r=0,
                       drop_padding=True)
            else:
                spec, described = schedule_for(model, fraction, "tome", "global", lengths)
                record(x, f"{seconds:g} s", "tome", "global", f"drop + {fraction}", described, lengths=lengths,
                       r=spec, drop_padding=True)
    base_ms = timer.baseline_median * 1e3
    rows.insert(0, {"input": "10.24 s (any clip, padded)", "tokens": layout.num_tokens, "method": "none",
                    "time_mode": "-", "target": 1.0, "schedule": "r=0", "final_tokens": layout.num_tokens,
                    "gflops": base_flops / 1e9, "flops_ratio": 1.0, "ms": base_ms, "base_ms": base_ms,
                    "speedup": 1.0})
    for row in rows:
        row["efficiency"] = row["speedup"] * row["flops_ratio"]  # speedup / (1 / flops_ratio); 1.0 = ideal
    return rows


def save(rows: Sequence[Dict[str, object]], out_dir: Path) -> None:
    """``audio.md`` and ``audio.json`` in ``out_dir`` (``python -m benchmarks audio`` writes its own instead)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audio.md").write_text(report(rows))
    (out_dir / "audio.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


COLUMNS = ["input", "tokens", "method", "time_mode", "target", "schedule", "final_tokens", "gflops", "flops_ratio",
           "ms", "base_ms", "speedup", "efficiency"]


def report(rows: Sequence[Dict[str, object]]) -> str:
    return (f"machine: {machine()}, batch 1, random weights, CPU shared with other processes (timings are noisy); "
            "efficiency = speedup x FLOPs ratio (goal >= 0.85 at 50% FLOPs)\n\n" + markdown_table(rows, COLUMNS))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for the whole run (1: on a "
                        "shared CPU a second OpenMP thread stalls on the busiest core and timings blow up)")
    parser.add_argument("--out", type=Path, default=None, help="folder for audio.md and audio.json")
    parser.add_argument("--sections", nargs="+", default=["full", "clips"], choices=["full", "clips"])
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS),
                        help="FLOPs targets of the tome time-mode sweep on the full input (other methods: 0.5)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    with tqdm(total=1, desc="audio", unit="row") as bar:
        rows = run(args.out, quick=args.quick, repeats=args.repeats, threads=args.threads, sections=args.sections,
                   fractions=args.fractions, progress=bar)
    if args.out is not None:
        save(rows, args.out)
    print(report(rows))


if __name__ == "__main__":
    main()
