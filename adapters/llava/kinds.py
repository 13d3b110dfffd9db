"""Model kinds: the one place where a model class is recognised, and what each kind reduces.

Adding a model family is one entry in ``KINDS`` and its classes in ``CLASSES``. Also here: the vision tower's token
layout (``Layout``, read from the config at patch time) and ``keep`` as a token count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch.nn as nn

from mmmerge.methods import MATCHERS, SELF_METRIC_METHODS, matcher_options

from ..encoder import encoder_layers
from ..vlm import check_keep

KeepSpec = Union[int, float]
METHODS = tuple(m for m in MATCHERS if m != "none")
# Facts about the matchers come from the engine's tables: a method is scored when it takes a ``score=`` option.
SCORED = tuple(m for m in METHODS if "score" in matcher_options(m))  # tps, prune, dominant
SELF_METRIC = tuple(m for m in METHODS if m in SELF_METRIC_METHODS)  # divprune, cdpruner: compare the tokens
WHERE = ("post_projector", "pre_projector", "vision_tower")


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelKind:
    """What ``reduce_visual_tokens`` reduces for one model family."""

    name: str
    images: Optional[str]  # "uniform" (N per image), "anyres" (a count per image size) or None (left as they are)
    videos: bool
    processor: str  # the processor class that matches
    video_newline: int = 0  # newline tokens the model appends to every video (OneVision: 1)


KINDS = {
    "llava": ModelKind("llava", "uniform", False, "LlavaProcessor"),
    "llava_next": ModelKind("llava_next", "anyres", False, "LlavaNextProcessor"),
    "llava_next_video": ModelKind("llava_next_video", None, True, "LlavaNextVideoProcessor"),
    "llava_onevision": ModelKind("llava_onevision", "anyres", True, "LlavaOnevisionProcessor", video_newline=1),
}
CLASSES = {
    "LlavaForConditionalGeneration": "llava", "LlavaModel": "llava",
    "LlavaNextForConditionalGeneration": "llava_next", "LlavaNextModel": "llava_next",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video", "LlavaNextVideoModel": "llava_next_video",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision", "LlavaOnevisionModel": "llava_onevision",
}
SUPPORTED = tuple(CLASSES)


def model_kind(model: nn.Module) -> ModelKind:
    for cls in type(model).__mro__:
        if cls.__name__ in CLASSES:
            return KINDS[CLASSES[cls.__name__]]
    raise TypeError(f"reduce_visual_tokens supports {', '.join(SUPPORTED)}; got {type(model).__name__}")


def inner_model(model: nn.Module) -> nn.Module:
    """The ``Llava*Model`` that owns the vision tower, projector and LM."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model


def _feature_index(layer: int, num_layers: int) -> int:
    """``hidden_states`` index (0 = embeddings, i = output of layer i-1) as a non-negative int."""
    total = num_layers + 1
    if not -total <= layer < total:
        raise ValueError(f"vision_feature_layer={layer} is out of range for a tower with {num_layers} layers")
    return layer % total


@dataclass
class Layout:
    """Token layout of one tower input (an image, a crop or a frame) as the vision tower sees it."""

    rows: int
    cols: int
    cls: int  # leading [CLS] tokens in the tower (1 for CLIP, 0 for SigLIP)
    strategy: str  # "default" drops the first token from the features, "full" keeps every token
    feature_layers: Tuple[int, ...]  # hidden_states indices, non-negative
    num_layers: int  # layers in the tower

    @property
    def tower_tokens(self) -> int:
        return self.cls + self.rows * self.cols

    @property
    def num_features(self) -> int:
        """Feature tokens per tower input handed to the projector (N)."""
        return self.tower_tokens - self.drop

    @property
    def protected(self) -> int:
        """Leading feature tokens that never merge: [CLS] when the strategy keeps it."""
        return self.cls if self.strategy == "full" else 0

    @property
    def drop(self) -> int:
        """Leading tower tokens not in the features: "default" drops the first token ([CLS] for CLIP)."""
        return 1 if self.strategy == "default" else 0

    @property
    def square(self) -> bool:
        """The features are exactly the rows x cols grid (what anyres packing and video pooling need)."""
        return self.num_features == self.rows * self.cols and self.protected == 0

    @property
    def key_layer(self) -> int:
        """The tower layer whose attention gives the metric and score: the one that produces the (last) feature
        layer (layer 0 when the features are the embeddings); its input is ``hidden_states[key_layer]``."""
        return max(self.feature_layers[-1] - 1, 0)


def tower_layout(lm: nn.Module) -> Layout:
    vcfg = lm.config.vision_config
    if getattr(vcfg, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
        raise TypeError(f"vision tower '{getattr(vcfg, 'model_type', '?')}' is not supported; mmmerge knows CLIP "
                        "and SigLIP towers")
    grid = vcfg.image_size // vcfg.patch_size
    cls = 1 if vcfg.model_type == "clip_vision_model" else 0
    strategy = lm.config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unknown vision_feature_select_strategy '{strategy}'")
    layers = lm.config.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    num_layers = len(tower_layers(lm))
    return Layout(grid, grid, cls, strategy, tuple(_feature_index(i, num_layers) for i in layers), num_layers)


def tower_layers(lm: nn.Module) -> nn.ModuleList:
    tower = lm.vision_tower
    return encoder_layers(getattr(tower, "vision_model", tower))


def _ceil_fraction(keep: float, count: int) -> int:
    """``ceil(keep * count)``, forgiving float rounding (0.1 * 30 is 3, not 4), at least 1."""
    return max(1, math.ceil(keep * count - 1e-9))


def _resolve_keep(keep: KeepSpec, available: int, what: str = "image") -> int:
    """``keep`` as a token count: an int as is (at most ``available``), a fraction as ``ceil(keep * available)``."""
    check_keep(keep, what)
    if isinstance(keep, float):
        return _ceil_fraction(keep, available)
    if keep > available:
        raise ValueError(f"keep={keep} is larger than the {available} visual tokens per {what} this model makes; "
                         f"use keep <= {available} or a fraction such as keep=0.25")
    return keep

