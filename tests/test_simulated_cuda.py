"""GPU paths checked without a GPU: every video and audio model x method x time mode runs "on CUDA" in the
simulated-CUDA tier (``simulated_cuda.py``), with and without audio padding; accelerate-hooked models are
merged; deterministic algorithms and CUDA-graph compilation run."""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from torch._subclasses.fake_tensor import DataDependentOutputException
from transformers import VideoMAEModel, VivitForVideoClassification

import mmmerge
from mmmerge import TargetFlops
from mmmerge.adapters import audio
from helpers import AST_FRAMES, AST_MELS, clip, output, spectrogram, tiny_ast, tiny_video
from simulated_cuda import CudaKernelGap, simulated_cuda

METHODS = ["tome", "pitome", "tps", "random", "prune", "dominant", "divprune", "cdpruner"]
VIDEO_MODES = ["global", "within_frame", "adjacent", "window(2)"]
AUDIO_MODES = ["global", "same_band", "adjacent", "window(4)"]


def _video_forward(cls, **patch) -> torch.Tensor:
    with simulated_cuda():
        with torch.device("cuda"):
            model = tiny_video(cls, device="cuda")
        mmmerge.patch(model, **patch)
        out = output(model, torch.randn(2, 8, 3, 32, 32, device="cuda"))
    return out


@pytest.mark.parametrize("mode", VIDEO_MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls", [VideoMAEModel, VivitForVideoClassification], ids=["videomae", "vivit"])
def test_video_runs_on_simulated_cuda(cls, method, mode):
    per_frame = mode not in ("global", "adjacent")
    out = _video_forward(cls, r=TargetFlops(0.5), method=method, time_mode=mode,
                         group_budget=not (per_frame and method == "dominant"), trace_source=True)
    assert out.device.type == "cuda"


@pytest.mark.parametrize("drop_padding", [False, True])
@pytest.mark.parametrize("mode", AUDIO_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_audio_with_and_without_padding_runs_on_simulated_cuda(method, mode, drop_padding):
    for lengths in (None, [AST_FRAMES, 70]):
        with simulated_cuda():
            with torch.device("cuda"):
                model = tiny_ast(device="cuda")
            audio.patch(model, r=2, method=method, time_mode=mode, lengths=lengths, drop_padding=drop_padding,
                        group_budget=method != "dominant", trace_source=True)
            out = output(model, torch.randn(2, AST_FRAMES, AST_MELS, device="cuda"))
        assert out.device.type == "cuda"


def test_the_tier_catches_kernel_gaps_host_reads_and_host_built_tensors():
    with simulated_cuda():
        flags = torch.zeros(4, dtype=torch.bool, device="cuda")
        index = torch.tensor([0, 1, 1, 3], device="cuda")
        with pytest.raises(CudaKernelGap):
            flags.scatter_reduce(0, index, flags, "amax")
        with pytest.raises(DataDependentOutputException):
            index.sum().item()
        with pytest.raises(Exception, match="same device"):
            index + torch.arange(4)


def test_a_host_built_tensor_in_the_merge_fails_the_tier(monkeypatch):
    """The tier fails a forward that builds a tensor on the host (here: the engine plan's slot list, which a
    coordinate rule takes; the fused steps are traced through their fake implementations)."""
    import mmmerge.merge as merge

    monkeypatch.setattr(merge, "_slots", lambda batch, count, device: torch.arange(count).repeat(batch, 1))
    with pytest.raises(Exception, match="same device"):
        _video_forward(VideoMAEModel, r=4, method="tome", time_mode="adjacent")


# ------------------------------------------------------------------------------- accelerate's device hooks
def _hook_layers(layers) -> None:
    for layer in layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))


@pytest.mark.parametrize("before", [True, False], ids=["hooks-then-patch", "patch-then-hooks"])
def test_an_accelerate_hooked_model_is_merged(before):
    model = tiny_video(VideoMAEModel)
    x = clip()
    reference = output(model, x)
    mmmerge.patch(model, r=4)
    merged = output(model, x)
    mmmerge.unpatch(model)
    if before:
        _hook_layers(model.encoder.layer)
    mmmerge.patch(model, r=4)
    if not before:
        _hook_layers(model.encoder.layer)
    assert torch.equal(output(model, x), merged)  # merged, through the hooks
    twin = copy.deepcopy(model)
    assert torch.equal(output(twin, x), merged)
    mmmerge.unpatch(model)
    assert torch.equal(output(model, x), reference)


def test_a_hook_inside_an_encoder_layer_is_refused_at_patch_time():
    model = tiny_video(VideoMAEModel)
    add_hook_to_module(model.encoder.layer[1].attention.attention, AlignDevicesHook(execution_device="cpu"))
    with pytest.raises(ValueError, match="accelerate hook"):
        mmmerge.patch(model, r=4)
    assert all(type(layer).__name__ == "VideoMAELayer" for layer in model.encoder.layer)  # atomic


# ------------------------------------------------------------------------------ determinism, CUDA graphs
@pytest.mark.parametrize("method", ["tome", "pitome", "tps", "divprune"])
def test_a_deterministic_algorithms_forward_runs(method):
    model = tiny_ast()
    audio.patch(model, r=3, method=method, time_mode="adjacent", lengths=[128, 80], drop_padding=False,
                trace_source=True)
    x = spectrogram()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = output(model, x), output(model, x)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)


def test_reduce_overhead_compile_matches_eager():
    """``mode="reduce-overhead"`` captures CUDA graphs on a GPU; on the CPU torch compiles the same graph
    without them, which is what this checks (fullgraph: no break, shapes static)."""
    model = tiny_video(VideoMAEModel, layers=2)
    mmmerge.patch(model, r=[6, 6], method="tome", time_mode="within_frame")
    x = clip()
    eager = output(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(output(compiled, x), eager, rtol=1e-4, atol=1e-5)
