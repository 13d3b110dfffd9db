"""What dropping AST's padding changes: the reference AST on clips that are partly padding.

    python -m benchmarks padding --out benchmarks/results     # 1024 clips per length (about a minute on one CPU thread)
    python -m benchmarks padding --quick --out /tmp/padding   # smoke run: 128 clips per length

Clips of the reference audio task (``benchmarks/tasks.py``: a low and a high tone in some order, a chirp up or
down, a short or long gap) whose events all lie in the first ``real`` frames of the 256-frame window; the rest
of the window is cut off and padded as ``transformers.ASTFeatureExtractor`` pads (zero fbank frames, then
normalised), so ``real / 256`` of the input is sound and the rest padding. The labels stay exact: the events
are re-placed (not stretched) inside the real part, and clips whose tone pair does not fit are left out.

For each length, on the same clips:
  * ``unpadded``: the unpatched model on the whole 2.56 s clip (background noise continues, no padding);
  * ``padded``: the unpatched model on the padded input (what transformers runs); the reference for agreement;
  * ``keep``: ``audio.patch(r=0, lengths=..., drop_padding=False)``: padded columns stay (marked invalid);
  * ``drop``: ``audio.patch(r=0, lengths=..., drop_padding=True)``: padded columns are removed before layer 0;
  * ``keep + tome`` / ``drop + tome``: the same with tome at ``TargetFlops(0.5)`` (half of the encoder FLOPs of
    the columns each variant runs).
Rows: accuracy (true labels), top-1 agreement with ``padded``, the largest |logit difference| to ``padded``,
tokens entering layer 0 and GFLOPs per clip (torch's FLOP counter). Nothing is timed.

The reference AST was trained on full 2.56 s clips only: it never saw padding. So ``padded`` is itself an input
the model was not trained on, and ``drop`` (which shows it only real columns) can be more or less accurate than
``padded``; what ``drop`` certainly is not is the same model as transformers runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import tasks

REAL_FRAMES = (256, 192, 128)  # real fbank frames of the 256-frame window (100%, 75%, 50%)
FRACTION = 0.5  # the merged variants' TargetFlops
THREADS = 1
MODELS = ("ast", "ast_padded")
COLUMNS = ["model", "real_frames", "real_share", "variant", "clips", "tokens", "gflops", "accuracy", "agreement",
           "max_logit_diff"]


def fitted_params(n: int, real_frames: int, seed: int) -> tasks.Params:
    """``n`` task clip descriptions with all their events in the first ``real_frames`` frames, labels unchanged.

    Drawn with ``tasks.audio_params``; draws whose events need more frames are left out (at 128 frames this
    favours long gaps near the task's 0.35 s threshold), the others are re-placed inside the real part
    (``tasks.place_audio_events``).
    """
    g = torch.Generator().manual_seed(seed + 7)
    kept: List[tasks.Params] = []
    got, chunk = 0, 0
    while got < n:
        p = tasks.audio_params(4 * n, seed * 1000 + chunk)
        chunk += 1
        fits = tasks.needed_frames(p) <= real_frames
        p = {k: v[fits] for k, v in p.items()}
        m = int(fits.sum())
        kept.append(tasks.place_audio_events(p, torch.full((m,), real_frames), g))
        got += m
    return {k: torch.cat([p[k] for p in kept])[:n] for k in kept[0]}


def padded_batch(n: int, real_frames: int, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(unpadded [n, 256, 128], padded [n, 256, 128], labels [n])``: the same clips whole, and cut after
    ``real_frames`` frames then padded as ``ASTFeatureExtractor`` pads (zero fbank frames, normalised)."""
    p = fitted_params(n, real_frames, seed)
    whole = tasks.fbank(tasks.render_audio(p))
    return whole, tasks.pad_fbank(whole, torch.full((n,), real_frames)), tasks.audio_labels(p)


@torch.no_grad()
def _logits(model, x: Tensor, batch: int = 128) -> Tensor:
    return torch.cat([model(input_values=x[i:i + batch]).logits.float() for i in range(0, len(x), batch)])


def run(out_dir: Optional[Path] = None, quick: bool = False, progress: Any = None,
        real_frames: Sequence[int] = REAL_FRAMES, clips: Optional[int] = None,
        models: Sequence[str] = MODELS) -> List[Dict[str, Any]]:
    """One row per (model, real length, variant); see the module docstring."""
    from .train_reference import REFERENCE_DIR, TEST_SEED, load_reference

    torch.set_num_threads(THREADS)
    clips = clips or (128 if quick else 1024)
    missing = [name for name in models if not (REFERENCE_DIR / name / "model.safetensors").is_file()]
    if "ast" in missing:
        raise FileNotFoundError(f"no reference model 'ast' in {REFERENCE_DIR}: run python -m benchmarks.train_reference ast")
    present = [name for name in models if name not in missing]
    if progress is not None:
        progress.reset(total=len(present) * len(real_frames) * (2 + len(VARIANTS)))
    rows: List[Dict[str, Any]] = [{"model": name, "note": f"no reference model: python -m benchmarks.train_reference "
                                                          f"{name}"} for name in missing]
    for name in present:
        model = load_reference(name)
        for real in real_frames:
            whole, x, labels = padded_batch(clips, real, TEST_SEED + real)
            rows += measure(model, whole, x, labels, real, name, progress)
    return rows


VARIANTS = (("keep", False, 0.0), ("drop", True, 0.0), ("keep + tome", False, FRACTION),
            ("drop + tome", True, FRACTION))


def measure(model, whole: Tensor, x: Tensor, labels: Tensor, real: int, name: str,
            progress: Any = None) -> List[Dict[str, Any]]:
    """The rows of one model on one set of clips (``whole`` unpadded, ``x`` padded after ``real`` frames)."""
    import mmmerge
    from mmmerge.adapters import audio

    def row(variant: str, logits: Tensor, base: Tensor, tokens: int, flops: float) -> Dict[str, Any]:
        return {"model": name, "real_frames": real, "real_share": real / x.shape[1], "variant": variant,
                "clips": len(x), "tokens": tokens, "gflops": flops / 1e9,
                "accuracy": float((logits.argmax(-1) == labels).float().mean()),
                "agreement": float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
                "max_logit_diff": float((logits - base).abs().max())}

    mmmerge.unpatch(model)
    tokens = audio.ast_layout(model).num_tokens
    base = _logits(model, x)
    base_flops = mmmerge.count_flops(model, input_values=x[:1])
    rows = [row("unpadded", _logits(model, whole), base, tokens, base_flops),
            row("padded", base, base, tokens, base_flops)]
    if progress is not None:
        progress.update(2)
    for variant, drop, fraction in VARIANTS:
        if progress is not None:
            progress.set_postfix_str(f"{name} {real} frames {variant}")
        spec = mmmerge.TargetFlops(fraction) if fraction else 0
        audio.patch(model, r=spec, method="tome", lengths=real, drop_padding=drop)
        logits = _logits(model, x)
        seen = audio.patched_layout(model).num_tokens
        rows.append(row(variant, logits, base, seen, mmmerge.count_flops(model, input_values=x[:1])))
        mmmerge.unpatch(model)
        if progress is not None:
            progress.update(1)
    return rows


def report(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one table per real length (accuracy, agreement with the padded unpatched model, logit gap)."""
    lines = ["Clips with their events in the first `real` of 256 frames, the rest padding. `ast` was trained on "
             "unpadded clips only, `ast_padded` on half unpadded, half padded clips. Agreement and |logit diff| "
             "are against the unpatched model on the padded input (`padded`, what transformers runs).", ""]
    for row in rows:
        if "note" in row:
            lines += [f"**{row['model']}**: {row['note']}", ""]
    for name in dict.fromkeys(r["model"] for r in rows if "note" not in r):
        measured = [r for r in rows if r["model"] == name]
        for real in sorted({r["real_frames"] for r in measured}, reverse=True):
            part = [r for r in measured if r["real_frames"] == real]
            lines += [f"**{name}, {real} of 256 frames real ({100 * part[0]['real_share']:.0f}%)**, "
                      f"{part[0]['clips']} clips", "",
                      "| variant | tokens | GFLOPs | accuracy % | agreement % | max abs logit diff |",
                      "|---|---|---|---|---|---|"]
            for r in part:
                lines.append(f"| {r['variant']} | {r['tokens']} | {r['gflops']:.4f} | {100 * r['accuracy']:.1f} | "
                             f"{100 * r['agreement']:.1f} | {r['max_logit_diff']:.3g} |")
            lines.append("")
    return "\n".join(lines)
