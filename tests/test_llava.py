"""LLaVA adapter on tiny random LLaVA-1.5 / LLaVA-NeXT-Video models built from configs (no network).

Set MMMERGE_TEST_DEVICE=cuda to run on a GPU (in bf16 unless MMMERGE_TEST_DTYPE=float32).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaNextVideoConfig,
                          LlavaNextVideoForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

import mmmerge
from mmmerge.adapters import llava

from helpers import has_increasing_representatives

DEVICE = torch.device(os.environ.get("MMMERGE_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("MMMERGE_TEST_DTYPE", "bfloat16" if DEVICE.type == "cuda" else "float32"))
EXACT = DTYPE == torch.float32  # greedy tokens are compared exactly only in fp32 (bf16 near-ties may flip)
TOL = dict(atol=1e-5, rtol=1e-5) if EXACT else dict(atol=3e-2, rtol=3e-2)

SIZE, PATCH = 32, 4  # 8 x 8 = 64 feature tokens per image (+ [CLS] in the tower)
N = (SIZE // PATCH) ** 2
IMAGE, VIDEO, PAD = 99, 98, 0
FRAMES = 4  # video: 4 frames x (4 x 4 after 2x2 pooling) = 64 tokens


def vision_config(layers=3):
    return CLIPVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=layers, num_attention_heads=4, projection_dim=32)


def text_config():
    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)


def tiny_llava(seed=0, layers=3, strategy="default", feature_layer=-2):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision_config(layers), text_config=text_config(), image_token_id=IMAGE,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(cfg).to(DEVICE, DTYPE).eval()


def tiny_video(seed=0):
    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(vision_config=vision_config(), text_config=text_config(), image_token_id=VIDEO - 1,
                               video_token_id=VIDEO, vision_feature_layer=-2, spatial_pool_stride=2,
                               image_grid_pinpoints=[[SIZE, SIZE]])
    return LlavaNextVideoForConditionalGeneration(cfg).to(DEVICE, DTYPE).eval()


def pixels(n, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


def prompt(*parts, per_image=N):
    """Token ids: ints are text tokens, "img" an expanded image."""
    ids = []
    for p in parts:
        ids += [IMAGE] * per_image if p == "img" else [p]
    return torch.tensor([ids], device=DEVICE)


def processor():
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(90)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMAGE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")
    images = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((40, 48, 3)) * 255).astype("uint8") for _ in range(n)]


def to_device(batch):
    return {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in batch.items()}


@torch.no_grad()
def generate(model, steps=5, **inputs):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=PAD)
    return out.sequences[:, -steps:], torch.stack(out.scores, 1).float()


@torch.no_grad()
def logits(model, **inputs):
    return model(**inputs).logits.float()


def lm_input(model):
    """Record the language model's inputs_embeds ``[B, L, C]`` of every forward."""
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
    return seen


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, set(model.__dict__),
            {n: set(m.__dict__) for n, m in model.named_modules()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()})


def assert_same_snapshot(a, b):
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


# ------------------------------------------------------------------------------------------- off switch
@pytest.mark.parametrize("method,where", [("tome", "post_projector"), ("dominant", "pre_projector"), ("pitome", "vision_tower")])
def test_keep_all_generates_identically(method, where):
    model = tiny_llava()
    inputs = dict(input_ids=prompt(3, 4, "img", 5, 6), pixel_values=pixels(1))
    ref_tokens, ref_scores = generate(model, **inputs)
    llava.reduce_visual_tokens(model, keep=N, method=method, where=where)
    tokens, scores = generate(model, **inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    llava.reduce_visual_tokens(model, keep=1.0, method=method, where=where)  # fraction 1.0 is all tokens too
    assert torch.equal(generate(model, **inputs)[0], ref_tokens)


# -------------------------------------------------------------------------------------- counts and order
@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "prune", "random", "dominant"])
@pytest.mark.parametrize("where", ["pre_projector", "post_projector"])
def test_lm_sees_text_plus_keep_per_image(method, where):
    K = 12
    model = tiny_llava()
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=K, method=method, where=where)
    ids = prompt(3, "img", 4, 5, "img", 6, per_image=K)
    logits(model, input_ids=ids, pixel_values=pixels(2))
    embeds = seen[-1]
    text = ids != IMAGE
    assert embeds.shape[1] == int(text.sum()) + 2 * K
    # Text positions are the plain token embeddings; image positions are not.
    table = model.get_input_embeddings()
    torch.testing.assert_close(embeds[text], table(ids[text]))
    info = mmmerge.last_info(model)
    assert (info.tokens_in, info.tokens_out) == (N, K)
    assert info.size.shape == (2, K) and torch.all(info.size.sum(1) == N)
    # Output order: raster order of each token's representative (the member that survived).
    for b in range(2):
        assert has_increasing_representatives(info.source[b].cpu(), K)


def test_fraction_keep_and_vision_tower_counts():
    model = tiny_llava(layers=4)  # feature layer -2: layers 0..2 merge
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=0.5, where="vision_tower")
    ids = prompt(3, "img", 4, per_image=N // 2)
    logits(model, input_ids=ids, pixel_values=pixels(1))
    assert seen[-1].shape[1] == 2 + N // 2
    assert mmmerge.last_info(model).tokens_per_layer == [
        N + 1, N + 1 - 11, N + 1 - 22, N + 1 - 32, N + 1 - 32]


@pytest.mark.parametrize("method, prop_attn, expected", [("tome", None, True), ("prune", None, False),
                                                      ("prune", True, True), ("tome", False, False)])
def test_vision_tower_prop_attn_defaults_as_the_encoders(method, prop_attn, expected):
    """On by default, off for prune (nothing merged to weigh), as video.patch and audio.patch decide."""
    from mmmerge.adapters.encoder import patch_spec

    model = tiny_llava(layers=4)
    llava.reduce_visual_tokens(model, keep=0.5, method=method, where="vision_tower", prop_attn=prop_attn)
    tower = model.model.vision_tower
    assert patch_spec(getattr(tower, "vision_model", tower)).prop_attn is expected


def test_full_strategy_keeps_cls():
    model = tiny_llava(strategy="full")
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=10, method="dominant")
    logits(model, input_ids=prompt(3, "img", 4, per_image=10), pixel_values=pixels(1))
    assert seen[-1].shape[1] == 12
    info = mmmerge.last_info(model)
    assert info.tokens_in == N + 1 and info.size[0, 0] == 1 and torch.all(info.source[:, 0] == 0)


def test_dominant_uses_the_eager_cls_attention():
    """The hook-computed [CLS] attention picks the same tokens as the eager attention weights would."""
    model = tiny_llava()
    K, C = 12, 2
    llava.reduce_visual_tokens(model, keep=K, method="dominant", contextual=C)
    pv = pixels(2)
    logits(model, input_ids=prompt(3, "img", "img", per_image=K), pixel_values=pv)
    info = mmmerge.last_info(model)
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(pv, output_attentions=True).attentions[-2]  # layer producing hidden_states[-2]
    top = att[:, :, 0, 1:].float().mean(1).topk(K - C, dim=-1).indices.sort(-1).values
    alone = info.size == 1
    for b in range(2):
        singles = torch.nonzero(torch.isin(info.source[b], torch.nonzero(alone[b]).flatten())).flatten()
        missing = set(top[b].tolist()) - set(singles.tolist())
        assert len(missing) <= (0 if EXACT else 2)  # bf16: near-ties in the eager weights may swap
    assert torch.all((~alone).sum(1) <= C)


# ----------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method", ["tome", "dominant"])
def test_cached_generate_equals_recompute(method):
    K = 16
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K, method=method)
    inputs = dict(input_ids=prompt(3, "img", 4, 5, per_image=K), pixel_values=pixels(1))
    cached = generate(model, use_cache=True, **inputs)
    recomputed = generate(model, use_cache=False, **inputs)
    if EXACT:
        assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1][:, 0], recomputed[1][:, 0], **TOL)


def test_batch_of_left_padded_prompts_equals_each_alone():
    K = 16
    model, proc = tiny_llava(), processor()
    llava.reduce_visual_tokens(model, keep=K, method="tome", processor=proc)
    images = pictures(3)
    texts = ["w5 <image> w6 <image> w7", "w8 w9 w10 w11 <image> w12"]
    batch = to_device(proc(images=images, text=texts, return_tensors="pt", padding=True))
    assert torch.equal((batch["input_ids"] == IMAGE).sum(1).cpu(), torch.tensor([2 * K, K]))
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is left padded
    tokens, scores = generate(model, **batch)
    for row, (text, imgs) in enumerate([(texts[0], images[:2]), (texts[1], images[2:])]):
        alone = to_device(proc(images=imgs, text=[text], return_tensors="pt"))
        t, s = generate(model, **alone)
        if EXACT:
            assert torch.equal(tokens[row], t[0])
        torch.testing.assert_close(scores[row, 0], s[0, 0], atol=1e-4 if EXACT else 3e-2, rtol=1e-4)


def test_processor_and_compact_agree():
    K = 20
    model, proc = tiny_llava(), processor()
    images, texts = pictures(3), ["w5 <image> <image> w7", "w8 <image> w12 w13 w14"]
    full = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (full["input_ids"] == IMAGE).sum() == 3 * N
    llava.reduce_visual_tokens(model, keep=K, processor=proc)
    short = proc(images=images, text=texts, return_tensors="pt", padding=True)
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model)
    assert torch.equal(ids, short["input_ids"]) and torch.equal(mask, short["attention_mask"])
    llava.check_placeholder_counts(ids, model)
    torch.testing.assert_close(logits(model, **to_device({**short, "input_ids": ids, "attention_mask": mask})),
                               logits(model, **to_device(short)), atol=0, rtol=0)
    llava.restore_visual_tokens(model)
    assert proc(images=images, text=texts, return_tensors="pt", padding=True)["input_ids"].shape == full["input_ids"].shape


def test_per_image_counts_are_checked():
    K = 16
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K)
    # Right total (2 K) but split 10 + 22: transformers alone would accept it.
    ids = torch.tensor([[3] + [IMAGE] * 10 + [4] + [IMAGE] * 22 + [5]], device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of keep=16"):
        llava.check_placeholder_counts(ids, model)
    with pytest.raises(ValueError, match="not a multiple of keep=16"):  # at the call, on every device
        logits(model, input_ids=ids, pixel_values=pixels(2))
    with pytest.raises(ValueError, match="not a multiple of the 64"):
        llava.compact_image_tokens(ids, None, model)


@pytest.mark.parametrize("keep", [16, 32, 10, 63, 0.25, 0.5], ids=str)  # 16 and 32 divide the 64 tokens
def test_inputs_from_an_unpatched_processor_get_mmmerges_error_at_the_call(keep):
    # Reduced without processor=, called with inputs the unpatched processor expanded to 64 per image: for
    # every keep (also one that divides 64, whose runs look like whole numbers of reduced images) the call
    # raises mmmerge's ValueError, naming both fixes, and generate() does too.
    model, proc = tiny_llava(), processor()
    llava.reduce_visual_tokens(model, keep=keep)
    batch = to_device(proc(images=pictures(3), text=["w5 <image> <image> w7", "w8 <image> w9"], return_tensors="pt",
                           padding=True))
    assert (batch["input_ids"] == IMAGE).sum() == 3 * N
    for call in (lambda: logits(model, **batch), lambda: generate(model, steps=1, **batch)):
        with pytest.raises(ValueError, match=r"mmmerge\.llava: .*processor=.*compact_image_tokens"):
            call()
    ids, mask = llava.compact_image_tokens(batch["input_ids"], batch["attention_mask"], model)
    assert logits(model, **{**batch, "input_ids": ids, "attention_mask": mask}).shape[1] == ids.shape[1]


def test_anyres_and_video_inputs_from_an_unpatched_processor_get_mmmerges_error():
    from test_llava_next import WIDE, TALL, batch, next_processor, picture, tiny_next

    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25)
    inputs = batch(proc, [picture(WIDE), picture(TALL, 1)], ["w5 <image> <image>"])
    with pytest.raises(ValueError, match=r"mmmerge\.llava: .*processor=.*compact_image_tokens"):
        logits(model, **inputs)
    video = tiny_video()
    llava.reduce_visual_tokens(video, keep=16)
    with pytest.raises(ValueError, match=r"mmmerge\.llava: .*processor=.*compact_image_tokens"):
        logits(video, input_ids=video_prompt(N), pixel_values_videos=video_pixels())


# ---------------------------------------------------------------------------------------------- video
def video_prompt(keep, videos=2):
    return torch.tensor([[3, 4] + [VIDEO] * keep + [5]] * videos, device=DEVICE)


def video_pixels(videos=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(videos, FRAMES, 3, SIZE, SIZE, generator=g).to(DEVICE, DTYPE)


@pytest.mark.parametrize("method", ["tome", "dominant", "tps"])
def test_video_within_frame(method):
    K, n = 32, 16  # 8 of each frame's 16 tokens
    model = tiny_video()
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=K, method=method, time_mode="within_frame")
    logits(model, input_ids=video_prompt(K), pixel_values_videos=video_pixels())
    assert seen[-1].shape[1] == 3 + K
    info = mmmerge.last_info(model)
    frame_in = torch.arange(FRAMES * n, device=DEVICE) // n
    assert torch.equal(info.source // (K // FRAMES), frame_in.expand(2, -1))  # never across frames
    assert torch.all(info.size.view(2, FRAMES, -1).sum(-1) == n)


@pytest.mark.parametrize("time_mode", ["adjacent", "window(2)", "global"])
def test_video_across_frames(time_mode):
    K, n = 10, 16
    model = tiny_video()
    seen = lm_input(model)
    llava.reduce_visual_tokens(model, keep=K, method="tome", time_mode=time_mode)
    logits(model, input_ids=video_prompt(K), pixel_values_videos=video_pixels())
    assert seen[-1].shape[1] == 3 + K
    info = mmmerge.last_info(model)
    assert info.size.shape == (2, K) and torch.all(info.size.sum(1) == FRAMES * n)
    frame = (torch.arange(FRAMES * n, device=DEVICE) // n).expand(2, -1)
    for b in range(2):
        for j in range(K):
            frames = sorted(set(frame[b][info.source[b] == j].tolist()))
            if time_mode == "adjacent":
                assert frames == list(range(frames[0], frames[-1] + 1))  # one contiguous stretch
            if time_mode == "window(2)":
                assert len({f // 2 for f in frames}) == 1


def test_video_compact_and_restore():
    model = tiny_video()
    ids, pv = video_prompt(FRAMES * 16), video_pixels()
    ref = logits(model, input_ids=ids, pixel_values_videos=pv)
    llava.reduce_visual_tokens(model, keep=0.25, time_mode="within_frame")
    new, mask = llava.compact_image_tokens(ids, None, model, num_frames=FRAMES)
    assert new.shape == (2, 3 + 16) and bool(mask.all())
    assert logits(model, input_ids=new, pixel_values_videos=pv).shape[1] == 19
    with pytest.raises(ValueError, match="num_frames"):
        llava.compact_image_tokens(ids, None, model)
    llava.restore_visual_tokens(model)
    assert torch.equal(logits(model, input_ids=ids, pixel_values_videos=pv), ref)


# ----------------------------------------------------------------------------------- bad input, restore
def wrong_patch_processor():
    p = processor()
    p.patch_size = 8
    return p


BAD = [
    (dict(keep=N + 1), ValueError, "larger than the 64"),
    (dict(keep=0), ValueError, "keep >= 1"),
    (dict(keep=0.0), ValueError, "fraction"),
    (dict(keep=1.5), ValueError, "fraction"),
    (dict(keep="all"), TypeError, "keep must be"),
    (dict(method="merge"), ValueError, "unknown method"),
    (dict(where="llm"), ValueError, "unknown where"),
    (dict(stage="pre_projector"), TypeError, "stage= was merged into where="),
    (dict(where="pre_llm", stage="late"), TypeError, "where="),
    (dict(time_mode="adjacent"), ValueError, "video models"),
    (dict(keep=2, where="vision_tower"), ValueError, "cannot reach keep=2"),
    (dict(method="dominant", where="vision_tower"), ValueError, "post_projector"),
    (dict(processor="wrong"), ValueError, "patch_size 8"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_input_leaves_model_untouched(kwargs, error, message):
    model = tiny_llava()
    inputs = dict(input_ids=prompt(3, "img", 4), pixel_values=pixels(1))
    ref = logits(model, **inputs)
    before = snapshot(model)
    kwargs = {"keep": 16, **kwargs}
    if kwargs.get("processor") == "wrong":
        kwargs = dict(kwargs, processor=wrong_patch_processor())
    with pytest.raises(error, match=message):
        llava.reduce_visual_tokens(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, **inputs), ref)


def test_failed_repatch_keeps_the_previous_patch():
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=16)
    inputs = dict(input_ids=prompt(3, "img", 4, per_image=16), pixel_values=pixels(1))
    ref = logits(model, **inputs)
    with pytest.raises(ValueError):
        llava.reduce_visual_tokens(model, keep=1000)
    assert torch.equal(logits(model, **inputs), ref)


def test_unsupported_models_and_processors():
    with pytest.raises(TypeError, match="supports LlavaForConditionalGeneration"):
        llava.reduce_visual_tokens(LlamaForCausalLM(text_config()))
    with pytest.raises(TypeError, match="supports"):
        llava.reduce_visual_tokens(CLIPVisionModel(vision_config()))
    with pytest.raises(TypeError, match="needs a LlavaNextVideoProcessor"):
        llava.reduce_visual_tokens(tiny_video(), keep=16, processor=processor())
    with pytest.raises(TypeError, match="take keep= .* not r="):
        mmmerge.patch(tiny_llava(), r=8)
    with pytest.raises(ValueError, match="not patched"):
        llava.compact_image_tokens(prompt(3, "img"), None, tiny_llava())


@pytest.mark.parametrize("kwargs", [dict(method="tome"), dict(method="dominant", where="pre_projector"),
                                    dict(method="tome", where="vision_tower", keep=40)])
def test_restore_is_bit_identical(kwargs):
    model, proc = tiny_llava(), processor()
    inputs = dict(input_ids=prompt(3, "img", 4), pixel_values=pixels(1))
    ref, before = logits(model, **inputs), snapshot(model)
    ref_ids = proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt")["input_ids"]
    keep = kwargs.pop("keep", 16)
    llava.reduce_visual_tokens(model, keep=keep, processor=proc, **kwargs)
    llava.reduce_visual_tokens(model, keep=keep - 8, processor=proc, **kwargs)  # re-patching replaces, never stacks
    short = proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt")
    assert (short["input_ids"] == IMAGE).sum() == keep - 8
    assert logits(model, **to_device(short)).shape[1] == 2 + keep - 8
    llava.restore_visual_tokens(model)
    assert torch.equal(logits(model, **inputs), ref)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt")["input_ids"], ref_ids)
    llava.restore_visual_tokens(model)  # a no-op now


def test_mmmerge_patch_dispatch_and_unpatch():
    model = tiny_llava()
    inputs = dict(input_ids=prompt(3, "img", 4), pixel_values=pixels(1))
    ref = logits(model, **inputs)
    assert "LlavaForConditionalGeneration" in mmmerge.supported_models()
    mmmerge.patch(model, keep=16, method="pitome")
    logits(model, input_ids=prompt(3, "img", 4, per_image=16), pixel_values=pixels(1))
    assert mmmerge.last_info(model).tokens_out == 16
    mmmerge.unpatch(model)
    assert torch.equal(logits(model, **inputs), ref)


def test_reduce_visual_tokens_checks_its_own_options_like_every_entry_point():
    model = tiny_llava()
    with pytest.raises(ValueError, match="reduce_visual_tokens has no option 'methd'; did you mean 'method'"):
        llava.reduce_visual_tokens(model, keep=16, methd="tome")
    with pytest.raises(TypeError, match="prop_attn must be True, False or None"):
        llava.reduce_visual_tokens(model, keep=16, where="vision_tower", prop_attn="no")
    assert model.__dict__.get("_mmmerge_undo") is None  # refused before any change


def test_a_half_precision_model_scores_and_matches_on_float32_keys():
    """The keys that choose the tokens are computed in float32 (by the heads' mean key weight: the mean of the
    heads' keys), so a bf16 run ranks tokens as a float32 run of the same activations does (issue 20: bf16 and
    compiled runs choose the plans fp32 eager does)."""
    model = tiny_llava().to(torch.bfloat16)
    lm = model.model
    layout = llava.kinds.tower_layout(lm)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        hidden = lm.vision_tower(pixels, output_hidden_states=True).hidden_states
        keys, _ = llava.reduction.keys_and_scores(lm, layout, hidden, False)
        parts = llava.reduction.layer_parts(llava.kinds.tower_layers(lm)[layout.key_layer])
        x = parts.norm1(hidden[layout.key_layer]).float()
        attn = parts.attention
        exact = torch.nn.functional.linear(x, attn.k_proj.weight.float(), attn.k_proj.bias.float())
    assert keys.dtype == torch.float32
    torch.testing.assert_close(keys, exact.view(*exact.shape[:2], parts.num_heads, -1).mean(2))


def test_the_cls_score_is_the_eager_cls_attention_without_projecting_the_keys():
    """The [CLS] score folds the [CLS] query into the key weight (no second key projection) and equals the
    head-averaged [CLS] row of the eager attention weights of the feature layer."""
    model = tiny_llava().float()
    lm = model.model
    layout = llava.kinds.tower_layout(lm)
    pv = pixels(2).float()
    with torch.no_grad():
        hidden = lm.vision_tower(pv, output_hidden_states=True).hidden_states
        keys, score = llava.reduction.keys_and_scores(lm, layout, hidden, True)
        eager = copy.deepcopy(lm.vision_tower)
        eager.set_attn_implementation("eager")
        attention = eager(pv, output_attentions=True).attentions[layout.key_layer]  # [B, heads, T, T]
    assert score.dtype == torch.float32 and keys.shape[:2] == score.shape
    torch.testing.assert_close(score, attention[:, :, 0].float().mean(1), atol=1e-6, rtol=1e-4)
