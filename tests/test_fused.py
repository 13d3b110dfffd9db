"""The fused ToMe step (``mmmerge.fused``): where it applies, that it equals the engine path, its op registrations,
its gradients, and its Triton kernels (run by Triton's interpreter on the CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import VideoMAEModel, VivitModel

import mmmerge
from mmmerge.adapters import audio
from mmmerge.fused import FUSED_ENV, merge_reference, plan_reference, row_tables
from helpers import DEVICE, clip, tiny_ast, tiny_video

ROOT = Path(__file__).resolve().parents[1]


def _fused_layers(model) -> list:
    return [layer._mmmerge.fused is not None for layer in model.modules() if hasattr(layer, "_mmmerge")]


def _run(model, x, monkeypatch, fused: bool, **patch):
    monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
    mmmerge.patch(model, **patch)
    assert any(_fused_layers(model)) == fused
    with torch.no_grad():
        out = model(x).last_hidden_state if not isinstance(x, dict) else model(**x).logits
    state = mmmerge.last_info(model).state
    mmmerge.unpatch(model)
    return out, state


@pytest.mark.parametrize("cls,method,mode,options", [
    (VideoMAEModel, "tome", "global", {}), (VideoMAEModel, "tome", "within_frame", {}),
    (VivitModel, "tome", "global", {"parity": "official"}), (VivitModel, "tome", "within_frame", {}),
    (VideoMAEModel, "pitome", "global", {}), (VideoMAEModel, "pitome", "within_frame", {"preset": "official"}),
    (VivitModel, "pitome", "global", {"margin": 0.5, "alpha": 0.5}), (VivitModel, "pitome", "within_frame", {}),
    (VideoMAEModel, "tps", "global", {}), (VideoMAEModel, "tps", "within_frame", {"temperature": 0.5}),
    (VivitModel, "tps", "global", {"preset": "official", "temperature": 0.5}), (VivitModel, "tps", "within_frame", {})])
def test_the_fused_step_equals_the_engine_path(cls, method, mode, options, monkeypatch):
    model, x = tiny_video(cls), clip()
    patch = dict(r=6, method=method, time_mode=mode, trace_source=True, **options)
    engine, engine_state = _run(model, x, monkeypatch, False, **patch)
    fused, fused_state = _run(model, x, monkeypatch, True, **patch)
    assert fused.shape == engine.shape
    torch.testing.assert_close(fused, engine, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_state.source, engine_state.source)
    assert torch.equal(fused_state.size, engine_state.size)


def test_audio_without_padding_takes_the_fused_step_and_padding_the_engine_path(monkeypatch):
    model = tiny_ast()
    monkeypatch.setenv(FUSED_ENV, "1")
    audio.patch(model, r=4, method="tome")
    assert all(_fused_layers(model)[:1]) and any(_fused_layers(model))
    audio.patch(model, r=4, method="tome", lengths=[128, 96], drop_padding=False)
    assert not any(_fused_layers(model))


@pytest.mark.parametrize("patch", [dict(method="prune"), dict(method="random"), dict(method="tome", time_mode="adjacent"),
                                   dict(method="pitome", time_mode="adjacent"), dict(method="tps", time_mode="adjacent")])
def test_other_methods_and_coordinate_rules_take_the_engine_path(patch, monkeypatch):
    model = tiny_video(VideoMAEModel)
    monkeypatch.setenv(FUSED_ENV, "1")
    mmmerge.patch(model, r=4, **patch)
    assert not any(_fused_layers(model))


def test_a_bad_switch_value_is_refused_at_patch_time(monkeypatch):
    model = tiny_video(VideoMAEModel)
    monkeypatch.setenv(FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="MMMERGE_FUSED must be '0'"):
        mmmerge.patch(model, r=4)
    assert not hasattr(model, "_mmmerge_patch")


@pytest.mark.parametrize("method", ["tome", "pitome", "tps"])
def test_gradients_equal_the_engine_path(method, monkeypatch):
    model = tiny_video(VideoMAEModel).double()
    x = clip().double()

    def grad(fused: bool) -> torch.Tensor:
        monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
        mmmerge.patch(model, r=6, method=method)
        pixels = x.clone().requires_grad_(True)
        (model(pixels).last_hidden_state ** 2).sum().backward()
        mmmerge.unpatch(model)
        return pixels.grad

    torch.testing.assert_close(grad(True), grad(False), rtol=1e-9, atol=1e-9)


def _plan_inputs(B=2, N=21, D=8, P=1):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(B, N, D, generator=gen)
    ids = torch.zeros(N - P, dtype=torch.int32)
    sel = torch.arange(6, dtype=torch.int32)
    return metric, ids, sel, P


def test_the_ops_registrations_pass_opcheck():
    metric, ids, sel, P = _plan_inputs()
    torch.library.opcheck(torch.ops.mmmerge.bipartite_plan, (metric, ids, sel, P, 0))
    torch.library.opcheck(torch.ops.mmmerge.pitome_plan, (metric, ids, torch.arange(12, dtype=torch.int32), P, 0.6,
                                                          1.0, False))
    kept, members, lo, hi, assign = plan_reference(metric, ids, sel, P, 0)
    x = torch.randn(2, 21, 5, dtype=torch.double, requires_grad=True)
    size = torch.randint(1, 4, (2, 21)).double()
    torch.library.opcheck(torch.ops.mmmerge.tps_plan, (metric, size.float(), ids, sel, P, 1.0, 0.5, 0.0))
    torch.library.opcheck(torch.ops.mmmerge.tps_plan, (metric, size.float(), ids, sel, P, 1.0, 0.5, 0.0,
                                                       torch.randn(2, 21)))
    torch.library.opcheck(torch.ops.mmmerge.merge_slots, (x, size, size, kept, members, lo, hi, assign))
    weight = size * torch.rand(2, 21, dtype=torch.double)
    torch.library.opcheck(torch.ops.mmmerge.merge_slots, (x, size, weight, kept, members, lo, hi, assign))
    out, new_size = merge_reference(x, size, size, kept, members, assign)
    assert torch.allclose(new_size.sum(1), size.sum(1))
    assert out.shape == (2, 15, 5)


def _padded_rows(method, N=24, lengths=(24, 17, 11), quota=(5, 2, 1), r=5):
    """A padded batch of rows of their own lengths (real tokens first) and each row's real removals of r = 5:
    feasible for PiToMe (2 quota real and 2 (r - quota) padding candidates) and TPS (quota real tokens and
    r - quota padding ones removed, a host of each tier left). Returns ``(valid, quota, r, ids, sel)``."""
    valid = torch.arange(N).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return (valid, torch.tensor(quota), r, *row_tables(method, lengths, quota, N, r))


def test_the_plan_ops_take_per_row_tables_under_opcheck():
    metric, size = torch.randn(3, 24, 8), torch.randint(1, 4, (3, 24)).float()
    ids, sel = _padded_rows("pitome")[3:]
    torch.library.opcheck(torch.ops.mmmerge.pitome_plan, (metric, ids, sel, 0, 0.6, 1.0, False))
    ids, sel = _padded_rows("tps")[3:]
    torch.library.opcheck(torch.ops.mmmerge.tps_plan, (metric, size, ids, sel, 0, 1.0, 0.5, 0.0))
    torch.library.opcheck(torch.ops.mmmerge.tps_plan, (metric, size, ids, sel, 0, 0.0, 0.5, 1.0, torch.randn(3, 24)))


@pytest.mark.parametrize("method,options,scored", [
    ("pitome", {"preset": "paper"}, False), ("pitome", {"preset": "official"}, False),
    *[("tps", {"preset": preset, "temperature": t}, scored)
      for preset in ("paper", "official") for t in (1.0, 0.5) for scored in (False, True)]])
def test_per_row_tables_give_the_engines_quota_plan(method, options, scored):
    """PiToMe's and TPS's plan ops with per-row tables (tier 0 real, 1 padding) choose what the engine's matchers
    choose with ``quota=``: the same slots for every token, the same merged tokens, sizes and sources."""
    from dataclasses import replace

    from mmmerge.fused import _apply, fused_choice

    gen = torch.Generator().manual_seed(1)
    valid, quota, r, ids, sel = _padded_rows(method)
    B, N = valid.shape
    metric, x = torch.randn(B, N, 6, generator=gen), torch.randn(B, N, 5, generator=gen)
    state = replace(mmmerge.init_state(B, N, valid=valid), size=torch.randint(1, 4, (B, N), generator=gen).float())
    if method == "pitome":  # a margin most random pairs fall on both sides of (the paper's + margin term counts)
        options = {**options, "margin": 0.4}
    extra = {"score": torch.randn(B, N, generator=gen)} if scored else {}
    plan = getattr(mmmerge, method)(metric, state, r, quota=quota, **options, **extra)
    want, want_state = mmmerge.merge_tokens(x, state, plan)
    choose = fused_choice(method, options, 0, N, 1, True, False, False, 0, 1)  # the options as a layer binds them
    fused_plan = choose(metric, state.size, ids, sel, 0, **extra)
    assert torch.equal(fused_plan[4], plan.assign)
    got, got_state = _apply(x, state, fused_plan)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_state.source, want_state.source) and torch.equal(got_state.size, want_state.size)
    assert torch.equal(got_state.valid, want_state.valid)


def test_the_plan_keeps_survivors_in_order_and_lists_each_slots_members():
    metric, ids, sel, P = _plan_inputs()
    kept, members, lo, hi, assign = plan_reference(metric, ids, sel, P, 0)
    assert torch.equal(kept[:, :P], torch.arange(P).expand(2, P))  # protected tokens first, in place
    assert (kept.diff(dim=1) > 0).all()
    for b in range(2):
        for k in range(kept.shape[1]):
            expected = sorted(set((assign[b] == k).nonzero().flatten().tolist()) - {kept[b, k].item()})
            assert members[b, lo[b, k]:hi[b, k]].tolist() == expected


def _interpreted(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MMMERGE_TRITON_ON_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)


def _needs_triton() -> None:
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA the kernels run for real (the other tests); the interpreter is for the CPU")
    pytest.importorskip("triton", reason="Triton is not installed (the fused step then runs its PyTorch reference)")


def test_the_kernels_match_their_references_in_the_triton_interpreter():
    _needs_triton()
    result = _interpreted("import sys; from mmmerge.kernel_check import main; sys.exit(main())")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 mismatches" in result.stdout


def test_a_model_through_the_kernels_equals_its_engine_path():
    _needs_triton()
    result = _interpreted("""
        import os, torch, mmmerge
        from transformers import VideoMAEModel
        from helpers import clip, tiny_video
        model, x = tiny_video(VideoMAEModel), clip()
        outs = []
        for fused in ("0", "1"):
            os.environ["MMMERGE_FUSED"] = fused
            mmmerge.patch(model, r=6, time_mode="within_frame")  # ToMe
            with torch.no_grad():
                outs.append(model(x).last_hidden_state)
            mmmerge.patch(model, r=6, method="pitome")
            with torch.no_grad():
                outs.append(model(x).last_hidden_state)
            mmmerge.patch(model, r=6, method="tps", temperature=0.5)
            with torch.no_grad():
                outs.append(model(x).last_hidden_state)
        for fused, engine in zip(outs[3:], outs[:3]):
            torch.testing.assert_close(fused, engine, rtol=1e-5, atol=1e-5)
        print("same")
    """)
    assert result.returncode == 0 and "same" in result.stdout, result.stdout + result.stderr


def test_a_failing_kernel_warns_once_and_falls_back_to_the_reference(monkeypatch):
    import mmmerge.fused as fused

    class Broken:
        def bipartite_plan(self, *args):
            raise RuntimeError("no such GPU")

    monkeypatch.setenv("MMMERGE_TRITON_ON_CPU", "1")
    monkeypatch.setattr(fused, "_triton", lambda module="triton_kernels": Broken())
    monkeypatch.setattr(fused, "_FAILED", {})
    metric, ids, sel, P = _plan_inputs()
    with pytest.warns(RuntimeWarning, match="bipartite_plan failed .*no such GPU"):
        got = torch.ops.mmmerge.bipartite_plan(metric, ids, sel, P, 0)
    for a, b in zip(got, plan_reference(metric, ids, sel, P, 0)):
        assert torch.equal(a, b)
    assert "bipartite_plan" in fused._FAILED


def test_layers_over_the_kernels_size_take_the_engine_path(monkeypatch):
    import mmmerge.fused as fused

    model = tiny_video(VideoMAEModel)  # 64 tokens, 6 fewer per layer
    monkeypatch.setattr(fused, "MAX_TOKENS", 60)
    mmmerge.patch(model, r=6)
    assert _fused_layers(model) == [False, True, True, True]


@pytest.mark.parametrize("method,options", [("tome", {}), ("pitome", {"margin": 0.5}), ("tps", {}),
                                            ("tps", {"score": "given", "temperature": 0.5})])
def test_reduce_tokens_in_fused_steps_equals_the_engine_rounds(method, options):
    """``reduce_tokens`` takes the fused steps (several rounds for the bipartite methods); the engine's own rounds
    (matcher + merge_tokens) give the same tokens, sizes and source map."""
    from mmmerge.methods import get_matcher
    from mmmerge.reduce import reduction_steps

    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 40, 6, generator=gen), torch.randn(2, 40, 4, generator=gen)
    if options.get("score") == "given":
        options = {**options, "score": torch.randn(2, 40, generator=gen)}
    y, state = mmmerge.reduce_tokens(x, 9, method, metric=metric, protected=1, **options)
    want, want_state, m = x, mmmerge.init_state(2, 40, protected=1), metric
    for r in reduction_steps(method, 40, 9, 1):
        plan = get_matcher(method)(m, want_state, r, None, None, **options)
        m = mmmerge.merge_weighted(m, plan)
        want, want_state = mmmerge.merge_tokens(want, want_state, plan)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(state.source, want_state.source) and torch.allclose(state.size, want_state.size)


@pytest.mark.parametrize("method,options,rows", [
    ("tome", {}, False), ("pitome", {}, False), ("tps", {"score": True}, False),
    ("tome", {}, True), ("pitome", {}, True), ("tps", {}, True), ("tps", {"score": True}, True),
    ("dominant", {"score": True}, False), ("dominant", {"score": True}, True)])
def test_reduce_tokens_takes_the_fused_steps_where_they_apply(method, options, rows, monkeypatch):
    """Plain reductions, TPS and dominant with a given score, and ToMe, PiToMe, TPS and dominant over rows with
    budgets of their own dispatch the fused plan op; with MMMERGE_FUSED=0 they do not."""
    x = torch.randn(3, 40, 8)
    if rows:
        budgets = mmmerge.plan_rows(method, [40, 31, 20], [10, 8, 5])
        x = torch.randn(3, budgets.width, 8)
        if options.get("score"):
            options = {"score": torch.randn(3, budgets.width)}
        call = lambda: mmmerge.reduce_tokens(x, budgets.out, method, rows=budgets, **options)  # noqa: E731
    else:
        if options.get("score"):
            options = {"score": torch.randn(3, 40)}
        call = lambda: mmmerge.reduce_tokens(x, 12, method, **options)  # noqa: E731
    assert any(f"{method}_plan" in str(op) or "bipartite_plan" in str(op) for op in mmmerge.count_ops(call))
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not any("mmmerge." in str(op) for op in mmmerge.count_ops(call))
