"""Windowed tagging of recordings longer than AST's input (audio.tag_windows), on a tiny random AST."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import ASTConfig, ASTForAudioClassification, ASTModel

import mmmerge
from mmmerge.adapters import audio

pytest.importorskip("torchaudio", reason="fbank features need torchaudio (the audio extra)")

MELS, FRAMES, STRIDE = 32, 128, 8  # a window of 128 frames = 1.28 s; 3 bands x 15 columns
WINDOW = 400 + (FRAMES - 1) * 160  # samples in one window (1.295 s at 16 kHz)


def tiny(cls=ASTForAudioClassification, seed=0):
    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                       num_mel_bins=MELS, max_length=FRAMES, patch_size=16, frequency_stride=STRIDE,
                       time_stride=STRIDE, num_labels=5)
    return cls(config).eval()


def recording(seconds: float, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(round(seconds * 16000))) / 16000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return 0.3 * torch.sin(2 * math.pi * (300 + 200 * t) * t) + 0.05 * noise


def window_features(wave: torch.Tensor, starts: torch.Tensor):
    pieces = [wave[round(float(s) * 16000):round(float(s) * 16000) + WINDOW] for s in starts]
    return audio.features(pieces, num_mel_bins=MELS, max_length=FRAMES)


def test_windows_cover_the_recording_and_the_last_drops_its_padding():
    model = tiny()
    reference = copy.deepcopy(model)
    audio.patch(model, r=0, trace_source=True, drop_padding=True)
    wave = recording(3.3)
    tags = audio.tag_windows(model, wave, hop_seconds=0.64)
    assert tags.starts.tolist() == pytest.approx([0.0, 0.64, 1.28, 1.92, 2.56])
    assert tags.window_seconds == pytest.approx(1.28) and tags.hop_seconds == pytest.approx(0.64)
    assert tags.lengths.tolist() == [128, 128, 128, 128, 72]  # 3.3 - 2.56 = 0.74 s: 1 + (11840 - 400) // 160
    layout = audio.ast_layout(model)
    assert tags.columns.tolist() == [15, 15, 15, 15, layout.real_columns(72)] and layout.real_columns(72) == 9
    assert [t[0] for t in tags.tokens_per_layer] == [47, 47, 47, 47, 2 + 3 * 9]  # padding dropped before layer 0
    assert tags.logits.shape == (5, 5) and tags.scores.shape == (5,)
    assert tags.timeline.shape == (math.ceil(3.3), 5) and tags.seconds == pytest.approx(3.3)
    # r=0 merges nothing: the full windows are exactly the unpatched model on each window's features
    x, lengths = window_features(wave, tags.starts)
    assert torch.equal(lengths, tags.lengths)
    with torch.no_grad():
        assert torch.equal(tags.logits[:4], reference(input_values=x[:4]).logits)
    # the last window went through the padding path: the same as a patch given its length
    short = copy.deepcopy(reference)
    audio.patch(short, r=0, lengths=lengths[4:], trace_source=True, drop_padding=True)
    with torch.no_grad():
        torch.testing.assert_close(tags.logits[4], short(input_values=x[4:]).logits[0])
        padded = reference(input_values=x[4:]).logits[0]
    assert not torch.allclose(tags.logits[4], padded)  # dropping the padding changed what the model saw
    assert torch.equal(tags.scores, tags.logits.sigmoid().amax(0))


def test_timeline_is_the_overlap_weighted_mean_of_column_scores():
    model = tiny()
    audio.patch(model, r=4, trace_source=True)
    wave = recording(2.5, seed=1)
    tags = audio.tag_windows(model, wave, hop_seconds=1.0)
    x, lengths = window_features(wave, tags.starts)
    spans, scores = [], []
    for w, start in enumerate(tags.starts.tolist()):  # loop reference: one window at a time
        audio.set_lengths(model, lengths[w:w + 1] if int(lengths[w]) < FRAMES else None)
        _, per_column = audio.column_logits(model, x[w:w + 1])
        real = audio.ast_layout(model).real_columns(int(lengths[w]))
        for t in range(real):
            begin = start + t * STRIDE * 0.01
            spans.append((begin, begin + 0.16))
            scores.append(per_column[0, t].sigmoid())
    expected = []
    for second in range(math.ceil(2.5)):
        weights = [max(0.0, min(b, second + 1) - max(a, second)) for a, b in spans]
        expected.append(sum(w * s for w, s in zip(weights, scores)) / sum(weights))
    torch.testing.assert_close(tags.timeline, torch.stack(expected), atol=1e-5, rtol=0)


def test_merging_runs_in_every_window_and_the_patch_is_restored():
    model = tiny()
    x = torch.randn(1, FRAMES, MELS)
    audio.patch(model, r=3, time_mode="adjacent", lengths=[100], trace_source=True, drop_padding=True)
    with torch.no_grad():
        before = model(input_values=x).logits
    tokens_before = mmmerge.last_info(model).tokens_per_layer
    tags = audio.tag_windows(model, recording(4.2), hop_seconds=1.28)  # the last window holds 0.36 s
    assert all(t[-1] < t[0] for t in tags.tokens_per_layer)  # merged in every window
    assert tags.tokens_per_layer[0][:3] == [47, 44, 41] and tags.tokens_per_layer[-1][:3] == [17, 14, 11]
    assert audio.patched_layout(model).columns == 13  # the patch's own lengths=[100]: ceil(100 / 8) columns
    with torch.no_grad():
        assert torch.equal(model(input_values=x).logits, before)
    assert mmmerge.last_info(model).tokens_per_layer == tokens_before


def test_stereo_pcm_and_other_rates_are_accepted():
    model = tiny()
    audio.patch(model, r=0, trace_source=True)
    wave = recording(2.0)
    base = audio.tag_windows(model, wave)
    pcm = (torch.stack([wave, wave], dim=1) * 32767).round().to(torch.int16)  # [S, 2] int16
    with pytest.warns(UserWarning, match="channels-last"):
        stereo = audio.tag_windows(model, pcm)
    torch.testing.assert_close(stereo.logits, base.logits, atol=2e-3, rtol=0)
    import torchaudio.functional as AF

    low = AF.resample(wave, 16000, 8000)
    resampled = audio.tag_windows(model, low, 8000)
    again = audio.tag_windows(model, AF.resample(low, 8000, 16000))
    torch.testing.assert_close(resampled.logits, again.logits)


def test_a_clip_shorter_than_one_window_is_one_padded_window():
    model = tiny()
    audio.patch(model, r=0, trace_source=True)
    tags = audio.tag_windows(model, recording(0.5))
    assert tags.starts.tolist() == [0.0] and tags.lengths.tolist() == [48] and tags.columns.tolist() == [15]  # kept
    assert tags.timeline.shape == (1, 5)


def test_window_starts_cover_and_skip_a_tail_shorter_than_one_frame():
    assert audio.window_starts(1000, 2000, 500) == [0]
    assert audio.window_starts(5000, 2000, 1000) == [0, 1000, 2000, 3000]
    assert audio.window_starts(4200, 2000, 2000) == [0, 2000]  # 200 samples left after 4000: under one frame
    assert audio.window_starts(4500, 2000, 2000) == [0, 2000, 4000]


def test_bad_calls_are_refused():
    wave = recording(2.0)
    model = tiny()
    with pytest.raises(ValueError, match="not patched"):
        audio.tag_windows(model, wave)
    audio.patch(model, r=0)
    with pytest.raises(ValueError, match="trace_source=True"):
        audio.tag_windows(model, wave)
    audio.patch(model, r=0, trace_source=True)
    for hop in (0, 0.001, 1.3, -1, float("nan")):
        with pytest.raises(ValueError, match="hop_seconds must be between 0.01 s and one window"):
            audio.tag_windows(model, wave, hop_seconds=hop)
    with pytest.raises(ValueError, match="activation"):
        audio.tag_windows(model, wave, activation="relu")
    with pytest.raises(ValueError, match="batch_size"):
        audio.tag_windows(model, wave, batch_size=0)
    with pytest.raises(ValueError, match="mono"):
        audio.tag_windows(model, torch.zeros(2, 32000))
    with pytest.raises(ValueError, match="at least one 25 ms frame"):
        audio.tag_windows(model, torch.zeros(100))
    encoder = tiny(ASTModel)
    audio.patch(encoder, r=0, trace_source=True)
    with pytest.raises(TypeError, match="ASTForAudioClassification"):
        audio.tag_windows(encoder, wave)


def test_an_r_the_short_last_window_cannot_take_is_explained_and_the_patch_kept():
    model = tiny()
    audio.patch(model, r=8, trace_source=True, drop_padding=True)  # feasible for 47 tokens, not for the 0.2 s last window (11)
    with pytest.raises(ValueError, match="the last window holds .* a relative r"):
        audio.tag_windows(model, recording(1.295 + 0.2), hop_seconds=1.28)
    assert audio.patched_layout(model).columns == 15 and mmmerge.last_info(model).tokens_per_layer[0] == 47


def test_by_default_the_last_window_keeps_its_padding_and_r0_is_exact():
    model = tiny()
    reference = copy.deepcopy(model)
    audio.patch(model, r=0, trace_source=True)
    wave = recording(3.3)
    tags = audio.tag_windows(model, wave, hop_seconds=0.64)
    assert tags.columns.tolist() == [15] * 5 and [t[0] for t in tags.tokens_per_layer] == [47] * 5
    x, _ = window_features(wave, tags.starts)
    with torch.no_grad():
        assert torch.equal(tags.logits[:4], reference(input_values=x[:4]).logits)  # batched as tag_windows runs
        # the padded last window too (tracing its padding reorders the tokens: equal up to float summation order)
        torch.testing.assert_close(tags.logits[4], reference(input_values=x[4:]).logits[0], atol=1e-6, rtol=0)
