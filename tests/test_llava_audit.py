"""LLaVA adapter, second set: no host sync or per-image loop in the forward path, a true no-cache recompute,
the video processor, video bad input, [CLS] attention without eager.

Tiny random models from configs (helpers shared with test_llava.py); no network.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.overrides import TorchFunctionMode
from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, PreTrainedTokenizerFast
from transformers.models.clip import modeling_clip
from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

import mmmerge
from mmmerge.adapters import llava
from test_llava import (DEVICE, DTYPE, EXACT, FRAMES, PATCH, SIZE, TOL, VIDEO, assert_same_snapshot, generate,
                        lm_input, logits, pictures, pixels, processor, prompt, snapshot, tiny_llava, tiny_video,
                        video_pixels, video_prompt)

PER_FRAME = ((SIZE // PATCH) // 2) ** 2  # 16 tokens per frame after the 2 x 2 pooling


# ------------------------------------------------------------------------------- forward-path hygiene
HOST_SYNC = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.unique, torch.unique, torch.masked_select, torch.Tensor.masked_select}


class Ops(TorchFunctionMode):
    """Records every torch call made inside the block, and separately the ones that force a host sync."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if func in HOST_SYNC:
            self.syncs.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def traced(fn, *args, **kwargs) -> Ops:
    with Ops() as ops:
        fn(*args, **kwargs)
    return ops


IMAGE_SETUPS = [dict(method=m, where=w) for m in ("tome", "pitome", "tps", "prune", "random", "dominant")
                for w in ("pre_projector", "post_projector")]


@pytest.mark.parametrize("kwargs", IMAGE_SETUPS, ids=lambda k: f"{k['method']}-{k['where']}")
def test_image_reduction_has_no_host_sync_and_no_per_image_loop(kwargs):
    K = 12
    model = tiny_llava()
    ids = prompt(3, "img", 4, "img", per_image=K)
    plain = traced(model, input_ids=prompt(3, "img", 4, "img"), pixel_values=pixels(2))
    llava.reduce_visual_tokens(model, keep=K, **kwargs)
    assert traced(model.model.get_image_features, pixels(2)).syncs == []
    # The whole forward syncs exactly as the unpatched one does (transformers' own total-count check, which the
    # per-run placeholder check feeds instead of reading a bool of its own). Text-only calls (decoding) add none.
    with torch.no_grad(), Ops() as forward:
        model(input_ids=ids, pixel_values=pixels(2))
    assert forward.syncs == plain.syncs == ["item"]
    assert traced(model, input_ids=prompt(3, 4)).syncs == []
    # Same number of torch calls for 1 and 3 images: nothing loops over images.
    one, three = (traced(model.model.get_image_features, pixels(b)).calls for b in (1, 3))
    assert one == three


@pytest.mark.parametrize("time_mode,method", [("within_frame", "tome"), ("within_frame", "dominant"),
                                              ("adjacent", "tome"), ("adjacent", "tps"), ("global", "pitome")])
def test_video_reduction_has_no_host_sync_and_no_per_video_loop(time_mode, method):
    model = tiny_video()
    llava.reduce_visual_tokens(model, keep=16, method=method, time_mode=time_mode)
    assert traced(model.model.get_video_features, video_pixels(2)).syncs == []
    one, three = (traced(model.model.get_video_features, video_pixels(b)).calls for b in (1, 3))
    assert one == three


def test_dominant_does_not_force_eager_attention(monkeypatch):
    """The [CLS] attention comes from hooks on the projections: the tower keeps sdpa, eager never runs."""
    eager_calls = []
    original = modeling_clip.eager_attention_forward

    def spy(*args, **kwargs):
        eager_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_clip, "eager_attention_forward", spy)
    model = tiny_llava()
    tower = model.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    outputs = []
    tower.register_forward_hook(lambda m, a, o: outputs.append(o))
    llava.reduce_visual_tokens(model, keep=12, method="dominant")
    logits(model, input_ids=prompt(3, "img", per_image=12), pixel_values=pixels(1))
    assert tower.config._attn_implementation == "sdpa" and eager_calls == []
    assert outputs[-1].attentions is None  # no attention maps were asked for
    # The spy itself works: an eager tower does call it.
    tower.set_attn_implementation("eager")
    logits(model, input_ids=prompt(3, "img", per_image=12), pixel_values=pixels(1))
    assert eager_calls


# ----------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method", ["tome", "dominant", "tps"])
def test_cached_generate_equals_full_recompute(method):
    """generate() with the KV cache against a greedy loop that reruns the whole model (tower, reduction,
    projector, LM over the full sequence) at every step, and against generate(use_cache=False)."""
    K, steps = 16, 6
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K, method=method)
    ids, pv = prompt(3, "img", 4, 5, per_image=K), pixels(1)
    tokens, scores = generate(model, steps=steps, use_cache=True, input_ids=ids, pixel_values=pv)
    seq, loop_scores = ids, []
    for _ in range(steps):
        step = logits(model, input_ids=seq, pixel_values=pv, use_cache=False)[:, -1]
        loop_scores.append(step)
        seq = torch.cat([seq, step.argmax(-1, keepdim=True)], 1)
    if EXACT:
        assert torch.equal(tokens, seq[:, -steps:])
        torch.testing.assert_close(scores, torch.stack(loop_scores, 1), atol=1e-5, rtol=1e-5)
    no_cache_tokens, no_cache_scores = generate(model, steps=steps, use_cache=False, input_ids=ids, pixel_values=pv)
    if EXACT:
        assert torch.equal(tokens, no_cache_tokens)
    torch.testing.assert_close(scores[:, 0], no_cache_scores[:, 0], **TOL)
    if EXACT:
        torch.testing.assert_close(scores, no_cache_scores, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_alone_at_every_step():
    K, steps = 16, 6
    model, proc = tiny_llava(), processor()
    llava.reduce_visual_tokens(model, keep=K, method="pitome", processor=proc)
    images = pictures(3, seed=5)
    long_text = " ".join(f"w{i}" for i in range(20, 42))  # 22 words > 3 words + one more image
    texts = ["w5 <image> w6 <image> w7", long_text + " <image> w12"]
    batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # now the first row (2 images, shorter text) is the padded one
    batch = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in batch.items()}
    tokens, scores = generate(model, steps=steps, **batch)
    for row, (text, imgs) in enumerate([(texts[0], images[:2]), (texts[1], images[2:])]):
        alone = proc(images=imgs, text=[text], return_tensors="pt")
        alone = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in alone.items()}
        t, s = generate(model, steps=steps, **alone)
        if EXACT:
            assert torch.equal(tokens[row], t[0])
            torch.testing.assert_close(scores[row], s[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- video processor
def video_processor(patch=PATCH, crop_side=SIZE):
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(90)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"], vocab["<video>"] = VIDEO - 1, VIDEO
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    crop = {"height": SIZE, "width": SIZE}
    videos = LlavaNextVideoVideoProcessor(size={"shortest_edge": crop_side}, do_sample_frames=False,
                                          crop_size={"height": crop_side, "width": crop_side})
    images = LlavaNextImageProcessor(size={"shortest_edge": SIZE}, crop_size=crop, image_grid_pinpoints=[[SIZE, SIZE]])
    return LlavaNextVideoProcessor(video_processor=videos, image_processor=images, tokenizer=fast, patch_size=patch,
                                   vision_feature_select_strategy="default")


def clips(n, frames=FRAMES, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((frames, 40, 48, 3)) * 255).astype("uint8") for _ in range(n)]


@pytest.mark.parametrize("keep,time_mode,expected", [(16, "within_frame", 16), (0.25, "within_frame", 16),
                                                     (10, "adjacent", 10), (FRAMES * PER_FRAME, "global", 64)])
def test_video_processor_emits_keep_per_video(keep, time_mode, expected):
    model, proc = tiny_video(), video_processor()
    texts = ["w3 <video> w4", "w5 w6 w7 <video>"]
    full = proc(videos=clips(2), text=texts, return_tensors="pt", padding=True)
    assert torch.equal((full["input_ids"] == VIDEO).sum(1), torch.tensor([FRAMES * PER_FRAME] * 2))
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=keep, time_mode=time_mode, processor=proc)
    short = proc(videos=clips(2), text=texts, return_tensors="pt", padding=True)
    assert torch.equal((short["input_ids"] == VIDEO).sum(1), torch.tensor([expected] * 2))
    short = {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in short.items()}
    logits(model, **short)
    assert seen[-1].shape[1] == short["input_ids"].shape[1] == 3 + expected  # 3 text tokens in the longer prompt
    assert mmmerge.last_info(model).tokens_out == expected
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model, num_frames=FRAMES)
    assert torch.equal(ids, short["input_ids"].cpu()) and torch.equal(mask, short["attention_mask"].cpu())
    llava.restore_visual_tokens(model, proc)
    again = proc(videos=clips(2), text=texts, return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], full["input_ids"])


def test_video_keep_all_is_exact_and_restore_bit_identical():
    model = tiny_video()
    ids, pv = video_prompt(FRAMES * PER_FRAME), video_pixels()
    ref, before = logits(model, input_ids=ids, pixel_values_videos=pv), snapshot(model)
    for keep in (FRAMES * PER_FRAME, 1.0):
        llava.reduce_visual_tokens(model, keep=keep, time_mode="adjacent")
        assert torch.equal(logits(model, input_ids=ids, pixel_values_videos=pv), ref)
    llava.reduce_visual_tokens(model, keep=8, method="tps", time_mode="within_frame")
    assert logits(model, input_ids=video_prompt(8), pixel_values_videos=pv).shape[1] == 3 + 8
    llava.restore_visual_tokens(model)
    assert torch.equal(logits(model, input_ids=ids, pixel_values_videos=pv), ref)
    assert_same_snapshot(before, snapshot(model))


# ------------------------------------------------------------------------------------------ bad input
VIDEO_BAD = [
    (dict(keep=0), ValueError, "keep >= 1"),
    (dict(keep=1.5), ValueError, "fraction"),
    (dict(keep=16, time_mode="sideways"), ValueError, "unknown time_mode"),
    (dict(keep=16, where="vision_tower"), ValueError, "post_projector"),
    (dict(keep=16, where="pre_projector"), ValueError, "post_projector"),
    (dict(keep=16, processor="image"), TypeError, "needs a LlavaNextVideoProcessor"),
    (dict(keep=16, processor="patch"), ValueError, "patch_size 8"),
    (dict(keep=16, processor="crop"), ValueError, "video crop 64x64"),
]


@pytest.mark.parametrize("kwargs,error,message", VIDEO_BAD)
def test_video_bad_input_leaves_model_and_processor_untouched(kwargs, error, message):
    model = tiny_video()
    ids, pv = video_prompt(FRAMES * PER_FRAME), video_pixels()
    ref, before = logits(model, input_ids=ids, pixel_values_videos=pv), snapshot(model)
    makers = {"image": processor, "patch": lambda: video_processor(patch=8),
              "crop": lambda: video_processor(crop_side=2 * SIZE)}
    proc = makers.get(kwargs.get("processor"), lambda: None)()
    if proc is not None:
        kwargs = dict(kwargs, processor=proc)
        proc_attrs = set(proc.__dict__)
    with pytest.raises(error, match=message):
        llava.reduce_visual_tokens(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, input_ids=ids, pixel_values_videos=pv), ref)
    if proc is not None:
        assert set(proc.__dict__) == proc_attrs


def test_video_keep_checked_against_the_frames_of_each_call():
    """A video's token count is only known from its frames: the forward raises a clear error, before the tower."""
    model = tiny_video()
    tower_calls = []
    model.model.vision_tower.register_forward_hook(lambda m, a, o: tower_calls.append(1))
    llava.reduce_visual_tokens(model, keep=FRAMES * PER_FRAME + 1)
    with pytest.raises(ValueError, match="larger than the 64 visual tokens per video"):
        logits(model, input_ids=video_prompt(FRAMES * PER_FRAME + 1), pixel_values_videos=video_pixels())
    llava.reduce_visual_tokens(model, keep=10, time_mode="within_frame")
    with pytest.raises(ValueError, match="multiple of the 4 frames"):
        logits(model, input_ids=video_prompt(10), pixel_values_videos=video_pixels())
    assert tower_calls == []
    with pytest.raises(ValueError, match="multiple of the 4 frames"):
        llava.check_placeholder_counts(video_prompt(10), model, num_frames=FRAMES)


IMAGE_PROCESSOR_MISMATCH = [
    ("image_token_id", lambda p: setattr(p, "image_token_id", 7), "image_token_id 7"),
    ("strategy", lambda p: setattr(p, "vision_feature_select_strategy", "full"), "vision_feature_select_strategy"),
    ("crop", lambda p: setattr(p.image_processor, "crop_size", {"height": 2 * SIZE, "width": 2 * SIZE}),
     "image crop 64x64"),
]


@pytest.mark.parametrize("name,spoil,message", IMAGE_PROCESSOR_MISMATCH, ids=[m[0] for m in IMAGE_PROCESSOR_MISMATCH])
def test_mismatched_image_processor_leaves_both_untouched(name, spoil, message):
    model, proc = tiny_llava(), processor()
    spoil(proc)
    before, proc_attrs = snapshot(model), set(proc.__dict__)
    with pytest.raises(ValueError, match=message):
        llava.reduce_visual_tokens(model, keep=16, processor=proc)
    assert_same_snapshot(before, snapshot(model))
    assert set(proc.__dict__) == proc_attrs


# ------------------------------------------------------------------------------------------- the example
@pytest.mark.parametrize("args,message", [(["--keep", "1.5"], "a fraction must lie in (0, 1]"),
                                          (["--image", "missing.png"], "no such file"),
                                          (["--method", "dominant", "--where", "vision_tower"], "post_projector")])
def test_example_rejects_bad_arguments_in_one_line(args, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "llava_vqa.py"
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- the engine's dominant
def frame_state(B, frames, per_frame, valid=None):
    t = torch.arange(frames, dtype=torch.float32).repeat_interleave(per_frame)
    return mmmerge.init_state(B, frames * per_frame, coords={"t": t, "t_min": t, "t_max": t},
                              rules={"t_min": "min", "t_max": "max"}, valid=valid)


def test_dominant_keeps_the_top_scores_and_merges_the_rest_into_contextual_tokens():
    g = torch.Generator().manual_seed(0)
    x, score = torch.randn(3, 40, 8, generator=g), torch.rand(3, 40, generator=g)
    K, C = 12, 3
    y, state = mmmerge.reduce_tokens(x, K, "dominant", score=score, contextual=C)
    assert y.shape == (3, K, 8) and torch.all(state.size.sum(1) == 40)
    top = score.topk(K - C, dim=-1).indices
    for b in range(3):
        singles = {int(i) for i in torch.nonzero(state.size[b] == 1).flatten()}
        kept_alone = {int(state.source[b, i]) for i in top[b]}
        assert kept_alone <= singles  # the dominant tokens pass through unmerged
        torch.testing.assert_close(y[b, state.source[b, top[b]]], x[b, top[b]])
    assert torch.all((state.size > 1).sum(1) <= C)


@pytest.mark.parametrize("constraint", ["within_frame", "adjacent", "window(2)"])
def test_dominant_respects_time_constraints(constraint):
    g = torch.Generator().manual_seed(1)
    frames, per_frame = 4, 10
    x, score = torch.randn(2, frames * per_frame, 8, generator=g), torch.rand(2, frames * per_frame, generator=g)
    _, state = mmmerge.reduce_tokens(x, 8, "dominant", score=score, state=frame_state(2, frames, per_frame),
                                     constraint=mmmerge.parse_constraint(constraint, steps={"t": frames}),
                                     contextual=2)
    lo, hi = state.coords["t_min"], state.coords["t_max"]
    if constraint == "within_frame":
        assert torch.equal(lo, hi)
    if constraint == "window(2)":
        assert torch.equal(torch.div(lo, 2, rounding_mode="floor"), torch.div(hi, 2, rounding_mode="floor"))
    frame = torch.arange(frames * per_frame) // per_frame
    for b in range(2):
        for j in range(8):
            members = sorted(set(frame[state.source[b] == j].tolist()))
            assert members == list(range(members[0], members[-1] + 1))  # contiguous in every mode here


def test_dominant_keeps_padding_apart_and_rejects_bad_options():
    g = torch.Generator().manual_seed(2)
    x, score = torch.randn(2, 20, 8, generator=g), torch.rand(2, 20, generator=g)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 14:] = False
    _, state = mmmerge.reduce_tokens(x, 6, "dominant", score=score, state=mmmerge.init_state(2, 20, valid=valid))
    assert not bool(torch.isin(state.source[1, 14:], state.source[1, :14]).any())
    for bad, message in [(dict(contextual=0), "positive int"), (dict(contextual=True), "positive int"),
                         (dict(contextual=7), "more than the 6"), (dict(score=torch.rand(2, 19)), "score must be")]:
        with pytest.raises(ValueError, match=message):
            mmmerge.reduce_tokens(x, 6, "dominant", **{"score": score, **bad})


def test_patch_time_option_check_moves_no_random_stream():
    """The options are tried on a tiny input at patch time; that trial draws from no random stream."""
    model = tiny_llava()
    g = torch.Generator(device=DEVICE).manual_seed(3)
    expected_user = torch.rand(4, generator=torch.Generator(device=DEVICE).manual_seed(3), device=DEVICE)
    torch.manual_seed(5)
    expected_global = torch.rand(4)
    torch.manual_seed(5)
    llava.reduce_visual_tokens(model, keep=16, method="random")
    llava.reduce_visual_tokens(model, keep=16, method="random", generator=g)
    assert torch.equal(torch.rand(4), expected_global)
    assert torch.equal(torch.rand(4, generator=g, device=DEVICE), expected_user)
