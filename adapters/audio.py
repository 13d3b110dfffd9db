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
them; ``real_lengths`` reads them off input from transformers' ASTFeatureExtractor) and padded columns are
dropped right after the embeddings (``drop_padding=True``, a free speedup on short clips) or kept but marked
invalid, so that they never merge with real tokens.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from mmmerge.constraints import parse_time_mode
from mmmerge.info import MergeInfo
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
    """Real frame counts as Python ints (setup time, never in a forward), checked."""
    if lengths is None:
        return None
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integer frame counts, got a {lengths.dtype} tensor")
        values = lengths.reshape(-1).tolist()
    elif isinstance(lengths, bool) or isinstance(lengths, (str, bytes)):
        raise TypeError(f"lengths must be an int or a sequence of ints (frames per clip), got {lengths!r}")
    elif isinstance(lengths, int):
        values = [lengths]
    else:
        values = list(lengths)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"lengths must be positive int frame counts (features() returns them), got {lengths!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"lengths must be positive frame counts (features() returns them), got {values}")
    return [min(v, layout.max_length) for v in values]


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
          drop_padding: bool = True, within_band: bool = False, group_budget: bool = True,
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
        drop_padding: with ``lengths``, remove columns that are padding in every clip before layer 0 (the
            output then covers fewer columns); otherwise padded columns stay, marked invalid.
        output: ``"merged"`` (the merged tokens) or ``"original"`` (one row per token entering layer 0).
        **options: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``); unknown names and bad values raise ValueError.
    Raises:
        TypeError for unsupported models, ValueError for an infeasible r or a bad option; the model is
        then left untouched.
    """
    for old, new in (("band_budget", "group_budget"), ("window", "time_mode='window(k)'")):
        if old in options:
            raise ValueError(f"audio.patch takes no option '{old}'; use {new}")
    full = ast_layout(model)
    base = _backbone(model)
    mode, k = parse_time_mode(time_mode, TIME_MODES)
    layout, keep, valid = _padding(full, _lengths_list(lengths, full), drop_padding)
    layers = encoder_layers(base)
    merge_layout = plan_layout(layout.grid, mode, k, group_budget, band_axis="f", within_band=within_band,
                               padded=valid is not None)
    coords, rules = _position_coords(layout)
    if prop_attn is None:
        prop_attn = method != "prune"
    record = dict(r=r, method=method, time_mode=time_mode, prop_attn=prop_attn, trace_source=trace_source,
                  drop_padding=drop_padding, within_band=within_band, group_budget=group_budget, output=output,
                  **options)
    patch_encoder(model, layers, grid=layout.grid, layout=merge_layout, r=r, method=method, options=options,
                  prop_attn=prop_attn, trace_source=trace_source, output=output,
                  layer_flops=encoder_flops(base.config), embed_index=keep, embed_tokens=full.num_tokens,
                  valid=valid, position_coords=coords, rules=rules, family="audio",
                  extra={"layout": layout, "options": record, "lengths": lengths})
    return model


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
def load_audio(path: Union[str, os.PathLike], sample_rate: Optional[int] = 16000,
               mono: bool = True) -> Tuple[Tensor, int]:
    """Read WAV/FLAC/OGG with soundfile and resample with torchaudio.

    Returns:
        waveform float32, ``[S]`` if ``mono`` (channels averaged) else ``[channels, S]``, in [-1, 1]; and its
        rate in Hz (``sample_rate``, or the file's own rate when ``sample_rate`` is None).
    Raises:
        FileNotFoundError (no file), ValueError (not a readable audio file; an empty file: 0 bytes or no
        samples in it).
    """
    import soundfile as sf

    path = os.fspath(path)
    if sample_rate is not None and (isinstance(sample_rate, bool) or int(sample_rate) <= 0):
        raise ValueError(f"sample_rate must be a positive rate in Hz (or None to keep the file's), got {sample_rate}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no audio file at '{path}'")
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is an empty file (0 bytes), not audio")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)  # [S, channels]
    except Exception as err:  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        raise ValueError(f"could not read '{path}' as audio (WAV/FLAC/OGG via soundfile): {err}") from None
    if data.shape[0] == 0:
        raise ValueError(f"'{path}' holds no audio samples (empty file)")
    waveform = torch.from_numpy(data.T.copy())  # [channels, S]
    if mono:
        waveform = waveform.mean(0)
    if sample_rate is not None and sample_rate != rate:
        import torchaudio.functional as AF

        waveform = AF.resample(waveform, orig_freq=int(rate), new_freq=int(sample_rate))
        rate = sample_rate
    return waveform, int(rate)


def features(waveform: Union[Tensor, Sequence[Tensor]], sample_rate: int = 16000, *, num_mel_bins: int = 128,
             max_length: int = 1024, mean: float = AST_MEAN, std: float = AST_STD,
             normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """AST's input: 128-bin Kaldi log-mel fbank (25 ms Hann window, 10 ms hop), padded or cut to ``max_length``.

    Matches ``transformers.ASTFeatureExtractor`` (same torchaudio Kaldi fbank, zero padding, then
    ``(x - mean) / (2 * std)``). Audio at another rate is resampled to 16 kHz first.

    Args:
        waveform: ``[S]`` one clip, ``[B, S]`` clips of equal length, or a list of ``[S_i]`` clips (mono);
            tensors or numpy arrays.
        sample_rate: rate of ``waveform`` in Hz.
    Returns:
        input_values ``[B, max_length, num_mel_bins]`` float32, and lengths ``[B]`` long: real frames per clip
        (before padding, at most ``max_length``), to pass to ``patch(..., lengths=...)``.
    """
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    if isinstance(sample_rate, bool) or int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be a positive rate in Hz, got {sample_rate}")
    if isinstance(waveform, (list, tuple)):
        clips = list(waveform)
    else:
        waveform = torch.as_tensor(waveform)
        clips = list(waveform) if waveform.dim() == 2 else [waveform]
    if not clips:
        raise ValueError("no clips given; pass a waveform [S], a batch [B, S] or a list of [S_i] clips")
    rows, lengths = [], []
    for clip in clips:
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if clip.dim() != 1:
            raise ValueError(f"each clip must be mono [S]; got shape {tuple(clip.shape)} (use load_audio(mono=True))")
        if sample_rate != 16000:
            clip = AF.resample(clip, orig_freq=int(sample_rate), new_freq=16000)
        if clip.numel() < 400:
            raise ValueError(f"clip has {clip.numel()} samples at 16 kHz; AST needs at least one 25 ms frame (400)")
        fbank = kaldi.fbank(clip.unsqueeze(0), sample_frequency=16000, window_type="hanning",
                            num_mel_bins=num_mel_bins)  # [frames, mel]
        n = min(fbank.shape[0], max_length)
        fbank = torch.nn.functional.pad(fbank[:max_length], (0, 0, 0, max_length - n))
        rows.append((fbank - mean) / (std * 2) if normalize else fbank)
        lengths.append(n)
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
