"""The prompt as CDPruner's query: each image's (video's) prompt text, embedded by the LM's own table."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .context import CALL, LlavaContext


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
    CALL.__dict__.setdefault("prompts", []).append((id(module), getattr(CALL, "prompt", None)))
    if ids is not None and any(kwargs.get(name) is not None for name in ("pixel_values", "pixel_values_videos")):
        CALL.prompt = (ids, kwargs.get("attention_mask"))
    return None


def _release_prompt(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
    """Forward hook on the inner model (always called, also when the call raises): the prompt held before
    this call comes back, so no later call of this thread sees this one's."""
    held = getattr(CALL, "prompts", None)
    if held and held[-1][0] == id(module):  # a pre-hook that raised first never held one
        CALL.prompt = held.pop()[1]
    return None


def _generate_with_prompt(model: nn.Module, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """Replacement of ``generate`` (cdpruner): hold the prompt for the vision step that runs before the first
    forward, in this thread, for the call."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    outer = getattr(CALL, "prompt", None)
    CALL.prompt = (ids, kwargs.get("attention_mask")) if isinstance(ids, Tensor) else None
    try:
        return original(*args, **kwargs)
    finally:
        CALL.prompt = outer


def item_queries(ctx: LlavaContext, lm: nn.Module, token_id: int, counts: Tensor
                  ) -> Optional[Tuple[Tensor, Tensor]]:
    """cdpruner's query of every item (image / video) of this call: ``(embeddings [items, L, C], mask [items, L])``
    of the prompt row that holds the item's placeholders; None for other methods or without a prompt.

    ``counts`` ``[items]``: placeholders of each item, in order; item i's prompt row is the row of its first
    placeholder in the batch read row by row (one ``searchsorted``, no host sync), on ``ids``' device. The
    held prompt is the call's (``_hold_prompt`` / ``generate``): the image and the video reductions of one
    forward both read it.
    """
    prompt = getattr(CALL, "prompt", None)
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


