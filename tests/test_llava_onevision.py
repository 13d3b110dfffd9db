"""LLaVA-OneVision on a tiny random model (SigLIP tower, no [CLS]) and a processor built offline (no network).

Images are anyres as in LLaVA-NeXT (a prompt with several images gets base views only, each with one newline);
videos are 4 frames x 16 pooled tokens + one newline per video. Set MMMERGE_TEST_DEVICE=cuda to run on a GPU.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, SiglipVisionConfig)
from transformers.models.siglip import modeling_siglip

import mmmerge
from mmmerge.adapters import llava
from test_llava import (DEVICE, DTYPE, EXACT, FRAMES, IMAGE, PATCH, SIZE, VIDEO, assert_same_snapshot, logits,
                        snapshot, text_config)
from test_llava_next import (BASE, PINPOINTS, SQUARE, TALL, WIDE, expected_count, generate, lm_lengths,
                             newline_count, packed_images, picture, tokenizer)

PER_FRAME = math.ceil(SIZE // PATCH / 2) ** 2  # 16 pooled tokens per frame


def siglip_config():
    return SiglipVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4)


def tiny_onevision(seed=0, aspect="anyres_max_9"):
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(vision_config=siglip_config(), text_config=text_config(), image_token_id=IMAGE,
                               video_token_id=VIDEO, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    return LlavaOnevisionForConditionalGeneration(cfg).to(DEVICE, DTYPE).eval()


def onevision_processor(aspect="anyres_max_9"):
    images = LlavaOnevisionImageProcessor(size={"height": SIZE, "width": SIZE}, image_grid_pinpoints=PINPOINTS)
    videos = LlavaOnevisionVideoProcessor(size={"height": SIZE, "width": SIZE})
    return LlavaOnevisionProcessor(image_processor=images, video_processor=videos, tokenizer=tokenizer(),
                                   num_image_tokens=BASE, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=aspect)


def to_device(out):
    return {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in out.items()}


def images_batch(proc, images, texts):
    return to_device(proc(images=images, text=texts, return_tensors="pt", padding=True))


def clips(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((FRAMES, 40, 48, 3)) * 255).astype("uint8") for _ in range(n)]


def videos_batch(proc, videos, texts):
    return to_device(proc(videos=videos, text=texts, return_tensors="pt", padding=True))


MIXED = ([[picture(WIDE)], [picture(TALL, 1), picture(SQUARE, 2)]], ["w5 <image> w6", "w7 <image> w9 <image> w4"])


# ---------------------------------------------------------------------------------------------- images
def test_keep_all_generates_identically_images_and_video():
    model, proc = tiny_onevision(), onevision_processor()
    inputs = images_batch(proc, *MIXED)
    video = videos_batch(proc, clips(2), ["w5 <video> w6", "w1 <video>"])
    refs = generate(model, **inputs), generate(model, **video)
    llava.reduce_visual_tokens(model, keep=1.0, method="dominant", processor=proc, time_mode="adjacent")
    for ref, again in zip(refs, (images_batch(proc, *MIXED), videos_batch(proc, clips(2), ["w5 <video> w6",
                                                                                            "w1 <video>"]))):
        tokens, scores = generate(model, **again)
        assert torch.equal(tokens, ref[0])
        torch.testing.assert_close(scores, ref[1], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["tome", "tps", "dominant", "prune"])
def test_quarter_keep_per_image_with_and_without_crops(method):
    model, proc = tiny_onevision(), onevision_processor()
    full = images_batch(proc, *MIXED)
    packed = packed_images(model, full)
    lengths = [p.shape[0] for p in packed]
    newlines = [newline_count(model, p) for p in packed]
    assert lengths[1:] == [BASE + 1, BASE + 1] and newlines[1:] == [1, 1]  # several images: base view + newline
    seen = lm_lengths(model)
    logits(model, **full)
    llava.reduce_visual_tokens(model, keep=0.25, method=method, processor=proc)
    short = images_batch(proc, *MIXED)
    expected = [expected_count(0.25, length, nl) for length, nl in zip(lengths, newlines)]
    expected[1:] = [math.ceil(0.25 * BASE) + 1] * 2  # no crops: the budget is the base view's alone
    assert (short["input_ids"] == IMAGE).sum(1).tolist() == [expected[0], expected[1] + expected[2]]
    logits(model, **short)
    assert seen[-1] == int(short["attention_mask"].sum(1).max()) < seen[0]
    reduced = packed_images(model, short)
    assert [r.shape[0] for r in reduced] == expected
    assert [newline_count(model, r) for r in reduced] == newlines
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                           image_sizes=full["image_sizes"], batch_num_images=full["batch_num_images"])
    assert torch.equal(ids, short["input_ids"]) and torch.equal(mask, short["attention_mask"])
    llava.check_placeholder_counts(ids, model, image_sizes=full["image_sizes"],
                                   batch_num_images=full["batch_num_images"])


def test_left_padded_batch_of_two_sizes_equals_each_alone():
    steps = 6
    model, proc = tiny_onevision(), onevision_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="tps", processor=proc)
    images = [picture(WIDE, 3), picture(TALL, 4)]
    texts = ["w5 <image> w6", " ".join(f"w{i}" for i in range(20, 50)) + " <image> w7"]
    inputs = images_batch(proc, [[images[0]], [images[1]]], texts)
    assert inputs["attention_mask"][0, 0] == 0
    tokens, scores = generate(model, steps=steps, **inputs)
    for row in range(2):
        t, s = generate(model, steps=steps, **images_batch(proc, [[images[row]]], [texts[row]]))
        if EXACT:
            assert torch.equal(tokens[row], t[0])
        torch.testing.assert_close(scores[row, 0], s[0, 0], atol=1e-4 if EXACT else 3e-2, rtol=1e-4)


def test_resampled_grids_keep_their_counts():
    """anyres_max_1: the model downsamples the crop grid (bilinear); the metric then follows its own packing."""
    model, proc = tiny_onevision(aspect="anyres_max_1"), onevision_processor(aspect="anyres_max_1")
    full = images_batch(proc, [[picture(SQUARE)]], ["w5 <image>"])
    ref = generate(model, **full)
    (length,) = [p.shape[0] for p in packed_images(model, full)]
    nl = newline_count(model, packed_images(model, full)[0])
    assert length < 5 * BASE + 16  # resampled: fewer than base + 4 crops + 16 newlines
    llava.reduce_visual_tokens(model, keep=1.0, processor=proc)
    assert torch.equal(generate(model, **images_batch(proc, [[picture(SQUARE)]], ["w5 <image>"]))[0], ref[0])
    llava.reduce_visual_tokens(model, keep=0.25, method="tps", processor=proc)
    short = images_batch(proc, [[picture(SQUARE)]], ["w5 <image>"])
    assert int((short["input_ids"] == IMAGE).sum()) == expected_count(0.25, length, nl)
    assert generate(model, **short)[0].shape == ref[0].shape


def test_score_without_cls_is_the_mean_attention_received_and_no_eager(monkeypatch):
    """SigLIP has no [CLS]: tps/prune/dominant rank tokens by the mean attention each receives in the feature
    layer, computed from the layer's own projections of its input; the tower keeps sdpa and eager never runs."""
    eager_calls = []
    original = modeling_siglip.eager_attention_forward
    monkeypatch.setattr(modeling_siglip, "eager_attention_forward",
                        lambda *a, **k: eager_calls.append(1) or original(*a, **k))
    model = tiny_onevision()
    lm = model.model
    layout = llava.kinds.tower_layout(lm)
    pv = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    with torch.no_grad():
        hidden = lm.vision_tower(pv, output_hidden_states=True).hidden_states
        _, score = llava.reduction.keys_and_scores(lm, layout, hidden, True)
    assert lm.vision_tower.config._attn_implementation == "sdpa" and eager_calls == []
    eager = copy.deepcopy(lm.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(pv, output_attentions=True).attentions[layout.feature_layers[-1] - 1]
    torch.testing.assert_close(score, attentions.float().mean((1, 2)), atol=1e-5 if EXACT else 2e-3, rtol=1e-3)
    assert eager_calls  # the spy itself works
    torch.testing.assert_close(score.sum(-1), torch.ones(3, device=DEVICE), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- videos
@pytest.mark.parametrize("time_mode", ["within_frame", "adjacent", "window(2)", "global"])
@pytest.mark.parametrize("method", ["tome", "dominant", "tps"])
def test_video_time_modes(time_mode, method):
    K = 16
    model, proc = tiny_onevision(), onevision_processor()
    texts = ["w5 <video> w6", "w1 w2 w3 <video>"]
    full = videos_batch(proc, clips(2), texts)
    assert torch.equal((full["input_ids"] == VIDEO).sum(1).cpu(), torch.tensor([FRAMES * PER_FRAME + 1] * 2))
    llava.reduce_visual_tokens(model, keep=K, method=method, time_mode=time_mode, processor=proc)
    short = videos_batch(proc, clips(2), texts)
    assert torch.equal((short["input_ids"] == VIDEO).sum(1).cpu(), torch.tensor([K + 1] * 2))  # + the newline
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model, num_frames=FRAMES)
    assert torch.equal(ids, short["input_ids"]) and torch.equal(mask, short["attention_mask"])
    with torch.no_grad():
        pooled = model.model.get_video_features(short["pixel_values_videos"]).pooler_output
    newline = model.model.image_newline.to(DTYPE)
    if pooled.shape[1] == K + 1:  # transformers >= 5.24 appends the newline in get_video_features
        assert torch.equal(pooled[:, -1], newline.expand(2, -1))
    else:
        assert pooled.shape[1] == K
    info = mmmerge.last_info(model)
    assert info.size.shape == (2, K) and torch.all(info.size.sum(1) == FRAMES * PER_FRAME)
    frame = (torch.arange(FRAMES * PER_FRAME, device=DEVICE) // PER_FRAME).expand(2, -1)
    for b in range(2):
        for j in range(K):
            frames = sorted(set(frame[b][info.source[b] == j].tolist()))
            if time_mode == "within_frame":
                assert len(frames) == 1
            if time_mode == "adjacent":
                assert frames == list(range(frames[0], frames[-1] + 1))
            if time_mode == "window(2)":
                assert len({f // 2 for f in frames}) == 1
    assert generate(model, **short)[0].shape == (2, 5)


def test_video_fraction_restore_and_bad_options():
    model, proc = tiny_onevision(), onevision_processor()
    video = videos_batch(proc, clips(1), ["w5 <video>"])
    ref, before = logits(model, **video), snapshot(model)
    llava.reduce_visual_tokens(model, keep=0.25, time_mode="within_frame", method="pitome", processor=proc)
    short = videos_batch(proc, clips(1), ["w5 <video>"])
    assert int((short["input_ids"] == VIDEO).sum()) == FRAMES * PER_FRAME // 4 + 1
    logits(model, **short)
    for bad, message in [(dict(time_mode="sideways"), "unknown time_mode"), (dict(time_mode=3), "must be a string"),
                         (dict(marign=0.1, method="pitome"), "takes no option 'marign'"),
                         (dict(contextual=0, method="dominant"), "positive int"),
                         (dict(where="pre_projector"), "post_projector")]:
        with pytest.raises((TypeError, ValueError), match=message):
            llava.reduce_visual_tokens(model, keep=8, **bad)
    logits(model, **short)  # a failed re-patch keeps the previous patch
    llava.restore_visual_tokens(model, proc)
    assert torch.equal(logits(model, **video), ref)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(videos_batch(proc, clips(1), ["w5 <video>"])["input_ids"], video["input_ids"])


def test_mismatched_processor_is_rejected_untouched():
    model = tiny_onevision()
    before = snapshot(model)
    for proc, message in [(onevision_processor(aspect="anyres_max_1"), "vision_aspect_ratio"),
                          (LlavaOnevisionProcessor(image_processor=onevision_processor().image_processor,
                                                   video_processor=onevision_processor().video_processor,
                                                   tokenizer=tokenizer(), num_image_tokens=BASE // 4,
                                                   vision_feature_select_strategy="full"), "num_image_tokens")]:
        attrs = set(proc.__dict__)
        with pytest.raises(ValueError, match=message):
            llava.reduce_visual_tokens(model, keep=0.25, processor=proc)
        assert set(proc.__dict__) == attrs
    assert_same_snapshot(before, snapshot(model))
