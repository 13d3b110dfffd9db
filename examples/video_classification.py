"""Classify a video with and without token merging, and show what merging bought.

    python examples/video_classification.py                       # offline demo (see below)
    python examples/video_classification.py --model MCG-NJU/videomae-base-finetuned-kinetics \\
        --video my.mp4 --flops 0.5 --method tome --time-mode within_frame --visualize merged.png

Prints the top-5 labels of the unmerged and the merged model, the tokens each layer sees, GFLOPs
(counted by torch.utils.flop_counter, via mmmerge.count_flops) and the wall-clock speedup, measured on a
batch of clips with the two models run alternately (median of the per-pair ratios).

With no arguments it runs offline on the project's reference VideoMAE (benchmarks/reference/videomae,
4 layers, 8 frames of 32 x 32, trained from scratch on a generated task: which way a square moves and
which of two flashes comes first) and a freshly generated clip of that task, written to mp4 and read
back with decord, so the prediction is real and the true label is shown. Its speed is timed on a batch
of 64 clips of the task (the decoded clip and 63 more), where the model's compute, not per-call overhead,
sets the time. ``--random-base`` instead builds VideoMAE-base (1568 tokens) from its config with RANDOM
weights: meaningless labels, but the token counts, FLOPs and speedup of a real-size model.

Needs the video extra (decord, av, torchvision): pip install -e ".[video]".
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import mmmerge
from mmmerge.adapters import video
from mmmerge.extras import model_folder_problem, require

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "benchmarks" / "reference" / "videomae"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROG = Path(__file__).name


class InputError(Exception):
    """Bad input found before any model runs: printed as one line, exit status 2."""


def write_sample_clip(path: Path, frames: int = 48, fps: int = 12, size: int = 240) -> Path:
    """A clip of a red square moving right and a blue disc moving down, on a textured background."""
    av = require("av", "the example's generated clip")
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    background = (40 + 20 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.repeat(background[:, :, None], 3, axis=2)
            x0 = 10 + i * (size - 70) // frames
            image[90:150, x0:x0 + 50] = (220, 40, 40)
            cy, cx = 20 + i * (size - 60) // frames, 170
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 22 ** 2] = (40, 60, 220)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def task_module():
    """benchmarks.tasks: the reference models' generated task (part of the repository, not of the package)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import tasks

    return tasks


def write_task_clip(path: Path, seed: int) -> Tuple[Path, str]:
    """One clip of the reference models' task (benchmarks/tasks.py), upscaled 4x into an mp4; and its label."""
    av = require("av", "the example's generated clip")
    import numpy as np

    tasks = task_module()
    clips, labels = tasks.video_batch(1, seed)  # [1, T, 3, 32, 32] in [-1, 1]
    frames = ((clips[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)  # [T, 32, 32, 3]
    frames = frames.repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = frames.shape[1]
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, tasks.VIDEO_LABELS[int(labels[0])]


def check_model_folder(name: Optional[str]) -> None:
    """A ``--model`` that names a path must be a model folder (hub ids such as ``org/name`` go to transformers).

    Raises InputError (one line) for a path with no folder, or a folder with no config.json, before anything loads.
    """
    problem = model_folder_problem(name)
    if problem:
        raise InputError(problem)


def model_config(name: Optional[str], reference: bool):
    """The model's config, read before any weights load (the input checks need its frame count)."""
    from transformers import AutoConfig, VideoMAEConfig

    if reference:
        return AutoConfig.from_pretrained(str(REFERENCE))
    if name is None:
        return VideoMAEConfig(num_labels=400)  # the videomae-base-finetuned-kinetics shape: 16x224x224
    return AutoConfig.from_pretrained(name)


def load_model(name: Optional[str], config, attn: str):
    """A model from a hub name or local directory, or VideoMAE-base from its config (random weights)."""
    from transformers import AutoModelForVideoClassification, VideoMAEForVideoClassification

    if name is None:
        config._attn_implementation = attn
        torch.manual_seed(0)
        return VideoMAEForVideoClassification(config).eval(), "VideoMAE-base built from its config (RANDOM weights)"
    model = AutoModelForVideoClassification.from_pretrained(name, attn_implementation=attn).eval()
    return model, f"{type(model).__name__} from {name} ({model.config.num_frames} frames)"


def preprocess(frames: torch.Tensor, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 -> ``[1, T, 3, S, S]`` float: short side to S, centre crop, normalise (torchvision v2)."""
    v2 = require("torchvision.transforms.v2", "the example's clip preprocessing")
    tv_tensors = require("torchvision.tv_tensors", "the example's clip preprocessing")
    transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(image_size, antialias=True),
                            v2.CenterCrop(image_size), v2.Normalize(mean, std)])
    return transform(tv_tensors.Video(frames.permute(0, 3, 1, 2))).as_subclass(torch.Tensor).unsqueeze(0)


def processor_stats(name: Optional[str]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation the model was trained with (its image processor's), else ImageNet's."""
    if name is None:
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained(name)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:  # no processor saved with the model: ImageNet statistics are the ViViT/VideoMAE default
        return IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


def gflops(model, x: torch.Tensor) -> float:
    return mmmerge.count_flops(model, pixel_values=x) / 1e9


def side_by_side():
    """benchmarks.timing.SideBySide: the project's interleaved timer (median of per-pair ratios)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.timing import SideBySide

    return SideBySide


def top5(logits: torch.Tensor, labels: Dict[int, str]) -> List[str]:
    probs = logits.softmax(-1)[0]
    values, indices = probs.topk(min(5, probs.numel()))
    return [f"{labels.get(int(i), str(int(i)))} ({float(p):.3f})" for p, i in zip(values, indices)]


def read_clip(args, reference: bool, frames_needed: int, tmp: Path) -> Tuple[torch.Tensor, torch.Tensor, str, Optional[str]]:
    """The clip's frames ``[T, H, W, 3]``, timestamps ``[T]``, a description and its true label (if known).

    Reads ``--num-frames`` frames (default: the model's) and repeats them in time to the model's count.
    Raises InputError (one line) for a missing, undecodable, damaged or too short ``--video``.
    """
    read = args.num_frames or frames_needed
    truth = None
    try:
        if args.video:
            path, described = Path(args.video), args.video
        elif reference:
            path, truth = write_task_clip(tmp / "task.mp4", args.seed)
            described = f"a generated task clip (seed {args.seed})"
        else:
            path, described = write_sample_clip(tmp / "sample.mp4"), "a generated sample clip"
        frames, stamps = video.load_video(path, num_frames=read, sampling=args.sampling)
    except video.VideoTooShort as err:
        if args.num_frames:
            raise InputError(f"--video {args.video}: {err} (--num-frames)") from None
        raise InputError(f"--video {args.video}: the clip has {err.frames} frames and the model takes {frames_needed} "
                         f"({args.sampling} sampling needs {err.needed}): pass --num-frames {err.frames} (or fewer) "
                         f"to read {err.frames} frames and repeat them in time to {frames_needed}") from None
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise InputError(f"--video {args.video}: {err}" if args.video else str(err)) from None
    if read < frames_needed:  # hold each read frame for several model frames
        repeat = torch.linspace(0, read - 1, frames_needed).round().long()
        frames, stamps = frames[repeat], stamps[repeat]
        described += f", {read} frames read and repeated in time to the model's {frames_needed}"
    return frames, stamps, described, truth


def check_args(args) -> None:
    """Option values, checked before anything loads."""
    if args.flops is not None and not 0 < args.flops <= 1:
        raise InputError(f"--flops must be a fraction of the unmerged FLOPs in (0, 1], got {args.flops}")
    if args.r is not None and args.r < 0:
        raise InputError(f"--r must be >= 0, got {args.r}")
    for name in ("repeats", "threads", "batch", "num_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.video and not Path(args.video).is_file():
        raise InputError(f"--video {args.video}: no such file")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub name or local directory (default: the reference VideoMAE)")
    parser.add_argument("--random-base", action="store_true",
                        help="VideoMAE-base from its config with random weights (real-size speed, meaningless labels)")
    parser.add_argument("--seed", type=int, default=7, help="which generated task clip to classify")
    parser.add_argument("--video", help="path to a video file (default: a generated sample clip)")
    parser.add_argument("--num-frames", type=int,
                        help="frames to read from the video (default: the model's); fewer are repeated in time "
                             "to the model's count, for clips shorter than that")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--r", type=int, help="tokens merged per layer")
    budget.add_argument("--flops", type=float, help="target fraction of the unmerged FLOPs (default 0.5)")
    parser.add_argument("--method", default="tome", choices=["tome", "pitome", "tps", "random", "prune"])
    parser.add_argument("--time-mode", default="global", help="global, within_frame, adjacent, window or window(k)")
    parser.add_argument("--window", type=int, default=2, help="tubelets per window for --time-mode window")
    parser.add_argument("--sampling", default="uniform", choices=list(video.SAMPLINGS))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch", type=int,
                        help="clips per timed forward (default: 64 for the reference model, whose 256 tokens per "
                             "clip would otherwise time per-call overhead, 1 for real-size models)")
    parser.add_argument("--repeats", type=int, default=7, help="timed (merged, unmerged) pairs (the median ratio is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU the steadiest ratio)")
    parser.add_argument("--visualize", metavar="PNG", help="save a picture of the merged groups")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    check_args(args)
    torch.set_num_threads(args.threads)
    reference = args.model is None and not args.random_base
    if reference and not (REFERENCE / "model.safetensors").exists():
        raise InputError(f"the reference model is missing at {REFERENCE}; rebuild it with "
                         "`python -m benchmarks.train_reference videomae`, or pass --random-base or --model")
    check_model_folder(args.model)
    try:
        config = model_config(args.model, reference)
    except (OSError, ValueError) as err:  # no such hub name or directory, or not a model config
        raise InputError(f"--model {args.model}: {err}".splitlines()[0]) from None
    if args.num_frames and args.num_frames > config.num_frames:
        raise InputError(f"--num-frames {args.num_frames}: the model takes {config.num_frames} frames; pass at most that")
    with tempfile.TemporaryDirectory() as tmp:
        frames, stamps, source, truth = read_clip(args, reference, config.num_frames, Path(tmp))
    # The reference models take pixels scaled to [-1, 1]; hub models use their processor's statistics.
    mean, std = ((0.5,) * 3, (0.5,) * 3) if reference else processor_stats(args.model)
    try:
        x = preprocess(frames, config.image_size, mean, std)
    except ImportError as err:
        raise InputError(str(err)) from None

    model, described = load_model(str(REFERENCE) if reference else args.model, config, args.attn)
    if reference:
        described = "the reference VideoMAE (benchmarks/reference/videomae: trained here on the generated task)"
    print(f"model: {described}")
    print(f"video: {source}; {frames.shape[0]} frames ({args.sampling} sampling) between {float(stamps[0]):.2f} s "
          f"and {float(stamps[-1]):.2f} s")
    if truth is not None:
        print(f"true label: {truth}")
    labels = {int(k): v for k, v in (model.config.id2label or {}).items()}

    spec = args.r if args.r is not None else mmmerge.TargetFlops(args.flops if args.flops is not None else 0.5)
    unmerged = copy.deepcopy(model)  # timed side by side with the patched model
    base_logits = logits_of(model, x)
    base_flops = gflops(model, x)
    time_mode = f"window({args.window})" if args.time_mode == "window" else args.time_mode
    try:  # patch validates everything first (infeasible r, unknown time mode) and leaves the model as it was
        mmmerge.patch(model, r=spec, method=args.method, time_mode=time_mode, trace_source=bool(args.visualize),
                      timestamps=stamps)
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None
    merged_logits = logits_of(model, x)
    info = mmmerge.last_info(model)
    merged_flops = gflops(model, x)

    # The timed workload: a batch of clips, so the model's compute sets the time (one 256-token clip of the
    # reference model takes about a millisecond per layer, and per-call overhead would dominate).
    batch = args.batch or (64 if reference else 1)
    truth_batch = None
    if reference and batch > 1:
        more, more_labels = task_module().video_batch(batch - 1, args.seed + 1)  # [b-1, T, 3, 32, 32] in [-1, 1]
        timed = torch.cat([x, more])
        truth_batch = more_labels
        what = f"the decoded clip and {batch - 1} more generated task clips"
    else:
        timed = x.expand(batch, *x.shape[1:]).contiguous()
        what = "the decoded clip" + (f", {batch} copies" if batch > 1 else "")
    timing = side_by_side()(lambda: logits_of(unmerged, timed)).compare(lambda: logits_of(model, timed), args.repeats)

    print(f"\nmerging: method={args.method} time_mode={time_mode} r per layer={info.schedule}")
    print(f"tokens per layer: {info.tokens_per_layer}")
    print(f"\n{'':12}{'unmerged':>44}{'merged':>44}")
    for i, (a, b) in enumerate(zip(top5(base_logits, labels), top5(merged_logits, labels))):
        print(f"top-{i + 1:<7}{a:>44}{b:>44}")
    print(f"top-1 unchanged: {int(base_logits.argmax()) == int(merged_logits.argmax())}")
    print(f"\nGFLOPs per clip: {base_flops:.3g} -> {merged_flops:.3g} ({merged_flops / base_flops:.0%} of unmerged)")
    shape = "x".join(str(d) for d in x.shape[1:])
    print(f"timed: forward passes on a batch of {batch} clip(s) ({what}; {shape} each), merged and unmerged "
          f"alternately, {args.repeats} pairs after one warm-up each, {torch.get_num_threads()} torch thread(s)")
    print(f"speedup {timing['speedup']:.2f}x (median of the {args.repeats} per-pair ratios); median time per batch "
          f"{timing['base_ms']:.0f} ms -> {timing['ms']:.0f} ms (absolute times vary with the machine's load, the "
          "ratio much less)")
    if truth_batch is not None and truth is not None:
        with torch.no_grad():
            base_top, merged_top = logits_of(unmerged, timed).argmax(-1), logits_of(model, timed).argmax(-1)
        correct = torch.cat([torch.tensor([task_module().VIDEO_LABELS.index(truth)]), truth_batch])
        print(f"top-1 on the timed batch: unmerged {int((base_top == correct).sum())}/{batch} correct, merged "
              f"{int((merged_top == correct).sum())}/{batch}, same top-1 {int((base_top == merged_top).sum())}/{batch}")
    if args.random_base and args.model is None:
        print("note: random weights, so the labels above are meaningless; token counts, FLOPs and speed are real.")

    if args.visualize:
        # The model's crop, drawn at >= 224 px per frame so small inputs still show their groups.
        scale = max(1, -(-224 // config.image_size))
        resized = preprocess(frames, config.image_size * scale, (0, 0, 0), (1, 1, 1))[0]  # [T, 3, S, S] in [0, 1]
        image = video.visualize((resized.permute(0, 2, 3, 1) * 255).round().byte(), info, model=model)
        image.save(args.visualize)
        print(f"saved the merged groups to {args.visualize}")
    mmmerge.unpatch(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
