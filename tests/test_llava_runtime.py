"""LLaVA adapter as a well-behaved patched model: copies, pickling, threads, compile, nothing installed or
stored per forward. Tiny random models from configs (helpers shared with the other LLaVA tests); no network.
"""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import mmmerge
from mmmerge.adapters import llava
from test_llava import (DEVICE, IMAGE, N, assert_same_snapshot, logits, pictures, pixels, processor, prompt, snapshot,
                        tiny_llava, to_device)
from test_llava_next import SQUARE, TALL, WIDE, batch, generate, next_processor, picture, tiny_next
from test_llava_onevision import clips, onevision_processor, tiny_onevision, videos_batch

K = 12  # LLaVA-1.5: tokens kept per image (of N = 64)


def llava_inputs(images=1, seed=1, per_image=K):
    """A batch of ``images`` prompts with one image each: ``[images, L]`` ids and ``[images, 3, H, W]`` pixels."""
    ids = torch.cat([prompt(3 + i, "img", 4, per_image=per_image) for i in range(images)])
    return dict(input_ids=ids, pixel_values=pixels(images, seed=seed))


def llava_full_inputs(images=1, seed=1):
    return llava_inputs(images, seed, per_image=N)


# Each setup: (name, model maker, patch options, inputs for the reduced model, inputs for the unpatched one).
def _next_inputs(keep):
    def make(images=(WIDE,), seed=0):
        proc = next_processor()
        full = batch(proc, [picture(s, seed + i) for i, s in enumerate(images)], ["w5 " + "<image> " * len(images)])
        llava.reduce_visual_tokens(tiny_next(), keep=keep, processor=proc)
        return batch(proc, [picture(s, seed + i) for i, s in enumerate(images)], ["w5 " + "<image> " * len(images)]), full
    return make


def _video_inputs(keep, time_mode):
    def make(videos=1, seed=0):
        proc = onevision_processor()
        texts = ["w5 <video> w6"] * videos
        full = videos_batch(proc, clips(videos, seed), texts)
        llava.reduce_visual_tokens(tiny_onevision(), keep=keep, time_mode=time_mode, processor=proc)
        return videos_batch(proc, clips(videos, seed), texts), full
    return make


SETUPS = {
    "llava-tome-post": (tiny_llava, dict(keep=K, method="tome"), lambda: (llava_inputs(2), llava_full_inputs(2))),
    "llava-dominant-pre": (tiny_llava, dict(keep=K, method="dominant", where="pre_projector"),
                           lambda: (llava_inputs(2), llava_full_inputs(2))),
    "llava-tower": (lambda: tiny_llava(layers=4), dict(keep=32, method="tome", where="vision_tower"),
                    lambda: (llava_inputs(2, per_image=32), llava_full_inputs(2))),
    "next-tps": (tiny_next, dict(keep=0.25, method="tps"), lambda: _next_inputs(0.25)((WIDE, TALL))),
    "onevision-video": (tiny_onevision, dict(keep=16, method="dominant", time_mode="within_frame"),
                        lambda: _video_inputs(16, "within_frame")(2)),
}


def replacements(model):
    return {name: value for name, value in vars(model.model).items() if isinstance(value, llava.context.Replacement)}


# ------------------------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("name", list(SETUPS))
def test_deepcopy_is_an_independent_reduced_model(name):
    make, options, inputs = SETUPS[name]
    short, full = inputs()
    model = make()
    ref, before = logits(model, **full), snapshot(model)
    llava.reduce_visual_tokens(model, **options)
    reduced = logits(model, **short)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, **short), reduced)
    # What the patch installed on the copy belongs to the copy.
    assert all(r.owner is twin.model for r in replacements(twin).values())
    assert twin.model._mmmerge_llava is not model.model._mmmerge_llava
    assert twin._mmmerge_undo.args[0] is twin
    # Restoring the copy restores the copy only, bit for bit; the original stays reduced.
    llava.restore_visual_tokens(twin)
    assert torch.equal(logits(twin, **full), ref)
    assert_same_snapshot(before, snapshot(twin))
    assert torch.equal(logits(model, **short), reduced)
    mmmerge.unpatch(model)
    assert torch.equal(logits(model, **full), ref)
    assert_same_snapshot(before, snapshot(model))


def test_unpatch_of_a_copy_and_the_processor_stays_with_the_original():
    model, proc = tiny_llava(), processor()
    llava.reduce_visual_tokens(model, keep=K, processor=proc)
    loaded = pickle.loads(pickle.dumps(model))  # the patched processor is not part of the model's state
    assert loaded.model._mmmerge_llava.processor_undo == [] and model.model._mmmerge_llava.processor_undo
    llava.restore_visual_tokens(model)
    full = to_device(proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt"))
    ref = logits(model, **full)
    llava.reduce_visual_tokens(model, keep=K, processor=proc)
    short = to_device(proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt"))
    assert int((short["input_ids"] == IMAGE).sum()) == K
    twin = copy.deepcopy(model)
    mmmerge.unpatch(twin)  # the copy does not own the processor: it stays patched for the original
    assert torch.equal(logits(twin, **full), ref)
    assert torch.equal(to_device(proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt"))["input_ids"],
                       short["input_ids"])
    assert torch.equal(logits(model, **short), logits(copy.deepcopy(model), **short))
    llava.restore_visual_tokens(model)  # the original restores its processor
    assert torch.equal(to_device(proc(images=pictures(1), text=["w3 <image> w4"], return_tensors="pt"))["input_ids"],
                       full["input_ids"])


def _pickles(model) -> bool:
    try:
        pickle.dumps(model)
    except (AttributeError, TypeError, pickle.PicklingError):
        return False
    return True


@pytest.mark.parametrize("name", list(SETUPS))
def test_torch_save_round_trips_to_a_working_reduced_model(name):
    make, options, inputs = SETUPS[name]
    short, full = inputs()
    model = make()
    llava.reduce_visual_tokens(model, **options)
    # Before its first forward: transformers installs local output-capturing hooks at the first forward, after
    # which no LLaVA model pickles, reduced or not (checked below).
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    reduced = logits(model, **short)
    assert torch.equal(logits(loaded, **short), reduced)  # (an unreduced model refuses these placeholder counts)
    mmmerge.unpatch(loaded)
    mmmerge.unpatch(model)
    assert torch.equal(logits(loaded, **full), logits(model, **full))
    # After a forward the reduced model pickles exactly when the unpatched one does.
    plain = make()
    logits(plain, **full)
    llava.reduce_visual_tokens(model, **options)
    assert _pickles(model) == _pickles(plain)


def test_save_pretrained_is_byte_identical_to_the_unreduced_checkpoint(tmp_path):
    for name in ("llava-dominant-pre", "llava-tower", "next-tps"):
        make, options, inputs = SETUPS[name]
        model = make()
        model.save_pretrained(tmp_path / name / "plain")
        llava.reduce_visual_tokens(model, **options)
        short, _ = inputs()
        logits(model, **short)
        model.save_pretrained(tmp_path / name / "reduced")
        for file in ("model.safetensors", "config.json"):
            plain, reduced = (tmp_path / name / part / file for part in ("plain", "reduced"))
            assert plain.read_bytes() == reduced.read_bytes(), f"{name}: {file}"


# ------------------------------------------------------------------------------------ nothing per forward
def test_no_hook_is_registered_and_nothing_is_stored_during_a_forward(monkeypatch):
    registered = []
    for method in ("register_forward_hook", "register_forward_pre_hook"):
        original = getattr(nn.Module, method)
        monkeypatch.setattr(nn.Module, method, lambda self, *a, _o=original, **k: registered.append(self) or
                            _o(self, *a, **k))
    for name, (make, options, inputs) in SETUPS.items():
        short, full = inputs()
        model = make()
        logits(model, **full)  # transformers installs its own capture hooks at the first forward
        llava.reduce_visual_tokens(model, **options)
        logits(model, **short)  # fills the host-side memos of this input's layout
        registered.clear()
        before = {(n, k): id(v) for n, m in model.named_modules() for k, v in vars(m).items()}
        ctx = model.model._mmmerge_llava
        ctx_before = {k: id(v) for k, v in vars(ctx).items()}
        memo_sizes = (len(ctx.image_layouts), len(ctx.plans))
        logits(model, **short)
        assert registered == [], name
        after = {(n, k): id(v) for n, m in model.named_modules() for k, v in vars(m).items()}
        assert after == before, name
        assert {k: id(v) for k, v in vars(ctx).items()} == ctx_before and (len(ctx.image_layouts),
                                                                          len(ctx.plans)) == memo_sizes


# ------------------------------------------------------------------------------------------------ threads
def _in_threads(work, jobs, repeats=3):
    """Run ``work(job)`` ``repeats`` times in one thread per job, all started together; the last results."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def run(i):
        try:
            start.wait()
            for _ in range(repeats):
                results[i] = work(jobs[i])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _forward_and_info(model):
    def work(inputs):
        out = logits(model, **inputs)
        info = mmmerge.last_info(model)  # this thread's last reduction
        return out, info.source, info.items
    return work


@pytest.mark.parametrize("options", [dict(method="tome"), dict(method="dominant", where="pre_projector"),
                                     dict(method="tps", where="pre_projector")], ids=lambda o: "-".join(o.values()))
def test_concurrent_forwards_equal_sequential_ones(options):
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K, **options)
    jobs = [llava_inputs(b, seed=s) for s, b in enumerate([1, 3, 2, 1, 2, 3])]
    work = _forward_and_info(model)
    sequential = [work(job) for job in jobs]
    for (out, source, _), (ref, ref_source, _) in zip(_in_threads(work, jobs), sequential):
        assert torch.equal(out, ref) and torch.equal(source, ref_source)


def test_concurrent_anyres_and_video_forwards_equal_sequential_ones():
    model = tiny_next()
    llava.reduce_visual_tokens(model, keep=0.25, method="pitome")
    make = _next_inputs(0.25)
    jobs = [make(sizes, seed)[0] for seed, sizes in enumerate([(WIDE,), (TALL, SQUARE), (SQUARE,), (WIDE, TALL)])]
    work = _forward_and_info(model)
    sequential = [work(job) for job in jobs]
    model.model._mmmerge_llava.image_layouts.clear()  # the threads fill the memos concurrently
    model.model._mmmerge_llava.plans.clear()
    for (out, source, items), (ref, ref_source, ref_items) in zip(_in_threads(work, jobs), sequential):
        assert torch.equal(out, ref) and torch.equal(source, ref_source) and items == ref_items
    video = tiny_onevision()
    llava.reduce_visual_tokens(video, keep=16, method="tome", time_mode="adjacent")
    jobs = [_video_inputs(16, "adjacent")(v, seed)[0] for seed, v in enumerate([1, 2, 1])]
    work = _forward_and_info(video)
    sequential = [work(job) for job in jobs]
    for (out, source, _), (ref, ref_source, _) in zip(_in_threads(work, jobs), sequential):
        assert torch.equal(out, ref) and torch.equal(source, ref_source)


def test_concurrent_generate_equals_sequential():
    model, proc = tiny_llava(), processor()
    llava.reduce_visual_tokens(model, keep=K, method="dominant", where="pre_projector", processor=proc)
    anyres = tiny_next()
    llava.reduce_visual_tokens(anyres, keep=0.25, method="tome")
    texts = [["w5 <image> w6"], ["w7 w8 <image>", "w9 <image> w10 <image>"], ["w11 <image> w12 w13"]]
    images = [pictures(1, seed=1), pictures(3, seed=2), pictures(1, seed=3)]
    jobs = [to_device(proc(images=i, text=t, return_tensors="pt", padding=True)) for i, t in zip(images, texts)]
    jobs += [_next_inputs(0.25)(sizes)[0] for sizes in [(WIDE,), (TALL, SQUARE)]]

    def work(inputs):
        return generate(anyres if "image_sizes" in inputs else model, steps=4, **inputs)[0]
    sequential = [work(job) for job in jobs]
    assert all(torch.equal(a, b) for a, b in zip(_in_threads(work, jobs, repeats=2), sequential))


def test_last_info_is_this_threads_last_reduction():
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K)
    info = mmmerge.last_info(model)  # before any forward: the counts, no state
    assert (info.tokens_in, info.tokens_out, info.state) == (N, K, None)
    logits(model, **llava_inputs(3))
    seen = {}

    def other():
        seen["before"] = mmmerge.last_info(model)
        logits(model, **llava_inputs(1))
        seen["after"] = mmmerge.last_info(model)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert seen["before"].state is None and seen["after"].size.shape == (1, K)
    assert mmmerge.last_info(model).size.shape == (3, K)  # this thread's own, not the other thread's
    twin = copy.deepcopy(model)
    logits(twin, **llava_inputs(2))
    assert mmmerge.last_info(twin).size.shape == (2, K) and mmmerge.last_info(model).size.shape == (3, K)


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("where", ["post_projector", "pre_projector", "vision_tower"])
def test_compiled_language_model_sees_the_reduced_tokens(where):
    torch._dynamo.reset()
    keep = 32 if where == "vision_tower" else K
    model = tiny_llava(layers=4)
    llava.reduce_visual_tokens(model, keep=keep, method="tome", where=where)
    inputs = [dict(input_ids=prompt(*[3] * words, "img", 4, per_image=keep), pixel_values=pixels(1, seed=words))
              for words in (1, 3)]
    eager = [logits(model, **x) for x in inputs]
    model.model.language_model.compile(fullgraph=True, backend="eager")
    for x, ref in zip(inputs, eager):
        torch.testing.assert_close(logits(model, **x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["post_projector", "pre_projector"])
def test_the_reduction_compiles_with_fullgraph(where):
    """The reduced get_image_features compiles as one graph and matches eager across inputs (after one eager
    call: transformers installs its output-capturing hooks, under a lock, at the first call)."""
    torch._dynamo.reset()
    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=K, method="dominant", where=where)
    model.model.get_image_features(pixels(2))
    compiled = torch.compile(model.model.get_image_features, fullgraph=True, backend="eager")
    for seed in (1, 2):
        out = compiled(pixels(2, seed=seed)).pooler_output
        ref = model.model.get_image_features(pixels(2, seed=seed)).pooler_output
        assert len(out) == 2 and all(torch.equal(a, b) for a, b in zip(out, ref))


# ------------------------------------------------------------------------------------------ where= checks
@pytest.mark.parametrize("make", [tiny_next, tiny_onevision], ids=["next", "onevision"])
@pytest.mark.parametrize("where", ["vision_tower", "pre_projector"])
def test_anyres_models_refuse_reduction_before_the_packing(make, where):
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match="full token grid after the projector.*where='post_projector'"):
        llava.reduce_visual_tokens(model, keep=0.25, where=where)
    assert_same_snapshot(before, snapshot(model))
