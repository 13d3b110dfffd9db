"""Qwen-VL adapter in the simulated-CUDA tier (``simulated_cuda``): the model is built "on CUDA" under torch's
FakeTensorMode, reduced, and called with inputs on "cuda". A host-built tensor meeting a CUDA one raises a
device mismatch, a host read (``.item()``, ``.tolist()``, ``bool``) raises ``DataDependentOutputException``.

The Qwen towers read ``image_grid_thw`` on the host themselves (positions, window indices, cu_seqlens), so the
tower is replaced here by a stand-in that returns CUDA features of the shapes the tower makes; everything
the adapter adds after it (the reduction, the deepstack features, the cells, cdpruner's query) runs in the
simulated tier. For a forward, the positions read the prompt's ids, types and mask on the host, as the model's
own ``get_rope_index`` does: the test hands that one read the real host tensors (``host_copy``), and turns off
transformers' own count checks (``TRANSFORMERS_DISABLE_TORCH_CHECK``, a host read of the model itself).
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmmerge.adapters import qwen_vl
from mmmerge.adapters.qwen_vl import positions

from simulated_cuda import simulated_cuda
from test_qwen_vl import IMAGE_GRIDS, KINDS, MERGE, MIXED, VIDEO_GRIDS, batch, compact, tiny

CUDA = torch.device("cuda")


class FakeTower:
    """Stand-in for the model's own ``get_image_features`` / ``get_video_features``: per item ``[F_i, C]``
    CUDA features (and per-layer deepstack features for Qwen3-VL), from a grid on the host."""

    def __init__(self, width, deepstack):
        self.width, self.deepstack = width, deepstack

    def __call__(self, pixels, grid, **kwargs):
        assert pixels.device.type == "cuda"
        sizes = [t * (h // MERGE) * (w // MERGE) for t, h, w in grid.tolist()]
        out = BaseModelOutputWithPooling(pooler_output=tuple(torch.randn(n, self.width, device=CUDA) for n in sizes))
        if self.deepstack:
            out.deepstack_features = [tuple(torch.randn(n, self.width, device=CUDA) for n in sizes)]
        return out


def reduced_on_cuda(kind, **options):
    with torch.device("cuda"):
        model = tiny(kind, device="cuda")
    fake = FakeTower(model.config.text_config.hidden_size, kind == "qwen3_vl")
    model.model.get_image_features = fake  # the class's method stays; the patch wraps this one
    model.model.get_video_features = fake
    qwen_vl.reduce_visual_tokens(model, **options)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, mode", [("tome", None), ("pitome", None), ("tps", None), ("prune", None),
                                          ("dominant", None), ("divprune", None), ("cdpruner", None),
                                          ("random", None), ("tome", "within_frame"), ("tps", "adjacent"),
                                          ("divprune", "window(2)")])
def test_reduction_makes_no_host_read_and_no_host_tensor(kind, method, mode):
    if kind == "qwen3_vl" and mode not in (None, "within_frame"):
        pytest.skip("Qwen3-VL takes within_frame only")
    with simulated_cuda():
        model = reduced_on_cuda(kind, keep=0.5, method=method, time_mode=mode)
        grids = torch.tensor(IMAGE_GRIDS)  # on the host, as the processor returns it
        out = model.model.get_image_features(torch.zeros(1, device=CUDA), grids)
        assert [tuple(o.shape) for o in out.pooler_output] == [(3, 32), (4, 32), (2, 32)]
        assert out.mmmerge_kept.device.type == "cuda"
        video = model.model.get_video_features(torch.zeros(1, device=CUDA), torch.tensor(VIDEO_GRIDS))
        assert video.pooler_output[0].shape == (8, 32) and video.pooler_output[0].device.type == "cuda"
        if kind == "qwen3_vl":
            assert video.deepstack_features[0][0].shape == (8, 32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["tome", "cdpruner"])
def test_forward_has_no_device_mismatch(kind, method, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    host = {}
    monkeypatch.setattr(positions, "host_copy", lambda t: host[id(t)])
    with simulated_cuda():
        model = reduced_on_cuda(kind, keep=0.5, method=method)
        inputs = compact(model, batch(kind, MIXED))
        on_cuda = {}
        for name, value in inputs.items():
            if name.endswith("grid_thw"):
                on_cuda[name] = value  # on the host: the stand-in tower and the positions read it there
            else:
                on_cuda[name] = value.to(CUDA)
                host[id(on_cuda[name])] = value
        try:
            with torch.no_grad():
                out = model(**on_cuda)
        except (DataDependentOutputException, DynamicOutputShapeException) as err:
            # Qwen3-VL's own forward gathers its deepstack rows with boolean masks (a sync of its own): the op
            # must come from the model's code, after the adapter's work (features, positions) ran.
            frames = [f for f in traceback.extract_tb(err.__traceback__)
                      if "/torch/" not in f.filename and "simulated_cuda" not in f.filename]
            assert kind == "qwen3_vl" and "transformers/models/qwen3_vl" in frames[-1].filename, frames[-1]
            return
        assert out.logits.device.type == "cuda" and out.logits.shape[:2] == inputs["input_ids"].shape
