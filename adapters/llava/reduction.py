"""Features and the reduction: keys and scores from what the tower computed, and the engine call on the
projected tokens (batched rows, and a batch of packed anyres images as one padded batch)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmmerge.reduce import reduce_tokens
from mmmerge.rows import RowBudgets
from mmmerge.state import TokenState

from ..encoder import layer_parts
from .anyres import RaggedPlan
from .context import LlavaContext
from .kinds import SCORED, SELF_METRIC, Layout, tower_layers


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


def keys_and_scores(lm: nn.Module, layout: Layout, hidden_states: Sequence[Optional[Tensor]], need_score: bool
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
    parts = layer_parts(tower_layers(lm)[index])
    attn = parts.attention
    with torch.no_grad():  # matching builds no graph
        x = parts.norm1(h)
        # The keys in float32 (one projection of the feature layer's input): half-precision runs then score and
        # choose as a float32 run does, up to the tower's own activations.
        k = F.linear(x.float(), attn.k_proj.weight.float(),
                     None if attn.k_proj.bias is None else attn.k_proj.bias.float())
        B, T, D = k.shape
        heads = parts.num_heads
        kh = k.view(B, T, heads, D // heads)
        keys = kh.mean(2)
        if not need_score:
            return keys, None
        # The [CLS] score needs the [CLS] queries only: project that row alone (a CLIP-L tower: 1 of 577 rows);
        # towers without [CLS] rank by the attention every token receives, so every row is a query.
        queries = attn.q_proj(x[:, : layout.cls]) if layout.cls else attn.q_proj(x)
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


def _engine_call(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], keep: int, protected: int,
                 state: Optional[TokenState] = None, constraint=None, query: Optional[Tuple[Tensor, Tensor]] = None,
                 rows: Optional[RowBudgets] = None) -> Tuple[Tensor, TokenState]:
    """One ``reduce_tokens`` call of ``ctx.method`` on ``x`` ``[B, N, C]`` (``rows``: per-row budgets of a padded
    batch), with the method's metric, score and query."""
    hyper = dict(ctx.hyper)
    if ctx.method in SCORED and score is not None:
        hyper["score"] = score
    if ctx.method in SELF_METRIC:  # DivPrune and CDPruner compare the tokens handed to the LM themselves
        metric = x
        if query is not None:
            hyper["query"], hyper["query_mask"] = query
    return reduce_tokens(x, keep, ctx.method, metric=metric, protected=protected if state is None else 0,
                         state=state, constraint=constraint, check_layout=False,  # time-major by construction
                         rows=rows, **hyper)


def reduce_rows(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], keep: int, protected: int,
                state: Optional[TokenState] = None, constraint=None,
                query: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, TokenState]:
    """Reduce ``x`` ``[B, N, C]`` to ``[B, keep, C]`` with ``ctx.method``, in raster order (batched, no host sync).
    ``query``: cdpruner's ``(text embeddings [B, L, C], mask [B, L])`` of each row's prompt (``item_queries``)."""
    return _raster_order(*_engine_call(ctx, x, metric, score, keep, protected, state, constraint, query))


def reduce_ragged(ctx: LlavaContext, x: Tensor, metric: Tensor, score: Optional[Tensor], plan: RaggedPlan,
                  query: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, TokenState]:
    """Reduce the packed tokens of a batch of anyres images ``[L, C]`` (all images concatenated) in one engine call.

    Every image part (base view, crops) is a row of one padded batch ``[G, W, C]`` with its own keep (``plan``); the
    engine reduces each row as if alone. The real outputs and the untouched newline tokens are then ordered by the
    position of their earliest original token, which keeps images, parts and rows in order. A fixed set of batched
    ops whatever the images: no loop, no host read. Returns ``([L', C], state)`` with one state row over the whole
    batch: ``size`` ``[1, L']``, ``source`` ``[1, L]`` (packed position -> output token). ``query``: cdpruner's
    per-image ``(embeddings [images, Q, C], mask [images, Q])``; each row gets its image's prompt.
    """
    L = x.shape[0]
    G, K = plan.rows.shape[0], plan.keep
    y, state = _engine_call(ctx, x[plan.rows], metric[plan.rows], None if score is None else score[plan.rows], K, 0,
                            query=None if query is None else (query[0][plan.row_image], query[1][plan.row_image]),
                            rows=plan.budgets)  # [G, K, C]: row g's real outputs first, then padding
    first = torch.full((G, K), L, device=x.device, dtype=torch.long).scatter_reduce(1, state.source, plan.first,
                                                                                      reduce="amin")
    order = torch.cat([first.flatten(), plan.newlines]).argsort(stable=True)[: plan.total_out]  # padding sorts last
    inverse = torch.empty(G * K + plan.newlines.shape[0], device=x.device, dtype=torch.long).scatter_(
        0, order, torch.arange(plan.total_out, device=x.device))  # output slot -> output token (padding: unused)
    slots = torch.cat([(state.source + plan.offsets).flatten(), plan.newline_slots])  # [G * W + NL] entry -> slot
    source = inverse[slots[plan.entry_of]]  # [L] packed position -> output token
    tokens = torch.cat([y.flatten(0, 1), x[plan.newlines]])[order]
    size = torch.cat([state.size.flatten(), plan.newline_sizes])[order]
    return tokens, TokenState(size=size.unsqueeze(0), source=source.unsqueeze(0))
