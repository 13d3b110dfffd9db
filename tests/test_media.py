"""Real media at the edges: AVI timestamps, damaged video and audio files, integer PCM, channels-last audio."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEModel

from mmmerge.adapters import audio, video

from helpers import untouched

av = pytest.importorskip("av", reason="the test media are written with PyAV (the video extra)")
decord = pytest.importorskip("decord", reason="load_video reads with decord (the video extra, x86_64 only)")
sf = pytest.importorskip("soundfile", reason="the test audio is written with soundfile (the audio extra)")


def write_video(path, frames=24, fps=25, b_frames=0, noisy=False, width=64, height=48, codec="mpeg4", **options):
    """A clip in any container; frame i is a flat grey of level 5 + 5 i (or noise, which compresses badly)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.codec_context.max_b_frames = b_frames
        for i in range(frames):
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8) if noisy else \
                np.full((height, width, 3), 5 + 5 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ------------------------------------------------------------------------------------------ timestamps
def decoded_levels(path):
    """Mean level of every frame, decoded in order by PyAV: the truth to compare decord's frames with."""
    with av.open(str(path)) as container:
        return torch.tensor([float(f.to_ndarray(format="rgb24").mean()) for f in container.decode(video=0)])


def test_avi_without_presentation_times_gets_index_over_fps(tmp_path):
    path = write_video(tmp_path / "b_frames.avi", frames=24, fps=25, b_frames=2)
    raw = decord.VideoReader(str(path)).get_frame_timestamp(list(range(24)))[:, 0]
    assert raw.min() < -1e6, "decord's own timestamps for this AVI are garbage (the case under test)"
    frames, stamps = video.load_video(path, num_frames=8)
    indices = video.sample_indices(24, 8)
    torch.testing.assert_close(stamps, torch.tensor(indices, dtype=torch.float32) / 25, atol=1e-6, rtol=0)
    assert torch.equal(video.check_timestamps(stamps), stamps)
    # decord's random access returns other frames in such files; load_video decodes them in order
    torch.testing.assert_close(frames.float().mean(dim=(1, 2, 3)), decoded_levels(path)[indices], atol=1.0, rtol=0)


@pytest.mark.parametrize("name, b_frames", [("mpeg4_b.mp4", 2), ("mpeg4_b.avi", 2), ("plain.avi", 0)])
def test_files_decord_cannot_seek_in_are_read_in_order(tmp_path, name, b_frames):
    path = write_video(tmp_path / name, frames=40, fps=10, b_frames=b_frames)
    assert not video.probe_container(str(path)).seekable
    truth = decoded_levels(path)
    for num_frames, sampling in ((8, "uniform"), (5, "segment"), (3, "uniform")):
        frames, _ = video.load_video(path, num_frames=num_frames, sampling=sampling)
        indices = video.sample_indices(40, num_frames, sampling)
        torch.testing.assert_close(frames.float().mean(dim=(1, 2, 3)), truth[indices], atol=1.0, rtol=0)


def test_h264_mp4_is_read_by_seeking(tmp_path):
    try:
        path = write_video(tmp_path / "x264.mp4", frames=40, fps=10, codec="libx264")
    except Exception as err:  # a PyAV build without libx264
        pytest.skip(f"PyAV cannot encode H.264 here: {err}")
    info = video.probe_container(str(path))
    assert info.codec == "h264" and "mp4" in info.formats and info.seekable
    frames, stamps = video.load_video(path, num_frames=8)
    indices = video.sample_indices(40, 8)
    torch.testing.assert_close(frames.float().mean(dim=(1, 2, 3)), decoded_levels(path)[indices], atol=1.0, rtol=0)
    torch.testing.assert_close(stamps, torch.tensor(indices, dtype=torch.float32) / 10, atol=1e-6, rtol=0)


def test_frame_seconds_keeps_sane_tables_and_replaces_broken_ones():
    fps, total = 10.0, 5
    index = torch.arange(5, dtype=torch.float64) / 10
    offset = 3600 + index  # a clip cut from a stream: a large start time is fine
    assert torch.equal(video.frame_seconds(offset, fps, total), offset)
    variable = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.42], dtype=torch.float64)  # variable frame rate
    assert torch.equal(video.frame_seconds(variable, fps, total), variable)
    broken = {
        "missing": None,
        "nan": torch.tensor([0.0, 0.1, float("nan"), 0.3, 0.4]),
        "decreasing": torch.tensor([0.0, 0.2, 0.1, 0.3, 0.4]),
        "repeated": torch.tensor([0.0, 0.1, 0.1, 0.3, 0.4]),
        "garbage": torch.tensor([-3.69e17, 0.1, 0.2, 0.3, 0.4]),
        "wrong length": torch.tensor([0.0, 0.1]),
        "span off": index * 10,  # timestamps 10x too far apart for the frame rate
    }
    for name, table in broken.items():
        assert torch.equal(video.frame_seconds(table, fps, total), index), name
    assert bool(video.frame_seconds(None, float("nan"), total).isnan().all())
    assert bool(video.frame_seconds(None, 0.0, total).isnan().all())


def test_check_timestamps_refuses_non_finite_and_decreasing():
    assert torch.equal(video.check_timestamps([0, 0.5, 0.5, 1]), torch.tensor([0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"timestamps\[2\] is nan, not a finite time"):
        video.check_timestamps([0.0, 0.1, float("nan")])
    with pytest.raises(ValueError, match=r"timestamps\[1\] is -inf"):
        video.check_timestamps(np.array([0.0, -np.inf]))
    with pytest.raises(ValueError, match=r"must not decrease: timestamps\[2\] = 0.1 s comes after timestamps\[1\] = 0.2 s"):
        video.check_timestamps(torch.tensor([0.0, 0.2, 0.1]))
    with pytest.raises(ValueError, match="shape"):
        video.check_timestamps(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"one time per input frame \(4\), got 3"):
        video.check_timestamps([0, 1, 2], frames=4)
    with pytest.raises(ValueError, match="numbers of seconds"):
        video.check_timestamps(["0.0", "zero"])
    with pytest.raises(ValueError, match="sequence of seconds"):
        video.check_timestamps(3.0)


def test_patch_refuses_bad_timestamps_before_touching_the_model():
    config = VideoMAEConfig(image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = VideoMAEModel(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ([0.0, 0.04, -3.69e17, 0.12], [0.0, 0.1, float("nan"), 0.3], [0.0, 0.2, 0.1, 0.3]):
        with pytest.raises(ValueError, match="timestamps"):
            video.patch(model, r=2, time_mode="adjacent", timestamps=bad)
        assert untouched(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    video.patch(model, r=2, time_mode="adjacent", timestamps=[0.0, 0.04, 0.08, 0.12])  # sane ones are taken


# ------------------------------------------------------------------------------------- damaged video
def test_truncated_avi_warns_and_drops_its_cut_last_frame(tmp_path):
    path = truncate(write_video(tmp_path / "cut.avi", frames=60, noisy=True), 0.4)
    decoded = len(decord.VideoReader(str(path)))
    assert 1 < decoded < 59
    with pytest.warns(UserWarning, match=rf"damaged or truncated: its container announces 60 frames, {decoded} decode"):
        frames, stamps = video.load_video(path, num_frames=decoded - 1)
    assert frames.shape[0] == decoded - 1
    torch.testing.assert_close(stamps, torch.arange(decoded - 1, dtype=torch.float32) / 25, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=rf"damaged or truncated: only {decoded} of the 60 frames") as err:
        video.load_video(path, num_frames=decoded)
    assert "fewer than" not in str(err.value) and not isinstance(err.value, video.VideoTooShort)


def test_intact_video_gives_no_warning_and_a_short_one_says_so(tmp_path):
    path = write_video(tmp_path / "intact.avi", frames=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frames, _ = video.load_video(path, num_frames=12)
    assert frames.shape[0] == 12
    with pytest.raises(video.VideoTooShort, match="video has 12 frames, fewer than the 16 requested") as err:
        video.load_video(path, num_frames=16)
    assert (err.value.frames, err.value.needed) == (12, 16)


def test_damaged_mp4_is_named_damaged(tmp_path):
    faststart = truncate(write_video(tmp_path / "faststart.mp4", frames=60, noisy=True, movflags="faststart"), 0.4)
    with pytest.raises(ValueError, match="is a damaged video file: its container announces 60 frames"):
        video.load_video(faststart, num_frames=8)
    index_at_end = truncate(write_video(tmp_path / "plain.mp4", frames=60, noisy=True), 0.4)
    with pytest.raises(ValueError, match="could not decode .* damaged beyond its header"):
        video.load_video(index_at_end, num_frames=8)


# ------------------------------------------------------------------------------------- damaged audio
def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    """A 440 Hz tone over a little noise (so every mel bin holds energy well above int16's quantisation)."""
    t = np.arange(int(round(seconds * rate))) / rate
    noise = np.random.default_rng(0).standard_normal(t.shape)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


def test_truncated_wav_warns_with_both_durations(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, tone(6.56), 16000, subtype="PCM_16")
    assert audio.wav_declared_frames(path) == 104960
    truncate(path, 0.3)
    assert audio.wav_declared_frames(path) == 104960  # the header still says 6.56 s
    with pytest.warns(UserWarning, match=r"damaged or truncated: its header says 6.56 s, 1.97 s decode"):
        waveform, rate = audio.load_audio(path)
    assert rate == 16000 and abs(waveform.shape[0] / rate - 1.967) < 0.01


def test_truncated_flac_warns_that_the_decoder_stopped(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, tone(6.56), 16000)
    assert audio.wav_declared_frames(path) is None  # not a WAV: the FLAC header's count is used
    truncate(path, 0.3)
    with pytest.warns(UserWarning, match=r"its header says 6.56 s, \d.\d\d s decode \(the decoder stopped"):
        waveform, _ = audio.load_audio(path)
    assert 0.5 < waveform.shape[0] / 16000 < 3.0


def test_intact_audio_gives_no_warning(tmp_path):
    path = tmp_path / "intact.wav"
    sf.write(path, tone(1.0), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        waveform, _ = audio.load_audio(path)
    assert waveform.shape == (16000,)


# ----------------------------------------------------------------------------------- PCM and layouts
def test_integer_pcm_is_scaled_to_unit_range():
    wave = tone(1.0)
    reference, lengths = audio.features(wave)
    pcm16 = np.round(wave * 32767).astype(np.int16)
    torch.testing.assert_close(audio.features(pcm16)[0], audio.features(pcm16 / 32768.0)[0])
    torch.testing.assert_close(audio.features(pcm16)[0], reference, atol=2e-3, rtol=0)
    pcm32 = torch.from_numpy((wave.astype(np.float64) * 2 ** 31).astype(np.int32))
    torch.testing.assert_close(audio.features(pcm32)[0], reference, atol=1e-4, rtol=0)
    pcm8 = np.round(wave * 127 + 128).astype(np.uint8)  # 8-bit WAV: unsigned around 128
    assert audio.as_mono_float(pcm8).abs().max() <= 1.0
    torch.testing.assert_close(audio.features([pcm8])[0], audio.features((pcm8 - 128.0) / 128)[0])
    with pytest.raises(ValueError, match=r"peak 15079, .* looks like int16 PCM stored as float: divide by 32768"):
        audio.features(torch.from_numpy(pcm16).float())  # int16 values as float: refused, not wrong features
    with pytest.raises(ValueError, match="dtype torch.int64, not an audio sample format"):
        audio.features(torch.zeros(16000, dtype=torch.int64))
    with pytest.raises(ValueError, match="not an audio sample format"):
        audio.features(torch.zeros(16000, dtype=torch.bool))


def test_channels_last_stereo_is_mixed_down_with_a_warning():
    left, right = tone(1.0), 0.5 * tone(1.0)
    stereo = np.stack([left, right], axis=1)  # [S, 2], soundfile's layout
    mono = audio.features((left + right) / 2)
    with pytest.warns(UserWarning, match=r"shape \[16000, 2\] is channels-last \(2 channels"):
        values, lengths = audio.features(stereo)
    torch.testing.assert_close(values, mono[0]) and lengths.tolist() == [98]
    with pytest.warns(UserWarning, match="clip 1 of shape"):
        listed, _ = audio.features([left, stereo])
    torch.testing.assert_close(listed[1], mono[0][0])
    pcm = np.round(stereo * 32767).astype(np.int16)
    with pytest.warns(UserWarning, match="channels-last"):
        torch.testing.assert_close(audio.features(pcm)[0], mono[0], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="must be mono"):  # channels-first inside a list stays ambiguous: refused
        audio.features([stereo.T.copy()])


def test_features_warns_when_it_cuts_a_long_clip():
    with pytest.warns(UserWarning, match=r"keeps the first 10.24 s .* clip 1: 12.00 s; audio.tag_windows"):
        values, lengths = audio.features([tone(2.0), tone(12.0)])
    assert lengths.tolist() == [198, 1024]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio.features(tone(10.255))  # exactly 1024 frames: nothing is cut
    assert math.isclose(audio.FRAME_SAMPLES + 1023 * audio.HOP_SAMPLES, 10.255 * 16000)
