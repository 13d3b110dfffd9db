"""Accuracy of every visual-token reduction method on the reference LLaVA, with the prefill speedup.

    python -m benchmarks llava_quality --out benchmarks/results     # full sweep (held-out 2048 questions)
    python -m benchmarks llava_quality --quick --out /tmp/lq          # smoke run: 256 questions, keep 16 only

The reference LLaVA (``benchmarks/reference/llava/``, ``python -m benchmarks.train_reference llava``) answers
single-token visual questions about 48 x 48 scenes of 144 visual tokens, one shape per token
(``benchmarks.tasks.vqa_*``: the colour at a named cell, how many shapes of a colour, whether a unique shape is
in the left half). For every method of ``mmmerge.adapters.llava.reduce_visual_tokens`` (tome, pitome, tps,
dominant, divprune, cdpruner, random, prune) at ``KEEPS`` visual tokens (11%, 22% and 33% of 144) it measures:
    accuracy        top-1 answer accuracy on held-out questions, overall and per question kind
    agreement       share of questions answered as the keep-all model answers them
    speedup         prefill time (tower, reduction, projector, LM over the prompt, last-token logits) of a
                    batch of ``TIME_BATCH`` prompts, keep-all over reduced, timed side by side in one process,
                    interleaved (``timing.SideBySide``), 1 thread
The keep-all model is the same checkpoint unpatched (``method == "none"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import results, tasks
from .timing import SideBySide

METHODS = ("tome", "pitome", "tps", "dominant", "divprune", "cdpruner", "random", "prune")
# Variants that say where a method's accuracy comes from: the papers' dropping of unselected tokens (instead of
# merging them into their nearest kept token), and CDPruner without its query (plain DPP diversity).
VARIANTS = ("divprune/drop", "cdpruner/drop", "cdpruner/noquery")
KEEPS = (16, 32, 48)  # of 144 visual tokens: about 11%, 22%, 33% (64 / 128 / 192 of 576 for LLaVA-1.5)
THREADS = 1
TIME_BATCH = 32
QUESTIONS = 2048


@torch.no_grad()
def answers_of(model, pixels: torch.Tensor, questions: torch.Tensor, image_tokens: int,
               batch: int = 256) -> torch.Tensor:
    """Predicted answer ids ``[n]``: ``model(input_ids, pixel_values)`` with ``image_tokens`` placeholders."""
    out = []
    for i in range(0, len(pixels), batch):
        ids = tasks.vqa_input_ids(questions[i:i + batch], image_tokens)
        out.append(model(input_ids=ids, pixel_values=pixels[i:i + batch], logits_to_keep=1).logits[:, -1].argmax(-1))
    return torch.cat(out)


def scores(pred: torch.Tensor, base: torch.Tensor, answers: torch.Tensor, kinds: torch.Tensor) -> Dict[str, float]:
    """accuracy (overall and ``acc_<kind>``) and agreement with the keep-all answers."""
    ok = (pred == answers).float()
    row = {"accuracy": float(ok.mean()), "agreement": float((pred == base).float().mean())}
    for i, kind in enumerate(tasks.VQA_KINDS):
        row[f"acc_{kind}"] = float(ok[kinds == i].mean())
    return row


def patch_method(model, keep: int, name: str) -> None:
    """``reduce_visual_tokens`` for a method or a variant ``method/drop`` / ``cdpruner/noquery``."""
    from mmmerge.adapters import llava

    method, _, variant = name.partition("/")
    options = {"drop_unselected": True} if variant == "drop" else {}
    llava.reduce_visual_tokens(model, keep=keep, method=method, **options)
    if variant == "noquery":  # a pre-hook after the adapter's: forget the prompt it holds for this call
        model.model.register_forward_pre_hook(_forget_prompt)


def _forget_prompt(*_) -> None:
    from mmmerge.adapters import llava

    llava.context.CALL.prompt = None  # the adapter's per-thread slot of this call's prompt


def unpatch_method(model) -> None:
    """Undo ``patch_method`` (the adapter's patch and the no-query hook)."""
    from mmmerge.adapters import llava

    llava.restore_visual_tokens(model)
    hooks = model.model._forward_pre_hooks
    for key in [k for k, h in hooks.items() if h is _forget_prompt]:
        del hooks[key]


def run(out_dir: Optional[Path] = None, quick: bool = False, progress: Any = None,
        methods: Sequence[str] = METHODS + VARIANTS, keeps: Sequence[int] = KEEPS, questions: Optional[int] = None,
        repeats: int = 5) -> List[Dict[str, Any]]:
    """Rows: method, keep, keep_share, accuracy, acc_<kind>, agreement, acc_drop, ms, speedup; the first row is
    the keep-all model (``method == "none"``)."""
    from mmmerge.adapters import llava

    from .train_reference import REFERENCE_DIR, load_reference, vqa_test_set

    if not (REFERENCE_DIR / "llava" / "model.safetensors").is_file():
        raise FileNotFoundError(f"no reference LLaVA in {REFERENCE_DIR / 'llava'}: run "
                                "python -m benchmarks.train_reference llava")
    torch.set_num_threads(THREADS)
    n = questions or (256 if quick else QUESTIONS)
    keeps = keeps[:1] if quick else keeps
    repeats = 1 if quick else repeats
    grid = [(m, k) for k in keeps for m in methods]
    if progress is not None:
        progress.reset(total=len(grid) + 1)
    model, reference = load_reference("llava"), load_reference("llava")
    pixels, question_ids, answers, kinds = vqa_test_set(n)
    full = tasks.VQA_GRID ** 2
    base = answers_of(reference, pixels, question_ids, full)
    t_pixels, t_ids_full = pixels[:TIME_BATCH], tasks.vqa_input_ids(question_ids[:TIME_BATCH], full)
    timer = SideBySide(lambda: reference(input_ids=t_ids_full, pixel_values=t_pixels, logits_to_keep=1))
    rows: List[Dict[str, Any]] = [{"method": "none", "keep": full, "keep_share": 1.0,
                                   **scores(base, base, answers, kinds)}]
    if progress is not None:
        progress.update(1)
    with torch.no_grad():
        for method, keep in grid:
            if progress is not None:
                progress.set_postfix_str(f"{method} keep={keep}")
            patch_method(model, keep, method)
            torch.manual_seed(0)  # the random baseline draws from the global generator
            pred = answers_of(model, pixels, question_ids, keep)
            t_ids = tasks.vqa_input_ids(question_ids[:TIME_BATCH], keep)
            torch.manual_seed(0)
            timed = timer.compare(lambda: model(input_ids=t_ids, pixel_values=t_pixels, logits_to_keep=1), repeats)
            unpatch_method(model)
            rows.append({"method": method, "keep": keep, "keep_share": keep / full,
                         **scores(pred, base, answers, kinds), "ms": timed["ms"], "base_ms": timed["base_ms"],
                         "speedup": timed["speedup"]})
            if progress is not None:
                progress.update(1)
    rows[0].update({"ms": timer.baseline_median * 1e3, "speedup": 1.0})
    for row in rows:
        row["acc_drop"] = 100.0 * (rows[0]["accuracy"] - row["accuracy"])
    return rows


COLUMNS = ["method", "keep", "keep_share", "accuracy", "acc_drop", "acc_colour", "acc_count", "acc_left", "agreement",
           "ms", "speedup"]


def summary(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: accuracy % (points lost) / agreement % / speedup for every method x keep, and the ranking."""
    base = next(r for r in rows if r["method"] == "none")
    keeps = sorted({r["keep"] for r in rows if r["method"] != "none"})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    out = [f"Keep-all: {100 * base['accuracy']:.1f}% on {base['keep']} visual tokens (colour "
           f"{100 * base['acc_colour']:.1f}%, count {100 * base['acc_count']:.1f}%, "
           f"left half {100 * base['acc_left']:.1f}%), "
           f"prefill {base['ms']:.1f} ms for {TIME_BATCH} prompts.\n",
           "Accuracy % (points lost against keep-all), agreement with keep-all %, measured prefill speedup:\n",
           "| method | " + " | ".join(f"keep {k} ({100 * k / base['keep']:.0f}%)" for k in keeps) + " |",
           "|---|" + "---|" * len(keeps)]
    for m in methods:
        cells = []
        for k in keeps:
            r = next((r for r in rows if r["method"] == m and r["keep"] == k), None)
            cells.append("" if r is None else f"{100 * r['accuracy']:.1f} ({r['acc_drop']:+.1f}), "
                         f"{100 * r['agreement']:.1f}, {r['speedup']:.2f}x")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("\nPer question kind at the smallest keep (accuracy %: colour at a cell / count / in the left half):\n")
    out.append("| method | colour | count | left |")
    out.append("|---|---|---|---|")
    for m in methods:
        r = next((r for r in rows if r["method"] == m and r["keep"] == keeps[0]), None)
        if r is not None:
            out.append(f"| {m} | {100 * r['acc_colour']:.1f} | {100 * r['acc_count']:.1f} | "
                       f"{100 * r['acc_left']:.1f} |")
    ranking = sorted((r for r in rows if r["keep"] == keeps[0] and r["method"] != "none"),
                     key=lambda r: -r["accuracy"])
    out.append(f"\nRanking at keep {keeps[0]}: " + " > ".join(f"{r['method']} {100 * r['accuracy']:.1f}"
                                                          for r in ranking) + "\n")
    return "\n".join(out) + "\n"


def report(rows: Sequence[Dict[str, Any]]) -> str:
    text = ("Accuracy of every method on the reference LLaVA (`benchmarks/reference/llava/`), held-out questions of "
            "`benchmarks/tasks.py` (vqa). Speedup: prefill of a batch of "
            f"{TIME_BATCH} prompts, {THREADS} CPU thread(s), timed side by side with the keep-all model.\n\n")
    return text + "## Summary\n\n" + summary(rows) + "\n## All rows\n\n" + results.markdown_table(rows, COLUMNS)


def plot(rows: Sequence[Dict[str, Any]], out_dir: Path) -> List[Path]:
    """Accuracy (left) and measured prefill speedup (right) against the visual tokens kept, one line per method
    (variants dashed), keep-all as a star and a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "none")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        pts = sorted((r["keep"], r["accuracy"], r.get("speedup")) for r in rows if r["method"] == m)
        style = dict(color=colours[(methods.index(m.split("/")[0]) if "/" in m else i) % len(colours)],
                     linestyle="--" if "/" in m else "-", marker="osD^vP*X"[i % 8], label=m, markersize=5)
        axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], **style)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
    for ax, y, label in ((axes[0], 100 * base["accuracy"], "held-out accuracy (%)"),
                         (axes[1], 1.0, "prefill speedup over keep-all (x)")):
        ax.axhline(y, color="black", linestyle=":", linewidth=1)
        ax.plot([base["keep"]], [y], marker="*", color="black", markersize=11,
                label="keep-all" if ax is axes[0] else None)
        ax.set_xlabel(f"visual tokens kept (of {base['keep']})")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle("reference LLaVA: every method at 11%, 22% and 33% of the visual tokens")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path = Path(out_dir) / "llava_quality.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    from .__main__ import run_suite

    for p in run_suite("llava_quality", args.out, quick=args.quick):
        print(p)
