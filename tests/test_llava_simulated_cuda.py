"""LLaVA in the simulated-CUDA tier (``simulated_cuda.py``): every model kind built "on CUDA" on a CPU-only machine.

Models: LLaVA-1.5; LLaVA-NeXT with several images of different sizes in one prompt; LLaVA-NeXT-Video;
LLaVA-OneVision with images (one and several per prompt) and a video. Each is moved to "cuda" inside the fake mode
and then patched and called with the default device left at the CPU, as on a GPU machine.

Two levels, because the unpatched models themselves read the device:
- ``get_image_features`` / ``get_video_features`` (where the reduction runs): the unpatched call makes no host read,
  so the reduced one runs under ``SimulatedCuda`` as is: any host read, data-dependent shape, device mismatch or
  CUDA kernel gap raises.
- ``forward`` and ``generate``: the unpatched LLaVA forward reads its placeholder total on the host (transformers'
  ``torch_compilable_check``, one bool per prefill) and ``generate`` reads whether every row has finished. These
  run under ``HostReadCounter``: a bool read on a device tensor is recorded and answered ``True`` (checks pass;
  ``generate`` stops after its first token, so the prefill with the reduction and one sampled token run), any other
  read still raises. The reduced model must record exactly the reads of the unpatched one: the same answers give
  the same control flow, so an extra read anywhere in the reduction shows up as a longer list. Device mismatches
  raise at any level.
Image sizes and ``batch_num_images`` stay host tensors, as the processor makes them: the unpatched models loop
over them in Python (a host read per image were they on the device).
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextVideoConfig,
                          LlavaNextVideoForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration)

from mmmerge.adapters import llava
from simulated_cuda import SimulatedCuda, simulated_cuda
from test_llava import FRAMES, IMAGE, N, PAD, SIZE, VIDEO, text_config, vision_config
from test_llava_next import PINPOINTS, SQUARE, TALL, WIDE, next_processor, picture
from test_llava_onevision import clips, onevision_processor, siglip_config

CUDA = torch.device("cuda")


class HostReadCounter(SimulatedCuda):
    """``SimulatedCuda`` that records bool host reads of device tensors (answering ``True``) instead of raising;
    every other host read still raises (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor) \
                and args[0].dtype == torch.bool:
            self.reads.append(str(func))
            return True
        return super().__torch_dispatch__(func, types, args, kwargs)


def build(kind: str) -> torch.nn.Module:
    """A tiny model of ``kind`` with fake CUDA weights (call inside a simulated mode): built on the host, then
    moved, since SigLIP's initialisation (``trunc_normal_``) reads a bool of its own tensors."""
    torch.manual_seed(0)
    configs = {
        "llava": lambda: (LlavaForConditionalGeneration, LlavaConfig(
            vision_config=vision_config(), text_config=text_config(), image_token_id=IMAGE, vision_feature_layer=-2)),
        "next": lambda: (LlavaNextForConditionalGeneration, LlavaNextConfig(
            vision_config=vision_config(), text_config=text_config(), image_token_id=IMAGE,
            image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)),
        "next_video": lambda: (LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig(
            vision_config=vision_config(), text_config=text_config(), image_token_id=VIDEO - 1, video_token_id=VIDEO,
            vision_feature_layer=-2, spatial_pool_stride=2, image_grid_pinpoints=[[SIZE, SIZE]])),
        "onevision": lambda: (LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig(
            vision_config=siglip_config(), text_config=text_config(), image_token_id=IMAGE, video_token_id=VIDEO,
            image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9")),
    }
    cls, config = configs[kind]()
    with torch.device("cpu"):
        model = cls(config).eval()  # real host weights (the mode keeps host work real) ...
    return model.to(CUDA)  # ... made fake CUDA tensors


def on_cuda(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """Processor outputs on the (fake) GPU, except the host bookkeeping the models read in Python."""
    host = ("image_sizes", "batch_num_images")
    return {k: v if k in host or not isinstance(v, torch.Tensor) else v.to(CUDA) for k, v in inputs.items()}


def host_inputs(kind: str, proc: Any, keep: int) -> Dict[str, Any]:
    """Host inputs of one call of ``kind`` (from the patched processor where there is one)."""
    g = torch.Generator().manual_seed(1)
    if kind == "llava":  # two images in one prompt, one in the other, left padded
        ids = torch.tensor([[1, 5] + [IMAGE] * keep + [6] + [IMAGE] * keep + [7],
                            [PAD] * (keep + 1) + [1] + [IMAGE] * keep + [8, 9]])
        return dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=torch.randn(3, 3, SIZE, SIZE,
                                                                                                generator=g))
    if kind == "next":  # three sizes (three layouts), two in one prompt
        return dict(proc(images=[picture(WIDE), picture(TALL, 1), picture(SQUARE, 2)],
                         text=["w5 <image> w6 <image>", "w7 <image> w8"], return_tensors="pt", padding=True))
    if kind == "next_video":
        ids = torch.tensor([[3, 4] + [VIDEO] * keep + [5]] * 2)
        return dict(input_ids=ids, pixel_values_videos=torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=g))
    if kind == "onevision_images":  # one image (cropped) in a prompt, two (uncropped) in the other
        return dict(proc(images=[[picture(WIDE)], [picture(TALL, 1), picture(SQUARE, 2)]],
                         text=["w5 <image> w6", "w7 <image> w9 <image> w4"], return_tensors="pt", padding=True))
    return dict(proc(images=[picture(WIDE)], videos=clips(1), text=["w5 <image> w6 <video> w1"],
                     return_tensors="pt"))


CASES = {  # name: (model kind, processor, keep, options)
    "llava-tome": ("llava", None, 16, {}),
    "llava-dominant-pre_projector": ("llava", None, 16, dict(method="dominant", where="pre_projector")),
    "llava-cdpruner": ("llava", None, 16, dict(method="cdpruner")),
    "next-tome": ("next", next_processor, 0.25, {}),
    "next-tps": ("next", next_processor, 0.25, dict(method="tps")),
    "next-cdpruner": ("next", next_processor, 0.25, dict(method="cdpruner")),
    # the other methods' per-row budgets (one padded batch of image parts with their own keeps)
    **{f"next-{m}": ("next", next_processor, 0.25, dict(method=m))
       for m in ("pitome", "prune", "random", "dominant", "divprune")},
    "next_video-adjacent": ("next_video", None, 16, dict(time_mode="adjacent")),
    "next_video-within_frame-dominant": ("next_video", None, 16, dict(method="dominant", time_mode="within_frame")),
    "onevision_images-tome": ("onevision_images", onevision_processor, 0.25, {}),
    "onevision_images-dominant": ("onevision_images", onevision_processor, 0.25, dict(method="dominant")),
    "onevision_mixed-tome": ("onevision_mixed", onevision_processor, 0.25, dict(time_mode="adjacent")),
    "onevision_mixed-cdpruner": ("onevision_mixed", onevision_processor, 0.25, dict(method="cdpruner")),
}
MODEL_OF = {"llava": "llava", "next": "next", "next_video": "next_video", "onevision_images": "onevision",
            "onevision_mixed": "onevision"}


def _setup(case: str):
    kind, make_proc, keep, options = CASES[case]
    proc = make_proc() if make_proc is not None else None
    return kind, proc, keep, options


@pytest.mark.parametrize("case", list(CASES))
def test_feature_reductions_make_no_host_read_and_stay_on_the_device(case):
    kind, proc, keep, options = _setup(case)
    with simulated_cuda():
        model = build(MODEL_OF[kind])
        llava.reduce_visual_tokens(model, keep=keep, processor=proc, **options)
        inputs = on_cuda(host_inputs(kind, proc, keep))
        lm = model.model
        with torch.no_grad():
            if "pixel_values" in inputs:
                extra = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
                out = lm.get_image_features(inputs["pixel_values"], **extra).pooler_output
                assert all(t.device.type == "cuda" for t in out)
                if kind in ("next", "onevision_images"):  # image parts of several sizes: one padded batch
                    assert all(p.budgets is not None for p in lm._mmmerge_llava.plans.values())
            if "pixel_values_videos" in inputs:
                out = lm.get_video_features(inputs["pixel_values_videos"]).pooler_output
                assert all(t.device.type == "cuda" for t in (out if isinstance(out, (list, tuple)) else [out]))


def _reads(mode: HostReadCounter, fn) -> List[str]:
    mode.reads.clear()
    with torch.no_grad():
        fn()
    return list(mode.reads)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_generate_read_the_host_exactly_as_the_unpatched_model(case):
    kind, proc, keep, options = _setup(case)
    full_proc = _setup(case)[1]  # an unpatched processor: the full counts, for the unpatched model
    with HostReadCounter() as mode:
        model = build(MODEL_OF[kind])
        full = on_cuda(host_inputs(kind, full_proc, N if kind == "llava" else 64))
        plain = [_reads(mode, lambda: model(**full)),
                 _reads(mode, lambda: model.generate(**full, max_new_tokens=2, do_sample=False, pad_token_id=PAD))]
        llava.reduce_visual_tokens(model, keep=keep, processor=proc, **options)
        short = on_cuda(host_inputs(kind, proc, keep))
        out = []
        reduced = [_reads(mode, lambda: out.append(model(**short))),
                   _reads(mode, lambda: model.generate(**short, max_new_tokens=2, do_sample=False, pad_token_id=PAD))]
    assert plain[0] and reduced == plain  # the model's own check, nothing more
    assert out[0].logits.device.type == "cuda" and out[0].logits.shape[1] == short["input_ids"].shape[1]
