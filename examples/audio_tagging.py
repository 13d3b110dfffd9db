"""Tag an audio clip with AST, with and without token merging, and show what merging bought.

    python examples/audio_tagging.py                        # offline demo (see below)
    python examples/audio_tagging.py --model MIT/ast-finetuned-audioset-10-10-0.4593 --audio dog.wav \\
        --flops 0.5 --method tome --time-mode adjacent --visualize merged.png

Prints the top-5 tags of the unmerged model (input padded to 10.24 s, as transformers runs it) and of
the merged model (padded columns dropped, then tokens merged to ``--flops`` of the remaining FLOPs),
the tokens each layer sees, GFLOPs (torch.utils.flop_counter, via mmmerge.count_flops) and the
wall-clock speedup measured side by side; with ``--columns`` also per-time-column scores of the top tag.

With no --model it runs offline: AST-base is built from its config with RANDOM weights (so its tags
mean nothing; the token counts, FLOPs and speedup are real), and with no --audio it writes a short
synthetic clip (tone, chirp and noise bursts) with soundfile and reads it back with load_audio.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import mmmerge
from mmmerge.adapters import audio


def write_sample_clip(path: Path, seconds: float = 4.0, rate: int = 22050) -> Path:
    """A clip with a steady 440 Hz tone, a rising chirp and three noise bursts, written as WAV."""
    import soundfile as sf

    t = torch.arange(int(seconds * rate)) / rate
    tone = 0.2 * torch.sin(2 * math.pi * 440 * t)
    chirp = 0.2 * torch.sin(2 * math.pi * (200 * t + 400 * t ** 2))
    noise = 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    bursts = ((t % 1.3) < 0.15).float() * noise
    sf.write(str(path), (tone + chirp + bursts).numpy(), rate)
    return path


def load_model(name: Optional[str], attn: str):
    """An AST classifier from a hub name or local directory, or AST-base from its config (random weights)."""
    from transformers import ASTConfig, ASTForAudioClassification, AutoModelForAudioClassification

    if name is None:
        config = ASTConfig(num_labels=527)  # the AudioSet AST-base shape: 128 mel bins x 1024 frames, 1214 tokens
        config._attn_implementation = attn
        torch.manual_seed(0)
        return ASTForAudioClassification(config).eval(), "AST-base built from its config (RANDOM weights)"
    model = AutoModelForAudioClassification.from_pretrained(name, attn_implementation=attn).eval()
    return model, f"{type(model).__name__} from {name}"


def normalisation(name: Optional[str]) -> Tuple[float, float]:
    """Mean and std of the model's feature extractor, else AST's AudioSet values."""
    if name is not None:
        try:
            from transformers import AutoFeatureExtractor
            extractor = AutoFeatureExtractor.from_pretrained(name)
            return float(extractor.mean), float(extractor.std)
        except Exception:  # no extractor saved with the model: AudioSet statistics are AST's default
            pass
    return audio.AST_MEAN, audio.AST_STD


def run_and_count(model, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Logits ``[B, labels]`` and GFLOPs of one forward."""
    seen: Dict[str, torch.Tensor] = {}
    flops = mmmerge.count_flops(lambda: seen.__setitem__("logits", model(input_values=x).logits))
    return seen["logits"], flops / 1e9


def time_all(fns: List, repeats: int) -> List[float]:
    """Median seconds of each callable, measured interleaved (callers warm them up first)."""
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def top5(logits: torch.Tensor, labels: Dict[int, str]) -> List[str]:
    probs = logits.sigmoid()[0]  # AudioSet tagging is multi-label
    values, indices = probs.topk(min(5, probs.numel()))
    return [f"{labels.get(int(i), str(int(i)))} ({float(p):.3f})" for p, i in zip(values, indices)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub name or local directory (default: AST-base, random weights)")
    parser.add_argument("--audio", help="WAV/FLAC/OGG file (default: a generated 4 s sample clip)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--r", type=int, help="tokens merged per layer")
    budget.add_argument("--flops", type=float, help="target fraction of the padding-free FLOPs (default 0.5)")
    parser.add_argument("--method", default="tome", choices=["tome", "pitome", "tps", "random", "prune"])
    parser.add_argument("--time-mode", default="global", help="global, same_band, adjacent, window or window(k)")
    parser.add_argument("--window", type=int, default=4, help="columns per window for --time-mode window")
    parser.add_argument("--within-band", action="store_true", help="also never merge across frequency bands")
    parser.add_argument("--keep-padding", action="store_true", help="mark padded columns invalid, do not drop them")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per model (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--columns", action="store_true", help="print per-time-column scores of the top tag")
    parser.add_argument("--visualize", metavar="PNG", help="save a picture of the merged groups")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, described = load_model(args.model, args.attn)
    config = model.config
    print(f"model: {described}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.audio) if args.audio else write_sample_clip(Path(tmp) / "sample.wav")
        try:
            waveform, rate = audio.load_audio(path)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"--audio: {err}")
    mean, std = normalisation(args.model)
    x, lengths = audio.features(waveform, rate, num_mel_bins=config.num_mel_bins, max_length=config.max_length,
                                mean=mean, std=std)
    print(f"audio: {'generated sample clip' if not args.audio else path}, {waveform.shape[0] / rate:.2f} s "
          f"-> {int(lengths[0])} of {config.max_length} frames real")
    labels = {int(k): v for k, v in (config.id2label or {}).items()}

    unmerged = copy.deepcopy(model)  # timed side by side with the patched model
    spec = args.r if args.r is not None else mmmerge.TargetFlops(args.flops if args.flops is not None else 0.5)
    try:  # patch validates everything first (infeasible r, unknown time mode) and leaves the model as it was
        time_mode = f"window({args.window})" if args.time_mode == "window" else args.time_mode
        audio.patch(model, r=spec, method=args.method, time_mode=time_mode, within_band=args.within_band, lengths=lengths, drop_padding=not args.keep_padding,
                    trace_source=bool(args.visualize or args.columns))
    except ValueError as err:
        parser.error(str(err))
    with torch.no_grad():
        base_logits, base_gflops = run_and_count(unmerged, x)
        merged_logits, merged_gflops = run_and_count(model, x)
        info = mmmerge.last_info(model)
        t_base, t_merged = time_all([lambda: unmerged(input_values=x), lambda: model(input_values=x)], args.repeats)

    print(f"\nmerging: method={args.method} time_mode={args.time_mode} within_band={args.within_band} "
          f"padding={'kept (invalid)' if args.keep_padding else 'dropped'}; r per layer={info.schedule}")
    print(f"tokens per layer: {info.tokens_per_layer}")
    print(f"\n{'':10}{'unmerged (padded input)':>44}{'merged':>44}")
    for i, (a, b) in enumerate(zip(top5(base_logits, labels), top5(merged_logits, labels))):
        print(f"top-{i + 1:<6}{a:>44}{b:>44}")
    print(f"\nGFLOPs: {base_gflops:.1f} -> {merged_gflops:.1f} ({merged_gflops / base_gflops:.0%} of unmerged)")
    print(f"time:   {t_base * 1e3:.0f} ms -> {t_merged * 1e3:.0f} ms, speedup {t_base / t_merged:.2f}x (median of "
          f"{args.repeats}, side by side, {torch.get_num_threads()} threads; the CPU may be shared, so it is noisy)")
    print(f"top-1 unchanged: {int(base_logits.argmax()) == int(merged_logits.argmax())}")
    if args.columns:
        with torch.no_grad():
            _, columns = audio.column_logits(model, x)
        top = int(merged_logits.argmax())
        seconds = audio.patched_layout(model).column_seconds()
        scores = columns[0, :, top].sigmoid()
        print(f"\nper-column score of '{labels.get(top, top)}':")
        print("  ".join(f"{float(s[0]):.1f}s:{float(v):.2f}" for s, v in zip(seconds, scores)))
    if args.model is None:
        print("note: random weights, so the tags above are meaningless; token counts, FLOPs and speed are real.")
    if args.visualize:
        audio.visualize(x[0], info, model=model).save(args.visualize)
        print(f"saved the merged groups to {args.visualize}")
    mmmerge.unpatch(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
