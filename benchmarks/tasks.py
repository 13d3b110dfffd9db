"""Seeded procedural tasks where time order matters, for the reference models of the quality benchmark.

Both generators draw a batch of clip parameters from a seed (``video_params`` / ``audio_params``), render
them (``render_video`` / ``render_audio``) and label them (``*_labels``). ``reverse_*_params`` gives the
parameters of the time-reversed clip: rendering them equals flipping the rendered clip in time, and the
label always changes (tests check both), so no model can solve the task from appearance alone.

Video (8 frames of 32 x 32 RGB, ``[B, T, 3, H, W]`` in [-1, 1]) - 8 classes = direction x order:
    a white square moves right / left / down / up at 2 or 3 px per frame (speed is a nuisance);
    a red and a green 8 x 8 square each flash for exactly one tubelet (2 frames from an even frame, on the
    4-px patch grid), one in the first half of the clip (frame 0 or 2), the other in the second (4 or 6);
    label = 2 * direction + (1 if green flashes first else 0).
    Nuisance: a static blue box, pixel noise, positions, flash times. Reversed: direction and order flip.
    (A first version with 5 x 5 flashes at any frame and any position was learned only for direction:
    the order bit stayed at chance in small models trained for 15 minutes on one core.)

Audio (2.56 s at 16 kHz, then 128-bin AST fbank ``[B, 256, 128]``) - 8 classes = order x sweep x gap:
    a low tone (250-500 Hz) and a high tone (2.5-4.5 kHz), one after the other, separated by a short
    (0.04-0.2 s) or long (0.5-0.8 s) gap; a chirp sweeping up or down between 0.8 and 2.4 kHz somewhere;
    each is a stack of partials spanning several mel bins (``PARTIALS``, ``SPREAD``);
    label = 4 * (high tone first) + 2 * (chirp sweeps down) + (gap is long).
    Nuisance: frequencies, durations, loudness, noise bursts, background noise. Reversed: order and sweep
    flip, the gap stays.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor

Params = Dict[str, Tensor]

# ------------------------------------------------------------------------------------------------ video
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_CLASSES = 8, 32, 8
MOVER, FLASH, FLASH_FRAMES = 6, 8, 2  # square sides (px) and flash length (frames, one tubelet)
DIRECTIONS = ("right", "left", "down", "up")
_VELOCITY = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}  # (dx, dy) unit per direction
VIDEO_LABELS = [f"moves {d}, {'green' if g else 'red'} flash first" for d in DIRECTIONS for g in (0, 1)]


def video_params(n: int, seed: int) -> Params:
    """``n`` random clip descriptions (integer pixel positions, so time reversal is exact)."""
    g = torch.Generator().manual_seed(seed)
    T, S = VIDEO_FRAMES, VIDEO_SIZE

    def randint(lo: int, hi: Tensor | int) -> Tensor:  # uniform in [lo, hi] per clip
        hi = torch.as_tensor(hi).expand(n)
        return lo + (torch.rand(n, generator=g) * (hi - lo + 1)).floor().long()

    direction = randint(0, 3)
    speed = randint(2, 3)
    unit = torch.tensor([_VELOCITY[d] for d in range(4)])[direction]  # [n, 2]
    vx, vy = unit[:, 0] * speed, unit[:, 1] * speed
    travel = speed * (T - 1)
    # Start so that the whole path stays inside the frame.
    x0 = randint(0, S - MOVER - torch.where(vx != 0, travel, 0))
    y0 = randint(0, S - MOVER - torch.where(vy != 0, travel, 0))
    x0 = torch.where(vx < 0, x0 + travel, x0)
    y0 = torch.where(vy < 0, y0 + travel, y0)
    # Flashes: each lasts exactly one tubelet (2 frames starting at an even frame) and sits on the 4-px patch
    # grid, so a token sees a whole flash or none; the first is in the first half (frame 0 or 2), the second
    # in the second half (frame 4 or 6). Reversal maps t -> 6 - t, which keeps both properties.
    first = 2 * randint(0, 1)
    second = 4 + 2 * randint(0, 1)
    green_first = randint(0, 1)
    red_t = torch.where(green_first.bool(), second, first)
    green_t = torch.where(green_first.bool(), first, second)
    cells = (S - FLASH) // 4  # top-left corners on the patch grid
    return {
        "x0": x0, "y0": y0, "vx": vx, "vy": vy,
        "red_t": red_t, "red_x": 4 * randint(0, cells), "red_y": 4 * randint(0, cells),
        "green_t": green_t, "green_x": 4 * randint(0, cells), "green_y": 4 * randint(0, cells),
        "box_x": randint(0, S - 8), "box_y": randint(0, S - 8), "box_w": randint(4, 8), "box_h": randint(4, 8),
        "noise": 0.04 * torch.randn(n, T, 3, S, S, generator=g),
    }


def video_labels(p: Params) -> Tensor:
    """``[B]`` long in [0, 8): 2 * direction + green-flashes-first."""
    direction = torch.where(p["vx"] > 0, 0, torch.where(p["vx"] < 0, 1, torch.where(p["vy"] > 0, 2, 3)))
    return 2 * direction + (p["green_t"] < p["red_t"]).long()


def reverse_video_params(p: Params) -> Params:
    """Parameters of the clips played backwards: ``render_video(reverse(p)) == render_video(p).flip(1)``."""
    T = VIDEO_FRAMES
    q = dict(p)
    q["x0"], q["y0"] = p["x0"] + p["vx"] * (T - 1), p["y0"] + p["vy"] * (T - 1)
    q["vx"], q["vy"] = -p["vx"], -p["vy"]
    q["red_t"] = T - FLASH_FRAMES - p["red_t"]
    q["green_t"] = T - FLASH_FRAMES - p["green_t"]
    q["noise"] = p["noise"].flip(1)
    return q


def _box(x: Tensor, y: Tensor, w: Tensor | int, h: Tensor | int) -> Tensor:
    """``[B, S, S]`` bool mask of axis-aligned boxes with top-left (x, y)."""
    S = VIDEO_SIZE
    cols = torch.arange(S).view(1, 1, S)
    rows = torch.arange(S).view(1, S, 1)
    w, h = torch.as_tensor(w).expand_as(x), torch.as_tensor(h).expand_as(x)
    return ((cols >= x.view(-1, 1, 1)) & (cols < (x + w).view(-1, 1, 1))
            & (rows >= y.view(-1, 1, 1)) & (rows < (y + h).view(-1, 1, 1)))


COLOURS = {"white": (0.95, 0.95, 0.95), "red": (0.95, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.2, 0.3, 0.9),
           "yellow": (0.95, 0.9, 0.1)}
Cues = Callable[[int], Iterable[Tuple[Tensor, str]]]  # frame t -> (mask [B, S, S], colour) to paint on top


def _render_scene(p: Params, cues: Cues) -> Tensor:
    """The scene both video tasks share: grey background, a blue box, a white square moving across it, then
    the task's cues painted on top (so the mover never hides one); plus the clip's noise. ``[B, T, 3, H, W]``
    float32 in [-1, 1] (what ViViT / VideoMAE take as ``pixel_values``)."""
    T = VIDEO_FRAMES
    B = p["x0"].shape[0]
    frames = torch.full((B, T, 3, VIDEO_SIZE, VIDEO_SIZE), 0.15)

    def paint(t: int, mask: Tensor, name: str) -> None:  # mask [B, S, S]
        rgb = torch.tensor(COLOURS[name]).view(1, 3, 1, 1)
        frames[:, t] = torch.where(mask.unsqueeze(1), rgb, frames[:, t])

    box = _box(p["box_x"], p["box_y"], p["box_w"], p["box_h"])
    for t in range(T):
        paint(t, box, "blue")
        paint(t, _box(p["x0"] + p["vx"] * t, p["y0"] + p["vy"] * t, MOVER, MOVER), "white")
        for mask, name in cues(t):
            paint(t, mask, name)
    return ((frames + p["noise"]).clamp(0, 1) - 0.5) / 0.5


def render_video(p: Params) -> Tensor:
    """Clips ``[B, T, 3, H, W]`` in [-1, 1]: a red and a green flash, each for ``FLASH_FRAMES`` frames."""
    def flashes(t: int) -> Iterable[Tuple[Tensor, str]]:
        for name in ("red", "green"):
            on = (p[f"{name}_t"] <= t) & (t < p[f"{name}_t"] + FLASH_FRAMES)
            yield _box(p[f"{name}_x"], p[f"{name}_y"], FLASH, FLASH) & on.view(-1, 1, 1), name

    return _render_scene(p, flashes)


def video_batch(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` clips ``[n, 8, 3, 32, 32]`` and their labels ``[n]`` from ``seed``."""
    p = video_params(n, seed)
    return render_video(p), video_labels(p)


# ------------------------------------------------------------------------------------ video: which came first
# Two flashes that look exactly alike, each filling exactly one token (a 4 x 4 px patch for one tubelet of 2
# frames), at different tubelets and in different horizontal bands (rows 0-1, 2-3, 4-5, 6-7 of the 8 x 8 patch
# grid); the label is the band of the first one. A merge that fuses the two flash tokens (or a flash token
# with tokens of other tubelets) keeps "a flash here, a flash there" but loses which came first, so merging
# across time can destroy the answer. (A first version asked for the quadrant: the small VideoMAE learned
# top/bottom (100%) but not left/right (55%) in 800 steps; bands keep four classes on the axis it learns.)
WHEN_CLASSES = 4
BANDS = ("top", "upper middle", "lower middle", "bottom")
WHEN_LABELS = [f"first flash in the {b} band" for b in BANDS]
_WHEN_PATCH, _WHEN_TUBELET, _WHEN_BAND = 4, 2, 2  # px per patch, frames per tubelet, patch rows per band


def when_params(n: int, seed: int) -> Params:
    """``n`` random clip descriptions: flash tubelets ``first_t < second_t`` (in 0..3), their patch cells
    (row, col on the 8 x 8 grid, in different bands), a moving white square and a static blue box as
    nuisance, pixel noise."""
    g = torch.Generator().manual_seed(seed)
    T, S = VIDEO_FRAMES, VIDEO_SIZE
    tubelets, cells = T // _WHEN_TUBELET, S // _WHEN_PATCH

    def randint(lo: int, hi: Tensor | int) -> Tensor:  # uniform in [lo, hi] per clip
        hi = torch.as_tensor(hi).expand(n)
        return lo + (torch.rand(n, generator=g) * (hi - lo + 1)).floor().long()

    pair = torch.rand(n, tubelets, generator=g).argsort(dim=1)[:, :2].sort(dim=1).values  # [n, 2] t1 < t2
    bands = torch.rand(n, cells // _WHEN_BAND, generator=g).argsort(dim=1)[:, :2]  # two different bands
    rows = bands * _WHEN_BAND + (torch.rand(n, 2, generator=g) * _WHEN_BAND).floor().long()
    cols = (torch.rand(n, 2, generator=g) * cells).floor().long()
    speed = randint(1, 2)
    direction = randint(0, 3)
    unit = torch.tensor([_VELOCITY[d] for d in range(4)])[direction]
    vx, vy = unit[:, 0] * speed, unit[:, 1] * speed
    travel = speed * (T - 1)
    x0 = randint(0, S - MOVER - torch.where(vx != 0, travel, 0))
    y0 = randint(0, S - MOVER - torch.where(vy != 0, travel, 0))
    x0 = torch.where(vx < 0, x0 + travel, x0)
    y0 = torch.where(vy < 0, y0 + travel, y0)
    return {
        "first_t": pair[:, 0], "second_t": pair[:, 1], "first_row": rows[:, 0], "first_col": cols[:, 0],
        "second_row": rows[:, 1], "second_col": cols[:, 1],
        "x0": x0, "y0": y0, "vx": vx, "vy": vy,
        "box_x": randint(0, S - 8), "box_y": randint(0, S - 8), "box_w": randint(4, 8), "box_h": randint(4, 8),
        "noise": 0.04 * torch.randn(n, T, 3, S, S, generator=g),
    }


def when_labels(p: Params) -> Tensor:
    """``[B]`` long in [0, 4): the band (top to bottom) of the first flash."""
    return p["first_row"] // _WHEN_BAND


def reverse_when_params(p: Params) -> Params:
    """Parameters of the clips played backwards: ``render_when(reverse(p)) == render_when(p).flip(1)``."""
    T = VIDEO_FRAMES
    last = T // _WHEN_TUBELET - 1
    q = dict(p)
    q["x0"], q["y0"] = p["x0"] + p["vx"] * (T - 1), p["y0"] + p["vy"] * (T - 1)
    q["vx"], q["vy"] = -p["vx"], -p["vy"]
    q["first_t"], q["second_t"] = last - p["second_t"], last - p["first_t"]
    q["first_row"], q["second_row"] = p["second_row"], p["first_row"]
    q["first_col"], q["second_col"] = p["second_col"], p["first_col"]
    q["noise"] = p["noise"].flip(1)
    return q


def render_when(p: Params) -> Tensor:
    """Clips ``[B, T, 3, H, W]`` in [-1, 1]: both flashes yellow, each on one patch for one tubelet."""
    def flashes(t: int) -> Iterable[Tuple[Tensor, str]]:
        for which in ("first", "second"):
            on = p[f"{which}_t"] == t // _WHEN_TUBELET
            cell = _box(_WHEN_PATCH * p[f"{which}_col"], _WHEN_PATCH * p[f"{which}_row"], _WHEN_PATCH, _WHEN_PATCH)
            yield cell & on.view(-1, 1, 1), "yellow"

    return _render_scene(p, flashes)


def when_batch(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` clips ``[n, 8, 3, 32, 32]`` and their labels ``[n]`` (band of the first flash) from ``seed``."""
    p = when_params(n, seed)
    return render_when(p), when_labels(p)


# ------------------------------------------------------------------------------------------------ audio
SAMPLE_RATE, AUDIO_FRAMES, MEL_BINS, AUDIO_CLASSES = 16000, 256, 128, 8
AUDIO_SAMPLES = 400 + (AUDIO_FRAMES - 1) * 160  # exactly 256 fbank frames (25 ms window, 10 ms hop)
RAMP = 0.02  # seconds of linear fade at each end of an event
# Each tone and the chirp is a stack of partials from f to f * (1 + spread): a band several mel bins
# high that fills whole 16 x 16 AST patches, not a line one bin high. (With single sine tones the small
# ASTs here stayed at chance in 800-1500 steps, while a one-layer CNN learned the task: too little of each
# patch changes for a from-scratch ViT to pick up.)
PARTIALS = 8
SPREAD = {"low": 0.8, "high": 0.5, "chirp": 0.2}
AUDIO_LABELS = [f"{'high' if h else 'low'} tone first, chirp {'down' if d else 'up'}, {'long' if g else 'short'} gap"
                for h in (0, 1) for d in (0, 1) for g in (0, 1)]


def audio_params(n: int, seed: int) -> Params:
    """``n`` random clip descriptions; every event is given by its centre ``c`` and duration ``d`` (seconds)."""
    g = torch.Generator().manual_seed(seed)
    length = (AUDIO_SAMPLES - 1) / SAMPLE_RATE

    def uniform(lo: float, hi: float | Tensor, shape: Tuple[int, ...] = ()) -> Tensor:
        return lo + torch.rand((n,) + shape, generator=g) * (torch.as_tensor(hi) - lo)

    high_first = (torch.rand(n, generator=g) < 0.5).long()
    gap_long = (torch.rand(n, generator=g) < 0.5).long()
    down = (torch.rand(n, generator=g) < 0.5).long()
    d1, d2 = uniform(0.2, 0.35), uniform(0.2, 0.35)
    gap = torch.where(gap_long.bool(), uniform(0.5, 0.8), uniform(0.04, 0.2))
    start = uniform(0.05, length - 0.05 - (d1 + gap + d2))  # the pair fits inside the clip
    c1, c2 = start + d1 / 2, start + d1 + gap + d2 / 2
    low_f, high_f = uniform(250.0, 500.0), uniform(2500.0, 4500.0)
    chirp_d = uniform(0.3, 0.5)
    span = uniform(600.0, 1200.0)  # Hz swept
    slope = torch.where(down.bool(), -1.0, 1.0) * span / chirp_d  # Hz per second
    return {
        "low_c": torch.where(high_first.bool(), c2, c1), "low_d": torch.where(high_first.bool(), d2, d1),
        "high_c": torch.where(high_first.bool(), c1, c2), "high_d": torch.where(high_first.bool(), d1, d2),
        "low_f": low_f, "high_f": high_f, "low_a": uniform(0.1, 0.3), "high_a": uniform(0.05, 0.2),
        "chirp_c": uniform(0.05 + chirp_d / 2, length - 0.05 - chirp_d / 2), "chirp_d": chirp_d,
        "chirp_f": uniform(1100.0, 1700.0), "chirp_k": slope, "chirp_a": uniform(0.05, 0.2),
        "burst_c": uniform(0.05, length - 0.05, (2,)), "burst_a": uniform(0.0, 0.3, (2,)),
        "noise": torch.randn(n, AUDIO_SAMPLES, generator=g), "noise_a": uniform(0.002, 0.02),
    }


def audio_labels(p: Params) -> Tensor:
    """``[B]`` long in [0, 8): 4 * high-first + 2 * sweeps-down + long-gap."""
    high_first = p["high_c"] < p["low_c"]
    first_c = torch.minimum(p["high_c"], p["low_c"])
    first_d = torch.where(high_first, p["high_d"], p["low_d"])
    second_c = torch.maximum(p["high_c"], p["low_c"])
    second_d = torch.where(high_first, p["low_d"], p["high_d"])
    gap = (second_c - second_d / 2) - (first_c + first_d / 2)
    return 4 * high_first.long() + 2 * (p["chirp_k"] < 0).long() + (gap > 0.35).long()


def reverse_audio_params(p: Params) -> Params:
    """Parameters of the clips played backwards: ``render_audio(reverse(p)) ~= render_audio(p).flip(-1)``."""
    length = (AUDIO_SAMPLES - 1) / SAMPLE_RATE
    q = dict(p)
    for key in ("low_c", "high_c", "chirp_c", "burst_c"):
        q[key] = length - p[key]
    q["chirp_k"] = -p["chirp_k"]
    q["noise"] = p["noise"].flip(-1)
    return q


def _envelope(tau: Tensor, d: Tensor) -> Tensor:
    """Even trapezoid: 1 inside, linear fades of RAMP seconds at the ends, 0 outside ``|tau| < d / 2``."""
    return ((d.unsqueeze(-1) / 2 - tau.abs()) / RAMP).clamp(0, 1)


def render_audio(p: Params) -> Tensor:
    """Waveforms ``[B, 41200]`` float32 at 16 kHz (2.56 s). Every event is even in time around its centre
    (cosine phase, symmetric envelope), so reversing a clip is the same as mirroring its events."""
    t = torch.arange(AUDIO_SAMPLES, dtype=torch.float32) / SAMPLE_RATE
    t = t.unsqueeze(0)
    p64 = {k: v.float() for k, v in p.items()}

    def tone(c: Tensor, d: Tensor, f: Tensor, a: Tensor, spread: float, k: Tensor | float = 0.0) -> Tensor:
        """A stack of PARTIALS cosine partials from f to f * (1 + spread), all sweeping k Hz/s."""
        tau = t - c.unsqueeze(-1)
        k = torch.as_tensor(k, dtype=torch.float32)
        k = k.unsqueeze(-1) if k.dim() else k
        stack = torch.zeros_like(tau)
        for j in range(PARTIALS):
            fj = f * (1 + spread * j / max(PARTIALS - 1, 1))
            stack = stack + torch.cos(2 * math.pi * (fj.unsqueeze(-1) * tau + 0.5 * k * tau * tau))
        return a.unsqueeze(-1) * _envelope(tau, d) * stack / math.sqrt(PARTIALS)

    x = tone(p64["low_c"], p64["low_d"], p64["low_f"], p64["low_a"], SPREAD["low"])
    x = x + tone(p64["high_c"], p64["high_d"], p64["high_f"], p64["high_a"], SPREAD["high"])
    x = x + tone(p64["chirp_c"], p64["chirp_d"], p64["chirp_f"], p64["chirp_a"], SPREAD["chirp"], p64["chirp_k"])
    level = p64["noise_a"].unsqueeze(-1)  # background noise, louder in short bursts
    for i in range(p64["burst_c"].shape[1]):
        burst = _envelope(t - p64["burst_c"][:, i:i + 1], torch.full_like(p64["burst_c"][:, i], 0.06))
        level = level + p64["burst_a"][:, i:i + 1] * burst
    x = x + level * p64["noise"]
    return x.float()


AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet normalisation (transformers.ASTFeatureExtractor)


def fbank(waveforms: Tensor) -> Tensor:
    """AST input ``[B, 256, 128]``: Kaldi log-mel fbank (25 ms Hann window, 10 ms hop, 128 bins) normalised
    as ``(x - mean) / (2 * std)``, i.e. what ``transformers.ASTFeatureExtractor`` gives for these clips.

    Batched re-statement of ``torchaudio.compliance.kaldi.fbank`` with its defaults (DC offset removed,
    pre-emphasis 0.97, 512-point power spectrum, Kaldi mel banks, log floored at float eps); the per-clip
    torchaudio call is about 50x slower, and the tests check both agree.
    """
    import torchaudio.compliance.kaldi as kaldi

    w = torch.as_tensor(waveforms, dtype=torch.float32)
    w = w.unsqueeze(0) if w.dim() == 1 else w
    frames = w.unfold(-1, 400, 160)  # [B, M, 400]
    frames = frames - frames.mean(-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - 0.97 * previous) * torch.hann_window(400, periodic=False)
    power = torch.fft.rfft(frames, n=512).abs().pow(2.0)  # [B, M, 257]
    banks, _ = kaldi.get_mel_banks(MEL_BINS, 512, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = torch.nn.functional.pad(banks.float(), (0, 1))  # [128, 257]
    mel = torch.matmul(power, banks.T).clamp_min(torch.finfo(torch.float32).eps).log()
    return (mel - AST_MEAN) / (2 * AST_STD)


def audio_batch(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` fbank clips ``[n, 256, 128]`` and labels ``[n]`` from ``seed``."""
    p = audio_params(n, seed)
    return fbank(render_audio(p)), audio_labels(p)


# Padded clips: the same task with its events inside the first ``real`` frames and the rest padding, as
# transformers.ASTFeatureExtractor pads a short clip (zero fbank frames, then normalised).
PAD_MARGIN = 0.05  # seconds between an event and the ends of the real part (the task's own margin)
AUDIO_PAD_VALUE = (0.0 - AST_MEAN) / (2 * AST_STD)  # a padded frame's value in every mel bin


def frames_samples(frames: int) -> int:
    """Samples that give exactly ``frames`` fbank frames (25 ms window, 10 ms hop)."""
    return 400 + (frames - 1) * 160


def pair_span(p: Params) -> Tuple[Tensor, Tensor]:
    """``(start, span)`` ``[B]`` seconds of the tone pair (first onset to last offset)."""
    low_first = p["low_c"] < p["high_c"]
    start = torch.where(low_first, p["low_c"] - p["low_d"] / 2, p["high_c"] - p["high_d"] / 2)
    end = torch.where(low_first, p["high_c"] + p["high_d"] / 2, p["low_c"] + p["low_d"] / 2)
    return start, end - start


def needed_frames(p: Params) -> Tensor:
    """``[B]`` long: the fewest frames whose samples hold the clip's tone pair and the chirp with margins."""
    span = torch.maximum(pair_span(p)[1], p["chirp_d"]) + 2 * PAD_MARGIN
    return (((span * SAMPLE_RATE + 1 - 400) / 160).ceil().long() + 1).clamp(max=AUDIO_FRAMES)


def place_audio_events(p: Params, real_frames: Tensor, g: torch.Generator) -> Params:
    """The clips of ``p`` with every event moved inside its first ``real_frames`` ``[B]`` frames; labels unchanged.

    The tone pair (order, durations, gap: the label) is shifted to a uniform start inside the real part, the
    chirp (direction, duration) and the noise bursts are re-drawn inside it. Needs ``needed_frames(p) <=
    real_frames``.
    """
    length = (400 + (real_frames.float() - 1) * 160 - 1) / SAMPLE_RATE  # seconds of real samples
    start, span = pair_span(p)
    n = span.shape[0]
    free = (length - 2 * PAD_MARGIN - span).clamp_min(0.0)
    q = dict(p)
    shift = PAD_MARGIN + torch.rand(n, generator=g) * free - start
    q["low_c"], q["high_c"] = p["low_c"] + shift, p["high_c"] + shift
    chirp_free = (length - 2 * PAD_MARGIN - p["chirp_d"]).clamp_min(0.0)
    q["chirp_c"] = PAD_MARGIN + p["chirp_d"] / 2 + torch.rand(n, generator=g) * chirp_free
    q["burst_c"] = PAD_MARGIN + torch.rand(n, 2, generator=g) * (length - 2 * PAD_MARGIN).unsqueeze(1)
    return q


def pad_fbank(x: Tensor, real_frames: Tensor) -> Tensor:
    """``x`` ``[B, frames, mel]`` with every frame from ``real_frames[b]`` on set to padding: what the extractor
    gives for the clip cut after ``frames_samples(real)`` samples (an fbank frame reads only its own window)."""
    padded = torch.arange(x.shape[1]).unsqueeze(0) >= real_frames.unsqueeze(1)  # [B, frames]
    return x.masked_fill(padded.unsqueeze(-1), AUDIO_PAD_VALUE)


def padded_audio_batch(n: int, seed: int, full_share: float = 0.5) -> Tuple[Tensor, Tensor]:
    """``n`` task clips ``[n, 256, 128]`` and labels ``[n]``, a ``full_share`` of them whole and the rest cut
    after a uniform length between what their events need and the whole window, then padded (the training
    data of the ``ast_padded`` reference: a model that, like AudioSet's ASTs, has seen padding)."""
    p = audio_params(n, seed)
    g = torch.Generator().manual_seed(seed + 31)
    need = needed_frames(p)
    cut = need + (torch.rand(n, generator=g) * (AUDIO_FRAMES + 1 - need)).long().clamp(max=AUDIO_FRAMES - need)
    real = torch.where(torch.rand(n, generator=g) < full_share, torch.full_like(need, AUDIO_FRAMES), cut)
    p = place_audio_events(p, real, g)
    return pad_fbank(fbank(render_audio(p)), real), audio_labels(p)


# ------------------------------------------------------------------------------------------- visual questions
# Images of 48 x 48 RGB on a 12 x 12 grid of 4 x 4 px cells: with a 4 px patch, one cell is one visual token
# (144 per image), so every shape lives in exactly one token and a question about it is lost with that token.
VQA_SIZE, VQA_GRID, VQA_CELL = 48, 12, 4
VQA_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_VQA_RGB = ((0.95, 0.15, 0.1), (0.1, 0.85, 0.15), (0.15, 0.3, 0.95), (0.95, 0.9, 0.1), (0.9, 0.15, 0.9),
            (0.1, 0.9, 0.9))
VQA_MAX_COUNT = 4  # each colour that is not one of the two unique ones appears 0..4 times
VQA_KINDS = ("colour", "count", "left")  # question kinds, drawn with equal probability
# Word-level vocabulary of the reference LLaVA: specials, question words, positions, colours, answers.
VQA_VOCAB = (["<pad>", "<s>", "<image>", "colour", "count", "left", "shapes", "half"]
             + [f"row{i}" for i in range(VQA_GRID)] + [f"col{i}" for i in range(VQA_GRID)]
             + list(VQA_COLOURS) + [str(i) for i in range(10)] + ["yes", "no", "none"])
VQA_TOKEN = {w: i for i, w in enumerate(VQA_VOCAB)}
VQA_IMAGE_TOKEN, VQA_BOS, VQA_PAD = VQA_TOKEN["<image>"], VQA_TOKEN["<s>"], VQA_TOKEN["<pad>"]
VQA_QUESTION = 3  # words after the image: the kind and two arguments; the answer is the next token


def vqa_params(n: int, seed: int) -> Params:
    """``n`` random scenes and one question each.

    Scene: two colours that appear exactly once (the "unique" pair, in different columns), and each of the other
    four colours 0..4 times, every shape in its own cell. Question (kind drawn uniformly):
        colour   "colour rowR colC"  -> the colour of the shape in that cell (always a filled cell)
        count    "count shapes X"    -> how many X shapes there are (0..4; X is never a unique colour)
        left     "left half X"       -> is the (unique) X shape in the left half (columns 0-5)
    The last word of every question is one the answer hinges on (the column, the colour counted, X). (A first
    version asked "left X Y", is the X shape left of the Y shape: the small LLaVA stayed at chance on it in
    four 10-minute trainings while it learned the other two kinds.)
    Returns ``cells`` ``[n, 144]`` long (colour index or -1 for empty, raster order), per-cell offsets/sizes of
    the shapes, the background level and pixel noise, and the question/answer fields.
    """
    g = torch.Generator().manual_seed(seed)
    cells_n = VQA_GRID * VQA_GRID
    colours = len(VQA_COLOURS)
    order = torch.rand(n, cells_n, generator=g).argsort(dim=1)  # [n, 144] a random ranking of the cells
    col = order % VQA_GRID
    # The two unique colours: a random ordered pair of different colours.
    pair = torch.rand(n, colours, generator=g).argsort(dim=1)[:, :2]  # [n, 2]
    # Cell of the first unique shape: order[:, 0]; of the second: the first ranked cell in another column.
    other_col = col != col[:, :1]
    other_col[:, 0] = False
    second = torch.argmax(other_col.int(), dim=1)  # [n] rank of that cell
    counts = (torch.rand(n, colours, generator=g) * (VQA_MAX_COUNT + 1)).floor().long()
    counts.scatter_(1, pair, 1)
    # Colour of each ranked slot: the unique pair in slots 0 and `second`, then the other colours' shapes in
    # the remaining slots (slot order is random, so positions are random).
    rest = counts.clone()
    rest.scatter_(1, pair, 0)
    colour_of_rest = torch.repeat_interleave(torch.arange(colours).repeat(n), rest.flatten())  # flat
    per_image = rest.sum(1)  # [n]
    slot_colour = torch.full((n, cells_n), -1, dtype=torch.long)
    # Slots other than 0 and `second`, in rank order, receive the rest.
    ranks = torch.arange(cells_n).expand(n, -1)
    free = (ranks != 0) & (ranks != second.unsqueeze(1))
    free_rank = free.long().cumsum(1) - 1  # 0, 1, ... over the free slots
    take = free & (free_rank < per_image.unsqueeze(1))
    slot_colour[take] = colour_of_rest
    slot_colour[:, 0] = pair[:, 0]
    slot_colour.scatter_(1, second.unsqueeze(1), pair[:, 1:2])
    cells = torch.full((n, cells_n), -1, dtype=torch.long).scatter_(1, order, slot_colour)
    scene = {
        "cells": cells, "pair": pair, "size": 3 + (torch.rand(n, cells_n, generator=g) < 0.5).long(),  # 3 or 4 px
        "dx": (torch.rand(n, cells_n, generator=g) * 2).floor().long(),
        "dy": (torch.rand(n, cells_n, generator=g) * 2).floor().long(),
        "background": 0.05 + 0.15 * torch.rand(n, generator=g),
        "noise": 0.04 * torch.randn(n, 3, VQA_SIZE, VQA_SIZE, generator=g),
    }
    return {**scene, **_vqa_question(cells, pair, g)}


def vqa_ask(p: Params, seed: int) -> Params:
    """The same scenes as ``p`` with another question each, drawn from ``seed`` (for multi-turn training)."""
    return {**p, **_vqa_question(p["cells"], p["pair"], torch.Generator().manual_seed(seed))}


def _vqa_question(cells: Tensor, pair: Tensor, g: torch.Generator) -> Params:
    n, cells_n = cells.shape
    colours = len(VQA_COLOURS)
    kind = (torch.rand(n, generator=g) * len(VQA_KINDS)).floor().long()
    filled = cells >= 0
    pick = torch.argmax(torch.rand(n, cells_n, generator=g) * filled, dim=1)  # a random filled cell
    # Count questions ask about one of the four colours that are not unique (answers 0..4 evenly).
    not_unique = torch.ones(n, colours).scatter_(1, pair, 0.0)
    count_colour = torch.argmax(torch.rand(n, colours, generator=g) * not_unique, dim=1)
    which = (torch.rand(n, generator=g) < 0.5).long()  # ask about either unique shape
    left_x = pair.gather(1, which.unsqueeze(1)).squeeze(1)
    return {"kind": kind, "pick": pick, "count_colour": count_colour, "left_x": left_x}


def vqa_answers(p: Params) -> Tensor:
    """``[n]`` vocabulary ids of the answers (a colour, a count 0..4, or yes/no)."""
    cells, n = p["cells"], p["cells"].shape[0]
    colour_word = torch.tensor([VQA_TOKEN[c] for c in VQA_COLOURS])
    colour = colour_word[cells.gather(1, p["pick"].unsqueeze(1)).squeeze(1).clamp_min(0)]
    count = (cells == p["count_colour"].unsqueeze(1)).sum(1)
    count_word = torch.tensor([VQA_TOKEN[str(i)] for i in range(10)])[count]
    col = torch.arange(cells.shape[1]) % VQA_GRID
    col_of = lambda c: torch.where(cells == c.unsqueeze(1), col, -1).amax(1)  # the unique shape's column
    left = col_of(p["left_x"]) < VQA_GRID // 2
    yes_no = torch.where(left, VQA_TOKEN["yes"], VQA_TOKEN["no"])
    return torch.where(p["kind"] == 0, colour, torch.where(p["kind"] == 1, count_word, yes_no))


def vqa_questions(p: Params) -> Tensor:
    """``[n, 3]`` vocabulary ids of the question words that follow the image."""
    n = p["kind"].shape[0]
    colour_word = torch.tensor([VQA_TOKEN[c] for c in VQA_COLOURS])
    row_word = VQA_TOKEN["row0"] + p["pick"] // VQA_GRID
    col_word = VQA_TOKEN["col0"] + p["pick"] % VQA_GRID
    q = torch.empty((n, VQA_QUESTION), dtype=torch.long)
    kind = p["kind"]
    q[:, 0] = torch.tensor([VQA_TOKEN[k] for k in VQA_KINDS])[kind]
    q[:, 1] = torch.where(kind == 0, row_word, torch.where(kind == 1, VQA_TOKEN["shapes"], VQA_TOKEN["half"]))
    q[:, 2] = torch.where(kind == 0, col_word, colour_word[torch.where(kind == 1, p["count_colour"], p["left_x"])])
    return q


def render_vqa(p: Params) -> Tensor:
    """Images ``[n, 3, 48, 48]`` float32 in [-1, 1] (what the CLIP tower takes as ``pixel_values``)."""
    cells = p["cells"]
    n = cells.shape[0]
    S, G, P = VQA_SIZE, VQA_GRID, VQA_CELL
    rgb = torch.tensor(_VQA_RGB)  # [colours, 3]
    # Per-pixel cell index and offset inside the cell.
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    cell = (ys // P) * G + xs // P  # [S, S]
    oy, ox = ys % P, xs % P
    c = cells[:, cell]  # [n, S, S] colour per pixel's cell
    size, dx, dy = p["size"][:, cell], p["dx"][:, cell], p["dy"][:, cell]
    dx, dy = torch.where(size == P, 0, dx), torch.where(size == P, 0, dy)  # a full-cell shape has no offset
    inside = (c >= 0) & (ox >= dx) & (ox < dx + size) & (oy >= dy) & (oy < dy + size)
    image = p["background"].view(n, 1, 1, 1).expand(n, 3, S, S).clone()
    colour = rgb[c.clamp_min(0)].permute(0, 3, 1, 2)  # [n, 3, S, S]
    image = torch.where(inside.unsqueeze(1), colour, image)
    return ((image + p["noise"]).clamp(0, 1) - 0.5) / 0.5


def vqa_input_ids(questions: Tensor, image_tokens: int = VQA_GRID * VQA_GRID) -> Tensor:
    """``[n, 1 + image_tokens + 3]``: ``<s>``, ``image_tokens`` ``<image>`` placeholders, the question."""
    n = questions.shape[0]
    bos = torch.full((n, 1), VQA_BOS, dtype=torch.long)
    image = torch.full((n, image_tokens), VQA_IMAGE_TOKEN, dtype=torch.long)
    return torch.cat([bos, image, questions], dim=1)


def vqa_batch(n: int, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``n`` images ``[n, 3, 48, 48]``, questions ``[n, 3]`` (vocabulary ids) and answers ``[n]`` from ``seed``."""
    p = vqa_params(n, seed)
    return render_vqa(p), vqa_questions(p), vqa_answers(p)
