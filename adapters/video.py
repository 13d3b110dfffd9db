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

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from mmmerge.constraints import parse_time_mode
from mmmerge.info import MergeInfo
from mmmerge.patching import register
from mmmerge.schedule import ScheduleSpec

from .encoder import TokenGrid, encoder_flops, encoder_layers, grid_features, patch_encoder, patch_spec, plan_layout

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


def check_timestamps(timestamps: Sequence[float], frames: int) -> Tensor:
    """``[frames]`` float32 seconds, checked: finite and non-decreasing (ValueError otherwise)."""
    ts = torch.as_tensor(list(timestamps) if not isinstance(timestamps, Tensor) else timestamps,
                         dtype=torch.float64).reshape(-1)
    if ts.numel() != frames:
        raise ValueError(f"timestamps must give one time per input frame ({frames}), got {ts.numel()}")
    if not torch.isfinite(ts).all():
        raise ValueError(f"timestamps must be finite seconds, got {ts.tolist()[:4]}...; load_video returns sane ones")
    if (ts[1:] < ts[:-1]).any():
        raise ValueError("timestamps must not decrease (one per input frame, in playing order)")
    return ts.float()


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
    for old, new in (("frame_budget", "group_budget"), ("window", "time_mode='window(k)'")):
        if old in options:
            raise ValueError(f"video.patch takes no option '{old}'; use {new}")
    layout = video_layout(model)
    base, family = _backbone(model)
    mode, k = parse_time_mode(time_mode, TIME_MODES)
    layers = encoder_layers(base)
    merge_layout = plan_layout(layout.grid, mode, k, group_budget)
    coords, rules = _position_coords(layout, timestamps)
    if prop_attn is None:
        prop_attn = method != "prune"
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


def sample_indices(total: int, num_frames: int, sampling: str = "uniform", stride: Optional[int] = None) -> List[int]:
    """Frame indices to read from a video of ``total`` frames.

    uniform: evenly spaced over the whole video, first and last included.
    segment: TSN-style, the middle frame of each of ``num_frames`` equal segments.
    dense:   ``num_frames`` frames ``stride`` apart (default 4, VideoMAE's Kinetics setting), centred.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling '{sampling}'; choose one of {', '.join(SAMPLINGS)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride is not None and sampling != "dense":
        raise ValueError(f"stride={stride} applies to dense sampling only (got sampling='{sampling}'); "
                         "pass sampling='dense' or leave stride unset")
    if sampling == "dense":
        stride = 4 if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        span = (num_frames - 1) * stride + 1
        if total < span:
            raise ValueError(f"video has {total} frames; dense sampling of {num_frames} frames with stride {stride} "
                             f"needs {span}: lower num_frames or stride")
        start = (total - span) // 2
        return [start + i * stride for i in range(num_frames)]
    if total < num_frames:
        raise ValueError(f"video has {total} frames, fewer than the {num_frames} requested: lower num_frames")
    if sampling == "uniform":
        return torch.linspace(0, total - 1, num_frames).round().long().tolist()
    seg = total / num_frames
    return [min(total - 1, int(seg * i + seg / 2)) for i in range(num_frames)]


def load_video(path: Union[str, os.PathLike], num_frames: int = 16, sampling: str = "uniform",
               stride: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Read ``num_frames`` frames with decord.

    Returns:
        frames ``[T, H, W, 3]`` uint8 and their timestamps ``[T]`` float32 in seconds (frame start times).
    Raises:
        FileNotFoundError (no file), ValueError (not a decodable video, or too short: says what was found).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at '{path}'")
    try:
        import decord
    except ImportError as err:  # pragma: no cover - decord ships for x86_64 Linux/Windows/macOS
        raise ImportError("load_video needs decord: pip install decord") from err
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        total = len(reader)
    except Exception as err:  # decord raises DECORDError (a RuntimeError) for bad files
        raise ValueError(f"could not decode '{path}' as a video: {err}") from None
    if total == 0:
        raise ValueError(f"'{path}' holds no video frames")
    indices = sample_indices(total, num_frames, sampling, stride)
    try:
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())
        stamps = torch.as_tensor(reader.get_frame_timestamp(indices)[:, 0], dtype=torch.float32)
    except Exception as err:
        raise ValueError(f"could not decode frames {indices[:3]}... of '{path}': {err}") from None
    return frames, stamps


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
    patches = first.view(T, H, Hp, W, Wp, 3).mean(dim=(2, 4)).reshape(-1, 3)  # [T*H*W, 3]
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
