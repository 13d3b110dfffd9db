"""Quality against cost: every method and time mode on the trained reference models.

    python -m benchmarks quality --out benchmarks/results     # full sweep (about 25 min on 2 CPU cores)
    python -m benchmarks quality --quick --out /tmp/q          # smoke run: 128 clips, 50% FLOPs only

For each reference model in ``benchmarks/reference/`` (``python -m benchmarks.train_reference --all``) and
its held-out clips (``benchmarks.tasks``, seed ``train_reference.TEST_SEED``), every method
(tome, pitome, tps, random, prune) in every time mode at every FLOPs target (``mmmerge.TargetFlops``:
the smallest constant r whose estimated encoder FLOPs are at most that fraction; where a constant r cannot
reach it, the mildest keep-ratio schedule that does, see ``schedule_for``) is measured for:
    accuracy        top-1 accuracy on the held-out clips (``acc_drop``: points lost against the unmerged model)
    agreement       share of clips whose top-1 class equals the unmerged model's
    kl              mean KL(unmerged || merged) of the softmax over classes, in nats
    gflops          FLOPs of one clip (torch's counter, ``mmmerge.count_flops``), and ``flops_ratio``
    speedup         wall time of the unmerged model over the merged one on a batch of 32 clips: the median
                    of ``TIME_PAIRS`` per-pair ratios, each pair run back to back (``SideBySide.compare``,
                    so load that drifts during the sweep cancels), 1 thread
Models: ViViT and VideoMAE on the video order task (time modes global, within_frame, adjacent,
window(2) = blocks of two tubelets), AST on the audio order task (global, same_band, adjacent,
window(4) = blocks of four columns). Plots: one PNG per model, accuracy against measured speedup,
one panel per time mode, one line per method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import mmmerge

from . import results
from .timing import SideBySide

MODELS = ("videomae", "vivit", "ast")
# Reference models of other tasks than the order tasks (``benchmarks.time_quality`` sweeps them).
TASK_NAMES = {"videomae_when": "video which-first"}
METHODS = ("tome", "pitome", "tps", "random", "prune")
TIME_MODES = {"video": ("global", "within_frame", "adjacent", "window(2)"),
              "audio": ("global", "same_band", "adjacent", "window(4)")}
FRACTIONS = (0.75, 0.5, 0.35)
THREADS = 1  # on a shared CPU more threads are slower and much noisier (OpenMP oversubscription)
TIME_BATCH = 32
TIME_PAIRS = 5  # merged/unmerged pairs timed per setting


def adapter_for(name: str):
    """(modality, adapter module) of a reference model; the audio adapter may not exist yet."""
    if name.startswith("ast"):
        from mmmerge.adapters import audio

        return "audio", audio
    from mmmerge.adapters import video

    return "video", video


def layout_of(model):
    modality, adapter = adapter_for(model_name(model))
    return adapter.ast_layout(model) if modality == "audio" else adapter.video_layout(model)


def model_name(model) -> str:
    name = type(model).__name__
    return "ast" if name.startswith("AST") else "vivit" if name.startswith("Vivit") else "videomae"


def schedule_for(model, fraction: float, method: str, time_mode: str) -> Tuple[List[int], str]:
    """Per-layer r meeting ``fraction`` of the encoder FLOPs under ``time_mode``, and a short description.

    The adapter's own ``TargetFlops``: the smallest constant r that every layer can always take under the
    time mode, else the mildest keep-ratio schedule; ValueError when no feasible schedule reaches it.
    """
    import mmmerge

    mmmerge.patch(model, r=mmmerge.TargetFlops(fraction), method=method, time_mode=time_mode)
    schedule = mmmerge.last_info(model).schedule
    mmmerge.unpatch(model)
    return schedule, f"const r={schedule[0]}" if len(set(schedule)) == 1 else f"keep-ratio: r={schedule}"


@torch.no_grad()
def logits_of(model, x: torch.Tensor, key: str, batch: int = 128) -> torch.Tensor:
    return torch.cat([model(**{key: x[i:i + batch]}).logits.float() for i in range(0, len(x), batch)])


def compare(logits: torch.Tensor, base: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """accuracy, agreement (top-1 equal to the unmerged model) and KL(base || merged) in nats."""
    pred, ref = logits.argmax(-1), base.argmax(-1)
    log_p, log_q = base.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return {"accuracy": float((pred == labels).float().mean()), "agreement": float((pred == ref).float().mean()),
            "kl": float(kl)}


def settings(modality: str, quick: bool) -> List[Tuple[str, str, float]]:
    modes = TIME_MODES[modality]
    fractions = (0.5,) if quick else FRACTIONS
    methods = ("tome", "random") if quick else METHODS
    return [(m, t, f) for f in fractions for t in modes for m in methods]


def run(out_dir: Optional[Path] = None, quick: bool = False, progress: Any = None,
        models: Sequence[str] = MODELS, clips: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows: model, task, method, time_mode, target, r, final_tokens, gflops, flops_ratio, accuracy, acc_drop,
    agreement, kl, ms, speedup; one ``method == "none"`` row per model (the unmerged reference)."""
    from .train_reference import REFERENCE_DIR, load_reference, test_set

    torch.set_num_threads(THREADS)
    clips = clips or (128 if quick else 1024)
    plan: List[Tuple[str, List[Tuple[str, str, float]]]] = []
    skipped: List[str] = []
    for name in models:
        if not (REFERENCE_DIR / name / "model.safetensors").is_file():
            raise FileNotFoundError(f"no reference model '{name}' in {REFERENCE_DIR}: run "
                                    f"python -m benchmarks.train_reference {name}")
        try:
            modality, _ = adapter_for(name)
        except ImportError as err:
            skipped.append(f"{name}: adapter not importable ({err})")
            continue
        plan.append((name, settings(modality, quick)))
    if progress is not None:
        progress.reset(total=sum(len(s) + 1 for _, s in plan))
    rows: List[Dict[str, Any]] = []
    for name, grid in plan:
        modality, adapter = adapter_for(name)
        key = "input_values" if modality == "audio" else "pixel_values"
        model = load_reference(name)
        reference = load_reference(name)
        x, labels = test_set(name, clips)
        x_time = x[:TIME_BATCH]
        if progress is not None:
            progress.set_postfix_str(f"{name} unmerged")
        base_logits = logits_of(reference, x, key)
        base_flops = mmmerge.count_flops(reference, **{key: x[:1]})
        timer = SideBySide(lambda: reference(**{key: x_time}))
        tokens = layout_of(model).num_tokens
        task = TASK_NAMES.get(name, f"{modality} order")
        base_row = {"model": name, "task": task, "method": "none", "time_mode": "-", "target": 1.0,
                    "r": 0, "tokens": tokens, "final_tokens": tokens, "gflops": base_flops / 1e9,
                    "flops_ratio": 1.0, **compare(base_logits, base_logits, labels)}
        rows.append(base_row)
        if progress is not None:
            progress.update(1)
        model_rows = []
        for method, mode, fraction in grid:
            if progress is not None:
                progress.set_postfix_str(f"{name} {method} {mode} {fraction}")
            row: Dict[str, Any] = {"model": name, "task": task, "method": method, "time_mode": mode,
                                   "target": fraction, "tokens": tokens}
            try:
                spec, row["schedule"] = schedule_for(model, fraction, method, mode)
                adapter.patch(model, r=spec, method=method, time_mode=mode)
            except ValueError as err:
                row["note"] = f"infeasible: {err}"
                model_rows.append(row)
                if progress is not None:
                    progress.update(1)
                continue
            torch.manual_seed(0)  # the random baseline draws from the global generator
            try:
                logits = logits_of(model, x, key)
            except RuntimeError as err:  # never expected (an accepted patch runs for every input): shown, not hidden
                row["note"] = f"failed: {str(err).splitlines()[0]}"
                mmmerge.unpatch(model)
                model_rows.append(row)
                if progress is not None:
                    progress.update(1)
                continue
            info = mmmerge.last_info(model)
            flops = mmmerge.count_flops(model, **{key: x[:1]})
            torch.manual_seed(0)
            timed = timer.compare(lambda: model(**{key: x_time}), 1 if quick else TIME_PAIRS)
            row.update({"r": info.schedule[0], "final_tokens": info.tokens_out,
                        "gflops": flops / 1e9, "flops_ratio": flops / base_flops,
                        **compare(logits, base_logits, labels), "ms": timed["ms"], "speedup": timed["speedup"]})
            mmmerge.unpatch(model)
            model_rows.append(row)
            if progress is not None:
                progress.update(1)
        base_ms = timer.baseline_median * 1e3
        base_row.update({"ms": base_ms, "speedup": 1.0, "acc_drop": 0.0})
        for row in model_rows:
            if "ms" in row:
                row["acc_drop"] = 100.0 * (base_row["accuracy"] - row["accuracy"])
        rows += model_rows
    for note in skipped:
        rows.append({"model": note.split(":")[0], "method": "-", "note": note})
    return rows


COLUMNS = ["model", "method", "time_mode", "target", "schedule", "final_tokens", "gflops", "flops_ratio", "accuracy",
           "acc_drop", "agreement", "kl", "ms", "speedup", "note"]


def best(rows: Sequence[Dict[str, Any]], model: str, target: float) -> Optional[Dict[str, Any]]:
    """The most faithful row for ``model`` at FLOPs ``target``: highest agreement with the unmerged model,
    then lowest KL, then highest accuracy (accuracy alone rewards lucky flips on held-out clips)."""
    cands = [r for r in rows if r.get("model") == model and r.get("target") == target and "accuracy" in r
             and r.get("method") != "none"]
    return max(cands, key=lambda r: (r["agreement"], -r["kl"], r["accuracy"])) if cands else None


def summary(rows: Sequence[Dict[str, Any]], targets: Sequence[float] = (0.5, 0.35)) -> str:
    """Markdown: per model and target, accuracy (drop) for every method x time mode, and the best."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("method") == "none"):
        base = next(r for r in rows if r.get("model") == model and r.get("method") == "none")
        out.append(f"### {model}: unmerged accuracy {100 * base['accuracy']:.1f}% on {base['tokens']} tokens, "
                   f"{base['gflops']:.3f} GFLOPs per clip\n")
        for target in targets:
            sub = [r for r in rows if r.get("model") == model and r.get("target") == target]
            if not sub:
                continue
            modes = list(dict.fromkeys(r["time_mode"] for r in sub))
            methods = list(dict.fromkeys(r["method"] for r in sub))
            out.append(f"**{int(round(100 * target))}% of the baseline FLOPs**: accuracy % (points lost), "
                       "agreement with the unmerged model %, speedup\n")
            out.append("| method | " + " | ".join(modes) + " |")
            out.append("|---|" + "---|" * len(modes))
            for m in methods:
                cells = []
                for t in modes:
                    r = next((r for r in sub if r["method"] == m and r["time_mode"] == t), None)
                    if r is None or "accuracy" not in r:
                        cells.append(("failed" if "failed" in r.get("note", "") else "infeasible")
                                     if r is not None else "")
                    else:
                        cells.append(f"{100 * r['accuracy']:.1f} ({r['acc_drop']:+.1f}), "
                                     f"{100 * r['agreement']:.1f}, {r['speedup']:.2f}x")
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            b = best(rows, model, target)
            if b is not None:
                out.append(f"\nBest: {b['method']} / {b['time_mode']}: {100 * b['accuracy']:.1f}% "
                           f"(change {-b['acc_drop']:+.1f} points), agreement {100 * b['agreement']:.1f}%, KL {b['kl']:.2e}, "
                           f"{b['flops_ratio']:.2f} of the FLOPs, {b['speedup']:.2f}x measured\n")
    return "\n".join(out) + "\n"


def report(rows: Sequence[Dict[str, Any]]) -> str:
    notes = [r["note"] for r in rows if r.get("method") == "-" and r.get("note")]
    text = ("Accuracy vs cost of every method and time mode on the reference models (`benchmarks/reference/`), "
            "held-out clips of the procedural order tasks (`benchmarks/tasks.py`). Speedup: batch of "
            f"{TIME_BATCH} clips, {THREADS} CPU thread(s), timed side by side with the unmerged model.\n\n")
    if notes:
        text += "Not measured: " + "; ".join(notes) + "\n\n"
    text += "## Summary\n\n" + summary(rows) + "\n## All rows\n\n" + results.markdown_table(rows, COLUMNS)
    return text


def plot(rows: Sequence[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """One PNG per model: accuracy (top) and agreement (bottom) against measured speedup."""
    paths: List[Path] = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("method") == "none"):
        sub = [r for r in rows if r.get("model") == model and r.get("method") not in ("none", "-")]
        base = next(r for r in rows if r.get("model") == model and r.get("method") == "none")
        paths.append(results.plot_lines(
            sub, Path(out_dir) / f"quality_{model}.png", x="speedup", y="accuracy", line="method", panel="time_mode",
            title=f"{model}: accuracy and agreement vs measured speedup (FLOPs targets {FRACTIONS}, joined in order)",
            xlabel="measured speedup (x)", reference=base,
            extra_panels_y=("agreement",), order="flops_ratio"))
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    from .__main__ import run_suite

    for p in run_suite("quality", args.out, quick=args.quick):
        print(p)
