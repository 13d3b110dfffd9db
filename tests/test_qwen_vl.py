"""Qwen-VL adapter on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built from configs (no network):
exactness of keep=1.0 and restore, fewer LM tokens, and the M-RoPE positions every kept token keeps."""
from __future__ import annotations

import pytest
import torch
import transformers

from mmmerge.adapters import qwen_vl

IMG, VID, VS, VE, PAD = 90, 91, 92, 93, 0
STAMP = 40  # Qwen3-VL video: a timestamp token (STAMP + frame) before every temporal patch
PATCH, MERGE, TPATCH = 4, 2, 2
CHANNELS = 3 * TPATCH * PATCH * PATCH
IMAGE_GRIDS = [[1, 4, 6], [1, 8, 4], [1, 4, 4]]  # 6, 8 and 4 LM tokens
VIDEO_GRIDS = [[4, 4, 4]]  # 4 temporal patches x 4 LM tokens
KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _text(**extra):
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1]}
    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
               rope_scaling=rope)
    cfg.update(extra)
    return cfg


def tiny(kind="qwen2_vl", seed=0, device="cpu", inner_only=False):
    """A tiny random Qwen-VL model (2 tower blocks, 2 LM layers, hidden 32) on ``device``."""
    tf = transformers
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    common = dict(depth=2, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TPATCH,
                  in_channels=3)
    if kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=_text(), vision_config=dict(embed_dim=32, hidden_size=32, mlp_ratio=2,
                                                                         **common), **ids)
        cls = tf.Qwen2VLModel if inner_only else tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=_text(), vision_config=dict(
            hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=16, fullatt_block_indexes=[1],
            **common), **ids)
        cls = tf.Qwen2_5_VLModel if inner_only else tf.Qwen2_5_VLForConditionalGeneration
    else:
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}
        cfg = tf.Qwen3VLConfig(text_config=_text(rope_scaling=rope, head_dim=8), vision_config=dict(
            hidden_size=32, out_hidden_size=32, intermediate_size=64, num_position_embeddings=64,
            deepstack_visual_indexes=[0], **common), **ids)
        cls = tf.Qwen3VLModel if inner_only else tf.Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg).eval()


def pixels(grids, seed=1):
    patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(patches, CHANNELS, generator=torch.Generator().manual_seed(seed))


def _tokens(kind, part, image_grids, video_grids, counts):
    """Placeholder ids of one item: ("img", i) or ("vid", j), with ``counts`` per run (None: unreduced)."""
    what, i = part
    t, h, w = (image_grids if what == "img" else video_grids)[i]
    n = (h // MERGE) * (w // MERGE)
    if what == "img":
        return [VS] + [IMG] * (counts(part) if counts else t * n) + [VE]
    if kind == "qwen3_vl":
        per = counts(part) if counts else n
        return [v for f in range(t) for v in [STAMP + f, VS] + [VID] * per + [VE]]
    return [VS] + [VID] * (counts(part) if counts else t * n) + [VE]


def batch(kind, rows, image_grids=IMAGE_GRIDS, video_grids=VIDEO_GRIDS, counts=None, seed=1):
    """Left-padded inputs: ``rows`` are lists of text ids and ("img", i) / ("vid", j) items (in grid order)."""
    seqs = [[v for p in row for v in (_tokens(kind, p, image_grids, video_grids, counts) if isinstance(p, tuple)
                                      else [p])] for row in rows]
    L = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    out = dict(input_ids=ids, attention_mask=mask,
               mm_token_type_ids=(ids == IMG).long() + 2 * (ids == VID).long())
    used = {p[0] for row in rows for p in row if isinstance(p, tuple)}
    if "img" in used:
        out.update(pixel_values=pixels(image_grids, seed), image_grid_thw=torch.tensor(image_grids))
    if "vid" in used:
        out.update(pixel_values_videos=pixels(video_grids, seed + 1), video_grid_thw=torch.tensor(video_grids))
    return out


MIXED = [[5, 6, ("img", 0), 7, ("vid", 0), 8, 9], [10, ("img", 1), 11, ("img", 2), 12]]


def compact(model, inputs):
    """The reduced inputs of ``inputs`` (made for the unreduced model) via ``compact_image_tokens``."""
    ids, mask, types = qwen_vl.compact_image_tokens(
        inputs["input_ids"], inputs["attention_mask"], model, image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), mm_token_type_ids=inputs["mm_token_type_ids"])
    return {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}


class LMInputs:
    """Records what the language model receives: ``inputs_embeds`` and the M-RoPE rows of ``position_ids``."""

    def __init__(self, model):
        self.calls = []
        lm = model.model.language_model if hasattr(model, "lm_head") else model.language_model
        self.handle = lm.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        pos = kwargs["position_ids"]
        self.calls.append((kwargs["inputs_embeds"].detach().clone(), pos[-3:].clone()))

    def close(self):
        self.handle.remove()


def lm_inputs(model, **inputs):
    rec = LMInputs(model)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        rec.close()
    return out, rec.calls[0]


@torch.no_grad()
def generate(model, steps=4, **inputs):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=PAD)
    return out.sequences[:, -steps:], torch.stack(out.scores, 1)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_exact_and_restore_is_bit_identical(kind):
    model = tiny(kind)
    inputs = batch(kind, MIXED)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens, ref_scores = generate(model, **inputs)
    before = snapshot(model)
    qwen_vl.reduce_visual_tokens(model, keep=1.0, method="tome")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    tokens, scores = generate(model, **inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome")
    with torch.no_grad():
        assert model(**compact(model, inputs)).logits.shape[1] < ref.shape[1]
    qwen_vl.restore_visual_tokens(model)
    assert not any(k.startswith("_mmmerge") for k in vars(model)) and not any(
        k.startswith("_mmmerge") or k in ("forward", "get_rope_index") for k in vars(model.model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ positions
def _full_columns(kind, inputs_full, inputs_red):
    """Per row: (columns of the real text tokens in the full and the reduced prompt)."""
    out = []
    for b in range(inputs_full["input_ids"].shape[0]):
        cols = []
        for inputs in (inputs_full, inputs_red):
            ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
            cols.append(torch.nonzero(mask & (ids != IMG) & (ids != VID)).flatten())
        out.append(cols)
    return out


def _check_positions(kind, full_inputs, red_inputs, full_call, red_call, kept_of):
    """Text tokens keep their positions, and each reduced visual token has the position of original token
    ``kept_of(row, column) -> full column``."""
    (_, pos_full), (_, pos_red) = full_call, red_call
    for b, (cols_full, cols_red) in enumerate(_full_columns(kind, full_inputs, red_inputs)):
        assert torch.equal(pos_red[:, b, cols_red], pos_full[:, b, cols_full])
        vis = torch.nonzero(red_inputs["attention_mask"][b].bool() & (red_inputs["mm_token_type_ids"][b] > 0))
        for c in vis.flatten().tolist():
            assert torch.equal(pos_red[:, b, c], pos_full[:, b, kept_of(b, c)]), (b, c)


@pytest.mark.parametrize("kind", KINDS)
def test_selected_tokens_keep_their_positions_images_and_video_left_padded(kind):
    """divprune with drop_unselected keeps original tokens unchanged: each reduced token is found in the
    unreduced LM input by its value, and must sit at that token's M-RoPE position."""
    model = tiny(kind)
    full = batch(kind, MIXED)
    full_call = lm_inputs(model, **full)[1]
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="divprune", drop_unselected=True,
                                 time_mode="within_frame" if kind == "qwen3_vl" else "global")
    red = compact(model, full)
    assert red["input_ids"].shape[1] < full["input_ids"].shape[1]
    red_call = lm_inputs(model, **red)[1]
    emb_full, emb_red = full_call[0], red_call[0]

    def kept_of(b, c):
        same = (emb_full[b] == emb_red[b, c]).all(-1) & (full["mm_token_type_ids"][b] > 0)
        assert int(same.sum()) == 1
        return int(torch.nonzero(same)[0])
    _check_positions(kind, full, red, full_call, red_call, kept_of)


def _kept_columns(model, full):
    """Full column of every reduced visual token from the reduction's own record of its earliest original token."""
    with torch.no_grad():
        kept = {}
        if "pixel_values" in full:
            kept[IMG] = model.model.get_image_features(full["pixel_values"], full["image_grid_thw"]).mmmerge_kept
        if "pixel_values_videos" in full:
            kept[VID] = model.model.get_video_features(full["pixel_values_videos"],
                                                       full["video_grid_thw"]).mmmerge_kept
    return kept


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["tome", "dominant"])
def test_merged_tokens_sit_at_their_earliest_original_token(kind, method):
    model = tiny(kind)
    full = batch(kind, MIXED)
    full_call = lm_inputs(model, **full)[1]
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method=method)
    red = compact(model, full)
    red_call = lm_inputs(model, **red)[1]
    kept = _kept_columns(model, full)
    for token, grids in ((IMG, IMAGE_GRIDS), (VID, VIDEO_GRIDS)):  # every item: distinct cells, raster order
        counts = [model.model._mmmerge_qwen.item(g, token == VID).kept for g in grids]
        for cells in kept[token].split(counts):
            assert torch.equal(cells, cells.unique())
    # Item starts (full columns) of each placeholder run, in order, per token id.
    starts = {}
    for token in (IMG, VID):
        m = (full["input_ids"] == token).flatten()
        prev = torch.cat([m.new_zeros(1), m[:-1]])
        starts[token] = torch.nonzero(m & ~prev).flatten()
    L_full = full["input_ids"].shape[1]
    n_video = (VIDEO_GRIDS[0][1] // MERGE) * (VIDEO_GRIDS[0][2] // MERGE)
    order = {}
    for token in (IMG, VID):
        flat = (red["input_ids"] == token).flatten()
        order[token] = torch.cumsum(flat.long(), 0) - 1

    def kept_of(b, c):
        token = int(red["input_ids"][b, c])
        k = int(order[token][b * red["input_ids"].shape[1] + c])
        index = int(kept[token][k])
        counts = [model.model._mmmerge_qwen.item(g, token == VID).kept
                  for g in (IMAGE_GRIDS if token == IMG else VIDEO_GRIDS)]
        item = next(i for i in range(len(counts)) if k < sum(counts[:i + 1]))
        if token == VID and kind == "qwen3_vl":  # one run per temporal patch
            run = sum(VIDEO_GRIDS[j][0] for j in range(item)) + index // n_video
            return int(starts[token][run]) - b * L_full + index % n_video
        return int(starts[token][item]) - b * L_full + index
    _check_positions(kind, full, red, full_call, red_call, kept_of)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_continues_from_the_unreduced_positions(kind):
    model = tiny(kind)
    full = batch(kind, MIXED)
    rec = LMInputs(model)
    generate(model, steps=3, **full)
    rec.close()
    full_steps = rec.calls
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome")
    red = compact(model, full)
    forward_call = lm_inputs(model, **red)[1]
    rec = LMInputs(model)
    tokens, scores = generate(model, steps=3, **red)
    rec.close()
    assert tokens.shape == (2, 3) and torch.isfinite(scores).all()
    prefill = rec.calls[0]
    assert torch.equal(prefill[1], forward_call[1]) and torch.equal(prefill[0], forward_call[0])
    for (_, pos_full), (_, pos_red) in zip(full_steps[1:], rec.calls[1:]):  # decode steps: same positions
        assert torch.equal(pos_full, pos_red)
    assert model.model.rope_deltas.shape == (2, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_model_class_is_reduced_too(kind):
    model = tiny(kind, inner_only=True)
    full = batch(kind, MIXED)
    with torch.no_grad():
        ref = model(**full).last_hidden_state
    qwen_vl.reduce_visual_tokens(model, keep=1.0)
    with torch.no_grad():
        assert torch.equal(model(**full).last_hidden_state, ref)
    qwen_vl.reduce_visual_tokens(model, keep=3)
    red = compact(model, full)
    with torch.no_grad():
        out = model(**red).last_hidden_state
    assert out.shape[1] == red["input_ids"].shape[1] < full["input_ids"].shape[1]


def test_qwen2_5_video_seconds_per_grid_keep_their_time_positions():
    """Qwen2.5-VL spaces a video's temporal positions by ``second_per_grid_ts``: kept tokens keep them."""
    model = tiny("qwen2_5_vl")
    full = {**batch("qwen2_5_vl", MIXED), "second_per_grid_ts": torch.tensor([0.5])}
    model.config.vision_config.tokens_per_second = 4
    full_call = lm_inputs(model, **full)[1]
    plain = lm_inputs(model, **{**full, "second_per_grid_ts": torch.tensor([1.0])})[1]
    assert not torch.equal(full_call[1], plain[1])  # the spacing is in effect
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="divprune", drop_unselected=True)
    red = compact(model, full)
    red_call = lm_inputs(model, **red)[1]

    def kept_of(b, c):
        same = (full_call[0][b] == red_call[0][b, c]).all(-1) & (full["mm_token_type_ids"][b] > 0)
        return int(torch.nonzero(same)[0])
    _check_positions("qwen2_5_vl", full, red, full_call, red_call, kept_of)


@pytest.mark.parametrize("kind", KINDS)
def test_int_keep_larger_than_an_item_keeps_it_whole_and_text_only_rows_work(kind):
    model = tiny(kind)
    rows = [[5, 6, 7, 8], [9, ("img", 0), 10, ("img", 1), 11]]  # a text-only row next to one with two images
    full = batch(kind, rows, image_grids=[[1, 4, 4], [1, 8, 8]])  # 4 and 16 tokens
    full_call = lm_inputs(model, **full)[1]
    qwen_vl.reduce_visual_tokens(model, keep=6, method="tome")
    red = compact(model, full)
    assert int((red["input_ids"] == IMG).sum()) == 4 + 6
    red_call = lm_inputs(model, **red)[1]
    assert torch.equal(red_call[1][:, 0], full_call[1][:, 0, -red["input_ids"].shape[1]:])  # text row unchanged
    small = red_call[0][1][red["input_ids"][1] == IMG][:4]
    assert torch.equal(small, full_call[0][1][full["input_ids"][1] == IMG][:4])  # the small image: untouched


def test_inputs_embeds_with_pixels_is_refused_with_the_fix():
    model = tiny("qwen2_vl")
    qwen_vl.reduce_visual_tokens(model, keep=0.5)
    red = compact(model, batch("qwen2_vl", MIXED))
    embeds = model.get_input_embeddings()(red.pop("input_ids"))
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, **red)


def test_a_video_kept_whole_next_to_reduced_images_keeps_its_positions():
    """keep=4 reduces the 6- and 8-token images and leaves a 4-token video whole (no cells recorded for it)."""
    model = tiny("qwen2_vl")
    full = batch("qwen2_vl", MIXED, video_grids=[[1, 4, 4]])
    full_call = lm_inputs(model, **full)[1]
    qwen_vl.reduce_visual_tokens(model, keep=4, method="divprune", drop_unselected=True)
    red = compact(model, full)
    red_call = lm_inputs(model, **red)[1]

    def kept_of(b, c):
        same = (full_call[0][b] == red_call[0][b, c]).all(-1) & (full["mm_token_type_ids"][b] > 0)
        return int(torch.nonzero(same)[0])
    _check_positions("qwen2_vl", full, red, full_call, red_call, kept_of)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_prefill_sees_each_beam_at_the_forward_positions(kind):
    """generate(num_beams=2) repeats every prompt and its encoded items (transformers >= 5.24 regroups the
    encoder outputs): each beam's prefill gets the embeddings and positions of a plain forward."""
    model = tiny(kind)
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome")
    red = compact(model, batch(kind, MIXED))
    embeds, positions = lm_inputs(model, **red)[1]
    rec = LMInputs(model)
    with torch.no_grad():
        model.generate(**red, max_new_tokens=2, do_sample=False, num_beams=2, pad_token_id=PAD)
    rec.close()
    assert torch.equal(rec.calls[0][1], positions.repeat_interleave(2, dim=1))
    assert torch.equal(rec.calls[0][0], embeds.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_that_ends_on_an_image_decodes_from_the_unreduced_position(kind):
    model = tiny(kind)
    full = batch(kind, [[5, 6, ("img", 0)], [7, ("img", 1)]], image_grids=IMAGE_GRIDS[:2])
    full["input_ids"], full["attention_mask"], full["mm_token_type_ids"] = (
        full[k][:, :-1] for k in ("input_ids", "attention_mask", "mm_token_type_ids"))  # no vision-end token
    rec = LMInputs(model)
    generate(model, steps=3, **full)
    rec.close()
    full_steps = rec.calls
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome")
    red = compact(model, full)
    rec = LMInputs(model)
    generate(model, steps=3, **red)
    rec.close()
    for (_, pos_full), (_, pos_red) in zip(full_steps[1:], rec.calls[1:]):
        assert torch.equal(pos_full, pos_red)
