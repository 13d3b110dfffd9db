"""Cost of choosing and merging tokens: time against one transformer layer, and dispatched ops per layer.

    python -m benchmarks.engine            # full sweep: N in 197..3137, C in 768/1024, CPU
    python -m benchmarks.engine --quick
    python -m benchmarks.engine --repeats 3   # fewer timed pairs per row on a busy machine
    python -m benchmarks.engine --sections host  # ops, bytes written, host time of VideoMAE-base (meta)

For each (N, C) it times one pre-norm transformer layer (sdpa attention, MLP ratio 4, heads of 64)
and, for each matcher (timed interleaved with the layer; fraction = median of per-pair ratios), ``plan_merge`` + ``merge_tokens`` removing r = N // 10 tokens with head-averaged
keys ``[B, N, 64]`` as the metric, and prints the matcher's time as a fraction of the layer's.

Host cost (``host`` section, also ``ops``): a VideoMAE-base forward (random weights, sdpa, bf16, batch 1,
``trace_source=False``) on the ``meta`` device, unmerged and merged at ``TargetFlops(0.5)``: aten ops dispatched
("extra per layer": the difference over the merging layers; on a GPU at small batch each is a kernel launch),
bytes written (every op's outputs), and host time (no kernel runs on meta: what Python and the dispatcher
spend), interleaved pairs. Goals in ``HOST_GOALS``; the matchers' goals: tome <= 10% and pitome <= 20% of a
layer at N=1568, C=768 on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
HOST_COLUMNS = ["method", "time_mode", "merging_layers", "ops", "extra_ops_per_layer", "bytes_ratio",
                "host_ratio"]
# Issue 19's goals for VideoMAE-base, bf16, batch 1, TargetFlops(0.5), on the meta device (the host's time):
# (method, time mode) -> (extra ops per merging layer, bytes written merged / unmerged, host time merged / unmerged).
HOST_GOALS = {("tome", "global"): (18, 0.60, 1.10), ("tome", "within_frame"): (24, 0.60, 1.15),
              ("pitome", "global"): (None, 0.70, 1.20), ("tps", "global"): (None, 0.70, 1.20)}
PITOME_TPS_OPS = 1.3  # pitome / tps extra ops within 1.3x of tome's in the same mode


def videomae_base(layers: int = 12, device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """VideoMAE-base (16 frames of 224 px: 1568 tokens) with random weights, sdpa, on ``device``."""
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return VideoMAEModel(config).eval().to(dtype)


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on the meta device as one fused op, as a GPU does (flash
    attention without a mask, memory-efficient attention with a float bias), instead of the math path the
    meta device would take (which writes the N x N attention matrices and dispatches a dozen ops)."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or dropout_p or is_causal or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)[0]
        bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, False,
                                                                      scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def host_rows(quick: bool = False, repeats: int = 5) -> List[Dict[str, object]]:
    """What a forward costs the host: dispatched ops, bytes written and host time, merged against unmerged.

    VideoMAE-base (4 layers with ``quick``), bf16, batch 1, ``TargetFlops(0.5)``, ``trace_source=False``, on the
    ``meta`` device: no kernel runs, so the time is what Python and the dispatcher spend launching the forward
    (on a GPU at small batch, the floor of its latency). Attention runs as one fused op, as on a GPU
    (``fused_attention_on_meta``). Host ratio: median of interleaved per-pair ratios.
    """
    model = videomae_base(4 if quick else 12)
    x = torch.randn(1, 16, 3, 224, 224, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), fused_attention_on_meta():
        def forward() -> None:
            model(pixel_values=x)

        base_ops = sum(mmmerge.count_ops(forward).values())
        base_bytes = sum(mmmerge.count_bytes(forward).values())
        timer = SideBySide(forward)
        reference = copy.deepcopy(model)  # the unmerged side of every pair
        timer.baseline = lambda: reference(pixel_values=x)
        rows = []
        for method, mode in HOST_GOALS:
            mmmerge.patch(model, r=mmmerge.TargetFlops(0.5), method=method, time_mode=mode)
            layers = sum(1 for r in mmmerge.last_info(model).schedule if r)
            ops = sum(mmmerge.count_ops(forward).values())
            written = sum(mmmerge.count_bytes(forward).values())
            timed = timer.compare(forward, repeats)
            mmmerge.unpatch(model)
            rows.append({"method": method, "time_mode": mode, "merging_layers": layers, "ops": ops,
                         "base_ops": base_ops, "extra_ops_per_layer": (ops - base_ops) / max(layers, 1),
                         "bytes_ratio": written / base_bytes, "host_ratio": 1.0 / timed["speedup"]})
    return rows


def host_goal_lines(rows: List[Dict[str, object]]) -> List[str]:
    """One line per goal of ``HOST_GOALS`` (and pitome/tps ops against tome's), with met / MISSED."""
    def verdict(got: float, limit: float) -> str:
        return f"{got:.2f} ({'met' if got <= limit else 'MISSED'})"

    lines = []
    by_key = {(r["method"], r["time_mode"]): r for r in rows}
    for (method, mode), (ops, written, host) in HOST_GOALS.items():
        row = by_key.get((method, mode))
        if row is None:
            continue
        if ops is not None:
            lines.append(f"goal {method}/{mode} <= {ops} extra ops per merging layer: "
                         f"{verdict(float(row['extra_ops_per_layer']), ops)}")
        elif (("tome", mode)) in by_key:
            ratio = float(row["extra_ops_per_layer"]) / float(by_key["tome", mode]["extra_ops_per_layer"])
            lines.append(f"goal {method}/{mode} extra ops <= {PITOME_TPS_OPS}x tome's: {verdict(ratio, PITOME_TPS_OPS)}")
        lines.append(f"goal {method}/{mode} bytes written <= {written}x unmerged: "
                     f"{verdict(float(row['bytes_ratio']), written)}")
        lines.append(f"goal {method}/{mode} host time <= {host}x unmerged: {verdict(float(row['host_ratio']), host)}")
    return lines


def run(out_dir: Optional[Path] = None, quick: bool = False, batch: int = 1, repeats: int = 5,
        sections=("time", "ops")) -> List[Dict[str, object]]:
    """Rows: N, C, method, layer_ms, merge_ms, fraction (merge / layer); then the op-count rows."""
    rows = time_rows(quick, batch, repeats) if "time" in sections else []
    return rows + (host_rows(quick, repeats) if "host" in sections or "ops" in sections else [])


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
        parts += [f"VideoMAE-base, bf16, batch 1, TargetFlops(0.5), meta device; unmerged: {counted[0]['base_ops']} "
                  "ops per forward", markdown_table(counted, HOST_COLUMNS), "\n".join(host_goal_lines(counted))]
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
    parser.add_argument("--sections", nargs="+", default=["time", "host"], choices=["time", "host", "ops"],
                        help="time: the matchers against one layer (CPU); host (or ops): ops, bytes written and host "
                             "time of a VideoMAE-base forward on the meta device")
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
