"""Runtime v2: a patched model is still a model (copies, pickling, threads, compile, checkpointing), fails
only at patch time, isolates non-finite clips, and stays lean (dispatched ops per merging layer)."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from transformers import VideoMAEForVideoClassification, VideoMAEModel, VivitForVideoClassification

import mmmerge
from mmmerge.adapters.encoder import MergingLayer
from mmmerge import TargetFlops
from mmmerge.adapters import audio
from mmmerge.adapters.encoder import patch_spec

from helpers import (DEVICE, clip, same, has_increasing_representatives, output, spectrogram, tiny_ast,
                     tiny_video, untouched)

VIDEO_MODES = ["global", "within_frame", "adjacent", "window(2)"]
AUDIO_MODES = [("global", {}), ("same_band", {}), ("adjacent", {}), ("window(2)", {}),
               ("adjacent", {"within_band": True}), ("window(3)", {"within_band": True})]
METHODS = ["tome", "pitome", "tps", "random", "prune"]
SELECTION = ["dominant", "divprune", "cdpruner"]  # keep-K selection matchers, per layer in the encoders


# ------------------------------------------------------------------------------------ copies and pickling
@pytest.mark.parametrize("make, x", [(lambda: tiny_video(VivitForVideoClassification), clip),
                                     (lambda: tiny_video(VideoMAEForVideoClassification), clip),
                                     (tiny_ast, spectrogram)], ids=["vivit", "videomae", "ast"])
def test_deepcopy_is_an_independent_patched_model(make, x):
    model = make()
    inputs = x()
    reference = output(model, inputs)
    mmmerge.patch(model, r=6, method="tome")
    merged = output(model, inputs)
    twin = copy.deepcopy(model)
    assert same(output(twin, inputs), merged)
    # The copy's layers are its own, and so are the modules their static plans call: unpatching the copy
    # restores the copy and leaves the original patched.
    assert all(a is not b for a, b in zip(twin.modules(), model.modules()))
    own = {id(m) for m in twin.modules()}
    plans = [m._mmmerge for m in twin.modules() if isinstance(m, MergingLayer)]
    assert plans and all(id(p.parts.attention) in own and id(p.parts.norm1) in own for p in plans if p.parts)
    mmmerge.unpatch(twin)
    assert untouched(twin) and same(output(twin, inputs), reference)
    assert same(output(model, inputs), merged) and patch_spec(model) is not None
    mmmerge.unpatch(model)
    assert untouched(model) and same(output(model, inputs), reference)


def test_pickle_and_torch_save_round_trip_to_a_working_patched_model():
    model = tiny_video(VideoMAEForVideoClassification)
    mmmerge.patch(model, r=6, method="pitome", time_mode="within_frame")
    x = clip()
    merged = output(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(output(loaded, x), merged)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(output(restored, x), merged)
    assert mmmerge.last_info(restored).schedule == mmmerge.last_info(model).schedule
    mmmerge.unpatch(restored)
    assert untouched(restored)


def test_save_pretrained_is_byte_identical_to_the_unpatched_checkpoint(tmp_path):
    model = tiny_video(VideoMAEForVideoClassification)
    model.save_pretrained(tmp_path / "plain")
    mmmerge.patch(model, r=6, method="tome", time_mode="adjacent")
    model.save_pretrained(tmp_path / "patched")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes()


def test_to_device_and_dtype_moves_the_patch_with_the_model():
    model = tiny_video(VideoMAEModel)
    mmmerge.patch(model, r=6, time_mode="within_frame")
    model.to(torch.float64)
    x = clip().double()
    out = output(model, x)
    assert out.dtype == torch.float64 and out.shape == (2, 40, 32)


# ------------------------------------------------------------------------------------------------ threads
def test_concurrent_forwards_equal_sequential_ones():
    model = tiny_video(VivitForVideoClassification)
    mmmerge.patch(model, r=6, method="tome", time_mode="adjacent", trace_source=True)
    inputs = [clip(batch=b, seed=s) for s, b in enumerate([1, 2, 3, 2, 1, 3])]
    sequential = [output(model, x) for x in inputs]
    results, sources, errors = [None] * len(inputs), [None] * len(inputs), []

    def work(i: int) -> None:
        try:
            for _ in range(4):
                results[i] = output(model, inputs[i])
                sources[i] = mmmerge.last_info(model).source  # this thread's own last forward
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(results, sequential))
    assert [s.shape[0] for s in sources] == [x.shape[0] for x in inputs]


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("method, mode", [(m, t) for m in ("tome", "pitome", "tps") for t in VIDEO_MODES]
                         + [("divprune", "within_frame"), ("cdpruner", "window(2)"), ("dominant", "adjacent")])
def test_compile_fullgraph_matches_eager_across_batch_sizes(method, mode):
    torch._dynamo.reset()
    model = tiny_video(VideoMAEForVideoClassification, layers=2)
    mmmerge.patch(model, r=6, method=method, time_mode=mode)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture; inductor below
    for batch in (2, 3):
        x = clip(batch=batch, seed=batch)
        torch.testing.assert_close(output(compiled, x), output(model, x), atol=1e-5, rtol=1e-5)


def test_a_path_that_cannot_compile_says_so():
    torch._dynamo.reset()
    model = tiny_video(VideoMAEModel, layers=2)
    mmmerge.patch(model, r=6, method="random", generator=torch.Generator(device=DEVICE).manual_seed(0))
    with pytest.raises(Exception, match="'random' with a torch.Generator cannot be compiled"):
        output(torch.compile(model, fullgraph=True, backend="eager"), clip())
    mmmerge.patch(model, r=6, method="random")  # torch's own stream compiles
    torch._dynamo.reset()
    assert output(torch.compile(model, fullgraph=True, backend="eager"), clip()).shape == (2, 52, 32)


def test_compile_with_inductor_matches_eager():
    torch._dynamo.reset()
    model = tiny_video(VivitForVideoClassification, layers=2)
    mmmerge.patch(model, r=6, method="tome", time_mode="within_frame")
    compiled = torch.compile(model, fullgraph=True)
    for batch in (2, 3):
        x = clip(batch=batch, seed=batch)
        torch.testing.assert_close(output(compiled, x), output(model, x), atol=1e-5, rtol=1e-5)


def test_compile_audio_with_padding_and_band_rule():
    torch._dynamo.reset()
    x = spectrogram()
    for method, mode, within_band in (("tome", "adjacent", True), ("tps", "same_band", False)):
        torch._dynamo.reset()
        model = tiny_ast(layers=2)
        audio.patch(model, r=3, method=method, time_mode=mode, within_band=within_band, lengths=[128, 80],
                    drop_padding=False)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(output(compiled, x), output(model, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("method", METHODS + SELECTION)
@pytest.mark.parametrize("mode", VIDEO_MODES)
def test_a_nan_clip_gets_nan_outputs_and_leaves_its_batch_mates_alone(method, mode):
    model = tiny_video(VivitForVideoClassification)
    budgets = {"group_budget": False} if method == "dominant" else {}  # dominant takes no per-group budgets
    mmmerge.patch(model, r=6, method=method, time_mode=mode, **budgets)
    x = clip(batch=3)
    x[1, 2] = float("nan")
    out = output(model, x)
    alone = output(model, x[[0, 2]])
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    if method != "random":  # random draws differ with the batch; every other method is per clip
        torch.testing.assert_close(out[[0, 2]], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS + SELECTION)
def test_inf_and_nan_audio_never_fail(method):
    model = tiny_ast()
    audio.patch(model, r=2, method=method, time_mode="adjacent", lengths=[128, 96, 50])
    x = spectrogram(batch=3)
    x[0, :20] = float("inf")
    x[2] = float("nan")
    out = output(model, x)
    assert out.shape == (3, 4) and not torch.isfinite(out[2]).any()


# ----------------------------------------------------------------------------------------------- any r
@pytest.mark.parametrize("r", [1, 3, 5, 6, 7])
@pytest.mark.parametrize("method", ["tome", "pitome", "tps"])
def test_any_r_shares_unevenly_and_keeps_frames_apart(r, method):
    model = tiny_video(VideoMAEModel)
    mmmerge.patch(model, r=r, method=method, time_mode="within_frame", trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    frame = torch.arange(64) // 16
    for b in range(2):
        groups = {}
        for i, g in enumerate(info.source[b].tolist()):
            groups.setdefault(g, set()).add(int(frame[i]))
        assert all(len(ts) == 1 for ts in groups.values())
        kept = torch.bincount(torch.tensor([next(iter(groups[g])) for g in range(info.size.shape[1])]), minlength=4)
        assert kept.sum() == 64 - 4 * r and kept.max() - kept.min() <= 1  # shares differ by one token at most
        # Output order: frames stay contiguous and in order.
        firsts = [next(iter(groups[g])) for g in range(info.size.shape[1])]
        assert firsts == sorted(firsts)


@pytest.mark.parametrize("r", [1, 2, 4, 5])
def test_any_r_under_the_band_rule(r):
    model = tiny_ast()
    audio.patch(model, r=r, time_mode="same_band", trace_source=True)
    output(model, spectrogram())
    info = mmmerge.last_info(model)
    band = torch.cat([torch.tensor([-1, -2]), torch.arange(24) // 8])
    for b in range(2):
        for g in range(info.size.shape[1]):
            assert len(set(band[info.source[b].cpu() == g].tolist())) == 1


# ------------------------------------------------------------------------------------------ feasibility
@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.35])
@pytest.mark.parametrize("method", METHODS + SELECTION)
def test_every_accepted_target_flops_patch_runs_video(fraction, method):
    for mode in VIDEO_MODES:
        model = tiny_video(VideoMAEModel)
        try:
            mmmerge.patch(model, r=TargetFlops(fraction), method=method, time_mode=mode, trace_source=True)
        except ValueError as err:  # refused at patch time, with the reason
            assert "out of reach" in str(err) or (method == "dominant" and "no per-group budgets" in str(err))
            continue
        out = output(model, clip())
        assert out.shape[1] == mmmerge.last_info(model).tokens_out


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.35])
@pytest.mark.parametrize("method", METHODS + SELECTION)
def test_every_accepted_target_flops_patch_runs_audio(fraction, method):
    for mode, extra in AUDIO_MODES:
        for lengths in (None, [128, 70]):
            model = tiny_ast()
            try:
                audio.patch(model, r=TargetFlops(fraction), method=method, time_mode=mode, lengths=lengths,
                            drop_padding=False, **extra)
            except ValueError as err:
                assert "out of reach" in str(err) or (method == "dominant" and "no per-group budgets" in str(err))
                continue
            assert output(model, spectrogram()).shape == (2, 4)


def test_infeasible_constraint_is_refused_at_patch_time_not_in_the_forward():
    model = tiny_video(VideoMAEModel)
    # adjacent: layer 0 can always remove (64 - 4 frames) / 2 = 30, layer 1 (35 tokens) only 16
    with pytest.raises(ValueError, match="layer 1: r=29 is infeasible.*largest constant r"):
        mmmerge.patch(model, r=29, time_mode="adjacent")
    assert untouched(model)
    with pytest.raises(ValueError, match="largest constant r"):
        mmmerge.patch(model, r=20, method="tps", time_mode="within_frame")
    assert untouched(model)


def test_a_whole_set_method_is_refused_per_group_budgets_at_patch_time():
    model = tiny_video(VideoMAEModel)
    for r in (4, TargetFlops(0.5)):
        with pytest.raises(ValueError, match="'dominant' selects over all tokens at once.*group_budget=False"):
            mmmerge.patch(model, r=r, method="dominant", time_mode="within_frame")
        assert untouched(model)
    mmmerge.patch(model, r=0, method="dominant", time_mode="within_frame")  # merging off: nothing to share
    mmmerge.patch(model, r=4, method="dominant", time_mode="within_frame", group_budget=False, trace_source=True)
    output(model, clip())
    frame = torch.arange(64) // 16
    for b in range(2):  # one budget, and still no token spans two frames
        for g in range(mmmerge.last_info(model).size.shape[1]):
            assert len(set(frame[mmmerge.last_info(model).source[b].cpu() == g].tolist())) == 1


@pytest.mark.parametrize("method", METHODS + ["divprune", "cdpruner"])
def test_a_forward_builds_no_tensor_from_host_data(method, monkeypatch):
    """Everything static is made at patch time (buffers): a forward never copies host lists to the device (on
    CUDA a synchronising copy, and illegal while capturing a CUDA graph)."""
    model = tiny_video(VideoMAEModel)
    mmmerge.patch(model, r=5, method=method, time_mode="within_frame")
    x = clip()
    torch.manual_seed(0)  # random's draws
    expected = output(model, x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called in a forward")

    monkeypatch.setattr(torch, "tensor", refuse)
    torch.manual_seed(0)
    torch.testing.assert_close(output(model, x), expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("method", METHODS + SELECTION)
def test_checkpointing_recompute_equals_the_forward(method):
    grads = []
    for checkpointing in (False, True):
        model = tiny_video(VivitForVideoClassification).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        options = {"generator": torch.Generator(device=DEVICE).manual_seed(3)} if method == "random" else {}
        mmmerge.patch(model, r=6, method=method, time_mode="adjacent", **options)
        calls = []
        model.vivit.layers[1].layernorm_before.register_forward_hook(lambda *a: calls.append(1))
        x = clip().requires_grad_()
        model(pixel_values=x).logits.sum().backward()
        grads.append((x.grad, model.vivit.layers[0].attention.k_proj.weight.grad))
        assert len(calls) == (2 if checkpointing else 1)  # the body really is recomputed in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------- last_info
def test_last_info_is_static_without_tracing_and_per_thread_with_it():
    model = tiny_video(VivitForVideoClassification)
    mmmerge.patch(model, r=6)
    info = mmmerge.last_info(model)  # before any forward: the schedule says it all
    assert info.tokens_per_layer == [65, 59, 53, 47, 41] and info.state is None
    mmmerge.patch(model, r=6, trace_source=True)
    output(model, clip(batch=3))
    seen = {}
    worker = threading.Thread(target=lambda: seen.setdefault("info", mmmerge.last_info(model)))
    worker.start()
    worker.join()
    assert mmmerge.last_info(model).source.shape == (3, 65)
    assert seen["info"].state is None  # another thread has not run this model


def test_output_order_keeps_representatives_in_order():
    model = tiny_video(VivitForVideoClassification)
    mmmerge.patch(model, r=10, method="tome", trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    for b in range(2):
        assert info.source[b, 0] == 0 and has_increasing_representatives(info.source[b].cpu(), 25)


# --------------------------------------------------------------------------------------------- op counts
def _ops(model: torch.nn.Module, x: torch.Tensor) -> int:
    return sum(mmmerge.count_ops(model, pixel_values=x).values())


@pytest.mark.parametrize("method, mode, budget", [("tome", "global", 45), ("tome", "within_frame", 60),
                                                  ("pitome", "global", 67), ("tps", "global", 67),
                                                  ("pitome", "within_frame", 90), ("tps", "within_frame", 90)])
def test_dispatched_ops_per_merging_layer_stay_within_budget(method, mode, budget):
    model = tiny_video(VideoMAEModel, layers=4)
    x = clip(batch=1)
    base = _ops(model, x)
    mmmerge.patch(model, r=[4, 4, 4, 4], method=method, time_mode=mode)
    extra = (_ops(model, x) - base) / 4
    assert extra <= budget, f"{method}/{mode}: {extra} extra ops per merging layer"
