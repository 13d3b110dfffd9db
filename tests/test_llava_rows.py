"""Anyres images (LLaVA-NeXT, OneVision) reduce in one engine call: every image part (base view, crops) is a row of
one padded batch with its own keep, and each row comes out exactly as if reduced alone (every method)."""
from __future__ import annotations

import pytest
import torch

import mmmerge
from mmmerge.adapters import llava
from test_llava import DTYPE, EXACT
from test_llava_next import SQUARE, TALL, WIDE, batch, next_processor, picture, tiny_next
from test_llava_onevision import clips, onevision_processor, tiny_onevision, to_device

METHODS = ["tome", "pitome", "tps", "prune", "random", "dominant", "divprune", "cdpruner"]
TOL = dict(atol=1e-5, rtol=1e-5) if EXACT else dict(atol=2e-2, rtol=2e-2)


def rows_alone(ctx, x, metric, score, plan, query):
    """Reference: every row alone (one engine call each, its own keep), then the kept tokens and the newlines by
    earliest packed position. Returns ``(tokens [L', C], size [L'], source [L])``."""
    L = x.shape[0]
    lengths = plan.budgets.lengths if plan.budgets else (plan.rows.shape[1],) * plan.rows.shape[0]
    keeps = plan.budgets.keeps if plan.budgets else (plan.keep,) * plan.rows.shape[0]
    tokens, sizes, members = [], [], []
    for g, (n, k) in enumerate(zip(lengths, keeps)):
        idx = plan.rows[g, :n]
        image = plan.row_image[g]
        y, state = llava.reduction.reduce_rows(ctx, x[idx][None], metric[idx][None],
                                               None if score is None else score[idx][None], k, 0,
                                               query=None if query is None else (query[0][image][None],
                                                                                 query[1][image][None]))
        for j in range(k):
            tokens.append(y[0, j])
            sizes.append(state.size[0, j])
            members.append(idx[state.source[0] == j])
    for p in plan.newlines:
        tokens.append(x[p])
        sizes.append(torch.ones((), device=x.device))
        members.append(p.view(1))
    order = sorted(range(len(members)), key=lambda i: int(members[i].min()))
    source = torch.empty(L, dtype=torch.long, device=x.device)
    for out, i in enumerate(order):
        source[members[i]] = out
    return torch.stack([tokens[i] for i in order]), torch.stack([sizes[i] for i in order]), source


def spy_on_reduce_ragged(monkeypatch):
    """Record every ``reduce_ragged`` call (its arguments and result) made by the image features."""
    calls = []
    original = llava.features.reduce_ragged

    def spy(ctx, x, metric, score, plan, query=None):
        out = original(ctx, x, metric, score, plan, query)
        calls.append(((ctx, x, metric, score, plan, query), out))
        return out

    monkeypatch.setattr(llava.features, "reduce_ragged", spy)
    return calls


def check_rows_as_alone(calls, method):
    (args, (tokens, state)), = calls
    plan = args[4]
    assert plan.budgets is not None  # rows of several lengths and keeps: one padded batch
    assert tokens.shape[0] == plan.total_out
    source, seen = state.source[0], set()
    for g, (n, k) in enumerate(zip(plan.budgets.lengths, plan.budgets.keeps)):  # every row keeps its own count
        outputs = set(source[plan.rows[g, :n]].tolist())
        assert len(outputs) == k and not outputs & seen  # ... and never shares a token with another row
        seen |= outputs
    if method == "random":  # its own draws: the counts and the parts, not the choice
        return
    ref_tokens, ref_size, ref_source = rows_alone(*args)
    assert torch.equal(source, ref_source) and torch.equal(state.size[0], ref_size)
    torch.testing.assert_close(tokens, ref_tokens, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_next_images_of_three_sizes_reduce_in_one_call_each_row_as_alone(method, monkeypatch):
    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method=method, processor=proc)
    inputs = batch(proc, [picture(WIDE), picture(TALL, 1), picture(SQUARE, 2)], ["w5 <image> w6 <image> w7 <image>"])
    calls = spy_on_reduce_ragged(monkeypatch)
    with torch.no_grad():
        model(**inputs)
    check_rows_as_alone(calls, method)
    plan = calls[0][0][4]
    assert plan.rows.shape[0] == 6 and len(set(zip(plan.budgets.lengths, plan.budgets.keeps))) >= 4


@pytest.mark.parametrize("method", METHODS)
def test_onevision_images_and_a_video_each_row_as_alone(method, monkeypatch):
    model, proc = tiny_onevision(), onevision_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method=method, processor=proc)
    images = [[picture(WIDE)], [picture(TALL, 1), picture(SQUARE, 2)]]  # cropped alone, uncropped together
    texts = ["w5 <image> w6 <video> w1", "w7 <image> w9 <image> w4"]
    calls = spy_on_reduce_ragged(monkeypatch)
    video = []
    spy_video = model.model.get_video_features

    def video_features(*args, **kwargs):
        out = spy_video(*args, **kwargs)
        video.append(out.pooler_output)
        return out

    monkeypatch.setattr(model.model, "get_video_features", video_features)
    with torch.no_grad():
        model(**to_device(proc(images=images, videos=clips(1), text=texts, return_tensors="pt", padding=True)))
    check_rows_as_alone(calls, method)
    assert len(video) == 1  # the video reduces on its own path, in the same forward
    if method != "random":
        with torch.no_grad():
            alone = model.model.get_video_features(
                to_device(proc(videos=clips(1), text=["w5 <video> w1"], return_tensors="pt"))["pixel_values_videos"])
        first = video[0][0] if isinstance(video[0], (list, tuple)) else video[0]
        again = alone.pooler_output[0] if isinstance(alone.pooler_output, (list, tuple)) else alone.pooler_output
        if method != "cdpruner":  # cdpruner's video query is its prompt: compare the counts only
            torch.testing.assert_close(first.to(DTYPE), again.to(DTYPE), **TOL)
        assert first.shape == again.shape


def test_uniform_rows_take_the_plain_path_and_one_image_is_unchanged(monkeypatch):
    """Images of one size uncropped (OneVision, several per prompt): rows of one length and keep, no padding."""
    model, proc = tiny_onevision(), onevision_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="tome", processor=proc)
    calls = spy_on_reduce_ragged(monkeypatch)
    with torch.no_grad():
        model(**to_device(proc(images=[[picture(TALL, 1), picture(TALL, 2)]], text=["w7 <image> w9 <image> w4"],
                               return_tensors="pt")))
    (args, (tokens, state)), = calls
    assert args[4].budgets is None and args[4].rows.shape[0] == 2
    ref_tokens, ref_size, ref_source = rows_alone(*args)
    assert torch.equal(state.source[0], ref_source)
    torch.testing.assert_close(tokens, ref_tokens, **TOL)
    assert mmmerge.last_info(model).size.shape == (1, tokens.shape[0])


@pytest.mark.parametrize("method", ["tome", "pitome", "dominant"])
def test_as_many_torch_calls_for_three_sizes_as_for_one_image(method):
    """No loop over images or parts: one image (two rows) and three images of three sizes (six rows) cost the
    reduction the same torch calls (no host read either). (DivPrune and CDPruner take one batched step per kept
    token of the widest row, whatever the number of rows.)"""
    from test_llava_audit import traced

    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method=method)
    one = batch(proc, [picture(WIDE)], ["w1 <image>"])
    three = batch(proc, [picture(WIDE), picture(TALL, 1), picture(SQUARE, 2)], ["w1 <image> <image> <image>"])
    get, unpatched = model.model.get_image_features, type(model.model).get_image_features
    extra = []
    for inputs in (one, three):
        get(inputs["pixel_values"], inputs["image_sizes"])  # the host-side plan, once per layout
        ops = traced(get, inputs["pixel_values"], inputs["image_sizes"])
        assert set(ops.syncs) <= {"tolist"}  # the image sizes, read once (the model reads them itself too)
        extra.append(ops.calls - traced(unpatched, model.model, inputs["pixel_values"],
                                        inputs["image_sizes"].tolist()).calls)
    assert extra[0] == extra[1]
