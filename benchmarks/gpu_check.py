"""The prepared GPU check: one run, one JSON, within a time budget (run it through benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check --out results/gpu_check.json [--budget 330] [--quick]

Sections, in this order (each recorded, and skipped with the reason when the budget runs short):
    kernels    the fused steps' Triton kernels against their PyTorch references (``mmmerge.kernel_check``)
    merge_step one merge step alone at VideoMAE-base's first layer, fused vs engine path, batch 1 / 8 / 32
    sync       the merged forward under ``torch.cuda.set_sync_debug_mode("error")`` (VideoMAE every time mode and
               method, AST with padding, LLaVA-1.5 and LLaVA-NeXT reductions): any host sync raises
    videomae   VideoMAE-base (random weights, bf16, sdpa) unmerged vs TargetFlops(0.5) for tome global, pitome,
               tome within_frame and tps, eager at batch 1, 8, 32: the fused step and the engine path
               (``MMMERGE_FUSED=0``), the host's time to return at batch 1, and the ceiling rows (the unmerged
               model on half the frames); median of interleaved per-pair ratios, CUDA-event times
    llava      prefill of LLaVA-1.5-7B size (576 / 192 / 128 / 64 visual tokens) and LLaVA-NeXT-7B size
               (2880 / 640 / 320 / 160), random weights in bf16 built on the device; the reduction's share of
               the vision tower's time (benchmarks/llava.py)
    qwen       Qwen2.5-VL-7B size prefill at keep 1.0 / 0.5 / 0.25 / 0.125 and the reduction's share of the tower
    videomae_compiled  compiled at 32 and CUDA graphs (mode="reduce-overhead") at 1, as the budget allows
Goals (issue 19): eager batch 32 >= 1.7x, batch 8 >= 1.1x, batch 1 >= 0.9x; compiled batch 32 >= 1.8x; CUDA
graphs batch 1 >= 1.3x (``VIDEO_GOALS``). LLaVA (issue 20): see benchmarks/llava.py.
``--quick`` runs every section on tiny models (CPU works too), to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

import mmmerge
from mmmerge.adapters import audio, llava

from .timing import machine


class Budget:
    """Seconds left of the run; sections ask before they start what they need."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _cuda_seconds(fn: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3
    start_t = time.perf_counter()
    fn()
    return time.perf_counter() - start_t


def paired(base: Callable[[], Any], variant: Callable[[], Any], repeats: int) -> Dict[str, float]:
    """Interleaved pairs after two warm-ups each: medians and the median of per-pair ratios base / variant."""
    for _ in range(2):
        base(), variant()
    b, v = [], []
    for _ in range(repeats):
        b.append(_cuda_seconds(base))
        v.append(_cuda_seconds(variant))
    return {"base_ms": statistics.median(b) * 1e3, "merged_ms": statistics.median(v) * 1e3,
            "speedup": statistics.median(x / y for x, y in zip(b, v))}


# ------------------------------------------------------------------------------------------------ sync
@torch.no_grad()
def sync_section(device: torch.device, quick: bool) -> List[Dict[str, Any]]:
    """Merged forwards under sync debug mode "error": a host sync anywhere raises."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    rows = []
    cfg = VideoMAEConfig(image_size=64, patch_size=16, num_frames=8, tubelet_size=2, hidden_size=64,
                         num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=5)
    cfg._attn_implementation = "sdpa"
    model = VideoMAEForVideoClassification(cfg).eval().to(device, torch.bfloat16 if device.type == "cuda" else None)
    x = torch.randn(2, 8, 3, 64, 64, device=device, dtype=next(model.parameters()).dtype)
    checks: List[tuple] = [(m, t) for m in ("tome", "pitome", "tps", "random", "prune", "divprune", "cdpruner", "none")
                           for t in ("global", "within_frame", "adjacent", "window(2)")]
    checks += [("dominant", t) for t in ("global", "adjacent")]  # dominant takes no per-group budgets
    for method, mode in checks:
        options = {"generator": torch.Generator(device=device).manual_seed(0)} if method == "random" else {}
        mmmerge.patch(model, r=0 if method == "none" else 3, method=method, time_mode=mode, **options)
        model(pixel_values=x)  # warm-up outside the debug mode (allocator, kernels)
        rows.append(_under_sync_debug(f"videomae {method}/{mode}", lambda: model(pixel_values=x)))
    from transformers import ASTConfig, ASTForAudioClassification

    acfg = ASTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                     max_length=256, num_mel_bins=64, num_labels=4)
    acfg._attn_implementation = "sdpa"
    ast = ASTForAudioClassification(acfg).eval().to(device)
    spec = torch.randn(2, 256, 64, device=device)
    for mode in ("global", "same_band", "adjacent"):
        audio.patch(ast, r=3, method="tome", time_mode=mode, lengths=[256, 150], drop_padding=False)
        ast(input_values=spec)
        rows.append(_under_sync_debug(f"ast tome/{mode} padded", lambda: ast(input_values=spec)))
    # LLaVA: the tower and the reduction (get_image_features). A whole LLaVA forward always syncs once: transformers
    # checks the placeholder total on the host (the adapter's per-run check feeds that check, no read of its own).
    # LLaVA-NeXT reads image sizes on the host (keep them there); tests/test_llava_simulated_cuda.py covers it.
    from .llava import Workload, build

    lm = build("quick", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    work = Workload(lm, device, next(lm.parameters()).dtype)
    for method in ("tome", "dominant", "tps", "divprune"):
        work.patch(max(work.full // 4, 8), method=method)
        lm.model.get_image_features(**work.pixels)
        rows.append(_under_sync_debug(f"llava-1.5 get_image_features {method}",
                                      lambda: lm.model.get_image_features(**work.pixels)))
    llava.restore_visual_tokens(lm)
    return rows


def _under_sync_debug(name: str, fn: Callable[[], Any]) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        fn()
        return {"check": name, "ok": None, "note": "no CUDA: ran without the sync debug mode"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return {"check": name, "ok": True}
    except Exception as err:  # the first sync raises: record it
        torch.cuda.set_sync_debug_mode("default")
        return {"check": name, "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}


# -------------------------------------------------------------------------------------------- VideoMAE
VIDEO_SETTINGS = (("tome", "global"), ("pitome", "global"), ("tome", "within_frame"), ("tps", "global"))
# Issue 19's goals, unmerged / merged: (batch, mode) -> speedup (the ceiling measured by the half-token rows).
VIDEO_GOALS = {(32, "eager"): 1.7, (8, "eager"): 1.1, (1, "eager"): 0.9, (32, "compiled (default)"): 1.8,
               (1, "compiled (reduce-overhead)"): 1.3}


def _host_seconds(fn: Callable[[], Any]) -> float:
    """Time to return from the call (what the host spends launching it), then wait for the GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seconds


class VideoModels:
    """VideoMAE-base for kinetics (random weights, bf16, sdpa): the unmerged model, a merged copy (the fused step
    where it applies), an engine-path copy (``MMMERGE_FUSED=0``: every step in PyTorch ops) and the unmerged model
    on half the frames (the ceiling: half the tokens in every layer, no merge ops)."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        cfg = VideoMAEConfig(num_hidden_layers=4, image_size=64) if quick else VideoMAEConfig(num_labels=400)
        cfg._attn_implementation = "sdpa"
        self.cfg, self.device = cfg, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        self.base = VideoMAEForVideoClassification(cfg).eval().to(device, self.dtype)
        self.merged = VideoMAEForVideoClassification(cfg).eval().to(device, self.dtype)
        self.merged.load_state_dict(self.base.state_dict())
        self.engine = VideoMAEForVideoClassification(cfg).eval().to(device, self.dtype)
        self.engine.load_state_dict(self.base.state_dict())
        half = VideoMAEForVideoClassification(VideoMAEConfig(**{**cfg.to_dict(), "num_frames": cfg.num_frames // 2}))
        half.config._attn_implementation = "sdpa"
        self.half = half.eval().to(device, self.dtype)
        self.half.load_state_dict(self.base.state_dict(), strict=False)  # position tables differ; speed only
        self.batches = (1, 2) if quick else (1, 8, 32)

    def clip(self, batch: int, frames: Optional[int] = None) -> torch.Tensor:
        size = self.cfg.image_size
        return torch.randn(batch, frames or self.cfg.num_frames, 3, size, size, device=self.device, dtype=self.dtype)

    def patch(self, method: str, mode: str) -> None:
        import os

        mmmerge.patch(self.merged, r=mmmerge.TargetFlops(0.5), method=method, time_mode=mode)
        os.environ["MMMERGE_FUSED"] = "0"  # read at patch time
        try:
            mmmerge.patch(self.engine, r=mmmerge.TargetFlops(0.5), method=method, time_mode=mode)
        finally:
            os.environ.pop("MMMERGE_FUSED")


def _adder(rows: List[Dict[str, Any]], record: Callable[[Dict[str, Any]], None]) -> Callable[[Dict[str, Any]], None]:
    def add(row: Dict[str, Any]) -> None:
        goal = VIDEO_GOALS.get((row.get("batch"), row.get("mode")))
        if goal is not None and "speedup" in row and row.get("setting") != "ceiling" and row.get("path") != "engine":
            row["goal"], row["met"] = goal, row["speedup"] >= goal
        rows.append(row)
        record(row)
    return add


def _fused_state(model: torch.nn.Module) -> Dict[str, Any]:
    """Which merging layers take the fused step, and any kernel that fell back to its PyTorch reference."""
    from mmmerge import fused

    layers = [m._mmmerge.fused is not None for m in model.modules() if hasattr(m, "_mmmerge")]
    return {"fused_layers": sum(layers), "patched_layers": len(layers), "kernel_fallbacks": dict(fused._FAILED)}


@torch.no_grad()
def videomae_section(models: VideoModels, repeats: int, record: Callable[[Dict[str, Any]], None]
                     ) -> List[Dict[str, Any]]:
    """Eager rows: the ceiling at every batch; then for each of ``VIDEO_SETTINGS`` and batch, unmerged vs merged
    (the fused step) and unmerged vs the engine path, with the host's time to return at batch 1. ``record`` is
    called after every row (one failing row loses nothing)."""
    rows: List[Dict[str, Any]] = []
    add = _adder(rows, record)
    m = models
    for batch in m.batches:
        try:
            x, xh = m.clip(batch), m.clip(batch, m.cfg.num_frames // 2)
            add({"setting": "ceiling", "batch": batch, "mode": "eager",
                 **paired(lambda: m.base(pixel_values=x), lambda: m.half(pixel_values=xh), repeats)})
        except Exception as err:
            add({"setting": "ceiling", "batch": batch, "error": f"{type(err).__name__}: {err}"[:400]})
    for method, mode in VIDEO_SETTINGS:
        setting = f"{method}/{mode}"
        try:
            m.patch(method, mode)
        except Exception as err:
            add({"setting": setting, "error": f"patch: {type(err).__name__}: {err}"[:400]})
            continue
        for batch in m.batches:
            x = m.clip(batch)
            for path, model in (("fused", m.merged), ("engine", m.engine)):
                try:
                    flops = mmmerge.count_flops(model, pixel_values=x) / mmmerge.count_flops(m.base, pixel_values=x)
                    add({"setting": setting, "path": path, "batch": batch, "mode": "eager", "flops_ratio": flops,
                         **paired(lambda: m.base(pixel_values=x), lambda: model(pixel_values=x), repeats),
                         **(_fused_state(model) if path == "fused" else {})})
                    if batch == 1:
                        host = [(_host_seconds(lambda: m.base(pixel_values=x)), _host_seconds(lambda: model(pixel_values=x)))
                                for _ in range(repeats)]
                        add({"setting": setting, "path": path, "batch": 1, "mode": "host time to return",
                             "base_ms": statistics.median(b for b, _ in host) * 1e3,
                             "merged_ms": statistics.median(t for _, t in host) * 1e3,
                             "ratio_merged_over_unmerged": statistics.median(t / b for b, t in host)})
                except Exception as err:
                    add({"setting": setting, "path": path, "batch": batch, "mode": "eager",
                         "error": f"{type(err).__name__}: {err}"[:400]})
        try:  # the fused and the engine path give the same model up to bf16 rounding
            x = m.clip(2)
            diff = (m.merged(pixel_values=x).logits.float() - m.engine(pixel_values=x).logits.float()).abs().max()
            add({"setting": setting, "mode": "fused vs engine logits", "max_abs_diff": float(diff)})
        except Exception as err:
            add({"setting": setting, "mode": "fused vs engine logits", "error": f"{type(err).__name__}: {err}"[:400]})
    return rows


@torch.no_grad()
def videomae_compiled_section(models: VideoModels, budget: Budget, repeats: int,
                              record: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
    """Compiled rows, while the budget lasts (each compile takes tens of seconds): ``torch.compile`` (default) at
    the largest batch and CUDA graphs (``mode="reduce-overhead"``) at batch 1, unmerged vs merged, for each of
    ``VIDEO_SETTINGS`` in order; the unmerged model is compiled once per mode."""
    rows: List[Dict[str, Any]] = []
    add = _adder(rows, record)
    m = models
    compiled_base: Dict[str, Any] = {}
    for method, mode in VIDEO_SETTINGS:
        setting = f"{method}/{mode}"
        m.patch(method, mode)
        for batch, compile_mode in ((m.batches[-1], "default"), (1, "reduce-overhead")):
            name = f"compiled ({compile_mode})"
            if budget.left() < 45:
                add({"setting": setting, "batch": batch, "mode": name, "skipped": "time budget"})
                continue
            try:
                x = m.clip(batch)
                if compile_mode not in compiled_base:
                    compiled_base[compile_mode] = torch.compile(m.base, mode=compile_mode, fullgraph=True, dynamic=False)
                cb = compiled_base[compile_mode]
                cm = torch.compile(m.merged, mode=compile_mode, fullgraph=True, dynamic=False)
                # Clone the outputs of CUDA-graph replays so a later replay cannot overwrite what is compared.
                add({"setting": setting, "batch": batch, "mode": name,
                     **paired(lambda: cb(pixel_values=x).logits.clone(), lambda: cm(pixel_values=x).logits.clone(),
                              repeats)})
                torch.testing.assert_close(cm(pixel_values=x).logits.float(), m.merged(pixel_values=x).logits.float(),
                                           atol=2e-2, rtol=2e-2)  # bf16: compiled equals eager
            except Exception as err:
                add({"setting": setting, "batch": batch, "mode": name, "error": f"{type(err).__name__}: {err}"[:400]})
    return rows


@torch.no_grad()
def merge_step_section(device: torch.device, quick: bool, repeats: int) -> List[Dict[str, Any]]:
    """One merge step alone (VideoMAE-base's first layer: N=1568, C=768, metric width 64, r=120; bf16 tokens), the
    fused step against the engine path, interleaved: device time (CUDA events) and the host's time to return."""
    from mmmerge import fused
    from mmmerge.methods import get_matcher
    from mmmerge.merge import merge_tokens

    N, C, D, r = (64, 32, 16, 8) if quick else (1568, 768, 64, 120)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: List[Dict[str, Any]] = []
    for method in ("tome", "pitome", "tps"):
        choose = fused.fused_choice(method, {}, 0, N, 1, True, False, False, 0, 12)
        tables = {k: v.to(device) for k, v in fused.fused_tables(method, N, r, mmmerge.GroupTables()).items()}
        for batch in ((1, 2) if quick else (1, 8, 32)):
            try:
                x = torch.randn(batch, N, C, device=device, dtype=dtype)
                metric = torch.randn(batch, N, D, device=device)
                state = mmmerge.init_state(batch, N, device=device, trace_source=False)
                matcher = get_matcher(method)

                def engine() -> Any:
                    return merge_tokens(x, state, matcher(metric, state, r))

                def fused_step() -> Any:
                    return fused.fused_step(x, state, metric, choose, tables["fused_ids"], tables["fused_sel"])

                timed = paired(engine, fused_step, repeats)
                host = [(_host_seconds(engine), _host_seconds(fused_step)) for _ in range(repeats)]
                rows.append({"method": method, "batch": batch, "engine_ms": timed["base_ms"],
                             "fused_ms": timed["merged_ms"], "speedup": timed["speedup"],
                             "engine_host_ms": statistics.median(e for e, _ in host) * 1e3,
                             "fused_host_ms": statistics.median(f for _, f in host) * 1e3,
                             "kernel_fallbacks": dict(fused._FAILED)})
            except Exception as err:
                rows.append({"method": method, "batch": batch, "error": f"{type(err).__name__}: {err}"[:400]})
    return rows


def kernels_section(device: torch.device) -> List[Dict[str, Any]]:
    """The fused steps' Triton kernels against their PyTorch references (``mmmerge.kernel_check``)."""
    if device.type != "cuda":
        return [{"check": "kernels", "skipped": "no CUDA (the tests run them in Triton's interpreter)"}]
    import contextlib
    import io

    from mmmerge import kernel_check

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kernel_check.main(["--device", "cuda"])
    return [{"check": "kernels", "ok": code == 0, "output": out.getvalue()[-3000:]}]


# ------------------------------------------------------------------------------------------------ LLaVA
def llava_section(quick: bool, repeats: int, budget: Budget) -> List[Dict[str, Any]]:
    from . import llava as bench

    rows: List[Dict[str, Any]] = []
    for size in (("quick", "next-quick") if quick else ("7b", "next-7b")):
        if budget.left() < 60 and not quick:
            rows.append({"size": size, "skipped": "time budget"})
            continue
        try:
            rows += bench.run(size=size, repeats=repeats, threads=None, sections=("prefill", "reduction"))
        except Exception as err:
            rows.append({"size": size, "error": f"{type(err).__name__}: {err}"[:400]})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def qwen_section(quick: bool, repeats: int, budget: Budget) -> List[Dict[str, Any]]:
    """Qwen2.5-VL-7B size (bf16, random weights): prefill at keep 1.0 / 0.5 / 0.25 / 0.125 and the reduction's
    share of the tower (benchmarks/qwen_vl.py)."""
    from . import qwen_vl as bench

    if budget.left() < 60 and not quick:
        return [{"size": "7b", "skipped": "time budget"}]
    try:
        return bench.run(size="quick" if quick else "7b", repeats=repeats)
    except Exception as err:
        return [{"size": "7b", "error": f"{type(err).__name__}: {err}"[:400]}]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all sections together")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny models: check the script itself (CPU too)")
    sections = ["kernels", "merge_step", "sync", "videomae", "llava", "qwen", "videomae_compiled"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget)
    result: Dict[str, Any] = {"machine": machine(), "device": torch.cuda.get_device_name() if device.type == "cuda"
                              else "cpu", "quick": args.quick, "sections": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    def write() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    models: Optional[VideoModels] = None
    for name in args.sections:
        start = time.monotonic()
        partial: List[Dict[str, Any]] = []
        result["sections"][name] = {"rows": partial, "seconds": None}

        def record(row: Dict[str, Any]) -> None:
            partial.append(row)
            write()

        try:
            if name == "kernels":
                rows = kernels_section(device)
            elif name == "merge_step":
                rows = merge_step_section(device, args.quick, args.repeats)
            elif name == "sync":
                rows = sync_section(device, args.quick)
            elif name in ("videomae", "videomae_compiled"):
                if models is None:
                    models = VideoModels(device, args.quick)
                rows = (videomae_section(models, args.repeats, record) if name == "videomae"
                        else videomae_compiled_section(models, budget, args.repeats, record))
            elif name == "llava":
                rows = llava_section(args.quick, min(args.repeats, 5), budget)
            else:
                rows = qwen_section(args.quick, min(args.repeats, 5), budget)
            result["sections"][name] = {"rows": rows, "seconds": time.monotonic() - start}
        except Exception:
            result["sections"][name] = {"rows": partial, "error": traceback.format_exc()[-2000:],
                                        "seconds": time.monotonic() - start}
        write()  # after every section (and every VideoMAE row): a partial result survives a failure
        print(f"{name}: {time.monotonic() - start:.0f} s, {budget.left():.0f} s left", flush=True)
    print(json.dumps(result, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
