"""Tag audio with AST, with and without token merging, and tag a long recording window by window.

    python examples/audio_tagging.py                        # offline demo (see below)
    python examples/audio_tagging.py --model MIT/ast-finetuned-audioset-10-10-0.4593 --audio dog.wav \\
        --flops 0.5 --method tome --time-mode adjacent --visualize merged.png

Part 1, a short clip: prints the top-5 tags of the unmerged model (input padded to 10.24 s, as transformers
runs it) and of the merged model (tokens merged to ``--flops`` of the FLOPs; padded columns kept, never merged
with real ones, or with ``--drop-padding`` dropped first: faster on a short clip, but it changes the
predictions, see the README), the tokens each layer sees, GFLOPs (torch.utils.flop_counter, via mmmerge.count_flops) and the
wall-clock speedup (the two models run alternately; median of the per-pair ratios); with ``--columns`` also
per-time-column scores of the top tag.

Part 2, a long recording (``--long-seconds``, default 30 s; or ``--audio`` when it is longer than the model's
10.24 s): ``audio.tag_windows`` runs the merged model on windows of 10.24 s, half a window apart (``--hop``),
the last window padded as in part 1, and prints each window's top tag and a per-second timeline of the
recording's top tag.

With no --model it runs offline: AST-base is built from its config with RANDOM weights (so its tags
mean nothing; the token counts, FLOPs and speedup are real), and with no --audio it writes synthetic clips
(tones, chirps and noise bursts) with soundfile and reads them back with load_audio.

Needs the audio extra (soundfile, torchaudio): pip install -e ".[audio]".
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import mmmerge
from mmmerge.adapters import audio
from mmmerge.extras import model_folder_problem, require

REPO = Path(__file__).resolve().parent.parent
PROG = Path(__file__).name


class InputError(Exception):
    """Bad input found before any model runs: printed as one line, exit status 2."""


def write_sample_clip(path: Path, seconds: float = 4.0, rate: int = 22050, seed: int = 0) -> Path:
    """A clip with a steady 440 Hz tone, a rising chirp and noise bursts every 1.3 s, written as WAV."""
    sf = require("soundfile", "the example's generated clip")
    t = torch.arange(int(seconds * rate)) / rate
    tone = 0.2 * torch.sin(2 * math.pi * 440 * t)
    chirp = 0.2 * torch.sin(2 * math.pi * (200 * t + 400 * (t % 4.0) ** 2))  # rises again every 4 s
    noise = 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    bursts = ((t % 1.3) < 0.15).float() * noise
    sf.write(str(path), (tone + chirp + bursts).numpy(), rate)
    return path


def check_model_folder(name: Optional[str]) -> None:
    """A ``--model`` that names a path must be a model folder (hub ids such as ``org/name`` go to transformers).

    Raises InputError (one line) for a path with no folder, or a folder with no config.json, before anything loads.
    """
    problem = model_folder_problem(name)
    if problem:
        raise InputError(problem)


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


def side_by_side():
    """benchmarks.timing.SideBySide: the project's interleaved timer (median of per-pair ratios)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.timing import SideBySide

    return SideBySide


def top5(logits: torch.Tensor, labels: Dict[int, str]) -> List[str]:
    probs = logits.sigmoid()[0]  # AudioSet tagging is multi-label
    values, indices = probs.topk(min(5, probs.numel()))
    return [f"{labels.get(int(i), str(int(i)))} ({float(p):.3f})" for p, i in zip(values, indices)]


def read_audio(args, tmp: Path) -> Tuple[torch.Tensor, int, str, torch.Tensor, str]:
    """The short clip and the long recording (waveforms at 16 kHz) with their descriptions.

    Raises InputError (one line) for a missing, unreadable or damaged ``--audio``.
    """
    try:
        if args.audio:
            waveform, rate = audio.load_audio(args.audio)
        else:
            waveform, rate = audio.load_audio(write_sample_clip(tmp / "sample.wav"))
        long_wave, long_what = None, ""  # part 2's recording when --audio fits in one window (run decides)
        if args.long_seconds > 0:
            long_wave, _ = audio.load_audio(write_sample_clip(tmp / "long.wav", args.long_seconds, seed=1))
            long_what = f"a generated {args.long_seconds:g} s recording (tone, rising chirps, noise bursts)"
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise InputError(f"--audio {args.audio}: {err}" if args.audio else str(err)) from None
    if waveform.shape[0] < audio.FRAME_SAMPLES:  # rate is 16 kHz here: load_audio resampled it
        raise InputError(f"--audio {args.audio}: {1000 * waveform.shape[0] / rate:.0f} ms of audio; AST needs at "
                         f"least one 25 ms fbank frame ({audio.FRAME_SAMPLES} samples at 16 kHz)")
    what = f"{args.audio}" if args.audio else "a generated 4 s sample clip"
    return waveform, rate, what, long_wave, long_what


def check_args(args) -> None:
    """Option values, checked before anything loads."""
    if args.flops is not None and not 0 < args.flops <= 1:
        raise InputError(f"--flops must be a fraction of the unmerged FLOPs in (0, 1], got {args.flops}")
    if args.r is not None and args.r < 0:
        raise InputError(f"--r must be >= 0, got {args.r}")
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.long_seconds < 0 or not math.isfinite(args.long_seconds):
        raise InputError(f"--long-seconds must be >= 0 (0 skips part 2), got {args.long_seconds}")
    if args.hop is not None and not args.hop > 0:
        raise InputError(f"--hop must be > 0 seconds, got {args.hop}")
    if args.audio and not Path(args.audio).is_file():
        raise InputError(f"--audio {args.audio}: no such file")
    check_model_folder(args.model)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub name or local directory (default: AST-base, random weights)")
    parser.add_argument("--audio", help="WAV/FLAC/OGG file (default: a generated 4 s sample clip)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--r", type=int, help="tokens merged per layer")
    budget.add_argument("--flops", type=float,
                        help="target fraction of the FLOPs (of the real columns with --drop-padding; default 0.5)")
    parser.add_argument("--method", default="tome", choices=["tome", "pitome", "tps", "random", "prune"])
    parser.add_argument("--time-mode", default="global", help="global, same_band, adjacent, window or window(k)")
    parser.add_argument("--window", type=int, default=4, help="columns per window for --time-mode window")
    parser.add_argument("--within-band", action="store_true", help="also never merge across frequency bands")
    parser.add_argument("--drop-padding", action="store_true",
                        help="drop the padded columns before layer 0 (faster on short clips; changes the predictions)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="timed (merged, unmerged) pairs (the median ratio is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU the steadiest ratio)")
    parser.add_argument("--columns", action="store_true", help="print per-time-column scores of the top tag")
    parser.add_argument("--long-seconds", type=float, default=30.0,
                        help="length of the generated long recording for part 2 (0 skips it)")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between window starts in part 2 (default: half the model's window)")
    parser.add_argument("--visualize", metavar="PNG", help="save a picture of the merged groups")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def check_hop(args) -> None:
    """``--hop`` against the model's window (from its config alone, before any weights load)."""
    if args.hop is None:
        return
    from transformers import ASTConfig, AutoConfig

    config = ASTConfig() if args.model is None else AutoConfig.from_pretrained(args.model)
    window_seconds = config.max_length * audio.HOP_SECONDS  # 10.24 s for AST-base
    if args.hop > window_seconds:
        raise InputError(f"--hop must be at most one window of this model ({window_seconds:g} s), got {args.hop}")


def run(args) -> int:
    check_args(args)
    check_hop(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        waveform, rate, what, long_wave, long_what = read_audio(args, Path(tmp))

    model, described = load_model(args.model, args.attn)
    config = model.config
    print(f"model: {described}")
    window = audio.FRAME_SAMPLES + (config.max_length - 1) * audio.HOP_SAMPLES  # samples of max_length frames
    if args.audio and waveform.shape[0] > window:  # a long --audio is part 2's recording itself
        long_wave, long_what = waveform, f"{args.audio}, {waveform.shape[0] / rate:.1f} s"
    clip = waveform[:window]  # part 1 tags the first window; part 2 the whole recording
    mean, std = normalisation(args.model)
    x, lengths = audio.features(clip, rate, num_mel_bins=config.num_mel_bins, max_length=config.max_length,
                                mean=mean, std=std)
    first = " (its first window)" if clip.shape[0] < waveform.shape[0] else ""
    print(f"audio: {what}{first}, {clip.shape[0] / rate:.2f} s -> {int(lengths[0])} of {config.max_length} "
          "frames real")
    labels = {int(k): v for k, v in (config.id2label or {}).items()}

    unmerged = copy.deepcopy(model)  # timed side by side with the patched model
    spec = args.r if args.r is not None else mmmerge.TargetFlops(args.flops if args.flops is not None else 0.5)
    try:  # patch validates everything first (infeasible r, unknown time mode) and leaves the model as it was
        time_mode = f"window({args.window})" if args.time_mode == "window" else args.time_mode
        audio.patch(model, r=spec, method=args.method, time_mode=time_mode, within_band=args.within_band,
                    lengths=lengths, drop_padding=args.drop_padding, trace_source=True)
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None
    with torch.no_grad():
        base_logits, base_gflops = run_and_count(unmerged, x)
        merged_logits, merged_gflops = run_and_count(model, x)
        info = mmmerge.last_info(model)
        timing = side_by_side()(lambda: unmerged(input_values=x)).compare(lambda: model(input_values=x), args.repeats)

    print(f"\nmerging: method={args.method} time_mode={time_mode} within_band={args.within_band} "
          f"padding={'dropped' if args.drop_padding else 'kept (invalid)'}; r per layer={info.schedule}")
    print(f"tokens per layer: {info.tokens_per_layer}")
    print(f"\n{'':10}{'unmerged (padded input)':>44}{'merged':>44}")
    for i, (a, b) in enumerate(zip(top5(base_logits, labels), top5(merged_logits, labels))):
        print(f"top-{i + 1:<6}{a:>44}{b:>44}")
    print(f"top-1 unchanged: {int(base_logits.argmax()) == int(merged_logits.argmax())}")
    print(f"\nGFLOPs: {base_gflops:.1f} -> {merged_gflops:.1f} ({merged_gflops / base_gflops:.0%} of unmerged)")
    print(f"timed: forward passes on this one clip, merged and unmerged alternately, {args.repeats} pairs after one "
          f"warm-up each, {torch.get_num_threads()} torch thread(s)")
    print(f"speedup {timing['speedup']:.2f}x (median of the {args.repeats} per-pair ratios); median time "
          f"{timing['base_ms']:.0f} ms -> {timing['ms']:.0f} ms (absolute times vary with the machine's load)")
    if args.columns:
        with torch.no_grad():
            _, columns = audio.column_logits(model, x)
        top = int(merged_logits.argmax())
        seconds = audio.patched_layout(model).column_seconds()
        scores = columns[0, :, top].sigmoid()
        print(f"\nper-column score of '{labels.get(top, top)}':")
        print("  ".join(f"{float(s[0]):.1f}s:{float(v):.2f}" for s, v in zip(seconds, scores)))
    if args.visualize:
        audio.visualize(x[0], info, model=model).save(args.visualize)
        print(f"saved the merged groups to {args.visualize}")

    if long_wave is not None:
        tags = audio.tag_windows(model, long_wave, 16000, hop_seconds=args.hop, mean=mean, std=std)
        last, full = int(tags.columns[-1]), audio.ast_layout(model).full_columns
        if int(tags.lengths[-1]) == config.max_length:
            ending = "every window is full"
        elif last < full:
            ending = (f"the last holds {int(tags.lengths[-1]) * audio.HOP_SECONDS:.2f} s, and its encoder saw {last} of {full} "
                      f"columns ({tags.tokens_per_layer[-1][0]} tokens: its padding dropped)")
        else:
            ending = f"the last holds {int(tags.lengths[-1]) * audio.HOP_SECONDS:.2f} s; its padded columns stay, never merged"
        print(f"\nlong recording: {long_what}")
        print(f"audio.tag_windows: {len(tags.starts)} windows of {tags.window_seconds:.2f} s, {tags.hop_seconds:.2f} s "
              f"apart, through the merged model; {ending}")
        for start, window_logits, tokens in zip(tags.starts, tags.logits, tags.tokens_per_layer):
            top = int(window_logits.argmax())
            print(f"  window at {float(start):5.2f} s: top tag {labels.get(top, top)} "
                  f"({float(window_logits[top].sigmoid()):.3f}); tokens per layer {tokens[0]} -> {tokens[-1]}")
        top = int(tags.scores.argmax())
        print(f"recording's top tag: {labels.get(top, top)} ({float(tags.scores[top]):.3f}); its score per second:")
        print("  ".join(f"{s}s:{float(v):.2f}" for s, v in enumerate(tags.timeline[:, top])))
    if args.model is None:
        print("note: random weights, so the tags above are meaningless; token counts, FLOPs and speed are real.")
    mmmerge.unpatch(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
