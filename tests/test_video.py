"""Video adapter and shared encoder patch, on tiny random ViViT / VideoMAE models (no network)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertModel, VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel,
                          VivitConfig, VivitForVideoClassification, VivitModel)

import mmmerge
from mmmerge import KeepRatio, TargetFlops
from mmmerge.adapters import video
from mmmerge.adapters.encoder import MergingLayer, layer_parts, patch_spec

from helpers import has_increasing_representatives, untouched

FRAMES, SIZE, PATCH, TUBELET = 8, 32, 8, 2  # 4 tubelets x 4 x 4 = 64 tokens (+ CLS for ViViT)
CLASSES = [VivitForVideoClassification, VivitModel, VideoMAEForVideoClassification, VideoMAEModel]


def tiny(cls, attn="eager", layers=4, seed=0):
    torch.manual_seed(seed)
    common = dict(image_size=SIZE, num_frames=FRAMES, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, num_labels=5)
    if cls.__name__.startswith("Vivit"):
        config = VivitConfig(tubelet_size=[TUBELET, PATCH, PATCH], **common)
    else:
        config = VideoMAEConfig(tubelet_size=TUBELET, patch_size=PATCH, use_mean_pooling=True, **common)
    config._attn_implementation = attn
    return cls(config).eval()


def clip(batch=2, seed=1):
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model, x):
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def protected(model):
    return video.video_layout(model).protected


def group_values(source: torch.Tensor, values: torch.Tensor):
    """For one batch element: {group id: sorted set of values of its original tokens}."""
    groups = {}
    for g, v in zip(source.tolist(), values.tolist()):
        groups.setdefault(g, set()).add(v)
    return groups


# ---------------------------------------------------------------------------------------------- off switch
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_off_switch_reproduces_unpatched(cls, attn):
    model = tiny(cls, attn)
    x = clip()
    reference = output(model, x)
    for off in (0, KeepRatio(1.0), [0, 0, 0, 0]):
        mmmerge.patch(model, r=off)
        assert mmmerge.last_info(model).schedule == [0, 0, 0, 0]
        torch.testing.assert_close(output(model, x), reference, atol=1e-6, rtol=0)
    assert mmmerge.last_info(model).tokens_per_layer == [64 + protected(model)] * 5
    assert not any(isinstance(m, MergingLayer) for m in model.modules())  # merging off: no layer is replaced


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unpatch_restores_bit_identical(cls):
    model = tiny(cls, "sdpa")
    x = clip()
    reference = output(model, x)
    state = copy.deepcopy(model.state_dict())
    mmmerge.patch(model, r=6, method="pitome", trace_source=True)
    merged = output(model, x)
    assert merged.shape != reference.shape or not torch.allclose(merged, reference)  # merging changed something
    mmmerge.unpatch(model)
    assert torch.equal(output(model, x), reference)
    assert untouched(model)
    for layer in video.encoder_layers(video._backbone(model)[0]):
        assert layer_parts(layer).attention.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_patching_twice_does_not_stack():
    model = tiny(VivitForVideoClassification)
    x = clip()
    mmmerge.patch(model, r=6)
    once = output(model, x)
    mmmerge.patch(model, r=6)
    assert torch.equal(output(model, x), once)
    assert mmmerge.last_info(model).tokens_per_layer == [65, 59, 53, 47, 41]
    mmmerge.patch(model, r=0)  # re-patch replaces: back to the unmerged model
    mmmerge.unpatch(model)
    reference = output(tiny(VivitForVideoClassification), x)
    assert torch.equal(output(model, x), reference)


def test_proportional_attention_same_under_eager_and_sdpa():
    x = clip()
    results = {}
    for attn in ("eager", "sdpa"):
        model = tiny(VideoMAEForVideoClassification, attn)
        mmmerge.patch(model, r=8, prop_attn=True)
        results[attn] = output(model, x)
        mmmerge.patch(model, r=8, prop_attn=False)
        results[attn, "off"] = output(model, x)
    torch.testing.assert_close(results["eager"], results["sdpa"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(results["eager"], results["eager", "off"], atol=1e-4)  # the bias reached attention


def test_backend_without_bias_support_is_refused():
    model = tiny(VivitModel, "sdpa")
    core = model.layers[0].attention
    core.config._attn_implementation_internal = "flash_attention_2"  # pretend; forward is never run
    with pytest.raises(ValueError, match="cannot take the proportional-attention bias"):
        mmmerge.patch(model, r=4)
    assert untouched(model)
    mmmerge.patch(model, r=4, prop_attn=False)  # without the bias any backend works


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("spec, expected", [
    (6, [65, 59, 53, 47, 41]),
    ([0, 10, 0, 5], [65, 65, 55, 55, 50]),
    ((8, -0.5), None),
    (TargetFlops(0.75), None),
])
def test_tokens_per_layer_follow_schedule(spec, expected):
    model = tiny(VivitForVideoClassification)
    mmmerge.patch(model, r=spec)
    output(model, clip())
    info = mmmerge.last_info(model)
    counts = [65]
    for r in info.schedule:
        counts.append(counts[-1] - r)
    assert info.tokens_per_layer == counts
    if expected is not None:
        assert info.tokens_per_layer == expected
    if isinstance(spec, tuple):
        assert info.schedule[0] > info.schedule[-1]  # ToMe's inflect: r shrinks with depth for inflect < 0
    if isinstance(spec, TargetFlops):
        layer = mmmerge.transformer_layer_flops(32, 2.0)
        full = sum(layer(65, 65) for _ in range(4))
        merged = sum(layer(n, n - r) for n, r in zip(info.tokens_per_layer, info.schedule))
        assert merged > 0
        assert merged <= 0.75 * full


def test_final_tokens_in_order_with_cls_first():
    model = tiny(VivitForVideoClassification)
    mmmerge.patch(model, r=10, trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    assert info.source.shape == (2, 65) and info.size.shape == (2, 25)
    assert torch.equal(info.source[:, 0], torch.zeros(2, dtype=torch.long))  # CLS never moves or merges
    assert torch.equal(info.size[:, 0], torch.ones(2))
    assert torch.equal(info.size.sum(1), torch.full((2,), 65.0))
    # Survivors keep the order of their representatives (the member that survived every step).
    for b in range(2):
        assert has_increasing_representatives(info.source[b], 25)


# ------------------------------------------------------------------------------------------ time modes
def _frame_of_original(model):
    layout = video.video_layout(model)
    t = torch.arange(layout.frames).repeat_interleave(layout.rows * layout.cols)
    return torch.cat([torch.full((layout.protected,), -1), t])


@pytest.mark.parametrize("cls", [VivitForVideoClassification, VideoMAEModel], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "random"])
def test_within_frame_never_groups_two_frames(cls, method):
    model = tiny(cls)
    mmmerge.patch(model, r=8, method=method, time_mode="within_frame", trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    frame = _frame_of_original(model)
    for b in range(2):
        assert all(len(ts) == 1 for ts in group_values(info.source[b], frame).values())
        # Per-frame budget: every tubelet ends with the same number of tokens (16 - 4 * 8 / 4).
        per_frame = torch.bincount(info.state.coords["t_min"][b, protected(model):].long(), minlength=4)
        assert per_frame.tolist() == [8, 8, 8, 8]


def test_within_frame_takes_any_r_and_one_global_budget():
    model = tiny(VideoMAEModel)
    mmmerge.patch(model, r=6, time_mode="within_frame", trace_source=True)  # 6 over 4 tubelets: uneven shares
    output(model, clip())
    per_frame = torch.bincount(mmmerge.last_info(model).state.coords["t_min"][0].long(), minlength=4)
    assert per_frame.sum() == 40 and per_frame.max() - per_frame.min() <= 1
    mmmerge.patch(model, r=6, time_mode="within_frame", group_budget=False, trace_source=True)
    output(model, clip())
    frame = _frame_of_original(model)
    assert all(len(ts) == 1 for ts in group_values(mmmerge.last_info(model).source[0], frame).values())
    with pytest.raises(ValueError, match="no option 'frame_budget'; use group_budget"):
        mmmerge.patch(model, r=6, time_mode="within_frame", frame_budget=False)


@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "random"])
def test_adjacent_keeps_time_spans_contiguous(method):
    model = tiny(VideoMAEModel, layers=4)
    mmmerge.patch(model, r=12, method=method, time_mode="adjacent", trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    frame = _frame_of_original(model)
    spanning = 0
    for b in range(2):
        groups = group_values(info.source[b], frame)
        for g, ts in groups.items():
            assert ts == set(range(min(ts), max(ts) + 1)), f"group {g} covers frames {sorted(ts)}"
            spanning += len(ts) > 1
        # The state's spans describe the same stretch.
        for g, ts in groups.items():
            assert info.state.coords["t_min"][b, g] == min(ts) and info.state.coords["t_max"][b, g] == max(ts)
    assert spanning > 0  # the test is not vacuous: some group does cross frames


@pytest.mark.parametrize("k", [1, 2])
def test_window_never_exceeds_k(k):
    model = tiny(VideoMAEModel)
    mmmerge.patch(model, r=12, time_mode=f"window({k})", trace_source=True)
    output(model, clip())
    frame = _frame_of_original(model)
    widest = 0
    for b in range(2):
        for ts in group_values(mmmerge.last_info(model).source[b], frame).values():
            assert max(ts) - min(ts) < k
            assert len({t // k for t in ts}) == 1
            widest = max(widest, len(ts))
    assert widest == k  # not vacuous: with k > 1 some group does use its window across frames


def test_time_mode_errors():
    model = tiny(VideoMAEModel)
    with pytest.raises(ValueError, match="unknown time_mode 'sideways'"):
        mmmerge.patch(model, r=4, time_mode="sideways")
    with pytest.raises(ValueError, match=r"k in window\(k\) must be a positive integer"):
        mmmerge.patch(model, r=4, time_mode="window(0)")
    with pytest.raises(ValueError, match=r"write 'window\(k\)'"):
        mmmerge.patch(model, r=4, time_mode="window")
    with pytest.raises(TypeError, match="time_mode must be a string"):
        mmmerge.patch(model, r=4, time_mode=3)
    with pytest.raises(ValueError, match="not available here"):
        mmmerge.parse_time_mode("window(2)", ("global",))
    with pytest.raises(ValueError, match="unknown time_mode 'same_band'"):
        mmmerge.patch(model, r=4, time_mode="same_band")
    with pytest.raises(ValueError, match="no option 'window'"):
        mmmerge.patch(model, r=4, time_mode="global", window=2)
    assert untouched(model)


def test_timestamps_become_spans_in_seconds():
    model = tiny(VideoMAEModel)
    stamps = [i / 10 for i in range(FRAMES)]  # 10 fps
    mmmerge.patch(model, r=12, time_mode="adjacent", trace_source=True, timestamps=stamps)
    output(model, clip())
    state = mmmerge.last_info(model).state
    t_min, t_max = state.coords["t_min"], state.coords["t_max"]
    torch.testing.assert_close(state.coords["sec_min"], t_min * 0.2)  # a tubelet is 2 frames = 0.2 s
    torch.testing.assert_close(state.coords["sec_max"], t_max * 0.2 + 0.1)
    with pytest.raises(ValueError, match="one time per input frame"):
        mmmerge.patch(model, r=4, timestamps=stamps[:3])
    with pytest.raises(ValueError, match="finite"):
        mmmerge.patch(model, r=4, timestamps=[float("nan")] + stamps[1:])
    with pytest.raises(ValueError, match="must not decrease"):
        mmmerge.patch(model, r=4, timestamps=stamps[::-1])


# ----------------------------------------------------------------------------------------------- pooling
def weighted_mean(x, size):
    """Size-weighted mean over tokens ``[B, N, C] -> [B, C]``: the plain mean over the originals."""
    w = size.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1)


def test_videomae_pooling_is_size_weighted():
    # The mean-pooling head gets one row per original token (output="original" by default), so its own
    # plain mean is the size-weighted mean of the merged tokens.
    model = tiny(VideoMAEForVideoClassification)
    x = clip()
    mmmerge.patch(model, r=10, trace_source=True, output="merged")
    with torch.no_grad():
        hidden = model.videomae(pixel_values=x).last_hidden_state  # merged: [2, 24, 32]
        size = mmmerge.last_info(model).size
        expected = model.classifier(model.fc_norm(weighted_mean(hidden, size)))
        plain = model.classifier(model.fc_norm(hidden.mean(1)))
    assert hidden.shape[1] == 24
    mmmerge.patch(model, r=10)
    assert patch_spec(model).output == "original"
    with torch.no_grad():
        rows = model.videomae(pixel_values=x).last_hidden_state
    assert rows.shape == (2, 64, 32)
    torch.testing.assert_close(output(model, x), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(output(model, x), plain, atol=1e-4)  # a plain mean of merged tokens would differ


def test_frame_features_unmerge_to_grid():
    model = tiny(VivitModel)
    mmmerge.patch(model, r=10, trace_source=True)
    with torch.no_grad():
        hidden = model(pixel_values=clip()).last_hidden_state
    grid = video.frame_features(model, hidden)
    assert grid.shape == (2, 4, 4, 4, 32)
    source = mmmerge.last_info(model).source
    torch.testing.assert_close(grid[1, 2, 3, 1], hidden[1, source[1, 1 + 2 * 16 + 3 * 4 + 1]])
    mmmerge.patch(model, r=10)  # no trace: a clear error
    with torch.no_grad():
        model(pixel_values=clip())
    with pytest.raises(ValueError, match="trace_source=True"):
        video.frame_features(model, hidden)
    mmmerge.patch(model, r=10, output="original")  # or ask for one row per token: no source map needed
    with torch.no_grad():
        rows = model(pixel_values=clip()).last_hidden_state
    assert video.frame_features(model, rows).shape == (2, 4, 4, 4, 32)


def test_gradients_flow_through_merged_model():
    model = tiny(VideoMAEForVideoClassification).train()
    mmmerge.patch(model, r=8, method="tps")
    x = clip().requires_grad_()
    model(pixel_values=x).logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert model.videomae.encoder.layer[0].attention.attention.key.weight.grad is not None


def test_wrong_input_size_after_patch_is_explained():
    model = tiny(VivitModel)
    mmmerge.patch(model, r=4)  # set up for 32x32 inputs: 65 tokens
    # (upstream ViViT cannot interpolate here, so the first patched layer is called directly)
    with pytest.raises(ValueError, match="got 145 tokens but this patch was set up for 65; re-patch"):
        model.layers[0](torch.zeros(1, 145, 32))
    with pytest.raises(RuntimeError, match="ran out of order"):
        model.layers[1](torch.zeros(1, 65, 32))


# --------------------------------------------------------------------------------------------- bad input
def test_unsupported_model_raises_type_error_and_is_untouched():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(TypeError, match="VideoMAEForVideoClassification"):
        mmmerge.patch(model, r=4)
    with pytest.raises(TypeError, match="supports"):
        video.patch(model, r=4)
    assert untouched(model)
    assert {name: type(m) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("bad", [1000, -1, [1, 2], "eight"])
def test_infeasible_r_raises_before_any_change(bad):
    model = tiny(VivitForVideoClassification)
    x = clip()
    reference = output(model, x)
    with pytest.raises((ValueError, TypeError)):
        mmmerge.patch(model, r=bad)
    assert untouched(model)
    assert torch.equal(output(model, x), reference)


def test_failed_repatch_keeps_previous_patch():
    model = tiny(VivitForVideoClassification)
    mmmerge.patch(model, r=6)
    with pytest.raises(ValueError):
        mmmerge.patch(model, r=1000)
    output(model, clip())
    assert mmmerge.last_info(model).tokens_per_layer == [65, 59, 53, 47, 41]


def test_unknown_method_is_refused():
    model = tiny(VivitModel)
    with pytest.raises(ValueError, match="method"):
        mmmerge.patch(model, r=4, method="magic")
    assert untouched(model)


def test_unknown_matcher_option_is_refused():
    model = tiny(VivitModel)
    with pytest.raises(ValueError, match="takes no option 'margn'; its options are: alpha, margin, preset"):
        mmmerge.patch(model, r=4, method="pitome", margn=0.5)  # a typo must not be ignored silently
    with pytest.raises(ValueError, match="'tome' takes no option 'temperature'"):
        mmmerge.patch(model, r=4, temperature=0.5)
    with pytest.raises(ValueError, match="unknown pitome preset 'offical'"):
        mmmerge.patch(model, r=4, method="pitome", preset="offical")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mmmerge.patch(model, r=4, method="tps", temperature=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        mmmerge.patch(model, r=4, method="random", generator=3)
    with pytest.raises(ValueError, match="set by the encoder patch itself"):
        mmmerge.patch(model, r=4, method="pitome", layer_idx=2)
    assert untouched(model)
    mmmerge.patch(model, r=4, method="pitome", margin=0.5)  # a real option is accepted
    mmmerge.patch(model, r=4, method="tps", temperature=0.5)


# ------------------------------------------------------------------------------------------ load_video
def write_mp4(path, frames=20, fps=10, width=64, height=48):
    """Each frame is a flat grey whose level encodes its index (so order is checkable after decoding)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 10 + 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.mark.parametrize("sampling, expected", [
    ("uniform", [0, 3, 5, 8, 11, 14, 16, 19]),
    ("segment", [1, 3, 6, 8, 11, 13, 16, 18]),
    ("dense", [2, 4, 6, 8, 10, 12, 14, 16]),
])
def test_load_video_samples_frames_and_timestamps(mp4, sampling, expected):
    pytest.importorskip("decord")
    frames, stamps = video.load_video(mp4, num_frames=8, sampling=sampling, stride=2 if sampling == "dense" else None)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == torch.uint8
    torch.testing.assert_close(stamps, torch.tensor(expected, dtype=torch.float32) / 10, atol=1e-3, rtol=0)
    levels = frames.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, 10 + 10 * torch.tensor(expected, dtype=torch.float32), atol=4, rtol=0)


def test_load_video_errors(tmp_path, mp4):
    pytest.importorskip("decord")
    with pytest.raises(FileNotFoundError, match="no video file"):
        video.load_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="could not decode"):
        video.load_video(junk)
    with pytest.raises(ValueError, match="video has 20 frames, fewer than the 32 requested"):
        video.load_video(mp4, num_frames=32)
    with pytest.raises(ValueError, match="needs 29"):
        video.load_video(mp4, num_frames=8, sampling="dense", stride=4)
    with pytest.raises(ValueError, match="unknown sampling"):
        video.load_video(mp4, sampling="random")
    with pytest.raises(ValueError, match="stride=2 applies to dense sampling only"):
        video.load_video(mp4, num_frames=8, sampling="uniform", stride=2)


def test_visualize_paints_groups(mp4):
    model = tiny(VideoMAEModel)
    mmmerge.patch(model, r=12, trace_source=True)
    frames = torch.randint(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=torch.uint8)
    x = frames.permute(0, 3, 1, 2).float().div(255).unsqueeze(0)
    with torch.no_grad():
        model(pixel_values=x)
    image = video.visualize(frames, mmmerge.last_info(model), model=model)
    assert image.size == (4 * SIZE, SIZE)  # one panel per tubelet, side by side
    assert np.asarray(image).std() > 0
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video.visualize(frames[..., 0], mmmerge.last_info(model), model=model)


@pytest.mark.parametrize("method", ["tome", "random"])
def test_gradient_checkpointing_still_recomputes_and_matches(method):
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny(VivitForVideoClassification).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        mmmerge.patch(model, r=6, method=method)
        count = []
        model.vivit.layers[1].layernorm_before.register_forward_hook(lambda *a: count.append(1))
        torch.manual_seed(3)
        x = clip().requires_grad_()
        model(pixel_values=x).logits.sum().backward()
        grads.append(x.grad)
        calls.append(len(count))
        assert mmmerge.last_info(model).tokens_per_layer == [65, 59, 53, 47, 41]
    assert calls == [1, 2]  # with checkpointing the layer body really is recomputed in backward
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_a_failure_while_patching_leaves_the_model_as_it_was(monkeypatch):
    from mmmerge.adapters import encoder

    model = tiny(VideoMAEForVideoClassification)
    x = clip()
    reference = output(model, x)
    original = encoder.merging_class
    calls = []

    def failing(base):  # the third layer's class swap fails: the first two must be undone
        calls.append(base)
        if len(calls) == 3:
            raise RuntimeError("swap failed")
        return original(base)

    monkeypatch.setattr(encoder, "merging_class", failing)
    with pytest.raises(RuntimeError, match="swap failed"):
        mmmerge.patch(model, r=4)
    assert untouched(model)
    assert torch.equal(output(model, x), reference)


def test_official_tome_parity_runs_with_per_frame_groups_on_a_cls_model():
    """ViViT has a [CLS] token: the official parity flips the A/B split, per frame group too (static tables)."""
    model = tiny(VivitForVideoClassification, attn="sdpa")
    x = clip()
    outputs = {}
    for parity in ("mergeable", "official"):
        mmmerge.patch(model, r=4, method="tome", time_mode="within_frame", parity=parity, trace_source=True)
        outputs[parity] = output(model, x)
        source = mmmerge.last_info(model).source
        assert torch.isfinite(outputs[parity]).all() and has_increasing_representatives(source[0], source.max() + 1)
    assert not torch.equal(outputs["mergeable"], outputs["official"])
