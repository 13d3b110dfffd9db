"""Qwen-VL adapter: fewer visual tokens reach the language model of Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

``reduce_visual_tokens(model, keep=..., method=..., processor=..., time_mode=...)`` makes a
``Qwen2VL`` / ``Qwen2_5_VL`` / ``Qwen3VL`` ``...ForConditionalGeneration`` (or ``...Model``) hand its language
model fewer visual tokens per image and per video; ``forward`` and ``generate()`` work as before (KV cache, left
padding, several images and videos per prompt). The same arguments as ``mmmerge.adapters.llava``:

    keep        an int (tokens per image / video, at most its count) or a fraction in (0, 1] of each item's
                F = t * (h/2) * (w/2) tokens; ``keep=1.0`` is an exact no-op
    method      tome, pitome, tps, random, prune, dominant, divprune, cdpruner (the prompt is the query)
    processor   patched to emit the reduced placeholder count of every image / video
    time_mode   videos: global, within_frame, adjacent, window(k) over temporal patches (Qwen3-VL:
                within_frame, its timestamps fix each patch's count)

``compact_image_tokens(input_ids, attention_mask, model, image_grid_thw=..., video_grid_thw=...)`` rewrites
inputs an unpatched processor expanded (and ``mm_token_type_ids=`` with them); ``restore_visual_tokens(model)``
gives the model back bit for bit.

``is_qwen_vl(model)`` says whether a model is one of these (``mmmerge.adapters.llava`` dispatches on it), and
``mmmerge.patch(model, keep=...)`` / ``mmmerge.unpatch`` / ``mmmerge.last_info`` work as for every adapter.

Files:
    kinds.py          model kinds, the context, the per-item budgets
    reduction.py      the reduction of each item's LM tokens with the engine (batched per grid shape)
    positions.py      M-RoPE: kept tokens keep their unreduced positions (the ``get_rope_index`` hook)
    features.py       the replaced feature calls and ``forward`` (the per-call frame)
    placeholders.py   ``compact_image_tokens`` and the processor patch
    patch.py          ``reduce_visual_tokens`` / ``restore_visual_tokens``
"""
from mmmerge.patching import register

from .kinds import SUPPORTED, is_qwen_vl
from .patch import reduce_visual_tokens, restore_visual_tokens
from .placeholders import compact_image_tokens

patch = reduce_visual_tokens
unpatch = restore_visual_tokens

for _name in SUPPORTED:  # mmmerge.patch(model, keep=...) dispatches here
    register(_name, reduce_visual_tokens)

__all__ = ["SUPPORTED", "compact_image_tokens", "is_qwen_vl", "patch", "reduce_visual_tokens",
           "restore_visual_tokens", "unpatch"]
