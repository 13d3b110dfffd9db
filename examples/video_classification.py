"""Classify a video with and without token merging, and show what merging bought.

    python examples/video_classification.py                       # offline demo (see below)
    python examples/video_classification.py --model MCG-NJU/videomae-base-finetuned-kinetics \\
        --video my.mp4 --flops 0.5 --method tome --time-mode within_frame --visualize merged.png

Prints the top-5 labels of the unmerged and the merged model, the tokens each layer sees, GFLOPs
(counted by torch.utils.flop_counter, via mmmerge.count_flops) and the wall-clock speedup measured side by side.

With no arguments it runs offline on the project's reference VideoMAE (benchmarks/reference/videomae,
4 layers, 8 frames of 32 x 32, trained from scratch on a generated task: which way a square moves and
which of two flashes comes first) and a freshly generated clip of that task, written to mp4 and read
back with decord, so the prediction is real and the true label is shown. ``--random-base`` instead
builds VideoMAE-base (1568 tokens) from its config with RANDOM weights: meaningless labels, but the
token counts, FLOPs and speedup of a real-size model.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import mmmerge
from mmmerge.adapters import video

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "benchmarks" / "reference" / "videomae"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_sample_clip(path: Path, frames: int = 48, fps: int = 12, size: int = 240) -> Path:
    """A clip of a red square moving right and a blue disc moving down, on a textured background."""
    import av
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


def load_model(name: Optional[str], attn: str):
    """A model from a hub name or local directory, or VideoMAE-base from its config (random weights)."""
    from transformers import AutoModelForVideoClassification, VideoMAEConfig, VideoMAEForVideoClassification

    if name is None:
        config = VideoMAEConfig(num_labels=400)  # the videomae-base-finetuned-kinetics shape: 16x224x224
        config._attn_implementation = attn
        torch.manual_seed(0)
        return VideoMAEForVideoClassification(config).eval(), "VideoMAE-base built from its config (RANDOM weights)"
    model = AutoModelForVideoClassification.from_pretrained(name, attn_implementation=attn).eval()
    return model, f"{type(model).__name__} from {name} ({model.config.num_frames} frames)"


def write_task_clip(path: Path, seed: int) -> Tuple[Path, str]:
    """One clip of the reference models' task (benchmarks/tasks.py), upscaled 4x into an mp4; and its label."""
    import av
    import numpy as np

    sys.path.insert(0, str(REPO))  # benchmarks/ is part of the repository, not of the installed package
    from benchmarks.tasks import VIDEO_LABELS, video_batch

    clips, labels = video_batch(1, seed)  # [1, T, 3, 32, 32] in [-1, 1]
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
    return path, VIDEO_LABELS[int(labels[0])]


def preprocess(frames: torch.Tensor, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 -> ``[1, T, 3, S, S]`` float: short side to S, centre crop, normalise."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = image_size / min(h, w)
    x = F.interpolate(x, size=(max(image_size, round(h * scale)), max(image_size, round(w * scale))),
                      mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - image_size) // 2, (x.shape[-1] - image_size) // 2
    x = x[..., top:top + image_size, left:left + image_size]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.unsqueeze(0)


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


def time_pair(run_a, run_b, repeats: int) -> Tuple[float, float]:
    """Median seconds of two callables, measured alternately after one warm-up each."""
    run_a(), run_b()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((run_a, a), (run_b, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def top5(logits: torch.Tensor, labels: Dict[int, str]) -> List[str]:
    probs = logits.softmax(-1)[0]
    values, indices = probs.topk(min(5, probs.numel()))
    return [f"{labels.get(int(i), str(int(i)))} ({float(p):.3f})" for p, i in zip(values, indices)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub name or local directory (default: the reference VideoMAE)")
    parser.add_argument("--random-base", action="store_true",
                        help="VideoMAE-base from its config with random weights (real-size speed, meaningless labels)")
    parser.add_argument("--seed", type=int, default=7, help="which generated task clip to classify")
    parser.add_argument("--video", help="path to a video file (default: a generated sample clip)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--r", type=int, help="tokens merged per layer")
    budget.add_argument("--flops", type=float, help="target fraction of the unmerged FLOPs (default 0.5)")
    parser.add_argument("--method", default="tome", choices=["tome", "pitome", "tps", "random", "prune"])
    parser.add_argument("--time-mode", default="global", help="global, within_frame, adjacent, window or window(k)")
    parser.add_argument("--window", type=int, default=2, help="tubelets per window for --time-mode window")
    parser.add_argument("--sampling", default="uniform", choices=list(video.SAMPLINGS))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--visualize", metavar="PNG", help="save a picture of the merged groups")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    reference = args.model is None and not args.random_base
    if reference and not (REFERENCE / "model.safetensors").exists():
        raise SystemExit(f"the reference model is missing at {REFERENCE}; rebuild it with "
                         "`python -m benchmarks.train_reference videomae`, or pass --random-base or --model")
    model, described = load_model(str(REFERENCE) if reference else args.model, args.attn)
    if reference:
        described = "the reference VideoMAE (benchmarks/reference/videomae: trained here on the generated task)"
    config = model.config
    print(f"model: {described}")

    truth = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.video:
            path = Path(args.video)
        elif reference:
            path, truth = write_task_clip(Path(tmp) / "task.mp4", args.seed)
        else:
            path = write_sample_clip(Path(tmp) / "sample.mp4")
        frames, stamps = video.load_video(path, num_frames=config.num_frames, sampling=args.sampling)
    source = path if args.video else ("a generated task clip (seed %d)" % args.seed if reference else "a generated sample clip")
    print(f"video: {source}, {frames.shape[0]} frames sampled ({args.sampling}) between {float(stamps[0]):.2f} s "
          f"and {float(stamps[-1]):.2f} s")
    if truth is not None:
        print(f"true label: {truth}")
    # The reference models take pixels scaled to [-1, 1]; hub models use their processor's statistics.
    mean, std = ((0.5,) * 3, (0.5,) * 3) if reference else processor_stats(args.model)
    x = preprocess(frames, config.image_size, mean, std)
    labels = {int(k): v for k, v in (config.id2label or {}).items()}

    spec = args.r if args.r is not None else mmmerge.TargetFlops(args.flops if args.flops is not None else 0.5)
    unmerged = copy.deepcopy(model)  # timed side by side with the patched model
    base_logits = logits_of(model, x)
    base_flops = gflops(model, x)
    time_mode = f"window({args.window})" if args.time_mode == "window" else args.time_mode
    mmmerge.patch(model, r=spec, method=args.method, time_mode=time_mode,
                  trace_source=bool(args.visualize), timestamps=stamps.tolist())
    merged_logits = logits_of(model, x)
    info = mmmerge.last_info(model)
    merged_flops = gflops(model, x)

    t_base, t_merged = time_pair(lambda: logits_of(unmerged, x), lambda: logits_of(model, x), args.repeats)

    print(f"\nmerging: method={args.method} time_mode={args.time_mode} r per layer={info.schedule}")
    print(f"tokens per layer: {info.tokens_per_layer}")
    print(f"\n{'':12}{'unmerged':>44}{'merged':>44}")
    for i, (a, b) in enumerate(zip(top5(base_logits, labels), top5(merged_logits, labels))):
        print(f"top-{i + 1:<7}{a:>44}{b:>44}")
    same = int(base_logits.argmax()) == int(merged_logits.argmax())
    print(f"\nGFLOPs: {base_flops:.3g} -> {merged_flops:.3g} ({merged_flops / base_flops:.0%} of unmerged)")
    print(f"time:   {t_base * 1e3:.0f} ms -> {t_merged * 1e3:.0f} ms, speedup {t_base / t_merged:.2f}x "
          f"(median of {args.repeats}, side by side, {torch.get_num_threads()} threads)")
    print(f"top-1 unchanged: {same}")
    if reference:
        print("note: the reference model is tiny (256 tokens, 4 layers), so per-layer overheads dominate its wall "
              "time; --random-base shows the speedup at real size (1568 tokens).")
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
