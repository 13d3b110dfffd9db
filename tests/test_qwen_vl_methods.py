"""Qwen-VL adapter: every engine method, cdpruner's prompt query, video time modes and per-frame budgets, and
errors for bad input (tiny random models from configs, no network)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mmmerge.adapters import qwen_vl

from test_qwen_vl import (KINDS, MERGE, MIXED, VIDEO_GRIDS, VID, LMInputs, batch, compact, generate, lm_inputs,
                          tiny)

METHODS = ("tome", "pitome", "tps", "prune", "random", "dominant", "divprune", "cdpruner")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reduces_images_and_a_video_in_forward_and_generate(kind, method):
    model = tiny(kind)
    full = batch(kind, MIXED)
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method=method)
    red = compact(model, full)
    out, (embeds, positions) = lm_inputs(model, **red)
    assert embeds.shape[1] == red["input_ids"].shape[1] < full["input_ids"].shape[1]
    assert torch.isfinite(out.logits).all()
    tokens, scores = generate(model, steps=2, **red)
    assert tokens.shape == (2, 2) and torch.isfinite(scores).all()


def _visual(embeds, inputs):
    return embeds[inputs["mm_token_type_ids"] > 0]


@pytest.mark.parametrize("kind", KINDS)
def test_cdpruner_query_is_each_items_prompt_in_forward_and_generate(kind):
    """Two prompts that differ only in their words keep different image tokens; generate keeps the same ones
    as forward for the same prompt (its vision step gets the prompt too)."""
    model = tiny(kind)
    rows_a = [[5, 6, 7, ("img", 0), 8]]
    rows_b = [[50, 61, 72, ("img", 0), 83]]
    grids = [[1, 8, 8]]  # 16 tokens, keep 4
    qwen_vl.reduce_visual_tokens(model, keep=4, method="cdpruner", drop_unselected=True)
    a = compact(model, batch(kind, rows_a, image_grids=grids))
    b = compact(model, batch(kind, rows_b, image_grids=grids))
    va = _visual(lm_inputs(model, **a)[1][0], a)
    vb = _visual(lm_inputs(model, **b)[1][0], b)
    assert va.shape == vb.shape == (4, 32)
    assert not torch.equal(va, vb)
    rec = LMInputs(model)
    generate(model, steps=1, **a)
    rec.close()
    assert torch.equal(_visual(rec.calls[0][0], a), va)


# ------------------------------------------------------------------------------------------------ time modes
N_FRAME = (VIDEO_GRIDS[0][1] // MERGE) * (VIDEO_GRIDS[0][2] // MERGE)  # tokens per temporal patch
T = VIDEO_GRIDS[0][0]


def _video_cells(model, inputs):
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return out, out.mmmerge_kept


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [0.5, 8])
def test_within_frame_keeps_the_budget_of_every_temporal_patch(kind, keep):
    model = tiny(kind)
    full = batch(kind, [[5, ("vid", 0), 6]])
    qwen_vl.reduce_visual_tokens(model, keep=keep, method="tome", time_mode="within_frame")
    out, cells = _video_cells(model, full)
    per_frame = 2  # 0.5 of 4 tokens, or 8 tokens over 4 temporal patches
    assert out.pooler_output[0].shape[0] == T * per_frame
    assert torch.bincount(cells // N_FRAME, minlength=T).tolist() == [per_frame] * T
    red = compact(model, full)
    assert int((red["input_ids"] == VID).sum()) == T * per_frame
    assert torch.isfinite(lm_inputs(model, **red)[0].logits).all()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("mode", ["global", "adjacent", "window(2)"])
@pytest.mark.parametrize("method", ["tome", "tps", "divprune"])
def test_time_modes_across_temporal_patches(kind, mode, method):
    model = tiny(kind)
    full = batch(kind, [[5, ("vid", 0), 6]])
    qwen_vl.reduce_visual_tokens(model, keep=6, method=method, time_mode=mode)
    out, cells = _video_cells(model, full)
    assert out.pooler_output[0].shape[0] == 6 and cells.shape == (6,)
    assert torch.equal(cells, cells.sort().values)  # raster order: time, row, col
    red = compact(model, full)
    assert torch.isfinite(lm_inputs(model, **red)[0].logits).all()


def test_qwen3_takes_within_frame_only_and_says_why():
    model = tiny("qwen3_vl")
    with pytest.raises(ValueError, match="timestamp before every temporal patch"):
        qwen_vl.reduce_visual_tokens(model, keep=0.5, time_mode="adjacent")
    with pytest.raises(ValueError, match="unknown time_mode"):
        qwen_vl.reduce_visual_tokens(model, keep=0.5, time_mode="adjacnet")
    assert _untouched(model)


# ------------------------------------------------------------------------------------------------ bad input
def _untouched(model):
    return not any(k.startswith("_mmmerge") for k in vars(model)) and not any(
        k.startswith("_mmmerge") or k in ("forward", "get_rope_index", "get_image_features")
        for k in vars(model.model))


@pytest.mark.parametrize("options, error, message", [
    (dict(keep=0), ValueError, "at least one visual token"),
    (dict(keep=1.5), ValueError, r"must lie in \(0, 1\]"),
    (dict(keep="half"), TypeError, "keep must be an int"),
    (dict(method="tomee"), ValueError, "unknown method 'tomee'"),
    (dict(method="tps", temperatur=0.5), ValueError, "temperatur"),
    (dict(method="tps", temperature=0.0), ValueError, "temperature"),
    (dict(time_mode="window(0)"), ValueError, "positive integer"),
    (dict(r=4), TypeError, "keep="),
    (dict(method="tps", score=torch.ones(1)), ValueError, "score= is made by the adapter"),
    (dict(where="vision_tower"), ValueError, "post_projector"),
    (dict(prop_attn=True), ValueError, "leave prop_attn=None"),
])
def test_bad_options_fail_at_patch_time_and_leave_the_model_as_it_was(options, error, message):
    model = tiny("qwen2_vl")
    with pytest.raises(error, match=message):
        qwen_vl.reduce_visual_tokens(model, **options)
    assert _untouched(model)


def test_a_failed_re_patch_keeps_the_working_patch():
    model = tiny("qwen2_5_vl")
    qwen_vl.reduce_visual_tokens(model, keep=0.5)
    ctx = model.model._mmmerge_qwen
    with pytest.raises(ValueError):
        qwen_vl.reduce_visual_tokens(model, keep=2.0)
    assert model.model._mmmerge_qwen is ctx


def test_unsupported_model_is_named():
    with pytest.raises(TypeError, match="supports Qwen2VLForConditionalGeneration"):
        qwen_vl.reduce_visual_tokens(nn.Linear(2, 2), keep=0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_unreduced_inputs_to_a_reduced_model_name_the_fix(kind):
    model = tiny(kind)
    full = batch(kind, MIXED)
    qwen_vl.reduce_visual_tokens(model, keep=0.5)
    with pytest.raises(ValueError, match="compact_image_tokens"):
        model(**full)
    red = compact(model, full)
    with pytest.raises(ValueError, match="already compacted inputs need no rewrite"):
        compact(model, red)
    with pytest.raises(ValueError, match="grids of this batch"):
        qwen_vl.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                     image_grid_thw=full["image_grid_thw"][:1], video_grid_thw=full["video_grid_thw"])


def test_compact_without_a_patch_names_the_fix():
    model = tiny("qwen2_vl")
    full = batch("qwen2_vl", MIXED)
    with pytest.raises(ValueError, match="reduce_visual_tokens"):
        qwen_vl.compact_image_tokens(full["input_ids"], full["attention_mask"], model,
                                     image_grid_thw=full["image_grid_thw"])
