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
Both come, in float32, from the feature layer's own norm and weights applied to that layer's input, a hidden
state the tower returns anyway, without projecting the keys a second time: the head-averaged keys are one
``d_head``-wide product by the heads' mean key weight, and the [CLS] score folds the [CLS] query into the key
weight (one ``[T, D] x [D, heads]`` product); about 0.03% of the FLOPs of a 24-layer ViT-L/336 tower. Only SigLIP
towers that need a score project every head's keys and queries (the attention each token receives). No hook in
the tower, which keeps its attention backend (sdpa, flash); nothing is forced eager.

On device, batched, no host sync: every reduction is one batched engine call for the whole batch. For anyres
images the rows are every image's base view and its crop part, rows of different lengths and keeps: they form one
padded batch with a budget per row (``mmmerge.reduce.plan_rows``: each row reduces exactly as it would alone, its
padding absorbing what its real tokens do not give up), so any mix of image sizes is one engine call and a fixed
set of ops (no loop over images or parts). The per-image bookkeeping (counts, index maps, the rows' budgets) is
host arithmetic on the image sizes, cached per size and per batch layout; its index maps reach the device from
pinned memory without a sync, once per batch layout. Keep
``image_sizes`` (and OneVision's ``batch_num_images``) on the host, as the processor makes them: the model loops
over them in Python, so on a device it reads each one (the reduction then reads them once and hands the model
host values).

How it is wired: the inner model's own ``get_image_features`` / ``get_video_features`` is replaced by an instance
attribute (a ``Replacement``: the class is untouched) that calls the original and reduces its output; the
context (``LlavaContext``, the settings) is a plain attribute of the inner model. Every hook is a module-level
function registered once, at patch time: a pre-hook on the inner model checks that each run of LLaVA-1.5 or
video placeholders is a whole number of reduced items without a host read of its own: a broken run hides that
kind's placeholders from the call's ``input_ids`` (one ``where`` on the device), so the model's own total check
(its one bool read per prefill; a hint under ``torch.compile``) fails, and the replaced ``get_placeholder_mask``
turns transformers' "features and tokens do not match" into mmmerge's ValueError naming ``processor=`` and
``compact_image_tokens``, which is also what inputs from an unpatched processor get, for every keep (never a
device-side assert, which would poison a CUDA context); for ``pre_projector``, a tower hook and a projector
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
      eager call: transformers installs its capture hooks, under a lock, at the first call); the whole model
      with ``torch.compile(model)``; and ``generate(..., cache_implementation="static")`` with a compiled
      decoding step (a reduced prompt's length is fixed by ``keep``).
``restore_visual_tokens`` removes every attribute and hook, so outputs are bit-identical to before.

The package, one part per file:
    kinds.py         model kinds (the one place a model class is recognised), the tower's token layout, ``keep``
    anyres.py        anyres arithmetic: packed layout of an image, budgets, index plans of a batch of images
    context.py       the patch's context, per-thread records for ``last_info``, replaced methods
    reduction.py     features and the reduction: keys and scores from the tower's hidden states, the engine call
    features.py      the replacements of ``get_image_features`` / ``get_video_features`` and the pre_projector hooks
    query.py         the prompt as CDPruner's query
    placeholders.py  placeholder tokens: the check at the call, ``compact_image_tokens``
    processor.py     the processor: checked against the model and patched to emit the reduced counts
    patch.py         ``reduce_visual_tokens`` / ``restore_visual_tokens``
"""
from __future__ import annotations

from mmmerge.patching import register

from .anyres import ImageLayout, anyres_budget, reduced_length
from .context import LlavaContext
from .kinds import KINDS, METHODS, SCORED, SELF_METRIC, SUPPORTED, WHERE, KeepSpec, ModelKind, model_kind
from .patch import patch, reduce_visual_tokens, restore_visual_tokens, unpatch
from .placeholders import check_placeholder_counts, compact_image_tokens

__all__ = ["reduce_visual_tokens", "restore_visual_tokens", "compact_image_tokens", "check_placeholder_counts",
           "anyres_budget", "reduced_length", "ImageLayout", "LlavaContext", "KINDS", "METHODS", "SCORED",
           "SELF_METRIC", "SUPPORTED", "WHERE", "KeepSpec", "ModelKind", "model_kind", "patch", "unpatch"]

for _name in SUPPORTED:
    register(_name, reduce_visual_tokens)
