"""Audio adapter: token merging for the Audio Spectrogram Transformer (AST), merging along time.

AST cuts a log-mel spectrogram ``[frames, mel bins]`` (10 ms hop, 1024 frames = 10.24 s) into 16 x 16
patches with strides ``frequency_stride`` (mel bins) and ``time_stride`` (frames). Tokens are
frequency-major: index = 2 + f * T' + t, after CLS (0) and distillation (1), which are protected, i.e.
``rearrange(x[:, 2:], "b (f t) c -> b f t c")``. Merged tokens report their band ``f`` and column ``t``
(centroids), spans ``f_min``/``f_max`` (bands), ``t_min``/``t_max`` (columns) and ``sec_min``/``sec_max``
(seconds: a column covers frames ``t*stride .. t*stride + 15``, i.e. ``[t*stride*0.01, (t*stride + 16)*0.01)`` s).

Time modes (``time_mode``):
    global     any two tokens may merge
    same_band  only inside one frequency band; each band gives up its own share of r (``group_budget``)
    adjacent   only tokens whose time spans touch: every merged token covers one contiguous stretch
    window(k)  only inside blocks of k consecutive columns; each block gives up its own share
``within_band=True`` adds the band rule to ``adjacent`` / ``window(k)`` (merging along time only). For the
time rules the tokens merge in time-major order (columns first), so merged outputs come time-major.

Padding: clips shorter than ``max_length`` frames are padded. Pass the real lengths (``features`` returns
them; ``real_lengths`` reads them off input from transformers' ASTFeatureExtractor) and padded columns are kept
but marked invalid, so that they never merge with real tokens (the default: with ``r=0`` the outputs are the
unpatched model's, bit for bit), or, with ``drop_padding=True``, dropped right after the embeddings. Dropping
is faster on short clips but changes what the model computes: the real tokens no longer attend to the padding.
How much that changes the predictions depends on the model (``python -m benchmarks padding``, on half-padded
clips: the reference AST, trained without padding, is at 16% accuracy on the padded input and at 50% with the
padding dropped, a different top-1 on 97% of clips; the same AST fine-tuned with padding keeps its accuracy,
50.2% -> 50.6%, but changes the top-1 of 2% of clips); check it on your model before relying on it.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from mmmerge.constraints import parse_time_mode
from mmmerge.extras import require
from mmmerge.info import MergeInfo
from mmmerge.options import check_entry_options
from mmmerge.patching import register
from mmmerge.schedule import ScheduleSpec

from .encoder import (TokenGrid, encoder_flops, encoder_layers, grid_features, merge_info, patch_encoder, patch_spec,
                      plan_layout)

SUPPORTED = ("ASTModel", "ASTForAudioClassification")
TIME_MODES = ("global", "same_band", "adjacent", "window(k)")
HOP_SECONDS = 0.01  # AST's fbank frame shift (10 ms)
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet normalisation used by ASTFeatureExtractor
Lengths = Union[None, int, Sequence[int], Tensor]


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class AudioLayout:
    """Where AST's tokens sit: 2 protected tokens, then a frequency-major ``[bands, columns]`` grid.

    ``columns`` counts the columns the encoder sees (fewer than ``full_columns`` when padding is dropped).
    """

    protected: int
    bands: int  # F'
    columns: int  # T' seen by the encoder
    full_columns: int  # T' of a full max_length input
    time_stride: int  # frames between columns
    frequency_stride: int  # mel bins between bands
    patch_size: int  # frames (and mel bins) per patch
    max_length: int  # input frames
    num_mel_bins: int

    @property
    def num_tokens(self) -> int:
        return self.protected + self.bands * self.columns

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.protected, (("f", self.bands), ("t", self.columns)))

    def real_columns(self, length: int) -> int:
        """Columns holding at least one of the first ``length`` frames (at least 1, at most ``full_columns``)."""
        return max(1, min(self.full_columns, math.ceil(int(length) / self.time_stride)))

    def column_seconds(self) -> Tensor:
        """``[columns, 2]`` start and end of each column in seconds (frame hops covered by its patches)."""
        start = torch.arange(self.columns, dtype=torch.float32) * self.time_stride
        return torch.stack([start, start + self.patch_size], dim=1) * HOP_SECONDS


def _backbone(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if not any(c.__name__ in SUPPORTED for c in type(model).__mro__):
        raise TypeError(f"audio.patch supports {', '.join(SUPPORTED)}; got {name}")
    return getattr(model, "audio_spectrogram_transformer", model)


def ast_layout(model: nn.Module, columns: Optional[int] = None) -> AudioLayout:
    """Token layout of an AST model, from its config; checked against the position embeddings.

    Frequency-major order follows from the patch embedding: its conv output ``[B, C, F', T']`` is flattened
    over ``(F', T')``, so the token of band f and column t sits at ``2 + f * T' + t``.
    """
    base = _backbone(model)
    cfg = base.config
    bands = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
    full = (cfg.max_length - cfg.patch_size) // cfg.time_stride + 1
    positions = base.embeddings.position_embeddings.shape[1]
    if positions != 2 + bands * full:
        raise TypeError(f"{type(model).__name__}: {positions} position embeddings, but its config implies "
                        f"2 + {bands} bands x {full} columns; mmmerge does not know this AST variant")
    return AudioLayout(2, bands, full if columns is None else columns, full, cfg.time_stride, cfg.frequency_stride,
                       cfg.patch_size, cfg.max_length, cfg.num_mel_bins)


def _position_coords(layout: AudioLayout) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Coordinates ``[N0]`` of every token position (protected ones get -1) and their merge rules."""
    pos = layout.grid.positions()
    head = torch.full((layout.protected,), -1.0)

    def full(v: Tensor) -> Tensor:
        return torch.cat([head, v.float()])

    start = pos["t"] * layout.time_stride * HOP_SECONDS
    coords = {"f": full(pos["f"]), "t": full(pos["t"]), "f_min": full(pos["f"]), "f_max": full(pos["f"]),
              "t_min": full(pos["t"]), "t_max": full(pos["t"]), "sec_min": full(start),
              "sec_max": full(start + layout.patch_size * HOP_SECONDS)}
    rules = {"f_min": "min", "f_max": "max", "t_min": "min", "t_max": "max", "sec_min": "min", "sec_max": "max"}
    return coords, rules


# --------------------------------------------------------------------------------------------- padding
def _lengths_list(lengths: Lengths, layout: AudioLayout) -> Optional[List[int]]:
    """Real frame counts as Python ints (setup time, never in a forward), checked against the model's window."""
    if lengths is None:
        return None
    what = ("lengths must be real fbank frame counts: an int, or one int per clip (a list, or the long tensor "
            "features() returns)")
    if isinstance(lengths, (bool, str, bytes)):
        raise TypeError(f"{what}; got {lengths!r}")
    if isinstance(lengths, Tensor) or type(lengths).__module__ == "numpy":
        t = torch.as_tensor(lengths)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{what}; got a {t.dtype} tensor (integer frame counts, not seconds)")
        values = t.reshape(-1).tolist()
    elif isinstance(lengths, numbers.Integral):
        values = [int(lengths)]
    elif isinstance(lengths, (list, tuple, range)):
        values = list(lengths)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"{what}; got {bad[0]!r} ({type(bad[0]).__name__}) among {lengths!r}")
        values = [int(v) for v in values]
    else:
        raise TypeError(f"{what}; got {lengths!r} ({type(lengths).__name__})")
    if not values:
        raise ValueError(f"{what}; got none (an empty {type(lengths).__name__})")
    if any(v < 1 for v in values):
        raise ValueError(f"lengths must be positive frame counts (features() returns them), got {values}")
    longest = max(values)
    if longest > layout.max_length:
        raise ValueError(f"lengths: {longest} frames is longer than this model's window of {layout.max_length} frames "
                         f"({layout.max_length * HOP_SECONDS:.2f} s, config.max_length): lengths count the real fbank "
                         "frames of each clip's input_values; make the features for this model with "
                         f"audio.features(waveform, rate, num_mel_bins={layout.num_mel_bins}, "
                         f"max_length={layout.max_length}), which returns them")
    return values


def _padding(layout: AudioLayout, lengths: Optional[List[int]], drop: bool
             ) -> Tuple[AudioLayout, Optional[Tensor], Optional[Tensor]]:
    """The encoder's layout, the embeddings' tokens it keeps (``[N]`` index, None: all) and the padding mask
    (``[B, N]`` bool in the kept layout, None: no padding) for these lengths."""
    if lengths is None:
        return layout, None, None
    real = [layout.real_columns(v) for v in lengths]
    columns = max(real) if drop else layout.full_columns
    seen = replace(layout, columns=columns)
    keep = None
    if columns < layout.full_columns:
        grid = torch.arange(layout.bands).unsqueeze(1) * layout.full_columns + torch.arange(columns)
        keep = torch.cat([torch.arange(layout.protected), layout.protected + grid.reshape(-1)])
    valid = None
    if min(real) < columns:
        col_ok = torch.arange(columns).unsqueeze(0) < torch.tensor(real).unsqueeze(1)  # [B, T']
        grid_ok = col_ok.unsqueeze(1).expand(-1, layout.bands, -1).reshape(len(real), -1)
        valid = torch.cat([torch.ones(len(real), layout.protected, dtype=torch.bool), grid_ok], dim=1)
    return seen, keep, valid


# ------------------------------------------------------------------------------------------------ patch
def patch(model: nn.Module, r: ScheduleSpec = 0, method: str = "tome", time_mode: str = "global",
          prop_attn: Optional[bool] = None, trace_source: bool = False, lengths: Lengths = None,
          drop_padding: bool = False, within_band: bool = False, group_budget: bool = True,
          output: str = "merged", **options: Any) -> nn.Module:
    """Patch an ASTModel or ASTForAudioClassification in place for token merging; returns the model.

    Args:
        r: tokens removed per layer, any engine schedule: int, ``(r, inflect)``, list, ``KeepRatio``,
            ``TargetTokens``, ``TargetFlops`` (fraction of the unmerged encoder's FLOPs at this length).
            Checked at patch time against what every layer can remove under the time mode.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune`` or ``none``.
        time_mode: ``global``, ``same_band``, ``adjacent`` or ``window(k)`` (blocks of k columns).
        within_band: also forbid merging across frequency bands (with ``adjacent`` / ``window(k)``).
        group_budget: under a band rule or ``window(k)`` every band (block) removes its own share of r; False:
            one budget over all tokens under the same rule.
        prop_attn: proportional attention (``log(size)`` bias); default on, except for ``prune``.
        trace_source: record the source map of each forward, for ``column_features``, ``visualize`` and
            ``last_info``.
        lengths: real length in frames (int, or one per clip), as ``features`` (or ``real_lengths``) returns;
            None = all real.
        drop_padding: with ``lengths``, remove columns that are padding in every clip before layer 0 (faster;
            the output then covers fewer columns, and the predictions change: see the module docstring);
            default False: padded columns stay, marked invalid (never merged with real ones), so ``r=0`` is
            exactly the unpatched model.
        output: ``"merged"`` (the merged tokens) or ``"original"`` (one row per token entering layer 0).
        **options: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``); unknown names and bad values raise ValueError.
    Raises:
        TypeError for unsupported models, ValueError for an infeasible r or a bad option; the model is
        then left untouched.
    """
    check_entry_options("audio.patch", patch, method, options,
                        flags={"trace_source": trace_source, "drop_padding": drop_padding, "within_band": within_band,
                               "group_budget": group_budget},
                        optional_flags={"prop_attn": (prop_attn, "the default: on, off for prune")},
                        renamed={"band_budget": "group_budget", "window": "time_mode='window(k)'"},
                        supplied=("layer_idx", "num_layers"))
    full = ast_layout(model)
    base = _backbone(model)
    mode, k = parse_time_mode(time_mode, TIME_MODES, steps=full.full_columns, unit="columns")
    layout, keep, valid = _padding(full, _lengths_list(lengths, full), drop_padding)
    layers = encoder_layers(base)
    merge_layout = plan_layout(layout.grid, mode, k, group_budget, band_axis="f", within_band=within_band,
                               padded=valid is not None)
    coords, rules = _position_coords(layout)
    record = dict(r=r, method=method, time_mode=time_mode, prop_attn=prop_attn, trace_source=trace_source,
                  drop_padding=drop_padding, within_band=within_band, group_budget=group_budget, output=output,
                  **options)
    patch_encoder(model, layers, grid=layout.grid, layout=merge_layout, r=r, method=method, options=options,
                  prop_attn=prop_attn, trace_source=trace_source, output=output,
                  layer_flops=encoder_flops(base.config), embed_index=keep, embed_tokens=full.num_tokens,
                  valid=valid, position_coords=coords, rules=rules, family="audio",
                  extra={"layout": layout, "options": record, "lengths": lengths})
    base.embeddings.register_forward_pre_hook(InputCheck(full.max_length, full.num_mel_bins))
    model._mmmerge_undo = functools.partial(_remove_input_checks, model)  # copies and pickles with the model
    return model


class InputCheck:
    """Forward pre-hook on a patched AST's embeddings: ``input_values`` must be ``[B, max_length, num_mel_bins]``
    of this model, else a ValueError naming both shapes (transformers fails deep inside the patch embedding or
    the position embeddings instead). Shapes only: no data is read, so it compiles and runs on any device."""

    def __init__(self, frames: int, mel: int) -> None:
        self.frames, self.mel = frames, mel

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or (x.dim() == 3 and tuple(x.shape[1:]) == (self.frames, self.mel)):
            return
        raise ValueError(f"input_values of shape {list(x.shape)} do not fit this AST: it takes [B, {self.frames}, "
                         f"{self.mel}] (config.max_length={self.frames} frames, config.num_mel_bins={self.mel}); "
                         f"make them with audio.features(waveform, rate, num_mel_bins={self.mel}, "
                         f"max_length={self.frames})")


def _remove_input_checks(model: nn.Module) -> None:
    """Undo of ``patch`` beyond the encoder layers (``mmmerge.unpatch`` calls it): drop the input checks."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, InputCheck):
                del module._forward_pre_hooks[key]
    model.__dict__.pop("_mmmerge_undo", None)


for _name in SUPPORTED:
    register(_name, patch)


def _audio_patch(model: nn.Module):
    spec = patch_spec(model)
    if spec is None or spec.family != "audio":
        raise ValueError("model is not patched by the audio adapter; call mmmerge.adapters.audio.patch(model, ...)")
    return spec


def patched_layout(model: nn.Module) -> AudioLayout:
    """The layout the patched encoder sees (fewer columns when padding is dropped)."""
    return _audio_patch(model).extra["layout"]


def set_lengths(model: nn.Module, lengths: Lengths) -> nn.Module:
    """Re-patch ``model`` with the same options for new real lengths (cheap: no weights change).

    Needed when ``drop_padding`` changes the token count, or when the clips of a batch differ in length.
    """
    return patch(model, lengths=lengths, **_audio_patch(model).extra["options"])


# ------------------------------------------------------------------------------------- per-column outputs
def band_time_features(model: nn.Module, last_hidden_state: Tensor, info: Optional[MergeInfo] = None) -> Tensor:
    """The encoder output per (band, column) position ``[B, F', T', C]`` (CLS and distillation dropped).

    Each position gets the merged token that holds it: directly with ``output="original"``, else through
    the source map (``trace_source=True``; ``info`` defaults to this thread's last traced forward).
    """
    _audio_patch(model)
    return grid_features(model, last_hidden_state, info)


def column_features(model: nn.Module, last_hidden_state: Tensor, info: Optional[MergeInfo] = None,
                    pool: str = "mean") -> Tensor:
    """Per-time-column features ``[B, T', C]``: unmerged tokens pooled over bands (``mean`` or ``max``).

    Column t covers ``layout.column_seconds()[t]`` seconds.
    """
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got '{pool}'")
    grid = band_time_features(model, last_hidden_state, info)
    return grid.mean(1) if pool == "mean" else grid.amax(1)


def column_logits(model: nn.Module, input_values: Tensor, pool: str = "mean") -> Tuple[Tensor, Tensor]:
    """Clip logits ``[B, L]`` and per-column logits ``[B, T', L]`` of an ASTForAudioClassification.

    The column scores apply the model's own classifier head to ``column_features``: frame-level (sound
    event detection style) scores from a clip-level tagger. Needs ``trace_source=True`` or ``output="original"``.
    """
    if not hasattr(model, "classifier"):
        raise TypeError("column_logits needs an ASTForAudioClassification (it uses the classifier head)")
    _audio_patch(model)
    out = _backbone(model)(input_values=input_values)
    logits = model.classifier(out.pooler_output)  # as ASTForAudioClassification.forward does
    return logits, model.classifier(column_features(model, out.last_hidden_state, pool=pool))


# ---------------------------------------------------------------------------------------------- loading
SAMPLE_RATE = 16000  # AST's input rate
FRAME_SAMPLES, HOP_SAMPLES = 400, 160  # the fbank's 25 ms window and 10 ms hop at 16 kHz
READ_BLOCK = 16384  # frames per soundfile read: a decoder error mid-file loses at most one block
PCM_FULL_SCALE = {torch.int8: 2.0 ** 7, torch.int16: 2.0 ** 15, torch.int32: 2.0 ** 31}
MAX_CHANNELS = 8  # a [S, C] array with C <= this (and S >= one frame) is channels-last audio, not a batch


def wav_declared_frames(path: Union[str, os.PathLike]) -> Optional[int]:
    """Frames a RIFF/WAVE header declares (data chunk bytes / block align); None for other files.

    libsndfile trims a truncated WAV's length to the bytes present, so the header is read here to tell.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if name == b"data":
                streaming = size in (0, 0xFFFFFFFF)  # length unknown when the header was written
                return None if streaming or not block else size // block
            body = f.read(size + (size & 1))  # chunks are padded to an even size
            if name == b"fmt " and len(body) >= 14:
                block = int.from_bytes(body[12:14], "little")


def load_audio(path: Union[str, os.PathLike], sample_rate: Optional[int] = 16000,
               mono: bool = True) -> Tuple[Tensor, int]:
    """Read WAV/FLAC/OGG with soundfile and resample with torchaudio.

    A file that decodes to less than its header announces (a truncated WAV, a FLAC whose decoder loses
    sync) gives a warning with both durations, and what decodes is returned.

    Returns:
        waveform float32, ``[S]`` if ``mono`` (channels averaged) else ``[channels, S]``, in [-1, 1]; and its
        rate in Hz (``sample_rate``, or the file's own rate when ``sample_rate`` is None).
    Raises:
        FileNotFoundError (no file), ImportError (soundfile or torchaudio missing: names the ``audio`` extra),
        ValueError (not a readable audio file, a damaged one, an empty one: 0 bytes or no samples in it).
    """
    path = os.fspath(path)
    if sample_rate is not None and (isinstance(sample_rate, bool) or int(sample_rate) <= 0):
        raise ValueError(f"sample_rate must be a positive rate in Hz (or None to keep the file's), got {sample_rate}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no audio file at '{path}'")
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is an empty file (0 bytes), not audio")
    sf = require("soundfile", "load_audio")
    blocks, stopped = [], None
    try:
        with sf.SoundFile(path) as file:
            rate, announced = int(file.samplerate), int(file.frames)
            try:
                for block in file.blocks(blocksize=READ_BLOCK, dtype="float32", always_2d=True):  # [s, channels]
                    blocks.append(torch.from_numpy(block))
            except RuntimeError as err:  # LibsndfileError mid-file: the decoder stopped (lost sync, cut data)
                stopped = err
    except Exception as err:  # soundfile raises LibsndfileError (a RuntimeError) for files it cannot open
        raise ValueError(f"could not read '{path}' as audio (WAV/FLAC/OGG via soundfile; not an audio file, or "
                         f"damaged): {err}") from None
    announced = wav_declared_frames(path) or announced
    decoded = sum(b.shape[0] for b in blocks)
    if decoded == 0:
        if stopped is not None or announced > 0:
            raise ValueError(f"'{path}' is damaged: its header announces {announced / rate:.2f} s but no samples "
                             f"decode ({stopped or 'no data'})")
        raise ValueError(f"'{path}' holds no audio samples (empty file)")
    if stopped is not None or decoded < announced:
        why = f" (the decoder stopped: {stopped})" if stopped is not None else ""
        warnings.warn(f"'{path}' looks damaged or truncated: its header says {announced / rate:.2f} s, "
                      f"{decoded / rate:.2f} s decode{why}; using what decodes", stacklevel=2)
    waveform = torch.cat(blocks).T.contiguous()  # [channels, S]
    if mono:
        waveform = waveform.mean(0)
    if sample_rate is not None and sample_rate != rate:
        AF = require("torchaudio.functional", "load_audio (resampling)")
        waveform = AF.resample(waveform, orig_freq=rate, new_freq=int(sample_rate))
        rate = int(sample_rate)
    return waveform, rate


def as_mono_float(clip: Union[Tensor, Any], name: str = "clip") -> Tensor:
    """One clip as float32 mono ``[S]`` in [-1, 1], from what users hand in.

    Integer PCM is scaled by its full range (int16 / 32768, int32 / 2**31, int8 / 128, uint8: (x - 128) / 128);
    a channels-last ``[S, C]`` array (soundfile's layout, C <= 8) is mixed down to mono with a warning.
    Raises ValueError for other layouts, for dtypes that are not audio samples (int64, bool, complex), for NaN or
    inf samples, and for float audio far outside [-1, 1] (peak above ``FLOAT_PEAK_LIMIT``: integer PCM stored as
    float, e.g. int16 samples x 32767, whose log-mel features would be shifted by ~21 in every bin).
    """
    x = torch.as_tensor(clip)
    if is_channels_last(x):
        warnings.warn(f"{name} of shape {list(x.shape)} is channels-last ({x.shape[1]} channels, soundfile's "
                      "layout): mixed down to mono; pass mono [S] (or load_audio(mono=True)) to skip this",
                      stacklevel=3)
        x = _checked_float(x, name).mean(1) if x.is_floating_point() else as_pcm_float(x, name).mean(1)
    if x.dim() != 1:
        raise ValueError(f"{name} must be mono [S]; got shape {tuple(x.shape)} (use load_audio(mono=True), "
                         "data.mean(1) for a soundfile [S, channels] array, or wave.mean(0) for a torchaudio "
                         "[channels, S] tensor)")
    return _checked_float(x, name) if x.is_floating_point() else as_pcm_float(x, name)


FLOAT_PEAK_LIMIT = 2.0  # float audio peaking above this is not [-1, 1] audio (clipped real audio stays near 1)


def _checked_float(x: Tensor, name: str) -> Tensor:
    """Float samples as float32, refused when not finite or far outside [-1, 1] (host reads: setup, not a forward)."""
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf sample(s) of {x.numel()}; audio samples must be finite "
                         "(check the decoder or the processing that made them)")
    peak = float(x.abs().max()) if x.numel() else 0.0
    if peak > FLOAT_PEAK_LIMIT:
        scale = next((f" (it looks like {kind} PCM stored as float: divide by {full:g}, or pass the {kind} array "
                      "itself)" for kind, full in (("int16", 2.0 ** 15), ("int32", 2.0 ** 31)) if peak <= full * 1.01), "")
        raise ValueError(f"{name} is float audio with peak {peak:g}, but float audio must lie in [-1, 1]{scale}")
    return x


def is_channels_last(x: Tensor) -> bool:
    """A ``[S, C]`` array with few columns (C <= 8) and at least one 25 ms frame of rows: channels, not a batch.

    (A batch ``[B, S]`` of clips that short could not be features anyway.)
    """
    return x.dim() == 2 and x.shape[1] <= MAX_CHANNELS and x.shape[0] >= FRAME_SAMPLES


def as_pcm_float(x: Tensor, name: str = "clip") -> Tensor:
    """Integer PCM samples as float32 in [-1, 1] (see ``as_mono_float``)."""
    if x.dtype == torch.uint8:  # 8-bit WAV is unsigned, centred on 128
        return (x.float() - 128.0) / 128.0
    if x.dtype not in PCM_FULL_SCALE:
        raise ValueError(f"{name} has dtype {x.dtype}, not an audio sample format: pass float audio in [-1, 1] or "
                         "integer PCM (int16, int32, int8, uint8)")
    return x.float() / PCM_FULL_SCALE[x.dtype]


def features(waveform: Union[Tensor, Sequence[Tensor]], sample_rate: int = 16000, *, num_mel_bins: int = 128,
             max_length: int = 1024, mean: float = AST_MEAN, std: float = AST_STD,
             normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """AST's input: 128-bin Kaldi log-mel fbank (25 ms Hann window, 10 ms hop), padded or cut to ``max_length``.

    Matches ``transformers.ASTFeatureExtractor`` (same torchaudio Kaldi fbank, zero padding, then
    ``(x - mean) / (2 * std)``). Audio at another rate is resampled to 16 kHz first. A clip longer than
    ``max_length`` frames (10.24 s for AST) is cut, with a warning: ``tag_windows`` tags a whole recording.

    Args:
        waveform: ``[S]`` one clip, a list of ``[S_i]`` clips (mono), or ``[B, S]`` clips of equal length with
            B = 1 or B > 8 (a ``[2..8, S]`` array is refused as ambiguous: channels-first audio, torchaudio's
            layout, or a small batch; pass ``wave.mean(0)`` or a list); tensors or numpy arrays, float in
            [-1, 1] or integer PCM (scaled by its full range). A channels-last ``[S, C]`` array (C <= 8,
            soundfile's layout) is mixed down to mono, with a warning. NaN or inf samples, and float audio
            peaking above 2 (integer PCM stored as float), are refused with a ValueError.
        num_mel_bins, max_length: the model's ``config.num_mel_bins`` and ``config.max_length`` (AST-base's by
            default); a patched model refuses input_values of another shape, naming both.
        sample_rate: rate of ``waveform`` in Hz.
    Returns:
        input_values ``[B, max_length, num_mel_bins]`` float32, and lengths ``[B]`` long: real frames per clip
        (before padding, at most ``max_length``), to pass to ``patch(..., lengths=...)``.
    """
    if isinstance(sample_rate, bool) or int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be a positive rate in Hz, got {sample_rate}")
    if isinstance(waveform, (list, tuple)):
        clips = [as_mono_float(c, f"clip {i}") for i, c in enumerate(waveform)]
    else:
        waveform = torch.as_tensor(waveform)
        if waveform.dim() == 2 and not is_channels_last(waveform):  # a batch [B, S], or channels first [C, S]
            if 1 < waveform.shape[0] <= MAX_CHANNELS:
                rows = waveform.shape[0]
                raise ValueError(f"waveform of shape {list(waveform.shape)} is ambiguous: {rows} channels of one clip "
                                 f"(torchaudio's [channels, S] layout) or a batch of {rows} clips? Pass wave.mean(0) "
                                 "for one clip mixed down to mono, or a list of clips ([w for w in wave]) for a batch")
            clips = [as_mono_float(c, f"clip {i}") for i, c in enumerate(waveform)]
        else:
            clips = [as_mono_float(waveform, "waveform")]
    if not clips:
        raise ValueError("no clips given; pass a waveform [S], a batch [B, S] or a list of [S_i] clips")
    kaldi = require("torchaudio.compliance.kaldi", "audio.features")
    rows, lengths, cut = [], [], []
    for i, clip in enumerate(clips):
        if sample_rate != SAMPLE_RATE:
            AF = require("torchaudio.functional", "audio.features (resampling)")
            clip = AF.resample(clip, orig_freq=int(sample_rate), new_freq=SAMPLE_RATE)
        if clip.numel() < FRAME_SAMPLES:
            raise ValueError(f"clip has {clip.numel()} samples at 16 kHz; AST needs at least one 25 ms frame (400)")
        fbank = kaldi.fbank(clip.unsqueeze(0), sample_frequency=SAMPLE_RATE, window_type="hanning",
                            num_mel_bins=num_mel_bins)  # [frames, mel]
        if fbank.shape[0] > max_length:
            cut.append(f"clip {i}: {clip.numel() / SAMPLE_RATE:.2f} s")
        n = min(fbank.shape[0], max_length)
        fbank = torch.nn.functional.pad(fbank[:max_length], (0, 0, 0, max_length - n))
        rows.append((fbank - mean) / (std * 2) if normalize else fbank)
        lengths.append(n)
    if cut:
        warnings.warn(f"features keeps the first {max_length * HOP_SECONDS:.2f} s ({max_length} frames) of each clip "
                      f"and cuts the rest of {', '.join(cut)}; audio.tag_windows(model, waveform, rate) tags a "
                      "whole recording in windows", stacklevel=2)
    return torch.stack(rows), torch.tensor(lengths, dtype=torch.long)


def real_lengths(input_values: Tensor, mean: float = AST_MEAN, std: float = AST_STD, normalized: bool = True,
                 atol: float = 1e-5) -> Tensor:
    """Real frames per clip ``[B]`` of padded AST input, e.g. from ``transformers.ASTFeatureExtractor``.

    The extractor pads the fbank with zeros before normalising, so a padded frame holds ``(0 - mean) / (2 std)``
    in every mel bin (0 when ``normalized=False``); a real frame never does (silence is log(eps), not 0). The
    trailing run of such frames is padding. Pass the result to ``patch(..., lengths=...)``.

    Args:
        input_values: ``[frames, mel]`` or ``[B, frames, mel]``.
    Returns:
        long ``[B]``, each in ``1 .. frames``.
    """
    x = torch.as_tensor(input_values)
    x = x.unsqueeze(0) if x.dim() == 2 else x
    if x.dim() != 3:
        raise ValueError(f"input_values must be [frames, mel] or [B, frames, mel], got {tuple(x.shape)}")
    pad = (0.0 - mean) / (2 * std) if normalized else 0.0
    is_pad = ((x.float() - pad).abs() <= atol).all(-1)  # [B, frames]
    trailing = is_pad.flip(1).long().cumprod(1).sum(1)  # padded frames at the end
    return (x.shape[1] - trailing).clamp_min(1)


# -------------------------------------------------------------------------------------- long recordings
@dataclass
class WindowTags:
    """What ``tag_windows`` found in a recording, window by window and second by second.

    ``starts`` ``[W]`` seconds where each window starts; ``lengths`` ``[W]`` real fbank frames per window (every
    window holds ``max_length`` but a shorter last one); ``columns`` ``[W]`` time columns the encoder saw (fewer
    in a short last window when the patch drops padding); ``tokens_per_layer``: per window, as the patched model ran
    it; ``logits`` ``[W, L]`` each window's clip logits; ``scores`` ``[L]`` the recording's scores, the max over
    windows of ``activation(logits)`` (a tag heard in any window scores high); ``timeline`` ``[ceil(seconds), L]``
    per-second scores: the per-column scores (``column_logits``) of every window, averaged over the columns that
    overlap each second, weighted by the overlap. ``seconds``: the recording's duration.
    """

    starts: Tensor
    lengths: Tensor
    columns: Tensor
    tokens_per_layer: List[List[int]]
    logits: Tensor
    scores: Tensor
    timeline: Tensor
    seconds: float
    window_seconds: float
    hop_seconds: float


def window_starts(samples: int, window: int, hop: int) -> List[int]:
    """Start samples of windows of ``window`` samples, ``hop`` apart, that cover ``samples`` samples.

    The last window may run past the end (it is padded); a tail shorter than one 25 ms fbank frame after the
    previous window gets no window of its own.
    """
    count = 1 + max(0, math.ceil((samples - window) / hop))
    starts = [k * hop for k in range(count)]
    if count > 1 and samples - starts[-1] < FRAME_SAMPLES:
        starts.pop()
    return starts


def _timeline(spans: Tensor, scores: Tensor, seconds: float) -> Tensor:
    """Per-second scores ``[ceil(seconds), L]`` from column spans ``[M, 2]`` (s) and column scores ``[M, L]``."""
    bins = max(1, math.ceil(seconds))
    edges = torch.arange(bins, device=scores.device, dtype=scores.dtype).unsqueeze(1)  # [bins, 1]
    overlap = (torch.minimum(spans[:, 1], edges + 1) - torch.maximum(spans[:, 0], edges)).clamp_min(0)  # [bins, M]
    # A last second holding less than one fbank frame may overlap no column: it takes its nearest column.
    centre = spans.mean(1)
    nearest = (centre - (edges + 0.5)).abs().argmin(1)  # [bins]
    empty = overlap.sum(1) == 0
    overlap[empty, nearest[empty]] = 1.0
    return overlap @ scores / overlap.sum(1, keepdim=True)


@torch.no_grad()
def tag_windows(model: nn.Module, waveform: Union[Tensor, Any], sample_rate: int = 16000, *,
                hop_seconds: Optional[float] = None, batch_size: int = 8, activation: str = "sigmoid",
                mean: float = AST_MEAN, std: float = AST_STD) -> WindowTags:
    """Tag a recording of any length with a patched ASTForAudioClassification, in windows of the model's length.

    AST sees ``max_length`` frames (10.24 s); ``features`` of a longer recording keeps only its start. Here the
    recording is cut into windows of exactly that length, ``hop_seconds`` apart (default: half a window), each
    window runs through the model as patched (merging included), and the last, shorter window goes through the
    adapter's padding path (``set_lengths``: its padded columns are dropped before layer 0 when the patch has
    ``drop_padding=True``, kept but never merged otherwise). The patch's own lengths are restored afterwards.

    Args:
        model: an ASTForAudioClassification patched by ``audio.patch(model, ..., trace_source=True)`` (the
            timeline needs the source map, or ``output="original"``; ``r=0`` merges nothing).
        waveform: one recording, mono ``[S]`` (float in [-1, 1] or integer PCM; ``[S, C]`` is mixed down).
        sample_rate: its rate in Hz (resampled to 16 kHz).
        hop_seconds: seconds between window starts, from 0.01 s to one window (rounded to 10 ms frames).
        batch_size: full windows per forward.
        activation: ``sigmoid`` (multi-label tagging, AudioSet) or ``softmax`` (one class per clip).
        mean, std: the feature extractor's normalisation.
    Returns:
        ``WindowTags`` (per-window logits, recording scores, per-second timeline).
    Raises:
        TypeError (not an ASTForAudioClassification), ValueError (not patched, no ``trace_source``, bad
        options, a recording shorter than one 25 ms frame, an ``r`` the short last window cannot take).
    """
    spec = _audio_patch(model)
    if not hasattr(model, "classifier"):
        raise TypeError("tag_windows needs an ASTForAudioClassification (it uses the classifier head)")
    options = spec.extra["options"]
    if not (options.get("trace_source") or options.get("output") == "original"):
        raise ValueError("tag_windows needs per-column outputs: patch with audio.patch(model, r=..., "
                         "trace_source=True) (r=0 merges nothing)")
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(sample_rate, bool) or int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be a positive rate in Hz, got {sample_rate}")
    layout = ast_layout(model)
    window = FRAME_SAMPLES + (layout.max_length - 1) * HOP_SAMPLES  # samples giving exactly max_length frames
    window_seconds = layout.max_length * HOP_SECONDS
    hop_seconds = window_seconds / 2 if hop_seconds is None else hop_seconds
    hop_frames = round(float(hop_seconds) / HOP_SECONDS) if math.isfinite(float(hop_seconds)) else 0
    if not 1 <= hop_frames <= layout.max_length:
        raise ValueError(f"hop_seconds must be between 0.01 s and one window ({window_seconds:.2f} s), so that "
                         f"windows touch or overlap; got {hop_seconds}")
    clip = as_mono_float(waveform, "waveform")
    if int(sample_rate) != SAMPLE_RATE:
        AF = require("torchaudio.functional", "tag_windows (resampling)")
        clip = AF.resample(clip, orig_freq=int(sample_rate), new_freq=SAMPLE_RATE)
    starts = window_starts(clip.numel(), window, hop_frames * HOP_SAMPLES)
    x, lengths = features([clip[s:s + window] for s in starts], num_mel_bins=layout.num_mel_bins,
                          max_length=layout.max_length, mean=mean, std=std)
    weight = next(model.parameters())
    x = x.to(weight.device, weight.dtype)
    full = int((lengths == layout.max_length).sum())  # windows are full but (maybe) the last
    logits, spans, column_scores, columns, tokens = [], [], [], [], []

    def run(batch: Tensor, first: int) -> None:
        clip_logits, per_column = column_logits(model, batch)  # [b, L], [b, T', L]
        seen = patched_layout(model)  # set_lengths made a new patch
        seconds = seen.column_seconds().to(per_column.device)
        per_layer = list(merge_info(model).tokens_per_layer)  # the same for every window of this batch
        for i in range(batch.shape[0]):
            real = seen.real_columns(int(lengths[first + i]))
            start = starts[first + i] / SAMPLE_RATE
            spans.append(seconds[:real] + start)
            column_scores.append(per_column[i, :real].float())
            columns.append(seen.columns)
            tokens.append(list(per_layer))
        logits.append(clip_logits.float())

    saved = spec.extra["lengths"]
    try:
        if full:
            set_lengths(model, None)
            for first in range(0, full, batch_size):
                run(x[first:min(full, first + batch_size)], first)
        if full < len(starts):
            try:
                set_lengths(model, lengths[full:])
            except ValueError as err:
                raise ValueError(f"the last window holds {int(lengths[-1]) * HOP_SECONDS:.2f} s of the recording, "
                                 f"and the patch cannot run it: {err}; a relative r (TargetFlops, KeepRatio) fits "
                                 "every length") from None
            run(x[full:], full)
    finally:
        set_lengths(model, saved)
    logits_all = torch.cat(logits)  # [W, L]
    act = torch.sigmoid if activation == "sigmoid" else (lambda v: v.softmax(-1))
    seconds = clip.numel() / SAMPLE_RATE
    timeline = _timeline(torch.cat(spans), act(torch.cat(column_scores)), seconds)
    return WindowTags(starts=torch.tensor(starts, dtype=torch.float32) / SAMPLE_RATE, lengths=lengths,
                      columns=torch.tensor(columns), tokens_per_layer=tokens, logits=logits_all,
                      scores=act(logits_all).amax(0), timeline=timeline, seconds=seconds,
                      window_seconds=window_seconds, hop_seconds=hop_frames * HOP_SECONDS)


# ------------------------------------------------------------------------------------------ visualizing
def _palette(n: int) -> Tensor:
    """``[n, 3]`` distinct-ish colours in [0, 1] (golden-ratio hues)."""
    hue = (torch.arange(n, dtype=torch.float32) * 0.618034) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0]).unsqueeze(0) + hue.unsqueeze(1) * 6) % 6  # HSV -> RGB, s = v = 0.9
    return 0.9 - 0.9 * 0.9 * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def visualize(spectrogram: Tensor, info: MergeInfo, layout: Optional[AudioLayout] = None,
              model: Optional[nn.Module] = None, batch_index: int = 0, alpha: float = 0.45, scale: int = 2):
    """Picture of the merged groups over the spectrogram (time left to right, low frequencies at the bottom).

    Every token paints its stride cell (``time_stride`` frames x ``frequency_stride`` mel bins) with its
    group's colour; group borders are white. Columns the encoder did not see (dropped padding) stay grey.
    Needs ``trace_source=True``.

    Args:
        spectrogram: ``[frames, mel]`` or ``[B, frames, mel]`` input_values (from ``features``).
        info: ``mmmerge.last_info(model)`` after a forward. layout: or ``model`` to read it from.
    Returns:
        a PIL image of ``scale * mel`` x ``scale * frames`` pixels.
    """
    from PIL import Image

    if layout is None:
        if model is None:
            raise ValueError("pass layout= or model=")
        layout = patched_layout(model)
    if info.source is None:
        raise ValueError("no source map: patch with trace_source=True and run a forward first")
    spec = torch.as_tensor(spectrogram).detach().float().cpu()
    spec = spec[batch_index] if spec.dim() == 3 else spec
    if spec.dim() != 2:
        raise ValueError(f"spectrogram must be [frames, mel] or [B, frames, mel], got {tuple(spectrogram.shape)}")
    frames, mels = spec.shape
    gray = ((spec - spec.min()) / (spec.max() - spec.min()).clamp_min(1e-6)).T.flip(0)  # [mel, frames], low at bottom
    source = info.source[batch_index, layout.protected:].cpu() - layout.protected  # [F' * T'] group of each token
    groups = int(source.max()) + 1
    grid = source.view(layout.bands, layout.columns)
    band = (torch.arange(mels) // layout.frequency_stride).clamp(max=layout.bands - 1).flip(0)  # per pixel row
    col = torch.arange(frames) // layout.time_stride
    seen = col < layout.columns
    cell = grid[band.unsqueeze(1), col.clamp(max=layout.columns - 1).unsqueeze(0)]  # [mel, frames] group id
    colour = _palette(groups)[cell]  # [mel, frames, 3]
    image = gray.unsqueeze(-1).expand(-1, -1, 3).clone()
    image[:, seen] = alpha * colour[:, seen] + (1 - alpha) * image[:, seen]
    image[:, ~seen] = 0.5 * image[:, ~seen] + 0.25
    edge = torch.zeros(mels, frames, dtype=torch.bool)
    edge[1:, :] |= cell[1:, :] != cell[:-1, :]
    edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    image[edge & seen.unsqueeze(0)] = 1.0
    image = image.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return Image.fromarray((image.clamp(0, 1) * 255).byte().numpy())
