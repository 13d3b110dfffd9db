"""Shared helpers for the tests: tiny random models built from configs (no network) and patch checks."""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn
from transformers import (ASTConfig, ASTForAudioClassification, VideoMAEConfig, VideoMAEForVideoClassification,
                          VideoMAEModel, VivitConfig, VivitForVideoClassification, VivitModel)

from mmmerge.adapters.encoder import MergingLayer

FRAMES, SIZE, PATCH, TUBELET = 8, 32, 8, 2  # 4 tubelets x 4 x 4 = 64 tokens (+ CLS for ViViT)
VIDEO_CLASSES = [VivitForVideoClassification, VivitModel, VideoMAEForVideoClassification, VideoMAEModel]
# AST: 128 frames x 32 mel bins, 16 x 16 patches with stride 8 (mel) and 16 (time): 3 bands x 8 columns
AST_FRAMES, AST_MELS, AST_BANDS, AST_COLUMNS = 128, 32, 3, 8
DEVICE = torch.device(os.environ.get("MMMERGE_TEST_DEVICE", "cpu"))


def tiny_video(cls, attn: str = "sdpa", layers: int = 4, seed: int = 0, hidden: int = 32,
               device: torch.device = DEVICE) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(image_size=SIZE, num_frames=FRAMES, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, intermediate_size=2 * hidden, num_labels=5)
    if cls.__name__.startswith("Vivit"):
        config = VivitConfig(tubelet_size=[TUBELET, PATCH, PATCH], **common)
    else:
        config = VideoMAEConfig(tubelet_size=TUBELET, patch_size=PATCH, use_mean_pooling=True, **common)
    config._attn_implementation = attn
    with torch.device(device):
        return cls(config).eval()


def tiny_ast(attn: str = "sdpa", layers: int = 3, seed: int = 0, device: torch.device = DEVICE) -> nn.Module:
    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                       patch_size=16, frequency_stride=8, time_stride=16, max_length=AST_FRAMES,
                       num_mel_bins=AST_MELS, num_labels=4)
    config._attn_implementation = attn
    with torch.device(device):
        return ASTForAudioClassification(config).eval()


def clip(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def spectrogram(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, AST_FRAMES, AST_MELS, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal outputs of two runs: bit for bit on the CPU; on CUDA within a few last bits (its kernels may
    accumulate in a different order run to run, unless ``torch.use_deterministic_algorithms(True)``)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@torch.no_grad()
def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    audio = "AST" in type(getattr(model, "_orig_mod", model)).__name__  # (a compiled model wraps the original)
    out = model(input_values=x) if audio else model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def untouched(model: nn.Module) -> bool:
    """No trace of a patch: no swapped class, no attribute, buffer or hook of mmmerge, no instance forward."""
    for module in model.modules():
        if isinstance(module, MergingLayer) or "forward" in module.__dict__:
            return False
        if any(k.startswith("_mmmerge") for k in list(module.__dict__) + list(module._buffers)):
            return False
        hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
        if any(type(h).__module__.startswith("mmmerge") for h in hooks):
            return False
    return True


def module_types(model: nn.Module) -> Dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def has_increasing_representatives(source: torch.Tensor, num_out: int) -> bool:
    """Output token j holds original tokens; tokens stay in the order of one member each (their
    representative): greedily pick, for j = 0, 1, ..., the smallest member above the last pick."""
    last = -1
    for j in range(num_out):
        members = (source == j).nonzero().flatten()
        later = members[members > last]
        if later.numel() == 0:
            return False
        last = int(later.min())
    return True
