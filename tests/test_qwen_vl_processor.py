"""Qwen-VL adapter with the model's processor, built offline (a word-level tokenizer and small image / video
processors): the patched processor emits the reduced placeholder counts; restore gives it back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmmerge.adapters import qwen_vl

from test_qwen_vl import IMG, KINDS, VE, VID, VS, generate, lm_inputs, tiny


def tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(86)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<|image_pad|>": IMG, "<|video_pad|>": VID, "<|vision_start|>": VS, "<|vision_end|>": VE})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>",
                                                         "vision_end_token": "<|vision_end|>"})


def processor(kind, merge_size=2):
    sizes = dict(patch_size=4, merge_size=merge_size, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    tf = transformers
    images = tf.Qwen2VLImageProcessor(**sizes)
    if kind == "qwen3_vl":
        videos = tf.Qwen3VLVideoProcessor(**{k: v for k, v in sizes.items() if "pixels" not in k},
                                          size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64 * 4})
        return tf.Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer(), video_processor=videos)
    videos = tf.Qwen2VLVideoProcessor(**sizes)
    cls = tf.Qwen2VLProcessor if kind == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer(), video_processor=videos)


def media(seed=0):
    rng = np.random.default_rng(seed)
    images = [(rng.random(shape) * 255).astype("uint8") for shape in ((24, 40, 3), (32, 16, 3), (16, 16, 3))]
    video = (rng.random((4, 16, 24, 3)) * 255).astype("uint8")
    return images, video


TEXTS = ["w5 <|vision_start|> <|image_pad|> <|vision_end|> w6 <|vision_start|> <|video_pad|> <|vision_end|> w7",
         "w8 <|vision_start|> <|image_pad|> <|vision_end|> w9 <|vision_start|> <|image_pad|> <|vision_end|>"]


def run(proc):
    images, video = media()
    kwargs = dict(do_sample_frames=False) if isinstance(proc, transformers.Qwen3VLProcessor) else {}
    out = proc(text=TEXTS, images=images, videos=[video], return_tensors="pt", padding=True, **kwargs)
    return {k: v for k, v in out.items() if k != "token_type_ids"}


@pytest.mark.parametrize("kind", KINDS)
def test_patched_processor_emits_reduced_counts_as_compact_would(kind):
    model = tiny(kind)
    proc = processor(kind)
    full = run(proc)
    with torch.no_grad():
        ref = model(**full).logits
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome", processor=proc)
    short = run(proc)
    ids, mask, types = qwen_vl.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                                    image_grid_thw=full["image_grid_thw"],
                                                    video_grid_thw=full["video_grid_thw"],
                                                    mm_token_type_ids=full["mm_token_type_ids"])
    assert torch.equal(short["input_ids"], ids) and torch.equal(short["attention_mask"], mask)
    assert torch.equal(short["mm_token_type_ids"], types)
    assert torch.equal(short["pixel_values"], full["pixel_values"])
    assert short["input_ids"].shape[1] < full["input_ids"].shape[1]
    out, _ = lm_inputs(model, **short)
    assert torch.isfinite(out.logits).all()
    tokens, _ = generate(model, steps=2, **short)
    assert tokens.shape == (2, 2)
    qwen_vl.restore_visual_tokens(model)
    assert "replace_image_token" not in vars(proc) and "replace_video_token" not in vars(proc)
    again = run(proc)
    assert torch.equal(again["input_ids"], full["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, ref)


def test_processor_that_does_not_match_the_model_is_refused():
    model = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="merge_size 3 vs the tower's 2"):
        qwen_vl.reduce_visual_tokens(model, keep=0.5, processor=processor("qwen2_vl", merge_size=3))
    with pytest.raises(TypeError, match="needs a Qwen2VLProcessor"):
        qwen_vl.reduce_visual_tokens(model, keep=0.5, processor=processor("qwen3_vl"))
    assert "_mmmerge_qwen" not in vars(model.model)
