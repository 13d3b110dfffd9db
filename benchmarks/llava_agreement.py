"""Do bf16 and compiled runs of a reduced LLaVA choose what fp32 eager chooses? (issue 20's agreement goal)

    python -m benchmarks.llava_agreement                 # tome at keep 16 of 144, 1024 held-out questions
    python -m benchmarks.llava_agreement --methods tome pitome --keep 16 --questions 512
    python -m benchmarks.llava_agreement --methods pitome --preset official

On the reference LLaVA (``benchmarks/reference/llava``) it answers the held-out questions four ways, each for the
unreduced model and for the reduced one: fp32 eager, bf16 eager and bf16 compiled (``torch.compile``, inductor).
Top-1 agreement of bf16 with fp32 and of compiled with eager, for the unreduced model (the floor: what precision
and compilation change without any reduction) and for each reduced one. Goal: within 2 points of the floor. The
reduction scores in float32 (the metric is made in float32 from the keys), so a bf16 or compiled run chooses the
tokens an fp32 run chooses except where the bf16 activations themselves differ.
"""
from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Optional, Sequence

import torch

from .llava_quality import answers_of
from .timing import markdown_table

GOAL_POINTS = 2.0


def _answers(model, pixels, questions, tokens, dtype, compiled: bool) -> torch.Tensor:
    run = torch.compile(model) if compiled else model
    return answers_of(run, pixels.to(dtype), questions, tokens, batch=128)


def run(methods: Sequence[str] = ("tome",), keep: int = 16, questions: int = 1024,
        options: Optional[Dict[str, object]] = None) -> List[Dict[str, object]]:
    """Rows: method (``none`` = unreduced), bf16-vs-fp32 and compiled-vs-eager top-1 agreement. ``options``: matcher
    options for every method (e.g. ``{"preset": "official"}``)."""
    from mmmerge.adapters import llava

    from .train_reference import load_reference, vqa_test_set

    pixels, qs, _, _ = vqa_test_set(questions)
    rows = []
    for method in ("none",) + tuple(methods):
        answers: Dict[str, torch.Tensor] = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = load_reference("llava").eval().to(dtype)
            tokens = 144
            if method != "none":
                llava.reduce_visual_tokens(model, keep=keep, method=method, **(options or {}))
                tokens = keep
            answers[f"{dtype}"] = _answers(model, pixels, qs, tokens, dtype, compiled=False)
            if dtype == torch.bfloat16:
                torch._dynamo.reset()
                answers["compiled"] = _answers(copy.deepcopy(model), pixels, qs, tokens, dtype, compiled=True)
        fp32, bf16 = answers[f"{torch.float32}"], answers[f"{torch.bfloat16}"]
        rows.append({"method": method, "keep": keep if method != "none" else 144, "questions": questions,
                     "bf16_vs_fp32": float((bf16 == fp32).float().mean()),
                     "compiled_vs_eager": float((answers["compiled"] == bf16).float().mean())})
    return rows


def goal_lines(rows: List[Dict[str, object]]) -> List[str]:
    floor = rows[0]
    lines = []
    for row in rows[1:]:
        for key in ("bf16_vs_fp32", "compiled_vs_eager"):
            gap = 100 * (float(floor[key]) - float(row[key]))  # type: ignore[arg-type]
            lines.append(f"goal {row['method']} {key} within {GOAL_POINTS:.0f} points of the unreduced floor "
                         f"({100 * float(floor[key]):.1f}%): {100 * float(row[key]):.1f}%, {gap:+.1f} points "
                         f"({'met' if gap <= GOAL_POINTS else 'MISSED'})")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["tome"])
    parser.add_argument("--keep", type=int, default=16)
    parser.add_argument("--questions", type=int, default=1024)
    parser.add_argument("--preset", help="a matcher preset for every method (pitome, tps: paper / official ...)")
    args = parser.parse_args(argv)
    rows = run(args.methods, args.keep, args.questions, {"preset": args.preset} if args.preset else None)
    print(markdown_table(rows, ["method", "keep", "questions", "bf16_vs_fp32", "compiled_vs_eager"]))
    print("\n".join(goal_lines(rows)))


if __name__ == "__main__":
    main()
