"""LLaVA adapter: fewer visual tokens reach the language model.

``reduce_visual_tokens(model, keep=...)`` makes a LLaVA model hand its language model fewer visual tokens per
image (per video), so prefill is faster and the KV cache smaller; ``generate()`` works as before (KV cache, left
padding, several images per prompt). Supported models (the ``...ForConditionalGeneration`` and ``...Model``):

    LLaVA-1.5          ``Llava*``          every image has N = 576 tokens (336 px); ``keep`` tokens per image
    LLaVA-NeXT         ``LlavaNext*``      anyres: a base view + crops + newline tokens, a count per image size
    LLaVA-NeXT-Video   ``LlavaNextVideo*`` videos (frames x pooled tokens); its images are left as they are
    LLaVA-OneVision    ``LlavaOnevision*`` SigLIP (no [CLS]), anyres images as NeXT, videos pooled per frame

``keep``: an int is a token budget per image (per video), a float in (0, 1] a fraction: an item with F feature
tokens keeps ``ceil(keep * F)`` of them (up to float rounding). ``keep = 1.0`` (or an int >= every count) is an
exact no-op: generation is token-for-token the unpatched model's.

Where the tokens are reduced (``where``, one knob):
    post_projector  (default) the vision tower and the projector run as usual; the projected tokens of each image
                    are reduced with the core engine (``mmmerge.reduce_tokens``), so a merged token is exactly the
                    size-weighted mean of the LM inputs it replaces. Measured (benchmarks/llava.py, ViT-L/336,
                    random weights): same speed as pre_projector within noise (the projector is ~1% of the tower),
                    clearly closer to keep-all (cosine of the LM's last hidden state 0.93 vs 0.74 at keep=144).
    pre_projector   LLaVA-1.5 only: reduce the tower's features and project only ``keep`` tokens.
    vision_tower    LLaVA-1.5 only: ToMe/PiToMe-style merging inside the CLIP layers (the shared encoder patch),
                    spread over the layers up to the feature layer so that it outputs ``keep`` tokens.
LLaVA-NeXT, OneVision and NeXT-Video take ``post_projector`` only, and say so at patch time: the model packs every
crop's full rows x cols grid after the projector (unpadding to the image's aspect ratio, a newline after each row,
OneVision's resampling of large grids) and pools every frame's full grid, so tokens merged in the tower or before
the projector have no grid left to pack (pool). Unmerging them back to the grid first would keep the LM's count,
which is what the reduction is for.
The old pair ``where="pre_llm"`` + ``stage=...`` is gone: ``where="pre_llm"`` maps to ``"post_projector"`` with a
FutureWarning, ``stage=`` is rejected with the new spelling.

Anyres images (LLaVA-NeXT, OneVision). The model packs each image as ``[base view (n tokens)] + [crop grid rows,
each followed by a newline token]`` (unpadded to the image's aspect ratio; OneVision also downsamples very
large grids). The feature tokens are F = n + crop tokens; the newline tokens are kept, unchanged, and stay
after the last token of their row: after the reduction each output token sits at the position of its earliest
original token, so the rows (and the newline between them) keep their order. The LM sees
``k_base + k_crops + newlines`` tokens per image; the budget K (``ceil(keep * F)`` or ``min(keep, F)``) is spread
over the two parts in proportion to their tokens: ``k_base = ceil(K * n / F)`` (at least 1, and at least one
token is left for the crops), ``k_crops = K - k_base``. Base and crop tokens never merge with each other (two
views at two scales). An image that OneVision does not crop (several images in one prompt) is its base view
plus one newline. The processor (when passed) emits exactly this count per image, computed by the model's own
packing code for that image size, and ``compact_image_tokens`` rewrites inputs that are already expanded.

Videos (NeXT-Video, OneVision): the projected, pooled tokens ``[videos, frames * n, C]`` are reduced to ``keep``
per video with the video adapter's time modes (``global``, ``within_frame``, ``adjacent``, ``window(k)``);
OneVision's one newline token per video is kept at its end.

Methods: the engine's ``tome``, ``pitome``, ``tps``, ``random``, ``prune`` and ``dominant`` (VisionZip-style: keep
the most important tokens, merge the rest into a few contextual tokens; ``contextual=`` sets how many), and the
selection methods ``divprune`` (the most diverse tokens) and ``cdpruner`` (a DPP conditioned on the prompt: the
query of each image is its prompt's text embeddings, see "the prompt as CDPruner's query" below), which measure
similarity on the tokens being reduced. For the other methods the similarity metric is the feature layer's
head-averaged keys; the importance score (``dominant``, ``tps``,
``prune``) is the [CLS] attention of the feature layer for CLIP towers, and for towers without [CLS] (SigLIP,
OneVision) the mean attention each token receives in the feature layer (averaged over heads and queries).
Both come from the feature layer's own norm and query/key projections, applied once more to that layer's input,
a hidden state the tower returns anyway (bit for bit what the layer computed; the cost is one projection of one
layer for the keys, two with a score: about 0.3% / 0.6% of the FLOPs of a 24-layer ViT-L/336 tower): no hook in
the tower, which keeps its attention backend (sdpa, flash), nothing is forced eager.

On device, batched, no host sync: every reduction is one batched engine call per distinct row shape. For
LLaVA-1.5 and videos that is one call for the whole batch. For anyres images the rows are the base views (all
images together: n tokens each) and the crop parts; images of the same size share one call, images of different
sizes (different crop counts) get one call each, so a batch of k distinct sizes makes 1 + k calls (the engine
has no per-row budget yet). The per-image bookkeeping (counts, index maps) is host arithmetic on the image sizes,
cached per size; the image sizes are read on the host once per call (the model itself reads them per image).

How it is wired: the inner model's own ``get_image_features`` / ``get_video_features`` is replaced by an instance
attribute (a ``_Replacement``: the class is untouched) that calls the original and reduces its output; the
context (``LlavaContext``, the settings) is a plain attribute of the inner model. Every hook is a module-level
function registered once, at patch time: a pre-hook on the inner model checks that each run of LLaVA-1.5 or
video placeholders is a whole number of reduced items, with transformers' own ``torch_compilable_check`` (a
ValueError at the call, before any work is queued: one read of a bool, as the model's own total check does
per prefill; a hint under ``torch.compile``; never a device-side assert, which would poison a CUDA context);
for ``pre_projector``, a tower hook and a projector
pre-hook reduce the projector's input during that model's call in that thread (a ``threading.local`` slot the
replacement sets for the call), and do nothing otherwise. So a reduced model:
    - copies: ``copy.deepcopy`` gives an independent reduced model (its replacements, hooks and context are its
      own); ``restore_visual_tokens`` / ``mmmerge.unpatch`` of the copy restore the copy only. A processor patched
      with the model stays with the original (the copy does not own it).
    - pickles: ``torch.save(model)`` / pickle round-trip to a working reduced model wherever the unpatched model
      pickles (transformers installs local output-capturing hooks at a model's first forward, after which no LLaVA
      model pickles; ``save_pretrained`` is byte-identical to the unreduced checkpoint in every case).
    - serves threads: nothing is written on a module or the context during a forward (two memos of host
      arithmetic excepted, see ``LlavaContext``); ``mmmerge.last_info(model)`` is this thread's last reduction
      by this model (per-thread records), under ``torch.compile`` not recorded (no Python side effects).
    - compiles: the language model with ``fullgraph=True`` (it only sees fewer tokens), and the post_projector and
      pre_projector reductions too (``torch.compile(model.model.get_image_features, fullgraph=True)``, after one
      eager call: transformers installs its capture hooks, under a lock, at the first call).
``restore_visual_tokens`` removes every attribute and hook, so outputs are bit-identical to before.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import torch_compilable_check

from mmmerge.constraints import parse_constraint, parse_time_mode
from mmmerge.info import MergeInfo
from mmmerge.matchers import MATCHERS, check_options
from mmmerge.patching import register
from mmmerge.reduce import reduce_tokens
from mmmerge.schedule import TargetTokens, resolve_schedule
from mmmerge.state import TokenState, init_state

from .encoder import TokenGrid, encoder_layers, layer_parts, patch_encoder, plan_layout, unpatch_encoder
from .video import TIME_MODES


KeepSpec = Union[int, float]
METHODS = tuple(m for m in MATCHERS if m != "none")
SCORED = ("tps", "prune", "dominant")  # methods that take a per-token importance score
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


def _kind(model: nn.Module) -> ModelKind:
    for cls in type(model).__mro__:
        if cls.__name__ in CLASSES:
            return KINDS[CLASSES[cls.__name__]]
    raise TypeError(f"reduce_visual_tokens supports {', '.join(SUPPORTED)}; got {type(model).__name__}")


def _inner(model: nn.Module) -> nn.Module:
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


def _layout(lm: nn.Module) -> Layout:
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
    num_layers = len(_tower_layers(lm))
    return Layout(grid, grid, cls, strategy, tuple(_feature_index(i, num_layers) for i in layers), num_layers)


def _tower_layers(lm: nn.Module) -> nn.ModuleList:
    tower = lm.vision_tower
    return encoder_layers(getattr(tower, "vision_model", tower))


def _ceil_fraction(keep: float, count: int) -> int:
    """``ceil(keep * count)``, forgiving float rounding (0.1 * 30 is 3, not 4), at least 1."""
    return max(1, math.ceil(keep * count - 1e-9))


def _check_keep(keep: KeepSpec, what: str) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (tokens per {what}) or a float fraction in (0, 1], got "
                        f"{type(keep).__name__}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep}: a fraction must lie in (0, 1]")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep={keep}: at least one visual token per {what} must remain (keep >= 1)")


def _resolve_keep(keep: KeepSpec, available: int, what: str = "image") -> int:
    """``keep`` as a token count: an int as is (at most ``available``), a fraction as ``ceil(keep * available)``."""
    _check_keep(keep, what)
    if isinstance(keep, float):
        return _ceil_fraction(keep, available)
    if keep > available:
        raise ValueError(f"keep={keep} is larger than the {available} visual tokens per {what} this model makes; "
                         f"use keep <= {available} or a fraction such as keep=0.25")
    return keep


# ------------------------------------------------------------------------------------------- anyres layout
@dataclass(frozen=True)
class ImageLayout:
    """One anyres image as the LM sees it, unreduced: ``[base (n)] + crop rows, each followed by a newline``."""

    key: Tuple  # (size, cropped, aspect): what the layout was made for
    length: int  # packed tokens, newlines included
    base: int  # base-view tokens: the first ``base`` packed tokens
    newlines: Tuple[int, ...]  # packed positions of the newline tokens
    tiles: int  # tower inputs of this image (base view + crops)
    # Tower token (tile * n + token) behind each packed position (newlines: 0), or None where the model
    # resamples the crop grid (OneVision's downsampling of very large grids).
    origin: Optional[Tensor] = field(default=None, compare=False, hash=False, repr=False)

    @property
    def features(self) -> int:
        """F: feature tokens (base + crops), newlines excluded."""
        return self.length - len(self.newlines)

    @property
    def crops(self) -> int:
        return self.features - self.base


def anyres_budget(keep: KeepSpec, image: ImageLayout) -> Tuple[int, int]:
    """``(k_base, k_crops)``: feature tokens an anyres image keeps in its base view and in its crops.

    K = ``ceil(keep * F)`` for a fraction, ``min(keep, F)`` for an int; spread in proportion to the parts' tokens:
    ``k_base = ceil(K * n / F)``, clipped so that each part that exists keeps at least one token.
    """
    F_, n = image.features, image.base
    K = _ceil_fraction(keep, F_) if isinstance(keep, float) else min(keep, F_)
    if image.crops == 0:
        return K, 0
    K = max(K, 2)
    k_base = min(max(-(-K * n // F_), 1), K - 1)
    return k_base, K - k_base


def reduced_length(keep: KeepSpec, image: ImageLayout) -> int:
    """Tokens the LM sees for one anyres image after the reduction (newlines included)."""
    return sum(anyres_budget(keep, image)) + len(image.newlines)


def _pack(lm: nn.Module, features: Sequence[Tensor], image_sizes: Tensor, newline: Tensor, strategy: str,
          aspect: Optional[str]) -> List[Tensor]:
    """The model's own ``pack_image_features`` (NeXT and OneVision name their arguments differently)."""
    params = inspect.signature(lm.pack_image_features).parameters
    kwargs: Dict[str, Any] = {"image_newline": newline}
    if "vision_feature_select_strategy" in params:
        kwargs["vision_feature_select_strategy"] = strategy
    if "vision_aspect_ratio" in params:
        kwargs["vision_aspect_ratio"] = aspect
    return list(lm.pack_image_features(list(features), image_sizes, **kwargs)[0])


def _tiles(lm: nn.Module, size: Tuple[int, int], cropped: bool) -> int:
    """Tower inputs of one image: the model's own ``image_size_to_num_patches``, or 1 when it is not cropped."""
    if not cropped:
        return 1
    module = sys.modules[type(lm).__module__]
    return int(module.image_size_to_num_patches(image_size=list(size), grid_pinpoints=lm.config.image_grid_pinpoints,
                                                 patch_size=lm.config.vision_config.image_size))


def _aspect(lm: nn.Module, given: Optional[str] = None) -> Optional[str]:
    return given if given is not None else getattr(lm.config, "vision_aspect_ratio", None)


# ------------------------------------------------------------------------------------------ the context
@dataclass
class RaggedPlan:
    """Index maps that reduce a batch of anyres images: one row group per distinct (length, keep)."""

    groups: List[Tuple[Tensor, int]]  # (global packed positions [G, length], keep)
    newlines: Tensor  # [NL] global packed positions of the newline tokens
    origin: Optional[Tensor]  # [L] tower token (over all tiles) behind each packed position, None if resampled
    lengths_out: List[int]  # tokens per image after the reduction
    items: List[Tuple[int, int]]  # (tokens in, tokens out) per image
    counts_out: Tensor  # [images] lengths_out on the device (cdpruner's prompt rows)
    ends_in: Tensor  # [images] cumulative packed tokens in, on the device (cdpruner's query per row group)


@dataclass(eq=False)  # identity: one context per patched model (per copy), a key of the per-thread records
class LlavaContext:
    """What one ``reduce_visual_tokens`` call set up; lives on the inner model (``_mmmerge_llava``).

    Fixed at patch time and only read by a forward, except two memos of host arithmetic (anyres layouts per
    image size, index plans per batch layout) that a forward may fill: pure functions of their keys, written
    whole under the GIL, so threads never see a partial entry (at worst two compute the same one).
    A copy (``copy.deepcopy``, pickle) carries the settings; it starts with empty memos and without the
    processors, which belong to the user and stay patched for the original model.
    """

    kind: ModelKind
    keep: KeepSpec  # as given (fractions of anyres images and videos resolve per item)
    keep_tokens: Optional[int]  # uniform images: resolved per image
    method: str
    where: str
    layout: Layout
    time_mode: str
    hyper: Dict[str, Any]
    # The hidden states to ask the tower for (the feature layers and the key layer's input), or None where
    # the model's get_*_features always returns every hidden state (transformers 5.17).
    select_hidden: Optional[Tuple[int, ...]] = None
    processor_undo: List[Callable[[], None]] = field(default_factory=list)
    image_layouts: Dict[Tuple, ImageLayout] = field(default_factory=dict)  # memo: (size, cropped, aspect) -> layout
    plans: Dict[Tuple, RaggedPlan] = field(default_factory=dict)  # memo: (keep, layouts, device) -> plan

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update(processor_undo=[], image_layouts={}, plans={})
        return state

    @property
    def info(self) -> MergeInfo:
        """This thread's last reduction with this context (see ``last_info``)."""
        return _last_record(self)

    def image_layout(self, lm: nn.Module, size: Sequence[int], cropped: bool, aspect: Optional[str]) -> ImageLayout:
        """The packed layout of one anyres image, found by running the model's own packing on token indices."""
        key = (tuple(int(s) for s in size), bool(cropped), aspect)
        image = self.image_layouts.get(key)
        if image is None:
            tiles = _tiles(lm, key[0], cropped)
            n = self.layout.num_features
            index = torch.arange(tiles * n, dtype=torch.float64).view(tiles, n, 1)
            with torch.no_grad():
                packed = _pack(lm, [index], torch.tensor([key[0]]), torch.tensor([-1.0], dtype=torch.float64),
                               self.layout.strategy, aspect)[0][:, 0]
            newlines = tuple(torch.nonzero(packed == -1.0).flatten().tolist())
            if not torch.equal(packed[:n], torch.arange(n, dtype=torch.float64)):
                raise RuntimeError("mmmerge.llava: this transformers version packs anyres images differently (the "
                                   "base view does not come first); please report it")
            exact = bool((packed == packed.round()).all())
            origin = packed.clamp_min(0).long() if exact else None
            image = ImageLayout(key, packed.shape[0], n, newlines, tiles, origin)
            if len(self.image_layouts) > 256:
                self.image_layouts.clear()
            self.image_layouts[key] = image
        return image


def _cropped(sizes: Sequence, batch_num_images: Any) -> List[bool]:
    """Which images the model crops: all of them, except OneVision's images in prompts with several images."""
    if batch_num_images is None:
        return [True] * len(sizes)
    counts = batch_num_images.tolist() if isinstance(batch_num_images, Tensor) else list(batch_num_images)
    return [int(n) == 1 for n in counts for _ in range(int(n))]


def _host_sizes(image_sizes: Any) -> List[Tuple[int, int]]:
    if image_sizes is None:
        raise ValueError("anyres models need image_sizes (the processor returns them with pixel_values)")
    rows = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
    return [(int(r[0]), int(r[1])) for r in rows]


# ------------------------------------------------------------------------------- what a call did, per thread
_RECORDS = threading.local()  # per thread: WeakKeyDictionary context -> MergeInfo of its last reduction


def _record(ctx: LlavaContext, info: MergeInfo) -> None:
    """Keep ``info`` as this thread's last reduction by ``ctx`` (eager calls only: a compiled graph has no
    Python side effects)."""
    if torch.compiler.is_compiling():
        return
    records = getattr(_RECORDS, "by_context", None)
    if records is None:
        records = _RECORDS.by_context = weakref.WeakKeyDictionary()
    records[ctx] = info


def _last_record(ctx: LlavaContext) -> MergeInfo:
    """This thread's last reduction by ``ctx``; before one, what is known without input (LLaVA-1.5 images: the
    counts; anyres images and videos have counts per input: an empty MergeInfo)."""
    info = getattr(_RECORDS, "by_context", {}).get(ctx)
    if info is not None:
        return info
    if ctx.kind.images == "uniform" and not ctx.kind.videos:
        N = ctx.layout.num_features
        return MergeInfo(schedule=[N - ctx.keep_tokens], tokens_per_layer=[N, ctx.keep_tokens])
    return MergeInfo()


# ------------------------------------------------------------------------------------- scores and metric
def _hidden_request(ctx: LlavaContext, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` for the model's own ``get_*_features`` with the hidden states the reduction reads: the feature
    layers (what the model selects itself) and the key layer's input. A caller's own request is kept."""
    if ctx.select_hidden is None:  # the model's call returns every hidden state anyway
        return kwargs
    asked = kwargs.get("output_hidden_states")
    if asked is True:
        return kwargs
    extra = () if asked in (None, False) else ((asked,) if isinstance(asked, int) else tuple(asked))
    return {**kwargs, "output_hidden_states": sorted(set(ctx.select_hidden) | set(extra))}


def _select_hidden(layout: Layout, original: Callable) -> Optional[Tuple[int, ...]]:
    """``LlavaContext.select_hidden`` for the model's ``get_*_features``: None where it takes
    ``output_hidden_states`` itself (transformers 5.17 ignores it and returns every hidden state), else the
    indices to ask for (transformers >= 5.24 keeps only the hidden states it is asked for)."""
    if "output_hidden_states" in inspect.signature(original).parameters:
        return None
    return tuple(sorted({layout.key_layer, *layout.feature_layers}))


def _keys_and_scores(lm: nn.Module, layout: Layout, hidden_states: Sequence[Optional[Tensor]], need_score: bool
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """Head-averaged keys ``[items, T, d]`` and an importance score ``[items, T]`` (float32) of the tower inputs
    (T = tower tokens), from the key layer's own norm and query/key projections applied to its input
    ``hidden_states[layout.key_layer]`` (what the tower computed in its forward, recomputed once here: no hook,
    and the tower keeps its attention backend).

    Score: the head-averaged [CLS] attention for towers with [CLS]; for towers without it, the mean attention
    each token receives (averaged over heads and all queries) in the key layer.
    """
    index = layout.key_layer
    h = hidden_states[index] if hidden_states is not None and index < len(hidden_states) else None
    if h is None:
        raise RuntimeError(f"mmmerge.llava: the vision tower returned no hidden_states[{index}] (the input of the "
                           "feature layer); this transformers version selects hidden states differently, please "
                           "report it")
    parts = layer_parts(_tower_layers(lm)[index])
    attn = parts.attention
    with torch.no_grad():  # matching builds no graph
        x = parts.norm1(h)
        k = attn.k_proj(x)
        B, T, D = k.shape
        heads = parts.num_heads
        kh = k.view(B, T, heads, D // heads)
        keys = kh.mean(2)
        if not need_score:
            return keys, None
        q = attn.q_proj(x)  # all rows, as in the layer's own forward (same values, bit for bit)
        queries = q[:, : layout.cls] if layout.cls else q
        qh = queries.reshape(B, queries.shape[1], heads, D // heads)
        logits = torch.einsum("bqhd,bthd->bhqt", qh.float(), kh.float()) * (D // heads) ** -0.5
        return keys, logits.softmax(-1).mean((1, 2))


def _raster_order(x: Tensor, state: TokenState) -> Tuple[Tensor, TokenState]:
    """Sort reduced tokens ``[B, K, C]`` by their earliest original position (a grid keeps its raster order)."""
    B, K = state.size.shape
    N0 = state.source.shape[1]
    if K == N0:
        return x, state
    positions = torch.arange(N0, device=x.device).expand(B, N0)
    first = torch.full((B, K), N0, device=x.device, dtype=torch.long).scatter_reduce(
        1, state.source, positions, reduce="amin")
    order = first.argsort(dim=1)  # [B, K]
    inverse = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=x.device).expand(B, K))
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    state = state.replace(size=state.size.gather(1, order), source=inverse.gather(1, state.source),
                          coords={n: c.gather(1, order) for n, c in state.coords.items()},
                          valid=None if state.valid is None else state.valid.gather(1, order))
    return x, state


def _reduce(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], keep: int, protected: int,
            state: Optional[TokenState] = None, constraint=None,
            query: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, TokenState]:
    """Reduce ``x`` ``[B, N, C]`` to ``[B, keep, C]`` with ``ctx.method``, in raster order (batched, no host sync).
    ``query``: cdpruner's ``(text embeddings [B, L, C], mask [B, L])`` of each row's prompt (``_item_queries``)."""
    hyper = dict(ctx.hyper)
    if ctx.method in SCORED and score is not None:
        hyper["score"] = score
    if ctx.method in SELF_METRIC:  # DivPrune and CDPruner compare the tokens handed to the LM themselves
        metric = x
        if query is not None:
            hyper["query"], hyper["query_mask"] = query
    y, state = reduce_tokens(x, keep, ctx.method, metric=metric, protected=protected if state is None else 0,
                             state=state, constraint=constraint, check_layout=False,  # time-major by construction
                             **hyper)
    return _raster_order(y, state)


# ------------------------------------------------------------------------------- LLaVA-1.5 image wrapper
_CALL = threading.local()  # per thread: the pre_projector call in progress (``_PreProjectorCall``), if any


@dataclass(eq=False)
class _PreProjectorCall:
    """One pre_projector call of one model, in this thread: the tower hook hands over its hidden states, the
    projector hook reduces the projector's input with them."""

    lm: nn.Module
    ctx: LlavaContext
    hidden_states: Optional[Sequence[Tensor]] = None
    state: Optional[TokenState] = None


def _tower_output_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on the vision tower (registered once, at patch time, for where='pre_projector'): during a
    pre_projector call of this model in this thread, keep the tower's hidden states for the projector hook."""
    call = getattr(_CALL, "pre_projector", None)
    if call is not None and call.lm.vision_tower is module:
        call.hidden_states = output.hidden_states


def _projector_input_hook(module: nn.Module, args: Tuple[Tensor, ...]) -> Optional[Tuple[Tensor, ...]]:
    """Forward pre-hook on the projector (registered once, at patch time, for where='pre_projector'): during a
    pre_projector call of this model in this thread, reduce its input ``[images, N, C_vision]`` to ``keep``."""
    call = getattr(_CALL, "pre_projector", None)
    if call is None or call.lm.multi_modal_projector is not module or call.hidden_states is None or not args:
        return None
    ctx, layout = call.ctx, call.ctx.layout
    x = args[0]
    keys, score = _keys_and_scores(call.lm, layout, call.hidden_states, ctx.method in SCORED)
    d = layout.drop
    y, call.state = _reduce(ctx, x, keys[:, d:], None if score is None else score[:, d:], ctx.keep_tokens,
                            layout.protected)
    call.hidden_states = None  # one projector call per image batch
    return (y,) + tuple(args[1:])


def _image_features(lm: nn.Module, original: Callable, pixel_values: Tensor, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaModel.get_image_features``: the original call, with ``keep`` tokens per image.

    ``post_projector``: the projected ``pooler_output`` (images x ``[N, C_text]``) is reduced.
    ``pre_projector``: the projector's input ``[images, N, C_vision]`` is reduced by the projector hook, which
    this call arms for its own thread only.
    """
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    if kwargs.get("image_sizes") is not None:
        raise ValueError("mmmerge.llava: image_sizes (variable-resolution towers) is not supported for LLaVA-1.5")
    return_dict = kwargs.pop("return_dict", True)
    keep, layout = ctx.keep_tokens, ctx.layout
    N = layout.num_features
    info = MergeInfo(schedule=[N - keep], tokens_per_layer=[N, keep])
    call = functools.partial(original, pixel_values, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if keep == N:
        out = call(**kwargs)
    elif ctx.where == "pre_projector":
        slot, outer = _PreProjectorCall(lm, ctx), getattr(_CALL, "pre_projector", None)
        _CALL.pre_projector = slot
        try:
            out = call(**_hidden_request(ctx, kwargs))
        finally:
            _CALL.pre_projector = outer
        if slot.state is None:
            raise RuntimeError("mmmerge.llava: the projector did not run on the tower's features in this call; "
                               "this transformers version computes image features differently, please report it")
        info.state = slot.state
    else:
        out = call(**_hidden_request(ctx, kwargs))
        keys, score = _keys_and_scores(lm, layout, out.hidden_states, ctx.method in SCORED)
        d = layout.drop
        x = torch.stack(list(out.pooler_output))
        query = _item_queries(ctx, lm, lm.config.image_token_id, torch.full((x.shape[0],), keep, device=x.device))
        y, info.state = _reduce(ctx, x, keys[:, d:], None if score is None else score[:, d:], keep,
                                layout.protected, query=query)
        out.pooler_output = list(y)
    _record(ctx, info)
    return out if return_dict else out.to_tuple()


def _check_call(ctx: LlavaContext, layer, strategy) -> None:
    """The token layout was fixed at patch time; a call overriding it would break the counts."""
    layout = ctx.layout
    if strategy is not None and strategy != layout.strategy:
        raise ValueError(f"mmmerge.llava was set up for vision_feature_select_strategy='{layout.strategy}', this "
                         f"call asks for '{strategy}'; re-run reduce_visual_tokens after changing the config")
    if layer is not None:
        given = (layer,) if isinstance(layer, int) else tuple(layer)
        if tuple(_feature_index(g, layout.num_layers) for g in given) != layout.feature_layers:
            raise ValueError(f"mmmerge.llava was set up for vision_feature_layer={layout.feature_layers} (as "
                             f"hidden_states indices); this call asks for {layer}: re-run reduce_visual_tokens")


# ------------------------------------------------------------------------------ anyres image wrapper
def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-built index tensor to ``device`` without a synchronising copy (pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _ragged_plan(ctx: LlavaContext, images: Sequence[ImageLayout], device: torch.device) -> RaggedPlan:
    """Row groups of a batch of anyres images: every image gives a base row and (if cropped) a crop row; rows
    with the same (length, keep) form one group. Host arithmetic only, cached per batch layout and device."""
    key = (ctx.keep, tuple(images), str(device))
    plan = ctx.plans.get(key)
    if plan is not None:
        return plan
    rows: Dict[Tuple[int, int], List[Tensor]] = {}
    newlines, lengths_out, items, origins = [], [], [], []
    offset = tile_offset = 0
    for image in images:
        if image.origin is not None:
            origins.append(image.origin + tile_offset * image.base)
        tile_offset += image.tiles
        k_base, k_crops = anyres_budget(ctx.keep, image)
        positions = torch.arange(offset, offset + image.length)
        is_crop = torch.ones(image.length, dtype=torch.bool)
        is_crop[: image.base] = False
        is_crop[list(image.newlines)] = False
        rows.setdefault((image.base, k_base), []).append(positions[: image.base])
        if image.crops:
            rows.setdefault((image.crops, k_crops), []).append(positions[is_crop])
        newlines.append(positions[list(image.newlines)])
        lengths_out.append(k_base + k_crops + len(image.newlines))
        items.append((image.length, lengths_out[-1]))
        offset += image.length
    groups = [(_to_device(torch.stack(r), device), keep) for (_, keep), r in rows.items()]
    origin = _to_device(torch.cat(origins), device) if len(origins) == len(images) else None
    plan = RaggedPlan(groups, _to_device(torch.cat(newlines), device), origin, lengths_out, items,
                      _to_device(torch.tensor(lengths_out), device),
                      _to_device(torch.tensor([i.length for i in images]).cumsum(0), device))
    if len(ctx.plans) > 64:
        ctx.plans.clear()
    ctx.plans[key] = plan
    return plan


def _reduce_ragged(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], plan: RaggedPlan,
                   query: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, TokenState]:
    """Reduce the packed tokens of a batch of anyres images ``[L, C]`` (all images concatenated).

    One batched engine call per row group (a handful: base views, and one per distinct crop layout). The kept
    tokens and the untouched newline tokens are then ordered by the position of their earliest original token,
    which keeps images, parts and rows in order. Returns ``([L', C], state)`` with one state row over the whole
    batch: ``size`` ``[1, L']``, ``source`` ``[1, L]`` (packed position -> output token). ``query``: cdpruner's
    per-image ``(embeddings, mask, packed end of each image)``; each row gets its image's prompt.
    """
    L = x.shape[0]
    device = x.device
    outs, firsts, sizes, sources = [], [], [], []
    for idx, keep in plan.groups:  # a few static row shapes; each step is one batched reduction
        rows = None if query is None else torch.searchsorted(query[2], idx[:, 0].contiguous(), right=True)  # image
        y, state = _reduce(ctx, x[idx], metric[idx], None if score is None else score[idx], keep, 0,
                           query=None if rows is None else (query[0][rows], query[1][rows]))
        first = torch.full_like(state.size, L, dtype=torch.long).scatter_reduce(1, state.source, idx, reduce="amin")
        outs.append(y.flatten(0, 1))
        firsts.append(first.flatten())
        sizes.append(state.size.flatten())
        sources.append(state.source)
    outs.append(x[plan.newlines])
    firsts.append(plan.newlines)
    sizes.append(torch.ones(plan.newlines.shape[0], device=device))
    order = torch.cat(firsts).argsort()
    total = order.shape[0]
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(total, device=device))
    source = torch.empty(L, dtype=torch.long, device=device)
    start = 0
    for (idx, keep), src in zip(plan.groups, sources):
        slots = start + src + torch.arange(idx.shape[0], device=device).unsqueeze(1) * keep  # [G, length]
        source.scatter_(0, idx.flatten(), inverse[slots.flatten()])
        start += idx.shape[0] * keep
    source.scatter_(0, plan.newlines, inverse[start + torch.arange(plan.newlines.shape[0], device=device)])
    state = TokenState(size=torch.cat(sizes)[order].unsqueeze(0), source=source.unsqueeze(0))
    return torch.cat(outs)[order], state


def _anyres_image_features(lm: nn.Module, original: Callable, pixel_values: Tensor,
                           image_sizes: Optional[Tensor] = None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``LlavaNextModel`` / ``LlavaOnevisionModel.get_image_features``: each image's packed tokens
    (base view, crops, newlines) are reduced to its budget (see the module docstring); newlines stay."""
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", True)
    sizes = _host_sizes(image_sizes)
    cropped = _cropped(sizes, kwargs.get("batch_num_images"))
    aspect = _aspect(lm, kwargs.get("vision_aspect_ratio"))
    images = [ctx.image_layout(lm, s, c, aspect) for s, c in zip(sizes, cropped)]  # host bookkeeping, cached
    host_sizes = [list(s) for s in sizes]  # the model reads them per image: hand it host values
    call = functools.partial(original, pixel_values, host_sizes, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if all(reduced_length(ctx.keep, image) == image.length for image in images):
        _record(ctx, MergeInfo(schedule=[0], tokens_per_layer=[sum(i.length for i in images)] * 2,
                               items=[(i.length, i.length) for i in images]))
        out = call(**kwargs)
        return out if return_dict else out.to_tuple()
    out = call(**_hidden_request(ctx, kwargs))
    tiles = [i.tiles for i in images]
    keys, score = _keys_and_scores(lm, ctx.layout, out.hidden_states, ctx.method in SCORED)
    tokens = torch.cat(list(out.pooler_output))  # [L, C]: every image's packed tokens
    if tokens.shape[0] != sum(i.length for i in images) or keys.shape[0] != sum(tiles):
        raise RuntimeError(f"mmmerge.llava: the model packed {tokens.shape[0]} tokens from {keys.shape[0]} tiles, the "
                           f"layouts say {[i.length for i in images]} from {tiles}; this transformers version packs "
                           "anyres images differently")
    d = ctx.layout.drop
    keys = keys[:, d:]
    score = None if score is None else score[:, d:]
    plan = _ragged_plan(ctx, images, keys.device)
    if plan.origin is not None:  # metric and score of the tower token behind each packed position
        metric = keys.flatten(0, 1)[plan.origin]
        score = None if score is None else score.flatten()[plan.origin]
    else:  # a resampled grid: pack them with the model's own code (its loop over images), as the features
        extras = keys.float() if score is None else torch.cat([keys.float(), score[..., None]], -1)
        packed = torch.cat(_pack(lm, extras.split(tiles), torch.tensor(sizes), extras.new_zeros(extras.shape[-1]),
                                 ctx.layout.strategy, aspect))
        width = keys.shape[-1]
        metric, score = packed[:, :width].to(keys.dtype), None if score is None else packed[:, width]
    query = _item_queries(ctx, lm, lm.config.image_token_id, plan.counts_out)
    if query is not None:
        query = (*query, plan.ends_in)
    y, state = _reduce_ragged(ctx, tokens, metric, score, plan, query)
    total_in = sum(i.length for i in images)
    _record(ctx, MergeInfo(schedule=[total_in - y.shape[0]], tokens_per_layer=[total_in, y.shape[0]], state=state,
                           items=plan.items))
    out.pooler_output = list(y.split(plan.lengths_out))
    return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------------------- video wrapper
def _video_tokens(ctx: LlavaContext, lm: nn.Module) -> int:
    """Pooled tokens per frame: NeXT-Video's ``spatial_pool_stride`` pooling, OneVision's 2x bilinear one."""
    rows, cols = ctx.layout.rows, ctx.layout.cols
    if ctx.kind.name == "llava_onevision":
        return math.ceil(rows / 2) * math.ceil(cols / 2)
    stride = lm.config.spatial_pool_stride
    return (rows // stride) * (cols // stride)


def _video_keep(ctx: LlavaContext, frames: int, per_frame: int) -> int:
    available = frames * per_frame
    keep = _resolve_keep(ctx.keep, available, "video")
    if ctx.time_mode == "within_frame" and keep % frames:
        raise ValueError(f"time_mode='within_frame' keeps the same count in every frame: keep={keep} must be a "
                         f"multiple of the {frames} frames (e.g. keep={keep - keep % frames or frames})")
    if ctx.time_mode not in ("global", "within_frame") and ctx.method in SCORED and keep < frames:
        raise ValueError(f"method '{ctx.method}' with time_mode='{ctx.time_mode}' keeps each frame's best token so "
                         f"that every token has an allowed host: keep={keep} must be at least the {frames} frames")
    return keep


def _pool_frames(ctx: LlavaContext, lm: nn.Module, x: Tensor) -> Tensor:
    """Pool per-frame tower tokens ``[B*T, rows*cols, c]`` like the model pools its video features."""
    if ctx.kind.name == "llava_onevision":
        return lm.apply_pooling(x)  # the model's own bilinear pooling (channel-agnostic)
    stride = lm.config.spatial_pool_stride
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], ctx.layout.rows, ctx.layout.cols)
    return F.avg_pool2d(grid, stride).flatten(2).transpose(1, 2)


def _video_features(lm: nn.Module, original: Callable, pixel_values_videos: Tensor, vision_feature_layer=None,
                    vision_feature_select_strategy=None, **kwargs):
    """Replacement of ``get_video_features`` (NeXT-Video, OneVision): ``keep`` tokens per video.

    The projected, pooled features ``[videos, frames * n, C]`` are reduced to ``[videos, keep, C]`` (OneVision's
    trailing newline token stays). Metric: the feature layer's keys, pooled like the features; score: [CLS]
    attention (CLIP) or the mean attention received (SigLIP), pooled likewise. ``within_frame`` reduces every
    frame to ``keep / frames`` on its own; ``adjacent``, ``window`` and ``global`` merge across frames under the
    matching constraint (frame spans stay contiguous).
    """
    ctx = _context_of(lm)
    _check_call(ctx, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", True)
    B, T = pixel_values_videos.shape[:2]
    n = _video_tokens(ctx, lm)
    keep = _video_keep(ctx, T, n)
    info = MergeInfo(schedule=[T * n - keep], tokens_per_layer=[T * n, keep])
    call = functools.partial(original, pixel_values_videos, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True)
    if keep == T * n:
        _record(ctx, info)
        out = call(**kwargs)
        return out if return_dict else out.to_tuple()
    out = call(**_hidden_request(ctx, kwargs))
    keys, score = _keys_and_scores(lm, ctx.layout, out.hidden_states, ctx.method in SCORED)
    pooled = out.pooler_output
    split = isinstance(pooled, (tuple, list))  # transformers 5.17: one [T, n, C] tensor per video
    x = torch.stack(list(pooled)).flatten(1, 2) if split else pooled
    newline = x[:, T * n:]  # OneVision (transformers >= 5.24) appends one newline per video
    x = x[:, : T * n]
    d = ctx.layout.drop
    metric = _pool_frames(ctx, lm, keys[:, d:])  # [B*T, n, c]
    if score is not None:
        score = _pool_frames(ctx, lm, score[:, d:, None])[..., 0]  # [B*T, n]
    query = _item_queries(ctx, lm, lm.config.video_token_id,
                          torch.full((B,), keep + newline.shape[1], device=x.device))
    if ctx.time_mode == "within_frame":
        query = None if query is None else tuple(q.repeat_interleave(T, dim=0) for q in query)  # per frame
        y, state = _reduce(ctx, x.reshape(B * T, n, -1), metric, score, keep // T, 0, query=query)
        y = y.reshape(B, keep, -1)
        # Per-frame states back to one [B, T * n] source map over the whole video.
        offsets = (torch.arange(T, device=x.device) * (keep // T)).repeat(B).unsqueeze(1)
        state = TokenState(size=state.size.reshape(B, keep), source=(state.source + offsets).reshape(B, T * n))
    else:
        t = torch.arange(T, device=x.device, dtype=torch.float32).repeat_interleave(n)
        state = init_state(B, T * n, device=x.device, coords={"t": t, "t_min": t, "t_max": t},
                           rules={"t_min": "min", "t_max": "max"})
        y, state = _reduce(ctx, x, metric.reshape(B, T * n, -1),
                           None if score is None else score.reshape(B, T * n), keep, 0, state=state,
                           constraint=parse_constraint(ctx.time_mode, steps={"t": T}), query=query)
    info.state = state
    _record(ctx, info)
    y = torch.cat([y, newline], 1)
    out.pooler_output = y.unsqueeze(1).unbind(0) if split else y
    return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------- the prompt as CDPruner's query
# method="cdpruner": the query of every image (video) is the text of its own prompt, embedded by the LM's own
# input embedding table (placeholders and padding left out), and it is compared with the projected visual
# tokens: DivPrune and CDPruner measure similarity on the tokens being reduced, the LM's visual inputs, as the
# papers do (the other methods use the feature layer's keys). So the tokens kept follow the question. The
# prompt is held for one call in a per-thread slot: set by a pre-hook on the inner model's forward (when pixels
# come with it) or by ``generate()`` (which runs the tower before its first forward), and used once. Without a
# prompt (``get_image_features`` called alone, or ``inputs_embeds``) cdpruner is plain DPP diversity. Cost: one
# embedding lookup of the prompt and an ``[items, N, L]`` cosine, about N * L * C multiply-adds per item
# (LLaVA-1.5-7B, 576 tokens, a 100-token prompt, C = 4096: 0.24 GFLOP, under 0.1% of the ViT-L/336 tower).
SELF_METRIC = ("divprune", "cdpruner")


def _check_query_options(method: str, where: str, hyper: Dict[str, Any]) -> None:
    if method == "cdpruner" and where != "post_projector":
        raise ValueError("method 'cdpruner' compares the prompt's text embeddings with projected visual tokens: use "
                         "where='post_projector'")
    for name in ("query", "query_mask"):
        if name in hyper:
            raise ValueError(f"{name}= is made by the adapter (the prompt's text embeddings of each image); remove "
                             f"{name}=")


def _hold_prompt(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook on the inner model (registered once, for cdpruner): hold this call's prompt for every
    reduction of the call (its images and its videos), in this thread, until ``_release_prompt``."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    _CALL.__dict__.setdefault("prompts", []).append((id(module), getattr(_CALL, "prompt", None)))
    if ids is not None and any(kwargs.get(name) is not None for name in ("pixel_values", "pixel_values_videos")):
        _CALL.prompt = (ids, kwargs.get("attention_mask"))
    return None


def _release_prompt(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
    """Forward hook on the inner model (always called, also when the call raises): the prompt held before
    this call comes back, so no later call of this thread sees this one's."""
    held = getattr(_CALL, "prompts", None)
    if held and held[-1][0] == id(module):  # a pre-hook that raised first never held one
        _CALL.prompt = held.pop()[1]
    return None


def _generate_with_prompt(model: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Replacement of ``generate`` (cdpruner): hold the prompt for the vision step that runs before the first
    forward, in this thread, for the call."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    outer = getattr(_CALL, "prompt", None)
    _CALL.prompt = (ids, kwargs.get("attention_mask")) if isinstance(ids, Tensor) else None
    try:
        return original(*args, **kwargs)
    finally:
        _CALL.prompt = outer


def _item_queries(ctx: LlavaContext, lm: nn.Module, token_id: int, counts: Tensor
                  ) -> Optional[Tuple[Tensor, Tensor]]:
    """cdpruner's query of every item (image / video) of this call: ``(embeddings [items, L, C], mask [items, L])``
    of the prompt row that holds the item's placeholders; None for other methods or without a prompt.

    ``counts`` ``[items]``: placeholders of each item, in order; item i's prompt row is the row of its first
    placeholder in the batch read row by row (one ``searchsorted``, no host sync), on ``ids``' device. The
    held prompt is the call's (``_hold_prompt`` / ``generate``): the image and the video reductions of one
    forward both read it.
    """
    prompt = getattr(_CALL, "prompt", None)
    if ctx.method != "cdpruner" or prompt is None:
        return None
    ids, attention_mask = prompt
    row_end = (ids == token_id).sum(1).cumsum(0)  # [B] placeholders up to the end of each row
    rows = torch.searchsorted(row_end, counts.cumsum(0) - counts, right=True).clamp_max(ids.shape[0] - 1)
    text = ids != token_id
    for other in ("image_token_id", "video_token_id"):
        other_id = getattr(lm.config, other, None)
        if other_id is not None:
            text = text & (ids != other_id)
    if attention_mask is not None:
        text = text & attention_mask.bool()
    embeddings = lm.get_input_embeddings()(ids)  # [B, L, C]
    return embeddings[rows], text[rows]


# ------------------------------------------------------------------------------------ placeholder counts
def _runs(ids: Tensor, token_id: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Placeholder runs of ``ids`` ``[B, L]``: ``(is_placeholder, position_in_run, is_run_end)``, all ``[B, L]``."""
    m = ids == token_id
    prev = F.pad(m[:, :-1], (1, 0), value=False)
    nxt = F.pad(m[:, 1:], (0, 1), value=False)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start = torch.where(m & ~prev, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return m, pos - start, m & ~nxt


def _video_counts(ctx: LlavaContext, lm: nn.Module, frames: int) -> Tuple[int, int]:
    """(placeholders of one unreduced video, of one reduced video), newline included."""
    n = _video_tokens(ctx, lm)
    return frames * n + ctx.kind.video_newline, _video_keep(ctx, frames, n) + ctx.kind.video_newline


def _check_placeholder_runs(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook on the inner model (registered once, at patch time; reads the context of the model it
    runs on, so a copy checks its own): every placeholder run is a whole number of reduced images (videos) of
    LLaVA-1.5 and the video models (transformers only compares totals). Checked as transformers checks the
    totals (``torch_compilable_check``: ValueError, one bool read on the host). Anyres images have a count per
    image size; their totals are checked by transformers, their split by ``check_placeholder_counts``."""
    ctx = module.__dict__.get("_mmmerge_llava")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ctx is None or ids is None:
        return None
    config = module.config
    checks = []
    encoded = kwargs.get("mm_encoder_outputs") or {}  # generate() runs the tower before the prefill
    if ctx.kind.images == "uniform" and (kwargs.get("pixel_values") is not None or encoded.get("image") is not None):
        checks.append((config.image_token_id, ctx.keep_tokens, "image"))
    videos = kwargs.get("pixel_values_videos")
    if ctx.kind.videos and videos is not None:
        checks.append((config.video_token_id, _video_counts(ctx, module, videos.shape[1])[1], "video"))
    elif ctx.kind.videos and encoded.get("video") is not None:
        pooled = encoded["video"].pooler_output
        count = pooled[0].flatten(0, 1).shape[0] if isinstance(pooled, (tuple, list)) else pooled.shape[1]
        checks.append((config.video_token_id, count, "video"))
    for token_id, keep, what in checks:
        m, pos, end = _runs(ids, token_id)
        torch_compilable_check((((pos + 1) % keep == 0) | ~end).all(),
                               f"mmmerge.llava: a run of {what} placeholders is not a multiple of keep={keep}; "
                               f"the processor or input_ids were made for another keep: pass processor= to "
                               f"reduce_visual_tokens or rewrite input_ids with compact_image_tokens")
    return None


def _anyres_counts(ctx: LlavaContext, lm: nn.Module, image_sizes: Any, batch_num_images: Any
                   ) -> Tuple[List[int], List[int]]:
    """Per anyres image, in batch order: (unreduced placeholders, reduced placeholders)."""
    if image_sizes is None:
        raise ValueError(f"{type(lm).__name__} has a token count per image size: pass image_sizes= (and, for "
                         "OneVision prompts with several images, batch_num_images=) from the processor's output")
    sizes = _host_sizes(image_sizes)
    images = [ctx.image_layout(lm, s, c, _aspect(lm)) for s, c in zip(sizes, _cropped(sizes, batch_num_images))]
    return [i.length for i in images], [reduced_length(ctx.keep, i) for i in images]


def _uniform_keep_mask(ids: Tensor, token_id: int, full: int, keep: int, what: str) -> Tensor:
    """``[B, L]``: False for the placeholders past ``keep`` in each item of ``full`` placeholders."""
    m, pos, end = _runs(ids, token_id)
    lengths = (pos + 1)[end]
    bad = lengths[lengths % full != 0]
    if bad.numel():
        raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of the {full} "
                         f"an unreduced {what} has; compact_image_tokens expects inputs from the unpatched "
                         "processor (already compacted inputs need no rewrite)")
    return ~m | (pos % full < keep)


def _ragged_keep_mask(ids: Tensor, token_id: int, full: Sequence[int], keep: Sequence[int]) -> Tensor:
    """``[B, L]``: False for the placeholders past ``keep[i]`` in image i (images in row-major order)."""
    m = ids == token_id
    total = int(m.sum())
    if total != sum(full):
        raise ValueError(f"input_ids hold {total} image placeholders, but these images make {sum(full)} unreduced "
                         f"({list(full)} per image); compact_image_tokens expects inputs from the unpatched processor "
                         "and the image_sizes of the same batch")
    flat = m.flatten()
    rank = flat.long().cumsum(0) - 1  # placeholder index in the batch
    ends = torch.tensor(list(full), device=ids.device).cumsum(0)
    image = torch.searchsorted(ends, rank.clamp_min(0), right=True).clamp_max(len(full) - 1)
    position = rank - (ends - torch.tensor(list(full), device=ids.device))[image]
    kept = position < torch.tensor(list(keep), device=ids.device)[image]
    return (~flat | kept).view_as(ids)


def check_placeholder_counts(input_ids: Tensor, model: nn.Module, num_frames: Optional[int] = None,
                             image_sizes: Any = None, batch_num_images: Any = None) -> None:
    """Raise ValueError unless every image (video) has exactly its reduced count of placeholders.

    Host-side check (one sync), for use outside the forward path. LLaVA-1.5 and videos: each run of placeholders
    is a whole number of reduced items. Anyres images (pass ``image_sizes``, and ``batch_num_images`` for
    OneVision prompts with several images): the placeholders split, in order, into one contiguous run per image
    of exactly its reduced count.
    """
    ctx = _context(model)
    lm = _inner(model)
    checks = []
    if ctx.kind.images == "uniform":
        checks.append((lm.config.image_token_id, ctx.keep_tokens, "image"))
    if ctx.kind.videos and bool((input_ids == lm.config.video_token_id).any()):
        if num_frames is None:
            raise ValueError("this is a video model: pass num_frames= (frames per video) to count video placeholders")
        checks.append((lm.config.video_token_id, _video_counts(ctx, lm, num_frames)[1], "video"))
    for token_id, keep, what in checks:
        m, pos, end = _runs(input_ids, token_id)
        lengths = (pos + 1)[end]
        bad = lengths[lengths % keep != 0]
        if bad.numel():
            raise ValueError(f"input_ids hold a run of {int(bad[0])} {what} placeholders, not a multiple of "
                             f"keep={keep}; use the patched processor or compact_image_tokens")
    if ctx.kind.images == "anyres" and bool((input_ids == lm.config.image_token_id).any()):
        _, reduced = _anyres_counts(ctx, lm, image_sizes, batch_num_images)
        where = torch.nonzero((input_ids == lm.config.image_token_id).flatten()).flatten()
        if where.numel() != sum(reduced):
            raise ValueError(f"input_ids hold {where.numel()} image placeholders, these images need {sum(reduced)} "
                             f"({reduced} per image); use the patched processor or compact_image_tokens")
        counts = torch.tensor(reduced)
        starts = counts.cumsum(0) - counts
        first, last = where[starts], where[starts + counts - 1]
        L = input_ids.shape[1]
        broken = ((last - first + 1) != counts) | (first // L != last // L)
        if bool(broken.any()):
            i = int(torch.nonzero(broken)[0])
            raise ValueError(f"image {i}'s {reduced[i]} placeholders are not one contiguous run in one row; use the "
                             "patched processor or compact_image_tokens")


def compact_image_tokens(input_ids: Tensor, attention_mask: Optional[Tensor], model: nn.Module,
                         num_frames: Optional[int] = None, pad_token_id: Optional[int] = None,
                         image_sizes: Any = None, batch_num_images: Any = None) -> Tuple[Tensor, Tensor]:
    """Rewrite inputs expanded for the unpatched model so every image (video) has its reduced placeholder count.

    Of every item's placeholders the first ``count`` remain (the LM fills them in order, so only the count
    matters). LLaVA-1.5 and videos: each run must hold a whole number of unreduced items (N each, 576 for
    LLaVA-1.5; frames x tokens per frame (+1 newline, OneVision) for video). Anyres images: pass the batch's
    ``image_sizes`` (and ``batch_num_images`` for OneVision prompts with several images); the placeholders are
    assigned to the images in order. Rows are re-padded on the side the input was padded on (left if any row
    starts with padding).

    Args:
        input_ids: ``[B, L]`` long. attention_mask: ``[B, L]`` or None (no padding). model: a model patched
            by ``reduce_visual_tokens``. num_frames: frames per video (videos only).
        pad_token_id: id for new padding (default: the model's pad id, else 0).
    Returns:
        ``(input_ids [B, L'], attention_mask [B, L'])`` on the input's device. Host syncs (L' is data
        dependent): call it once per batch, outside the model's forward.
    Raises:
        ValueError if the model is not patched or the placeholders do not match unreduced items.
    """
    ctx = _context(model)
    lm = _inner(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()
    kept = real
    if ctx.kind.images == "uniform":
        kept = kept & _uniform_keep_mask(input_ids, lm.config.image_token_id, ctx.layout.num_features,
                                         ctx.keep_tokens, "image")
    elif ctx.kind.images == "anyres" and bool((input_ids == lm.config.image_token_id).any()):
        full, reduced = _anyres_counts(ctx, lm, image_sizes, batch_num_images)
        kept = kept & _ragged_keep_mask(input_ids, lm.config.image_token_id, full, reduced)
    if ctx.kind.videos and bool((input_ids == lm.config.video_token_id).any()):
        if num_frames is None:
            raise ValueError("this is a video model: pass num_frames= (frames per video) to count video placeholders")
        full, keep = _video_counts(ctx, lm, num_frames)
        kept = kept & _uniform_keep_mask(input_ids, lm.config.video_token_id, full, keep, "video")
    counts = kept.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    left = bool((~real[:, 0]).any()) and bool(real[:, -1].all())
    B, L = input_ids.shape
    rank = kept.long().cumsum(1) - 1  # slot among kept tokens
    slot = rank + (width - counts).unsqueeze(1) if left else rank
    if pad_token_id is None:
        pad_token_id = getattr(getattr(lm.config, "text_config", lm.config), "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    new_ids = input_ids.new_full((B, width + 1), pad_token_id)
    new_mask = attention_mask.new_zeros((B, width + 1))
    dest = torch.where(kept, slot, torch.full_like(slot, width))  # dropped tokens go to a spare column
    new_ids.scatter_(1, dest, input_ids)
    new_mask.scatter_(1, dest, torch.ones_like(attention_mask))
    return new_ids[:, :width].contiguous(), new_mask[:, :width].contiguous()


# ------------------------------------------------------------------------------------------- processors
def _tile_size(sub: Any) -> Optional[Tuple[int, int]]:
    """The pixel size a sub-processor (image or video) hands the tower: its crop, or a fixed height x width."""
    for name in ("crop_size", "size"):
        value = getattr(sub, name, None)
        if value is None:
            continue
        h, w = (value.get("height"), value.get("width")) if isinstance(value, dict) else (
            getattr(value, "height", None), getattr(value, "width", None))
        if h is not None and w is not None:
            return int(h), int(w)
    return None


def _check_processor(processor: Any, model: nn.Module, kind: ModelKind, layout: Layout) -> None:
    cfg = _inner(model).config
    names = [c.__name__ for c in type(processor).__mro__]
    if kind.processor not in names:
        raise TypeError(f"processor is a {type(processor).__name__}, but a {type(model).__name__} needs a "
                        f"{kind.processor}")
    problems = []
    patch = cfg.vision_config.patch_size
    if hasattr(processor, "patch_size") and processor.patch_size != patch:
        problems.append(f"patch_size {processor.patch_size} vs the tower's {patch}")
    if getattr(processor, "num_image_tokens", None) not in (None, layout.num_features):
        problems.append(f"num_image_tokens {processor.num_image_tokens} vs the tower's {layout.num_features}")
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if strategy is not None and strategy != cfg.vision_feature_select_strategy:
        problems.append(f"vision_feature_select_strategy '{strategy}' vs the model's "
                        f"'{cfg.vision_feature_select_strategy}'")
    if getattr(processor, "image_token_id", cfg.image_token_id) != cfg.image_token_id:
        problems.append(f"image_token_id {processor.image_token_id} vs the model's {cfg.image_token_id}")
    if kind.videos and getattr(processor, "video_token_id", cfg.video_token_id) != cfg.video_token_id:
        problems.append(f"video_token_id {processor.video_token_id} vs the model's {cfg.video_token_id}")
    # The pixels the processor makes for what gets reduced: images and/or video frames.
    size = cfg.vision_config.image_size
    for what, reduced in (("image", kind.images is not None), ("video", kind.videos)):
        tile = _tile_size(getattr(processor, f"{what}_processor", None)) if reduced else None
        if tile is not None and tile != (size, size):
            problems.append(f"{what} crop {tile[0]}x{tile[1]} vs the tower's {size}x{size}")
    aspect = getattr(processor, "vision_aspect_ratio", None)
    if aspect is not None and getattr(cfg, "vision_aspect_ratio", aspect) != aspect:
        problems.append(f"vision_aspect_ratio '{aspect}' vs the model's '{cfg.vision_aspect_ratio}'")
    if kind.images == "anyres":
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        if pinpoints is not None and [list(p) for p in pinpoints] != [list(p) for p in cfg.image_grid_pinpoints]:
            problems.append(f"image_grid_pinpoints {pinpoints} vs the model's {cfg.image_grid_pinpoints}")
    if problems:
        raise ValueError("processor does not match the model: " + "; ".join(problems) +
                         ". Load the processor saved with this model (AutoProcessor.from_pretrained(same path))")
    for attr, needed in (("replace_image_token", kind.images is not None), ("replace_video_token", kind.videos)):
        if needed and not hasattr(type(processor), attr):
            raise TypeError(f"{type(processor).__name__} has no {attr} (this transformers version expands tokens "
                            "differently); use compact_image_tokens on its output instead")


def _patch_processor(processor: Any, ctx: LlavaContext, lm: nn.Module) -> Callable[[], None]:
    """Make the processor expand each ``<image>`` / ``<video>`` to its reduced count.

    Anyres images: the unpatched expansion gives the image's full count; the model's own packing (for that
    image size) gives its layout, which must agree, and the reduced count follows from the budget rule.
    """
    cls = type(processor)
    replacements: Dict[str, Callable] = {}
    if ctx.kind.images == "uniform":
        def replace_image(self, *args, **kwargs) -> str:
            return self.image_token * ctx.keep_tokens
        replacements["replace_image_token"] = replace_image
    elif ctx.kind.images == "anyres":
        def replace_image(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            full = len(cls.replace_image_token(self, image_inputs, image_idx, **kwargs)) // len(self.image_token)
            size = image_inputs["image_sizes"][image_idx]
            size = size.tolist() if isinstance(size, Tensor) else list(size)
            aspect = _aspect(lm)  # the model's (checked against the processor's at patch time)
            # OneVision does not crop an image of a prompt with several images: its base view and one newline.
            cropped = full != ctx.layout.num_features + 1
            image = ctx.image_layout(lm, size, cropped, aspect)
            if image.length != full:
                raise ValueError(f"the processor expands this {size[0]}x{size[1]} image to {full} tokens, the model "
                                 f"packs {image.length}: processor and model settings differ (image_grid_pinpoints, "
                                 "vision_aspect_ratio, tile size)")
            return self.image_token * reduced_length(ctx.keep, image)
        replacements["replace_image_token"] = replace_image
    if ctx.kind.videos:
        def replace_video(self, video_inputs: dict = None, video_idx: int = 0, **kwargs) -> str:
            frames = len(video_inputs["pixel_values_videos"][video_idx])
            full, reduced = _video_counts(ctx, lm, frames)
            given = len(cls.replace_video_token(self, video_inputs, video_idx, **kwargs)) // len(self.video_token)
            if given != full:
                raise ValueError(f"the processor expands a {frames}-frame video to {given} tokens, the model makes "
                                 f"{full}: processor and model settings differ")
            return self.video_token * reduced
        replacements["replace_video_token"] = replace_video
    saved = {attr: (attr in processor.__dict__, processor.__dict__.get(attr)) for attr in replacements}
    for attr, fn in replacements.items():
        setattr(processor, attr, types.MethodType(fn, processor))

    def undo() -> None:
        for attr, (had, old) in saved.items():
            if had:
                setattr(processor, attr, old)
            else:
                processor.__dict__.pop(attr, None)
    return undo


# ------------------------------------------------------------------------------------------- options
def _check_method_options(method: str, hyper: Dict[str, Any], device: torch.device) -> None:
    """Every matcher option is checked now, by the engine: names by ``check_options``, values by one tiny call
    of the engine's own reduction with these options (temperature <= 0, an unknown preset, contextual=0 ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    check_options(method, hyper)
    if "score" in hyper:
        raise ValueError("score is computed by the adapter ([CLS] attention, or the mean attention received for "
                         "towers without [CLS]); remove score=")
    generator = hyper.get("generator")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the model on {device}: make it with "
                             f"torch.Generator(device='{device.type}')")
    contextual = hyper.get("contextual")
    kept = contextual if isinstance(contextual, int) and not isinstance(contextual, bool) and contextual > 4 else 4
    state = generator.get_state() if generator is not None else None
    # The trial call must not move any random stream: the user's generator, or torch's default ones.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            x = torch.linspace(-1.0, 1.0, 2 * kept * 4, device=device).view(1, 2 * kept, 4)
            extra = {"score": x[..., 0]} if method in SCORED else {}
            reduce_tokens(x, kept, method, metric=x, **extra, **hyper)
        except (TypeError, ValueError) as err:
            raise type(err)(f"method '{method}' rejects its options {sorted(hyper)}: {err}") from None
        finally:
            if generator is not None:
                generator.set_state(state)


def _where(where: str, hyper: Dict[str, Any]) -> str:
    if "stage" in hyper:
        raise TypeError("stage= was merged into where=: use where='post_projector' (default) or "
                        "where='pre_projector' (or where='vision_tower')")
    if where == "pre_llm":
        warnings.warn("where='pre_llm' is now where='post_projector' (reduce after the projector, the default) or "
                      "where='pre_projector'", FutureWarning, stacklevel=3)
        where = "post_projector"
    if where not in WHERE:
        raise ValueError(f"unknown where='{where}'; choose one of {', '.join(WHERE)}")
    return where


# ---------------------------------------------------------------------------------------- patch / undo
def _context(model: nn.Module) -> LlavaContext:
    ctx = _inner(model).__dict__.get("_mmmerge_llava")
    if ctx is None:
        raise ValueError(f"{type(model).__name__} is not patched: call reduce_visual_tokens(model, keep=...) first")
    return ctx


def _context_of(lm: nn.Module) -> LlavaContext:
    ctx = lm.__dict__.get("_mmmerge_llava")
    if ctx is None:  # only reachable if the patch's attributes were removed by hand
        raise RuntimeError(f"{type(lm).__name__} has a reduced feature method but no mmmerge context; call "
                           "restore_visual_tokens(model) and patch again")
    return ctx


class _Replacement:
    """A method of the inner model replaced while patched (an instance attribute; the class is untouched).

    Calling it calls ``fn(owner, original, *args, **kwargs)``, ``fn`` a module-level wrapper and ``original`` the
    model's own method. It holds only its owner, the wrapper and the method's name, so ``copy.deepcopy`` of the
    model gives the copy a replacement bound to the copy, and pickle stores the wrapper by reference (a bound
    method would not do: it pickles as ``getattr(owner, fn.__name__)``). Its signature is the original's:
    ``generate()`` routes pixel inputs by it.
    """

    def __init__(self, owner: nn.Module, name: str, fn: Callable, previous: Optional[Callable] = None) -> None:
        self.owner = owner
        self.name = name
        self.fn = fn
        self.previous = previous  # an instance attribute of that name the patch replaced (restored with it)

    @property
    def original(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return getattr(type(self.owner), self.name).__get__(self.owner, type(self.owner))

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.owner, self.original, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name} of {type(self.owner).__name__}, reduced by mmmerge.llava ({self.fn.__name__})>"


_HOOKS = (_check_placeholder_runs, _tower_output_hook, _projector_input_hook, _hold_prompt, _release_prompt)  # all the patch registers


def _remove_hooks(root: nn.Module) -> None:
    """Remove every hook of this adapter from ``root`` and its submodules (found by function, so it works on a
    copy, whose hook dictionaries are copies of the original's)."""
    for module in root.modules():
        for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                              (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                       module._forward_hooks_always_called))):
            for key in [k for k, fn in hooks.items() if fn in _HOOKS]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


def _unpatch_model(model: nn.Module) -> None:
    """Undo what ``reduce_visual_tokens`` installed on ``model`` (or on a copy of it): replacements, hooks, the
    encoder patch of the tower, the attributes, and the processors patched with it (the original's only)."""
    lm = _inner(model)
    ctx = lm.__dict__.get("_mmmerge_llava")
    if ctx is not None:
        for undo in reversed(ctx.processor_undo):
            undo()
        ctx.processor_undo.clear()
        if ctx.where == "vision_tower":
            unpatch_encoder(getattr(lm.vision_tower, "vision_model", lm.vision_tower))
    for owner in {id(model): model, id(lm): lm}.values():
        for name, value in list(owner.__dict__.items()):
            if isinstance(value, _Replacement) and value.owner is owner:
                if value.previous is not None:
                    owner.__dict__[name] = value.previous
                else:
                    del owner.__dict__[name]
    _remove_hooks(lm)
    for module in {id(model): model, id(lm): lm}.values():
        for key in ("_mmmerge_llava", "_mmmerge", "_mmmerge_undo"):
            module.__dict__.pop(key, None)


def reduce_visual_tokens(model: nn.Module, keep: KeepSpec = 144, method: str = "tome", processor: Any = None,
                         where: str = "post_projector", time_mode: str = "global",
                         prop_attn: Optional[bool] = None, **hyper: Any) -> nn.Module:
    """Make a LLaVA model hand its language model fewer visual tokens per image (per video); in place.

    Args:
        model: a LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video or LLaVA-OneVision model (``...ForConditionalGeneration``
            or ``...Model``); see the module docstring for what each reduces.
        keep: an int (tokens per image / video; anyres images: a budget spread over base view and crops, an image
            with fewer features keeps all), or a float in (0, 1]: each item keeps ``ceil(keep * its tokens)``.
            Keeping everything is an exact no-op.
        method: ``tome``, ``pitome``, ``tps``, ``random``, ``prune``, ``dominant`` (VisionZip-style), ``divprune``
            or ``cdpruner`` (its query is each image's prompt, taken from ``forward`` / ``generate``).
        processor: the model's processor; patched to emit the reduced count per image (video).
        where: ``post_projector`` (default), ``pre_projector`` (LLaVA-1.5) or ``vision_tower`` (LLaVA-1.5).
        time_mode: videos: ``global``, ``within_frame``, ``adjacent`` or ``window(k)`` (blocks of k frames).
        prop_attn: ``vision_tower`` only: proportional attention in the merged layers; default on, except for
            ``prune`` (as in the video and audio adapters).
        **hyper: matcher options (pitome ``margin``/``alpha``/``preset``, tps ``temperature``, random
            ``generator``, dominant ``contextual``, divprune / cdpruner ``drop_unselected``), checked now.
    Returns:
        the model. ``restore_visual_tokens(model, processor)`` undoes everything. The reduced model can be
        deep-copied, pickled, called from several threads and compiled (see the module docstring).
    Raises:
        TypeError (unsupported model or processor, wrong option type), ValueError (bad keep, method, where,
        time_mode, option value, or a processor that does not match): checked before any change, so the model
        (and processor) are left as they were.
    """
    if "window" in hyper:
        raise ValueError("reduce_visual_tokens takes no option 'window'; use time_mode='window(k)'")
    if "r" in hyper:
        raise TypeError("LLaVA models take keep= (visual tokens kept per image, or a fraction such as keep=0.25), "
                        "not r= (tokens removed per encoder layer, for the video and audio encoders)")
    kind = _kind(model)
    lm = _inner(model)
    layout = _layout(lm)
    where = _where(where, hyper)
    device = next(lm.parameters()).device
    _check_query_options(method, where, hyper)
    _check_method_options(method, hyper, device)
    if kind.videos:  # the engine's parser: TypeError / ValueError naming the valid modes
        mode, k = parse_time_mode(time_mode, TIME_MODES)
        time_mode = f"window({k})" if mode == "window" else mode
    elif time_mode != "global":
        raise ValueError("time_mode is for video models; images have no time axis")
    if (kind.images == "anyres" or kind.videos) and not layout.square:
        raise ValueError(f"{type(model).__name__} packs (pools) a square grid of features per crop (frame): a tower "
                         "with [CLS] needs vision_feature_select_strategy='default', one without needs 'full'")
    keep_tokens = None
    if kind.images == "uniform":
        keep_tokens = _resolve_keep(keep, layout.num_features)
        if keep_tokens < layout.protected + 1:
            raise ValueError(f"keep={keep_tokens} leaves no room next to the [CLS] token the 'full' strategy keeps")
    else:
        _check_keep(keep, "image" if kind.images else "video")
    if where != "post_projector" and kind.name != "llava":
        # The model packs every crop's full rows x cols grid (anyres: unpadding to the aspect ratio, a newline
        # after each row, OneVision's resampling of large grids) and pools every frame's full grid (videos):
        # tokens merged in the tower, or before the projector, have no grid left to pack or pool.
        raise ValueError(f"where='{where}' is implemented for LLaVA-1.5; {type(model).__name__} packs (pools) every "
                         "crop's / frame's full token grid after the projector, so tokens cannot be merged before "
                         "it: use where='post_projector' (the default), which reduces each image's packed tokens")
    if where == "vision_tower" and method == "dominant":
        raise ValueError("method 'dominant' selects from the tower's output: use where='post_projector'")
    ctx = LlavaContext(kind, keep, keep_tokens, method, where, layout, time_mode, dict(hyper))

    schedule = None
    layers = _tower_layers(lm)
    if where == "vision_tower" and keep_tokens < layout.num_features:
        if len(layout.feature_layers) != 1:
            raise ValueError("where='vision_tower' needs one vision_feature_layer (features of several layers "
                             "would have different token counts)")
        depth = layout.feature_layers[0]  # layers 0..depth-1 produce the features
        if depth == 0:
            raise ValueError("the features are the embeddings (vision_feature_layer=0): nothing to merge in the tower")
        target = keep_tokens + layout.drop
        try:
            sched = resolve_schedule(TargetTokens(target), depth, layout.tower_tokens, layout.cls, method=method)
        except ValueError as err:
            raise ValueError(f"where='vision_tower' cannot reach keep={keep_tokens} in the {depth} layers before the "
                             f"feature layer ({err}); use a larger keep or where='post_projector'") from None
        schedule = sched + [0] * (len(layers) - depth)
        for layer in layers:
            layer_parts(layer)  # raises TypeError for an unknown layer, before any change
    if processor is not None:
        _check_processor(processor, model, kind, layout)

    previous = _inner(model).__dict__.get("_mmmerge_llava")
    if previous is not None and previous.layout == layout:  # host-side memos outlive a re-patch
        ctx.image_layouts, ctx.plans = previous.image_layouts, previous.plans
    wrappers: List[Tuple[str, Callable]] = []
    if where != "vision_tower":
        if kind.images == "uniform":
            wrappers.append(("get_image_features", _image_features))
        elif kind.images == "anyres":
            wrappers.append(("get_image_features", _anyres_image_features))
        if kind.videos:
            wrappers.append(("get_video_features", _video_features))
        ctx.select_hidden = _select_hidden(layout, getattr(type(lm), wrappers[0][0]))
    # Everything is validated: replace any previous patch, then apply; any failure undoes what was done.
    restore_visual_tokens(model)
    try:
        lm._mmmerge_llava = ctx
        if schedule is not None:
            tower = getattr(lm.vision_tower, "vision_model", lm.vision_tower)
            grid = TokenGrid(layout.cls, (("row", layout.rows), ("col", layout.cols)))
            patch_encoder(tower, layers, grid=grid, layout=plan_layout(grid, "global"), r=schedule, method=method,
                          options=hyper, prop_attn=prop_attn,
                          trace_source=True, family="llava")
        for name, wrapper in wrappers:
            lm.__dict__[name] = _Replacement(lm, name, wrapper, lm.__dict__.get(name))
        if where == "pre_projector" and keep_tokens < layout.num_features:
            lm.vision_tower.register_forward_hook(_tower_output_hook)
            lm.multi_modal_projector.register_forward_pre_hook(_projector_input_hook)
        lm.register_forward_pre_hook(_check_placeholder_runs, with_kwargs=True)
        if method == "cdpruner":  # the prompt of each call is the query (see "the prompt as CDPruner's query")
            lm.register_forward_pre_hook(_hold_prompt, with_kwargs=True)
            lm.register_forward_hook(_release_prompt, with_kwargs=True, always_call=True)
            if model is not lm and callable(getattr(type(model), "generate", None)):
                model.__dict__["generate"] = _Replacement(model, "generate", _generate_with_prompt,
                                                          model.__dict__.get("generate"))
        if processor is not None:
            ctx.processor_undo.append(_patch_processor(processor, ctx, lm))
        if schedule is None:
            model._mmmerge = ctx
        model._mmmerge_undo = functools.partial(_unpatch_model, model)  # copies and pickles with the model
    except Exception:
        _unpatch_model(model)
        raise
    return model


def restore_visual_tokens(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo ``reduce_visual_tokens``: model (and processor) behave bit-identically to before. A no-op on an
    unpatched model; ``processor`` is restored even if it was patched with another call."""
    undo = model.__dict__.get("_mmmerge_undo")
    if undo is not None:
        undo()
    if processor is not None:
        for attr in ("replace_image_token", "replace_video_token"):
            processor.__dict__.pop(attr, None)
    return model


patch = reduce_visual_tokens
unpatch = restore_visual_tokens

for _name in SUPPORTED:
    register(_name, reduce_visual_tokens)
