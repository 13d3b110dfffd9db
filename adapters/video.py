"""Video adapter: token merging for ViViT and VideoMAE, with time-respecting modes.

Tokens are time-major: index = t * H' * W' + row * W' + col (after ViViT's CLS at 0), i.e.
``rearrange(x, "b (t h w) c -> b t h w c")``. Merged tokens report their tubelet span ``t_min``/``t_max``,
centroids ``t``, ``row``, ``col`` and, with ``timestamps``, their span in seconds ``sec_min``/``sec_max``.

Time modes (``time_mode``):
    global        any two tokens may merge
    within_frame  never across tubelets; each tubelet gives up its own share of r (``group_budget``)
    adjacent      only tokens whose time spans touch: every merged token covers one contiguous stretch
    window(k)     only inside blocks of k consecutive tubelets; each block gives up its own share
Shares are as even as possible: for any r some tubelets (blocks) give up one token more.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import einops
from torch import Tensor

from mmmerge.constraints import parse_time_mode
from mmmerge.extras import require
from mmmerge.info import MergeInfo
from mmmerge.options import check_entry_options
from mmmerge.patching import register
from mmmerge.schedule import ScheduleSpec

from .encoder import TokenGrid, encoder_flops, encoder_layers, grid_features, patch_encoder, plan_layout

SUPPORTED = ("VivitModel", "VivitForVideoClassification", "VideoMAEModel", "VideoMAEForVideoClassification")
TIME_MODES = ("global", "within_frame", "adjacent", "window(k)")


@dataclass
class VideoLayout:
    """Where the video tokens sit: ``protected`` leading tokens, then a ``[frames, rows, cols]`` grid."""

    protected: int
    frames: int  # T' (tubelets)
    rows: int  # H'
    cols: int  # W'
    tubelet: int  # video frames per tubelet

    @property
    def num_tokens(self) -> int:
        return self.protected + self.frames * self.rows * self.cols

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.protected, (("t", self.frames), ("row", self.rows), ("col", self.cols)))


def _backbone(model: nn.Module) -> Tuple[nn.Module, str]:
    name = type(model).__name__
    if not any(c.__name__ in SUPPORTED for c in type(model).__mro__):
        raise TypeError(f"video.patch supports {', '.join(SUPPORTED)}; got {name}")
    if hasattr(model, "vivit"):
        return model.vivit, "vivit"
    if hasattr(model, "videomae"):
        return model.videomae, "videomae"
    return model, "vivit" if "Vivit" in name else "videomae"


def video_layout(model: nn.Module) -> VideoLayout:
    """Token layout of a ViViT/VideoMAE model, from its config."""
    base, family = _backbone(model)
    cfg = base.config
    if family == "vivit":
        t, h, w = cfg.tubelet_size
        return VideoLayout(1, cfg.num_frames // t, cfg.image_size // h, cfg.image_size // w, t)
    return VideoLayout(0, cfg.num_frames // cfg.tubelet_size, cfg.image_size // cfg.patch_size,
                       cfg.image_size // cfg.patch_size, cfg.tubelet_size)


def _position_coords(layout: VideoLayout, timestamps: Optional[Sequence[float]]) -> Tuple[Dict[str, Tensor],
                                                                                          Dict[str, str]]:
    """Coordinates of every token position (CLS gets -1) and how they combine when tokens merge."""
    T, P = layout.frames, layout.protected
    pos = layout.grid.positions()
    head = torch.full((P,), -1.0)

    def full(v: Tensor) -> Tensor:
        return torch.cat([head, v.float()])

    coords = {"t": full(pos["t"]), "row": full(pos["row"]), "col": full(pos["col"]),
              "t_min": full(pos["t"]), "t_max": full(pos["t"])}
    rules = {"t_min": "min", "t_max": "max", "sec_min": "min", "sec_max": "max"}
    if timestamps is not None:
        per_tubelet = check_timestamps(timestamps, T * layout.tubelet).view(T, layout.tubelet)
        # A tubelet spans from its first frame to its last frame; spans are in seconds.
        coords["sec_min"] = full(per_tubelet[:, 0][pos["t"]])
        coords["sec_max"] = full(per_tubelet[:, -1][pos["t"]])
    return coords, rules


def _mean_pooled(model: nn.Module, family: str) -> bool:
    """The head averages the encoder output over tokens (VideoMAE with fc_norm)."""
    return family == "videomae" and getattr(model, "fc_norm", None) is not None


def patch(model: nn.Module, r: ScheduleSpec = 0, method: str = "tome", time_mode: str = "global",
          prop_attn: Optional[bool] = None, trace_source: bool = False, group_budget: bool = True,
          timestamps: Optional[Sequence[float]] = None, output: Optional[str] = None, **options: Any) -> nn.Module:
    """Patch a ViViT or VideoMAE model in place for token merging; returns the model.

    Args:
        r: tokens removed per layer, any engine schedule: int, ``(r, inflect)``, list, ``KeepRatio``,
            ``TargetTokens``, ``TargetFlops`` (fraction of the unmerged encoder's FLOPs). Checked at patch
            time against what every layer can remove under the time mode, for every input.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune`` or ``none``.
        time_mode: ``global``, ``within_frame``, ``adjacent`` or ``window(k)`` (blocks of k tubelets).
        prop_attn: proportional attention (``log(size)`` bias); default on, except for ``prune``.
        trace_source: record the source map of each forward, for ``last_info``, ``frame_features``, ``visualize``.
        group_budget: under ``within_frame`` / ``window(k)`` every tubelet (block) removes its own share of
            r; False: one budget over all tokens under the same rule.
        timestamps: seconds of each input frame (from ``load_video``), to report merged spans in seconds.
        output: ``"merged"`` (the merged tokens) or ``"original"`` (one row per patch token, each holding
            its merged token). Default: ``"original"`` for VideoMAE's mean-pooling head (so its plain mean
            is the exact size-weighted mean), else ``"merged"``.
        **options: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``); unknown names and bad values raise ValueError.
    Raises:
        TypeError for unsupported models, ValueError for an infeasible r or a bad option; the model is
        then left untouched.
    """
    check_entry_options("video.patch", patch, method, options,
                        flags={"trace_source": trace_source, "group_budget": group_budget},
                        optional_flags={"prop_attn": (prop_attn, "the default: on, off for prune")},
                        renamed={"frame_budget": "group_budget", "window": "time_mode='window(k)'"},
                        supplied=("layer_idx", "num_layers"))
    layout = video_layout(model)
    base, family = _backbone(model)
    mode, k = parse_time_mode(time_mode, TIME_MODES, steps=layout.grid.steps("t"), unit="tubelets")
    layers = encoder_layers(base)
    merge_layout = plan_layout(layout.grid, mode, k, group_budget)
    coords, rules = _position_coords(layout, timestamps)  # checks timestamps (check_timestamps, loading section)
    if output is None:
        output = "original" if _mean_pooled(model, family) else "merged"
    patch_encoder(model, layers, grid=layout.grid, layout=merge_layout, r=r, method=method, options=options,
                  prop_attn=prop_attn, trace_source=trace_source, output=output,
                  layer_flops=encoder_flops(base.config), position_coords=coords, rules=rules, family="video")
    return model


for _name in SUPPORTED:
    register(_name, patch)


def frame_features(model: nn.Module, last_hidden_state: Tensor, info: Optional[MergeInfo] = None) -> Tensor:
    """The encoder output per tubelet position ``[B, T', H', W', C]`` (CLS dropped).

    Each position gets the merged token that holds it: directly with ``output="original"``, else through
    the source map (``trace_source=True``; ``info`` defaults to this thread's last traced forward).
    """
    return grid_features(model, last_hidden_state, info)


# ----------------------------------------------------------------------------------------------- loading
SAMPLINGS = ("uniform", "segment", "dense")


class VideoTooShort(ValueError):
    """A video holds fewer frames (``frames``) than its sampling needs (``needed``)."""

    def __init__(self, message: str, frames: int, needed: int) -> None:
        super().__init__(message)
        self.frames, self.needed = frames, needed


def frames_needed(num_frames: int, sampling: str = "uniform", stride: Optional[int] = None) -> int:
    """The fewest frames a video needs for this sampling; checks the options (ValueError for bad ones)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling '{sampling}'; choose one of {', '.join(SAMPLINGS)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride is not None and sampling != "dense":
        raise ValueError(f"stride={stride} applies to dense sampling only (got sampling='{sampling}'); "
                         "pass sampling='dense' or leave stride unset")
    if sampling != "dense":
        return num_frames
    stride = 4 if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return (num_frames - 1) * stride + 1


def sample_indices(total: int, num_frames: int, sampling: str = "uniform", stride: Optional[int] = None) -> List[int]:
    """Frame indices to read from a video of ``total`` frames.

    uniform: evenly spaced over the whole video, first and last included.
    segment: TSN-style, the middle frame of each of ``num_frames`` equal segments.
    dense:   ``num_frames`` frames ``stride`` apart (default 4, VideoMAE's Kinetics setting), centred.
    """
    needed = frames_needed(num_frames, sampling, stride)
    if sampling == "dense":
        stride = 4 if stride is None else stride
        if total < needed:
            raise VideoTooShort(f"video has {total} frames; dense sampling of {num_frames} frames with stride "
                                f"{stride} needs {needed}: lower num_frames or stride", total, needed)
        start = (total - needed) // 2
        return [start + i * stride for i in range(num_frames)]
    if total < needed:
        raise VideoTooShort(f"video has {total} frames, fewer than the {num_frames} requested: lower num_frames",
                            total, needed)
    if sampling == "uniform":
        return torch.linspace(0, total - 1, num_frames).round().long().tolist()
    seg = total / num_frames
    return [min(total - 1, int(seg * i + seg / 2)) for i in range(num_frames)]


def check_timestamps(timestamps: Union[Sequence[float], Tensor], frames: Optional[int] = None) -> Tensor:
    """``timestamps`` as float32 ``[T]`` seconds, checked: one per input frame, finite, never decreasing.

    ``video.patch(timestamps=...)`` checks them with this before it touches the model; ``load_video`` returns
    timestamps that pass it.

    Args:
        timestamps: seconds of each input frame (list, tuple, numpy array or tensor).
        frames: the number of input frames the model takes, if known (``T`` must equal it).
    Raises:
        ValueError naming the first bad entry.
    """
    if not isinstance(timestamps, Tensor) and not hasattr(timestamps, "__array__"):
        try:
            timestamps = list(timestamps)
        except TypeError:
            raise ValueError(f"timestamps must be a sequence of seconds, one per input frame; got "
                             f"{type(timestamps).__name__}") from None
    try:
        ts = torch.as_tensor(timestamps, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"timestamps must be numbers of seconds, one per input frame: {err}") from None
    if ts.dim() != 1:
        raise ValueError(f"timestamps must be one time per input frame, shape [T]; got shape {tuple(ts.shape)}")
    if frames is not None and ts.numel() != frames:
        raise ValueError(f"timestamps must give one time per input frame ({frames}), got {ts.numel()}")
    finite = torch.isfinite(ts)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(f"timestamps[{i}] is {float(ts[i])}, not a finite time in seconds (load_video gives "
                         "index / fps where a container's own timestamps are unusable)")
    back = ts[1:] < ts[:-1]
    if bool(back.any()):
        i = int(back.nonzero()[0]) + 1
        raise ValueError(f"timestamps must not decrease: timestamps[{i}] = {float(ts[i]):.6g} s comes after "
                         f"timestamps[{i - 1}] = {float(ts[i - 1]):.6g} s")
    return ts.float()


def frame_seconds(table: Optional[Tensor], fps: float, total: int) -> Tensor:
    """Start time in seconds of each of ``total`` frames ``[total]`` float64.

    The container's timestamps ``table`` ``[total]`` when they are usable: finite, strictly increasing and
    spanning about ``(total - 1) / fps`` (between half and twice that). Otherwise (missing, non-finite, out of
    order or garbage, as decord gives for AVI files whose packets carry no presentation times: -3.69e17 s)
    frame index / ``fps`` for every frame. NaN for every frame when neither is usable (no frame rate either).
    """
    rate_ok = math.isfinite(fps) and fps > 0
    if table is not None and table.numel() == total and total > 0:
        table = table.double()
        steps = table[1:] - table[:-1]
        usable = bool(torch.isfinite(table).all()) and bool((steps > 0).all())
        if usable and rate_ok and total > 1:
            span, expected = float(table[-1] - table[0]), (total - 1) / fps
            usable = 0.5 * expected <= span <= 2.0 * expected
        if usable:
            return table
    if rate_ok:
        return torch.arange(total, dtype=torch.float64) / fps
    return torch.full((total,), float("nan"), dtype=torch.float64)


# Where decord's random access returns the frames asked for (checked against in-order decoding): these codecs
# in these containers. Elsewhere it can return other frames: in AVI files (no presentation times) and for
# MPEG-4 Part 2 streams with B-frames, even in mp4. There load_video decodes in order instead.
SEEKABLE_CODECS = ("h264", "hevc", "vp8", "vp9", "av1")
SEEKABLE_CONTAINERS = ("mov", "mp4", "matroska", "webm")
READ_CHUNK = 32  # frames per decord call when decoding in order (bounds the memory held)


@dataclass
class ContainerInfo:
    """What a video file's container says, read by PyAV without decoding (None: not known)."""

    frames: Optional[int]  # frames it announces (header count, else duration x frame rate)
    codec: Optional[str]  # e.g. "h264", "mpeg4"
    formats: Tuple[str, ...]  # the demuxer's names, e.g. ("mov", "mp4", ...) or ("avi",)

    @property
    def seekable(self) -> bool:
        """Whether decord's random access is known to return the right frames for this file."""
        return self.codec in SEEKABLE_CODECS and any(f in SEEKABLE_CONTAINERS for f in self.formats)


def probe_container(path: str) -> ContainerInfo:
    """The container's frame count, codec and format, read with PyAV (the video extra); all unknown without it.

    Raises:
        ValueError when PyAV cannot read the file as a container with a video stream (not a video file, or
        damaged beyond its header, e.g. an mp4 cut before its index).
    """
    try:
        import av
    except ImportError:
        return ContainerInfo(None, None, ())
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"'{path}' holds no video stream")
            stream = container.streams.video[0]
            rate, frames = stream.average_rate, None
            if stream.frames:
                frames = int(stream.frames)
            elif rate and stream.duration and stream.time_base:
                frames = int(round(float(stream.duration * stream.time_base * rate)))
            elif rate and container.duration:
                frames = int(round(container.duration / 1e6 * float(rate)))  # container.duration is in microseconds
            return ContainerInfo(frames, stream.codec_context.name, tuple(container.format.name.split(",")))
    except av.FFmpegError as err:
        raise ValueError(f"could not decode '{path}' as a video (not a video file, or damaged beyond its header): "
                         f"{err}") from None


def read_frames(reader: Any, indices: Sequence[int], seek: bool) -> Tensor:
    """Frames ``[len(indices), H, W, 3]`` uint8 at ``indices`` from a decord VideoReader.

    ``seek``: decord's random access; otherwise frames 0 .. max(indices) are decoded in order, ``READ_CHUNK``
    at a time, and only the sampled ones are kept (right for every file, slower on long videos).
    """
    if seek:
        return torch.from_numpy(reader.get_batch(list(indices)).asnumpy())
    wanted, kept = set(indices), {}
    last = max(indices)
    for start in range(0, last + 1, READ_CHUNK):
        chunk = list(range(start, min(last + 1, start + READ_CHUNK)))
        batch = reader.get_batch(chunk).asnumpy()  # consecutive: decord decodes on without seeking
        kept.update({i: torch.from_numpy(batch[i - start].copy()) for i in chunk if i in wanted})
    return torch.stack([kept[i] for i in indices])


def load_video(path: Union[str, os.PathLike], num_frames: int = 16, sampling: str = "uniform",
               stride: Optional[int] = None, seek: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Read ``num_frames`` frames with decord.

    Timestamps are the container's where they are sane, else frame index / fps (``frame_seconds``). A file
    that decodes to fewer frames than its container announces (a truncated download, a damaged AVI) gives a
    warning; its last decodable frame, usually cut mid-packet, is dropped.

    Args:
        seek: decord's random access (fast on long videos). None (default): only where it is known to return
            the right frames (``SEEKABLE_CODECS`` in ``SEEKABLE_CONTAINERS``, with sane timestamps); elsewhere
            (AVI, MPEG-4 Part 2, or PyAV missing to tell) frames are decoded in order up to the last one sampled.
    Returns:
        frames ``[T, H, W, 3]`` uint8 and their timestamps ``[T]`` float32 in seconds (frame start times).
    Raises:
        FileNotFoundError (no file), ImportError (decord missing: names the ``video`` extra), ValueError (not a
        decodable video, a damaged one, or too short: says what was found; ``VideoTooShort`` for a sound video
        with fewer frames than the sampling needs).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at '{path}'")
    needed = frames_needed(num_frames, sampling, stride)
    decord = require("decord", "load_video")
    container = probe_container(path)  # also refuses files that are no video container at all
    announced = container.frames
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        total = len(reader)
    except Exception as err:  # decord raises DECORDError (a RuntimeError) for bad files
        if announced:
            raise ValueError(f"'{path}' is a damaged video file: its container announces {announced} frames but "
                             f"decoding fails ({err})") from None
        raise ValueError(f"could not decode '{path}' as a video (not a video file, or damaged beyond its "
                         f"header): {err}") from None
    if total == 0:
        raise ValueError(f"'{path}' holds no video frames")
    if announced is not None and total < announced - max(1, announced // 100):
        usable = max(1, total - 1)  # the last decodable frame is usually cut mid-packet
        if usable < needed:
            raise ValueError(f"'{path}' is damaged or truncated: only {total} of the {announced} frames its "
                             f"container announces decode, too few for {num_frames} frames ({sampling} sampling "
                             f"needs {needed}); repair or re-download the file")
        warnings.warn(f"'{path}' looks damaged or truncated: its container announces {announced} frames, "
                      f"{total} decode; the last of them, usually cut short, is dropped and frames are sampled "
                      f"from the first {usable}", stacklevel=2)
        total = usable
    indices = sample_indices(total, num_frames, sampling, stride)
    try:
        table = torch.as_tensor(reader.get_frame_timestamp(list(range(total)))[:, 0], dtype=torch.float64)
    except Exception:  # no timestamp table: index / fps
        table = None
    fps = float(reader.get_avg_fps())
    seconds = frame_seconds(table, fps, total)
    if not bool(torch.isfinite(seconds).all()):
        warnings.warn(f"'{path}' gives neither usable timestamps nor a frame rate: its timestamps are NaN "
                      "(video.patch refuses them; pass timestamps=None)", stacklevel=2)
    if seek is None:
        sane = table is not None and torch.equal(seconds, table.double())
        seek = container.seekable and sane
    try:
        frames = read_frames(reader, indices, seek)
    except Exception as err:
        raise ValueError(f"could not decode frames {indices[:3]}... of '{path}' (the file may be damaged): "
                         f"{err}") from None
    return frames, seconds[indices].float()


# ------------------------------------------------------------------------------------------ visualizing
def visualize(frames: Tensor, info: MergeInfo, layout: Optional[VideoLayout] = None, model: Optional[nn.Module] = None,
              batch_index: int = 0, alpha: float = 0.6):
    """Picture of the merged groups on each tubelet's first frame (ToMe's visualization, for video).

    Each patch is painted with the mean colour of its whole group (across frames, for groups that span
    time) and outlined where the group changes. Needs ``trace_source=True``.

    Args:
        frames: ``[T, H, W, 3]`` uint8 frames, as the model saw them (resized to its input size).
        info: ``mmmerge.last_info(model)`` after a forward. layout: or ``model`` to read it from.
    Returns:
        a PIL image, one panel per tubelet, left to right.
    """
    from PIL import Image

    if layout is None:
        if model is None:
            raise ValueError("pass layout= or model=")
        layout = video_layout(model)
    if info.source is None:
        raise ValueError("no source map: patch with trace_source=True and run a forward first")
    T, H, W = layout.frames, layout.rows, layout.cols
    frames = torch.as_tensor(frames)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    first = frames[:: layout.tubelet][:T].float() / 255.0  # [T, Hp, Wp, 3]
    if first.shape[0] != T:
        raise ValueError(f"need {T * layout.tubelet} frames for {T} tubelets, got {frames.shape[0]}")
    Hp, Wp = first.shape[1] // H, first.shape[2] // W
    first = first[:, : H * Hp, : W * Wp]
    patches = einops.reduce(first, "t (h hp) (w wp) c -> (t h w) c", "mean", h=H, w=W)  # each patch's mean colour
    source = info.source[batch_index, layout.protected:].cpu() - layout.protected  # group of each patch
    groups = int(source.max()) + 1
    colour = torch.zeros(groups, 3).index_add_(0, source, patches)
    colour /= torch.bincount(source, minlength=groups).clamp_min(1).unsqueeze(1).float()
    painted = colour[source].view(T, H, W, 3)
    grid = source.view(T, H, W)
    edge = torch.zeros(T, H * Hp, W * Wp, dtype=torch.bool)
    up = painted.repeat_interleave(Hp, 1).repeat_interleave(Wp, 2)
    g_up = grid.repeat_interleave(Hp, 1).repeat_interleave(Wp, 2)
    edge[:, 1:, :] |= g_up[:, 1:, :] != g_up[:, :-1, :]
    edge[:, :, 1:] |= g_up[:, :, 1:] != g_up[:, :, :-1]
    image = alpha * up + (1 - alpha) * first
    image[edge] = 1.0
    strip = torch.cat(list(image), dim=1)  # panels side by side
    return Image.fromarray((strip.clamp(0, 1) * 255).byte().numpy())
