"""Qwen-VL adapter as a well-behaved patched model: ``mmmerge.patch`` / ``unpatch`` / ``last_info``, copies,
pickling and threads (the per-call frame travels with the call, never on a shared object)."""
from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

import mmmerge
from mmmerge.adapters import qwen_vl

from test_qwen_vl import IMAGE_GRIDS, KINDS, MIXED, VIDEO_GRIDS, batch, compact, tiny


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("kind", KINDS)
def test_mmmerge_patch_dispatches_and_last_info_counts_each_item(kind):
    model = tiny(kind)
    full = batch(kind, MIXED)
    ref = logits(model, **full)
    mmmerge.patch(model, keep=0.5, method="tps")
    assert mmmerge.last_info(model).items is None or mmmerge.last_info(model).items == []
    red = compact(model, full)
    logits(model, **red)
    info = mmmerge.last_info(model)  # the last reduction of the call: the video
    t, h, w = VIDEO_GRIDS[0]
    assert info.items == [(t * h * w // 4, model.model._mmmerge_qwen.item(VIDEO_GRIDS[0], True).kept)]
    model.model.get_image_features(full["pixel_values"], full["image_grid_thw"])
    sizes = [t * h * w // 4 for t, h, w in IMAGE_GRIDS]
    assert mmmerge.last_info(model).items == [(n, -(-n // 2)) for n in sizes]
    mmmerge.unpatch(model)
    assert torch.equal(logits(model, **full), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_is_an_independent_reduced_model(kind):
    model = tiny(kind)
    full = batch(kind, MIXED)
    ref = logits(model, **full)
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="dominant")
    red = compact(model, full)
    reduced = logits(model, **red)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, **red), reduced)
    assert twin.model.get_image_features.owner is twin.model
    assert twin.model._mmmerge_qwen is not model.model._mmmerge_qwen
    qwen_vl.restore_visual_tokens(twin)
    assert torch.equal(logits(twin, **full), ref)
    assert torch.equal(logits(model, **red), reduced)  # the original is still reduced


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip_gives_a_working_reduced_model(kind):
    model = tiny(kind)
    full = batch(kind, MIXED)
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="tome")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # before any forward: transformers adds local capture hooks at the first one
    red = compact(model, full)
    reduced = logits(model, **red)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(logits(loaded, **red), reduced)
    qwen_vl.restore_visual_tokens(loaded)
    assert "forward" not in vars(loaded.model)


def test_threads_each_get_their_own_call():
    """Two threads with different prompts and media, many times, each get the result of their own inputs."""
    model = tiny("qwen2_5_vl")
    qwen_vl.reduce_visual_tokens(model, keep=0.5, method="cdpruner")
    a = compact(model, batch("qwen2_5_vl", MIXED, seed=1))
    b = compact(model, batch("qwen2_5_vl", [[20, ("img", 0), 21, ("img", 1), 22, ("img", 2)]], seed=5))
    expected = {"a": logits(model, **a), "b": logits(model, **b)}
    errors = []

    def work(name, inputs):
        try:
            for _ in range(4):
                if not torch.equal(logits(model, **inputs), expected[name]):
                    errors.append(name)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(n, i)) for n, i in (("a", a), ("b", b), ("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
