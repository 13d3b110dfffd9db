"""Cost of choosing and merging tokens: time against one transformer layer, and dispatched ops per layer.

    python -m benchmarks.engine            # full sweep: N in 197..3137, C in 768/1024, CPU
    python -m benchmarks.engine --quick
    python -m benchmarks.engine --repeats 3   # fewer timed pairs per row on a busy machine
    python -m benchmarks.engine --sections ops   # only the op counts (VideoMAE-base, deterministic)

For each (N, C) it times one pre-norm transformer layer (sdpa attention, MLP ratio 4, heads of 64)
and, for each matcher (timed interleaved with the layer; fraction = median of per-pair ratios), ``plan_merge`` + ``merge_tokens`` removing r = N // 10 tokens with head-averaged
keys ``[B, N, 64]`` as the metric, and prints the matcher's time as a fraction of the layer's.

Op counts (``ops`` section): aten ops dispatched per forward of VideoMAE-base (random weights, sdpa, fp32,
batch 1, ``trace_source=False``), unmerged and merged at ``TargetFlops(0.5)``; "extra per layer" is the
difference divided by the merging layers. On a GPU at small batch every op is a kernel launch.
The project's goals: tome <= 10% and pitome <= 20% of a layer at N=1568, C=768 on CPU; tome global <= 45 and
within_frame <= 60 extra ops per merging layer, pitome and tps within 1.5x of tome in the same mode.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import mmmerge
from mmmerge import init_state, merge_tokens, plan_merge

from .timing import SideBySide, machine, markdown_table

METHODS = ("tome", "pitome", "tps", "random", "prune")
SIZES = (197, 577, 1214, 1568, 3137)
WIDTHS = (768, 1024)


def transformer_layer(width: int) -> nn.Module:
    return nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True).eval()


COLUMNS = ["N", "C", "r", "method", "layer_ms", "merge_ms", "fraction"]
OP_COLUMNS = ["model", "method", "time_mode", "ops", "base_ops", "merging_layers", "extra_per_layer"]
OP_GOALS = {("tome", "global"): 45, ("tome", "within_frame"): 60}


def op_rows(quick: bool = False) -> List[Dict[str, object]]:
    """Dispatched aten ops per forward of VideoMAE-base, unmerged and merged (tome, pitome, tps)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(num_hidden_layers=4) if quick else VideoMAEConfig()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = VideoMAEModel(config).eval()
    x = torch.randn(1, config.num_frames, 3, config.image_size, config.image_size)
    base = sum(mmmerge.count_ops(model, pixel_values=x).values())
    rows = []
    for mode in ("global", "within_frame"):
        for method in ("tome", "pitome", "tps"):
            mmmerge.patch(model, r=mmmerge.TargetFlops(0.5), method=method, time_mode=mode)
            ops = sum(mmmerge.count_ops(model, pixel_values=x).values())
            layers = sum(1 for r in mmmerge.last_info(model).schedule if r)
            mmmerge.unpatch(model)
            rows.append({"model": f"VideoMAE-base ({config.num_hidden_layers} layers)", "method": method,
                         "time_mode": mode, "ops": ops, "base_ops": base, "merging_layers": layers,
                         "extra_per_layer": (ops - base) / max(layers, 1)})
    return rows


def op_goal_lines(rows: List[Dict[str, object]]) -> List[str]:
    lines = []
    extra = {(r["method"], r["time_mode"]): float(r["extra_per_layer"]) for r in rows}  # type: ignore[arg-type]
    for (method, mode), limit in OP_GOALS.items():
        if (method, mode) in extra:
            got = extra[method, mode]
            lines.append(f"goal {method}/{mode} <= {limit} extra ops per merging layer: {got:.1f} "
                         f"({'met' if got <= limit else 'MISSED'})")
    for mode in ("global", "within_frame"):
        for method in ("pitome", "tps"):
            if (method, mode) in extra and ("tome", mode) in extra:
                ratio = extra[method, mode] / extra["tome", mode]
                lines.append(f"goal {method}/{mode} within 1.5x of tome: {ratio:.2f}x "
                             f"({'met' if ratio <= 1.5 else 'MISSED'})")
    return lines


def run(out_dir: Optional[Path] = None, quick: bool = False, batch: int = 1, repeats: int = 5,
        sections=("time", "ops")) -> List[Dict[str, object]]:
    """Rows: N, C, method, layer_ms, merge_ms, fraction (merge / layer); then the op-count rows."""
    rows = time_rows(quick, batch, repeats) if "time" in sections else []
    return rows + (op_rows(quick) if "ops" in sections else [])


def time_rows(quick: bool = False, batch: int = 1, repeats: int = 5) -> List[Dict[str, object]]:
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
    timed = [r for r in rows if "fraction" in r]
    counted = [r for r in rows if "ops" in r]
    parts = []
    if timed:
        parts += [markdown_table(timed, COLUMNS), "\n".join(goal_lines(timed))]
    if counted:
        parts += [markdown_table(counted, OP_COLUMNS), "\n".join(op_goal_lines(counted))]
    return "\n\n".join(parts)


# ------------------------------------------------------------- DivPrune / CDPruner against the CLIP tower
SELECTION_METHODS = ("divprune", "cdpruner", "cdpruner+query")
SELECTION_TOKENS = ((576, 1), (2880, 5))  # (visual tokens, images of 576): LLaVA-1.5, five 336 px crops
SELECTION_GOAL = 0.05  # issue 15: the selection costs under 5% of the vision tower's time


def clip_vit_l336():
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower), random weights, from its config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    config._attn_implementation = "sdpa"
    return CLIPVisionModel(config).eval()


def selection_rows(keep: int = 64, width: int = 4096, repeats: int = 3,
                   tokens: Sequence[Tuple[int, int]] = SELECTION_TOKENS, query_tokens: int = 40,
                   tower: Optional[nn.Module] = None) -> List[Dict[str, object]]:
    """Cost of ``reduce_tokens(x, keep, method)`` for the selection methods against the CLIP ViT-L/336 tower.

    For each (N, images): ``x`` ``[1, N, width]`` (projected visual tokens; 4096 = LLaVA-1.5-7B's LM width), the
    reduction to ``keep`` (select + merge every other token into its nearest kept one), timed interleaved with
    the tower's forward over the same ``images`` (with the hidden states LLaVA asks for); fraction = median of
    per-pair ratios. ``cdpruner+query``: with a ``[1, query_tokens, width]`` text query.
    """
    from mmmerge import reduce_tokens

    tower = tower or clip_vit_l336()
    rows: List[Dict[str, object]] = []
    with torch.no_grad():
        for n, images in tokens:
            pixels = torch.randn(images, 3, 336, 336, generator=torch.Generator().manual_seed(1))
            timer = SideBySide(lambda: tower(pixels, output_hidden_states=True))
            x = torch.randn(1, n, width, generator=torch.Generator().manual_seed(2))
            query = torch.randn(1, query_tokens, width, generator=torch.Generator().manual_seed(3))
            for name in SELECTION_METHODS:
                method, _, extra = name.partition("+")
                hyper = {"query": query} if extra == "query" else {}
                timed = timer.compare(lambda: reduce_tokens(x, keep, method, **hyper), repeats)
                rows.append({"method": name, "N": n, "images": images, "keep": keep, "C": width,
                             "reduce_ms": timed["ms"], "tower_ms": timed["base_ms"],
                             "fraction_of_tower": 1.0 / timed["speedup"]})
    return rows


SELECTION_COLUMNS = ["method", "N", "images", "keep", "C", "reduce_ms", "tower_ms", "fraction_of_tower"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed (matcher, layer) pairs per row")
    parser.add_argument("--sections", nargs="+", default=["time", "ops"], choices=["time", "ops"])
    parser.add_argument("--selection", action="store_true", help="only the DivPrune/CDPruner cost at keep=64 "
                        "of 576 and 2880 tokens against the CLIP ViT-L/336 tower")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.selection:
        rows = selection_rows(repeats=args.repeats)
        print(f"machine: {machine()}, batch 1")
        print(markdown_table(rows, SELECTION_COLUMNS))
        worst = max(float(r["fraction_of_tower"]) for r in rows)  # type: ignore[arg-type]
        print(f"goal selection < {SELECTION_GOAL:.0%} of the tower: worst {worst:.2%} "
              f"({'met' if worst < SELECTION_GOAL else 'MISSED'})")
        return
    rows = run(quick=args.quick, batch=args.batch, repeats=args.repeats, sections=args.sections)
    print(f"machine: {machine()}, batch {args.batch}")
    print(report(rows))


if __name__ == "__main__":
    main()
