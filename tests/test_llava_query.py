"""LLaVA with divprune / cdpruner: the prompt is cdpruner's query (forward and generate), options, counts."""
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmmerge
from mmmerge.adapters import llava

SIZE, PATCH = 32, 4
N = (SIZE // PATCH) ** 2  # 64 visual tokens per image
IMAGE, PAD = 99, 0


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def pixels(n, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def prompts(words, keep, pad_to=None):
    """One row per entry of ``words``: [<s>=1, keep image placeholders, the words], left-padded to ``pad_to``."""
    rows = [[1] + [IMAGE] * keep + list(w) for w in words]
    width = pad_to or max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def aligned_model(targets):
    """A tiny LLaVA whose text tokens 10, 11, ... have exactly the embedding of projected visual token
    ``targets[i]`` of the test image: each such word is most relevant to one known token."""
    model = tiny_llava()
    with torch.no_grad():
        projected = model.model.get_image_features(pixel_values=pixels(1)).pooler_output[0]  # [N, C]
        for i, t in enumerate(targets):
            model.model.get_input_embeddings().weight[10 + i] = projected[t]
    return model, projected


def kept_rows(features, projected):
    """Indices of the projected tokens that appear unchanged among the reduced features ``[keep, C]``."""
    same = (features.unsqueeze(1) - projected.unsqueeze(0)).abs().amax(-1) < 1e-6  # [keep, N]
    return set(torch.nonzero(same)[:, 1].tolist())


def test_two_prompts_over_the_same_image_keep_different_tokens():
    # Token 10 is aligned with visual token 5, token 11 with visual token 40. Over the same image, the prompt
    # with word 10 keeps token 5, the one with word 11 keeps token 40 (each the most relevant of its prompt).
    model, projected = aligned_model([5, 40])
    keep = 8
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner", drop_unselected=True)
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
    ids, mask = prompts([[10, 3], [11, 3]], keep)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1).expand(2, -1, -1, -1))
    image_pos = ids == IMAGE
    first = kept_rows(seen[-1][0][image_pos[0]], projected)
    second = kept_rows(seen[-1][1][image_pos[1]], projected)
    assert len(first) == len(second) == keep
    assert 5 in first and 40 in second and first != second
    source = mmmerge.last_info(model).state.source  # [2 images, N]: which output token holds each token
    assert not torch.equal(source[0], source[1])


def test_generate_passes_the_prompt_too():
    model, projected = aligned_model([5, 40])
    keep = 8
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner", drop_unselected=True)
    ids, mask = prompts([[10, 3], [11, 3]], keep)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(1).expand(2, -1, -1, -1),
                             max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, ids.shape[1] + 2)
    source = mmmerge.last_info(model).state.source
    assert not torch.equal(source[0], source[1])  # the two prompts kept different tokens
    assert getattr(llava.context.CALL, "prompt", None) is None  # held for the one call only (this thread's slot)


def test_padding_and_placeholders_are_not_part_of_the_query():
    # Left padding and the image placeholders never count as query tokens: a padded batch selects what each
    # prompt alone selects.
    model, _ = aligned_model([5, 40])
    keep = 8
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner")
    sources = []
    with torch.no_grad():
        for words, pad_to in (([[10, 3]], None), ([[11, 3, 4, 4]], None), ([[10, 3], [11, 3, 4, 4]], None)):
            ids, mask = prompts(words, keep, pad_to)
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1).expand(len(words), -1, -1, -1))
            sources.append(mmmerge.last_info(model).state.source)
    assert torch.equal(sources[2][0], sources[0][0]) and torch.equal(sources[2][1], sources[1][0])


def test_several_images_per_prompt_get_their_own_prompt():
    # Row 0 holds two images, row 1 one: images 0 and 1 take row 0's prompt, image 2 row 1's.
    model, _ = aligned_model([5, 40])
    keep = 8
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner")
    rows = [[1] + [IMAGE] * keep + [IMAGE] * keep + [10, 3], [PAD] * keep + [1] + [IMAGE] * keep + [11, 3]]
    ids = torch.tensor(rows)
    mask = (ids != PAD).long()
    ctx = model.model._mmmerge_llava
    llava.context.CALL.prompt = (ids, mask)  # this thread's held prompt, as the pre-hook sets it
    query = llava.query.item_queries(ctx, model.model, IMAGE, torch.full((3,), keep))
    embed = model.model.get_input_embeddings()
    assert torch.equal(query[0][0], embed(ids[0])) and torch.equal(query[0][1], embed(ids[0]))
    assert torch.equal(query[0][2], embed(ids[1]))
    assert query[1][0].sum() == 3 and query[1][2].sum() == 3  # <s> and the two words
    llava.context.CALL.prompt = None


def test_images_and_a_video_of_one_call_both_get_its_prompt_and_the_call_releases_it(monkeypatch):
    import test_llava_onevision as ov

    model, proc = ov.tiny_onevision(), ov.onevision_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="cdpruner", processor=proc)
    seen = []
    original = llava.query.item_queries

    def spy(ctx, lm, token_id, counts):
        query = original(ctx, lm, token_id, counts)
        seen.append((token_id, query is not None))
        return query

    monkeypatch.setattr(llava.features, "item_queries", spy)
    inputs = ov.to_device(proc(images=[ov.picture(ov.WIDE)], videos=ov.clips(1), text=["w5 <image> w6 <video> w1"],
                               return_tensors="pt"))
    with torch.no_grad():
        model(**inputs)
    assert seen == [(ov.IMAGE, True), (ov.VIDEO, True)]  # the video reduction, after the image's, still has it
    assert llava.context.CALL.prompt is None  # released with the call: a later call never sees this prompt
    bad = dict(inputs, input_ids=inputs["input_ids"][:, 1:])  # a placeholder short: the call raises
    with pytest.raises(Exception), torch.no_grad():
        model(**bad)
    assert llava.context.CALL.prompt is None and not llava.context.CALL.prompts


def test_without_a_prompt_cdpruner_is_plain_dpp_and_divprune_needs_none():
    model = tiny_llava()
    for method in ("cdpruner", "divprune"):
        llava.reduce_visual_tokens(model, keep=12, method=method)
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels(2)).pooler_output
        assert [o.shape[0] for o in out] == [12, 12]
        llava.restore_visual_tokens(model)


def test_query_options_are_refused_with_the_reason():
    model = tiny_llava()
    with pytest.raises(ValueError, match="made by the adapter"):
        llava.reduce_visual_tokens(model, keep=12, method="cdpruner", query=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="where='post_projector'"):
        llava.reduce_visual_tokens(model, keep=12, method="cdpruner", where="pre_projector")
    with pytest.raises(TypeError, match="drop_unselected"):
        llava.reduce_visual_tokens(model, keep=12, method="divprune", drop_unselected=1)
    assert "_mmmerge_llava" not in model.__dict__ and "generate" not in model.__dict__


def test_restore_removes_the_generate_wrapper_and_is_exact():
    model = tiny_llava()
    ids, mask = prompts([[10, 3]], N)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
        llava.reduce_visual_tokens(model, keep=16, method="cdpruner")
        assert "generate" in model.__dict__
        llava.restore_visual_tokens(model)
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
    assert "generate" not in model.__dict__ and torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_keep_all_is_exact_for_the_selection_methods():
    model = tiny_llava()
    ids, mask = prompts([[10, 3]], N)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits
        for method in ("divprune", "cdpruner"):
            llava.reduce_visual_tokens(model, keep=N, method=method)
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)).logits, before)
    llava.restore_visual_tokens(model)


# ------------------------------------------------------------------------- anyres images and videos
def _alone_equals_batch(model, make_inputs, rows):
    """cdpruner's choice for each row of a batch equals its choice alone (its own prompt is its query)."""
    with torch.no_grad():
        model(**make_inputs(list(range(rows))))
        together = mmmerge.last_info(model).state.source
        alone = []
        for r in range(rows):
            model(**make_inputs([r]))
            alone.append(mmmerge.last_info(model).state.source)
    return together, alone


def test_anyres_images_each_take_their_own_prompt():
    from test_llava_next import TALL, WIDE, batch, next_processor, picture, tiny_next

    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="cdpruner", processor=proc)
    images = [picture(WIDE, 3), picture(TALL, 4)]
    texts = ["w5 w9 <image> w6", " ".join(f"w{i}" for i in range(20, 40)) + " <image> w7"]

    def make(rows):
        return batch(proc, [images[r] for r in rows], [texts[r] for r in rows])

    together, alone = _alone_equals_batch(model, make, 2)
    first = alone[0].shape[1]
    assert torch.equal(together[0, :first], alone[0][0])  # image 0's packed tokens come first
    offset = int(together[0, :first].max()) + 1
    assert torch.equal(together[0, first:] - offset, alone[1][0])
    # And the prompt matters: the same image under another prompt keeps other tokens.
    with torch.no_grad():
        model(**batch(proc, [images[0]], [" ".join(f"w{i}" for i in range(60, 80)) + " <image>"]))
    assert not torch.equal(mmmerge.last_info(model).state.source, alone[0])


@pytest.mark.parametrize("time_mode", ["global", "within_frame"])
def test_videos_each_take_their_own_prompt(time_mode):
    from test_llava import VIDEO, tiny_video, video_pixels

    model = tiny_video()
    keep = 16
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner", time_mode=time_mode)
    words = [[3, 4], [40, 41, 42, 43, 44]]
    videos = video_pixels(1).expand(2, -1, -1, -1, -1)  # the same video under two prompts

    def make(rows):
        width = max(len(words[r]) for r in rows)
        ids = torch.tensor([[PAD] * (width - len(words[r])) + words[r] + [VIDEO] * keep + [5] for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "pixel_values_videos": videos[: len(rows)]}

    together, alone = _alone_equals_batch(model, make, 2)
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])
    assert not torch.equal(together[0], together[1])  # same video, two prompts, two choices


def test_prompts_are_held_per_thread_and_copies_use_their_own():
    import copy
    import threading

    model, _ = aligned_model([5, 40])
    keep = 8
    llava.reduce_visual_tokens(model, keep=keep, method="cdpruner")
    calls = [prompts([[10, 3]], keep), prompts([[11, 3]], keep)]
    with torch.no_grad():
        alone = []
        for ids, mask in calls:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))
            alone.append(mmmerge.last_info(model).state.source)
    seen = [None, None]

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                ids, mask = calls[i]
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))
                seen[i] = mmmerge.last_info(model).state.source

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(seen[0], alone[0]) and torch.equal(seen[1], alone[1])
    twin = copy.deepcopy(model)
    assert twin.generate.owner is twin  # the copy's generate holds the copy's prompts
    llava.restore_visual_tokens(twin)
    assert "generate" not in twin.__dict__ and "generate" in model.__dict__
