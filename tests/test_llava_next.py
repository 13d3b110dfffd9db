"""LLaVA-NeXT (anyres) on a tiny random model and a processor built offline (no network).

Tiles are 32 x 32 px with 4 px patches: 64 feature tokens per tile; pinpoints up to 64 x 64 px, so an image has a
base view and up to 4 crops, unpadded to its aspect ratio, with a newline token after every crop row. Images of
different sizes get different counts. Set MMMERGE_TEST_DEVICE=cuda to run on a GPU (bf16).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                          LlavaNextProcessor, PreTrainedTokenizerFast)

import mmmerge
from mmmerge.adapters import llava
from test_llava import (DEVICE, DTYPE, EXACT, IMAGE, PAD, PATCH, SIZE, TOL, VIDEO, assert_same_snapshot, logits,
                        snapshot, text_config, vision_config)
from test_llava_audit import traced

PINPOINTS = [[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]]
BASE = (SIZE // PATCH) ** 2  # 64 tokens in the base view (and in every crop before unpadding)
WIDE, TALL, SQUARE = (40, 70), (50, 44), (64, 64)  # image sizes (height, width) with three different layouts


def tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(90)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"], vocab["<video>"] = IMAGE, VIDEO
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


def tiny_next(seed=0):
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=vision_config(), text_config=text_config(), image_token_id=IMAGE,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)
    return LlavaNextForConditionalGeneration(cfg).to(DEVICE, DTYPE).eval()


def next_processor():
    images = LlavaNextImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                     image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def picture(size, seed=0):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")


def batch(proc, images, texts):
    out = proc(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE) for k, v in out.items()}


@torch.no_grad()
def generate(model, steps=5, **inputs):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=PAD)
    return out.sequences[:, -steps:], torch.stack(out.scores, 1).float()


def lm_lengths(model):
    """Length of the language model's input of every forward."""
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen


@torch.no_grad()
def packed_images(model, inputs):
    """The model's own packed tokens per image (``[L_i, C]``) for these inputs."""
    keys = ("pixel_values", "image_sizes", "batch_num_images")
    return model.model.get_image_features(**{k: inputs[k] for k in keys if k in inputs}).pooler_output


def newline_count(model, tokens):
    """Rows of ``tokens`` ``[L, C]`` that are the model's newline embedding."""
    return int((tokens == model.model.image_newline.to(tokens.dtype)).all(-1).sum())


def expected_count(keep, length, newlines):
    """The documented rule, from the unpatched model's own output: features keep ceil(keep * F), newlines stay."""
    features = length - newlines
    kept = math.ceil(keep * features) if isinstance(keep, float) else min(keep, features)
    return max(kept, 2) + newlines


# ------------------------------------------------------------------------------------------- off switch
def test_keep_all_generates_identically():
    model, proc = tiny_next(), next_processor()
    inputs = batch(proc, [picture(WIDE), picture(TALL, 1)], ["w5 <image> w6", "w7 w8 w9 <image> w4"])
    ref = generate(model, **inputs)
    for keep in (1.0, 10 ** 6):
        llava.reduce_visual_tokens(model, keep=keep, method="tome", processor=proc)
        again = batch(proc, [picture(WIDE), picture(TALL, 1)], ["w5 <image> w6", "w7 w8 w9 <image> w4"])
        assert torch.equal(again["input_ids"], inputs["input_ids"])
        tokens, scores = generate(model, **again)
        assert torch.equal(tokens, ref[0])
        torch.testing.assert_close(scores, ref[1], atol=0, rtol=0)


# -------------------------------------------------------------------------------------- counts and rows
@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "prune", "random", "dominant"])
def test_quarter_keep_shrinks_every_image_and_the_prefill(method):
    model, proc = tiny_next(), next_processor()
    images, texts = [picture(WIDE), picture(TALL, 1), picture(SQUARE, 2)], ["w5 <image> w6 <image>", "w7 <image> w8"]
    full = batch(proc, images, texts)
    packed = packed_images(model, full)
    lengths = [p.shape[0] for p in packed]
    newlines = [newline_count(model, p) for p in packed]
    assert len(set(lengths)) == 3 and all(n > 0 for n in newlines)  # three layouts, each with newline rows
    seen = lm_lengths(model)
    logits(model, **full)
    llava.reduce_visual_tokens(model, keep=0.25, method=method, processor=proc)
    short = batch(proc, images, texts)
    expected = [expected_count(0.25, length, nl) for length, nl in zip(lengths, newlines)]
    assert (short["input_ids"] == IMAGE).sum(1).tolist() == [expected[0] + expected[1], expected[2]]
    logits(model, **short)
    saved = [lengths[0] + lengths[1] - expected[0] - expected[1], lengths[2] - expected[2]]
    assert (full["attention_mask"].sum(1) - short["attention_mask"].sum(1)).tolist() == saved
    assert seen[0] == int(full["attention_mask"].sum(1).max())
    assert seen[-1] == int(short["attention_mask"].sum(1).max()) < seen[0]  # the LM prefill is shorter
    reduced = packed_images(model, short)
    assert [r.shape[0] for r in reduced] == expected
    assert [newline_count(model, r) for r in reduced] == newlines  # every newline token is kept...
    newline = model.model.image_newline.to(DTYPE)
    assert all(torch.equal(r[-1], newline) for r in reduced)  # ...and each image still ends with its last row's one
    info = mmmerge.last_info(model)
    assert info.items == list(zip(lengths, expected))
    assert info.size.shape == (1, sum(expected)) and int(info.size.sum()) == sum(lengths)
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                           image_sizes=full["image_sizes"])
    assert torch.equal(ids, short["input_ids"]) and torch.equal(mask, short["attention_mask"])
    llava.check_placeholder_counts(ids, model, image_sizes=full["image_sizes"])


def test_rows_stay_in_order_and_parts_never_mix():
    """Output tokens sit at their earliest original position: base first, then every crop row before its
    newline; a base token never merges with a crop token; the base view keeps its proportional share."""
    model, proc = tiny_next(), next_processor()
    inputs = batch(proc, [picture(WIDE)], ["w5 <image>"])
    newlines = newline_count(model, packed_images(model, inputs)[0])
    llava.reduce_visual_tokens(model, keep=0.3, method="tome")
    packed_images(model, inputs)
    info = mmmerge.last_info(model)
    source = info.source[0]
    (length, out), = info.items
    positions = torch.arange(length, device=DEVICE)
    first = torch.full((out,), length, device=DEVICE).scatter_reduce(0, source, positions, reduce="amin")
    assert torch.all(first[1:] > first[:-1])
    is_base = positions < BASE
    assert not bool(torch.isin(source[is_base], source[~is_base]).any())
    features = length - newlines
    kept = math.ceil(0.3 * features)
    assert out == kept + newlines
    assert int(torch.unique(source[is_base]).numel()) == math.ceil(kept * BASE / features)


def test_int_keep_is_a_per_image_budget_spread_over_base_and_crops():
    model, proc = tiny_next(), next_processor()
    K = 40
    llava.reduce_visual_tokens(model, keep=K, method="tps", processor=proc)
    images = [picture(WIDE), picture(TALL, 1)]
    short = batch(proc, images, ["w5 <image> <image>"])
    packed_images(model, short)
    info = mmmerge.last_info(model)
    offset = 0
    for length, out in info.items:
        source = info.source[0, offset:offset + length]
        newlines = out - K
        features = length - newlines
        k_base = math.ceil(K * BASE / features)
        assert int(torch.unique(source[:BASE]).numel()) == k_base  # proportional share of the base view
        assert int(torch.unique(source).numel()) == out
        offset += length


# ----------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method", ["tome", "dominant", "tps"])
def test_left_padded_batch_of_two_sizes_equals_each_alone(method):
    steps = 6
    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method=method, processor=proc)
    images = [picture(WIDE, 3), picture(TALL, 4)]
    texts = ["w5 <image> w6", " ".join(f"w{i}" for i in range(20, 50)) + " <image> w7"]
    inputs = batch(proc, images, texts)
    assert inputs["attention_mask"][0, 0] == 0  # the first prompt is left padded
    counts = (inputs["input_ids"] == IMAGE).sum(1)
    assert counts[0] != counts[1]  # two sizes, two counts
    tokens, scores = generate(model, steps=steps, **inputs)
    for row in range(2):
        alone = batch(proc, [images[row]], [texts[row]])
        t, s = generate(model, steps=steps, **alone)
        if EXACT:
            assert torch.equal(tokens[row], t[0])
        torch.testing.assert_close(scores[row, 0], s[0, 0], atol=1e-4 if EXACT else 3e-2, rtol=1e-4)


def test_several_images_per_prompt_and_cached_generate_equals_recompute():
    steps = 5
    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="tome", processor=proc)
    inputs = batch(proc, [picture(WIDE), picture(SQUARE, 1)], ["w3 <image> w4 <image> w5"])
    tokens, scores = generate(model, steps=steps, use_cache=True, **inputs)
    seq, mask, loop_scores = inputs["input_ids"], inputs["attention_mask"], []
    for _ in range(steps):
        step = logits(model, **{**inputs, "input_ids": seq, "attention_mask": mask}, use_cache=False)[:, -1]
        loop_scores.append(step)
        seq = torch.cat([seq, step.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    if EXACT:
        assert torch.equal(tokens, seq[:, -steps:])
    torch.testing.assert_close(scores[:, 0], loop_scores[0], **TOL)


# ------------------------------------------------------------------------------------- forward hygiene
def test_no_host_sync_and_one_call_for_any_number_of_same_size_images():
    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="tome")
    one = batch(proc, [picture(WIDE)], ["w1 <image>"])
    three = batch(proc, [picture(WIDE, s) for s in range(3)], ["w1 <image> <image> <image>"])
    get, unpatched = model.model.get_image_features, type(model.model).get_image_features
    for inputs in (one, three):  # warm the host-side layout cache
        get(inputs["pixel_values"], inputs["image_sizes"])
    extra = []
    for inputs in (one, three):
        sizes = inputs["image_sizes"]
        ops = traced(get, inputs["pixel_values"], sizes)
        # The unpatched model reads every image's size on the host (tolist) several times; the patched one once.
        assert set(ops.syncs) <= {"tolist"}
        assert len(ops.syncs) <= len(traced(unpatched, model.model, inputs["pixel_values"], sizes).syncs)
        extra.append(ops.calls - traced(unpatched, model.model, inputs["pixel_values"], sizes.tolist()).calls)
    assert extra[0] == extra[1]  # the reduction makes as many torch calls for 3 images as for 1


# ------------------------------------------------------------------------------------ restore, bad input
def test_restore_is_bit_identical():
    model, proc = tiny_next(), next_processor()
    inputs = batch(proc, [picture(WIDE)], ["w5 <image> w6"])
    ref, before = logits(model, **inputs), snapshot(model)
    proc_attrs = set(proc.__dict__)
    llava.reduce_visual_tokens(model, keep=0.5, method="pitome", processor=proc)
    llava.reduce_visual_tokens(model, keep=0.25, method="dominant", processor=proc)  # replaces, never stacks
    short = batch(proc, [picture(WIDE)], ["w5 <image> w6"])
    assert short["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    logits(model, **short)
    llava.restore_visual_tokens(model, proc)
    assert torch.equal(logits(model, **inputs), ref)
    assert_same_snapshot(before, snapshot(model))
    assert set(proc.__dict__) == proc_attrs
    assert torch.equal(batch(proc, [picture(WIDE)], ["w5 <image> w6"])["input_ids"], inputs["input_ids"])


def other_pinpoints():
    p = next_processor()
    p.image_processor.image_grid_pinpoints = [[SIZE, SIZE]]
    return p


BAD = [
    (dict(marign=0.5, method="pitome"), ValueError, "takes no option 'marign'"),
    (dict(contextual=0, method="dominant"), ValueError, "contextual must be a positive int"),
    (dict(temperature=0.0, method="tps"), ValueError, "temperature must be > 0"),
    (dict(preset="offical", method="pitome"), ValueError, "unknown pitome preset"),
    (dict(generator="seed", method="random"), TypeError, "generator must be a torch.Generator"),
    (dict(contextual=4, method="tome"), ValueError, "takes no option 'contextual'"),
    (dict(r=8), TypeError, "take keep= .* not r="),
    (dict(stage="pre_projector"), TypeError, "stage= was merged into where="),
    (dict(where="pre_projector"), ValueError, "where='post_projector'"),
    (dict(where="vision_tower"), ValueError, "where='post_projector'"),
    (dict(keep=0), ValueError, "keep >= 1"),
    (dict(keep=1.5), ValueError, "fraction"),
    (dict(keep="all"), TypeError, "keep must be"),
    (dict(time_mode="adjacent"), ValueError, "video models"),
    (dict(score=torch.ones(1), method="tps"), ValueError, "score is computed by the adapter"),
    (dict(processor="pinpoints"), ValueError, "image_grid_pinpoints"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(sorted(b[0]))[:40] for b in BAD])
def test_bad_options_are_rejected_at_patch_time_untouched(kwargs, error, message):
    model = tiny_next()
    proc = next_processor()
    inputs = batch(proc, [picture(WIDE)], ["w5 <image> w6"])
    ref, before = logits(model, **inputs), snapshot(model)
    kwargs = {"keep": 0.25, **kwargs}
    if kwargs.get("processor") == "pinpoints":
        kwargs["processor"] = other_pinpoints()
    with pytest.raises(error, match=message):
        llava.reduce_visual_tokens(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, **inputs), ref)


def test_mmmerge_patch_dispatch_and_compact_needs_sizes():
    model, proc = tiny_next(), next_processor()
    assert "LlavaNextForConditionalGeneration" in mmmerge.supported_models()
    full = batch(proc, [picture(WIDE)], ["w5 <image> w6"])
    mmmerge.patch(model, keep=0.25, method="tps")
    with pytest.raises(ValueError, match="pass image_sizes="):
        llava.compact_image_tokens(full["input_ids"], None, model)
    ids, mask = llava.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                           image_sizes=full["image_sizes"])
    with pytest.raises(ValueError, match="unreduced"):  # already compacted
        llava.compact_image_tokens(ids, mask, model, image_sizes=full["image_sizes"])
    assert logits(model, **{**full, "input_ids": ids, "attention_mask": mask}).shape[1] == ids.shape[1]
    mmmerge.unpatch(model)
    assert copy.deepcopy(model) is not None


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch.cuda.set_sync_debug_mode needs a CUDA device")
@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "dominant"])
def test_reductions_run_under_sync_debug_mode_error(method):
    """The reductions themselves (anyres rows and uniform images) never synchronise with the host. (The models'
    own forwards do: LLaVA-NeXT reads image sizes on the host and builds feature_lens there.)"""
    from test_llava import tiny_llava

    model, proc = tiny_next(), next_processor()
    inputs = batch(proc, [picture(WIDE), picture(TALL, 1)], ["w5 <image> <image>"])
    llava.reduce_visual_tokens(model, keep=0.25, method=method)
    ctx, lm = model.model._mmmerge_llava, model.model
    images = [ctx.image_layout(lm, s, True, None) for s in inputs["image_sizes"].tolist()]
    plan = llava.anyres.ragged_plan(ctx, images, DEVICE)
    L = sum(i.length for i in images)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(L, 32, generator=g).to(DEVICE, DTYPE)
    metric = torch.randn(L, 8, generator=g).to(DEVICE, DTYPE)
    score = torch.rand(L, generator=g).to(DEVICE)
    small = tiny_llava()
    llava.reduce_visual_tokens(small, keep=16, method=method)
    images = torch.randn(3, 64, 32, generator=g).to(DEVICE, DTYPE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = llava.reduction.reduce_ragged(ctx, x, metric, score, plan)
        z, _ = llava.reduction.reduce_rows(small.model._mmmerge_llava, images, images[..., :8], score[:192].view(3, 64), 16, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape[0] == sum(plan.lengths_out) and z.shape == (3, 16, 32)
