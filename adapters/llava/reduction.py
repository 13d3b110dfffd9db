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
    """Head-averaged keys ``[items, T, d_head]`` and an importance score ``[items, T]`` of the key layer's tokens
    (T = tower tokens), both float32, from the layer's input ``hidden_states[layout.key_layer]`` (what the tower
    computed; no hook, and the tower keeps its attention backend) and the layer's own norm and projections.

    The keys are not projected a second time:
    - the mean of the heads' keys ``mean_h(W_h x + b_h)`` is one projection by the heads' mean key weight, a
      ``d_head``-wide product (1 / heads of the key projection's);
    - the score of towers with [CLS] is the head-averaged [CLS] attention; the [CLS] query of head h meets the
      keys of head h as ``q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h``, so the query is folded into the
      key weight and the logits are one ``[T, D] x [D, heads]`` product (``q_h . b_h`` is constant over the keys
      and leaves the softmax unchanged);
    - towers without [CLS] rank by the mean attention each token receives (averaged over heads and all
      queries), which needs every head's keys: only there are the keys projected in full.
    In float32: half-precision runs score and choose as a float32 run does, up to the tower's own activations.
    """
    index = layout.key_layer
    h = hidden_states[index] if hidden_states is not None and index < len(hidden_states) else None
    if h is None:
        raise RuntimeError(f"mmmerge.llava: the vision tower returned no hidden_states[{index}] (the input of the "
                           "feature layer); this transformers version selects hidden states differently, please "
                           "report it")
    parts = layer_parts(tower_layers(lm)[index])
    attn, heads = parts.attention, parts.num_heads
    with torch.no_grad():  # matching builds no graph
        x_model = parts.norm1(h)  # [B, T, D] in the model's dtype (the queries are projected from it, as the tower)
        x = x_model.float()
        B, T, D = x.shape
        d_head = D // heads
        w_heads = attn.k_proj.weight.view(heads, d_head, D)
        bias = attn.k_proj.bias
        keys = F.linear(x, w_heads.mean(0, dtype=torch.float32),
                        None if bias is None else bias.view(heads, d_head).mean(0, dtype=torch.float32))
        if not need_score:
            return keys, None
        c = layout.cls
        if c:  # the [CLS] queries only (a CLIP-L tower: 1 of 577 rows), folded into the key weight
            q = attn.q_proj(x_model[:, :c]).float().mul_(d_head ** -0.5).view(B * c, heads, d_head)
            folded = torch.bmm(q.transpose(0, 1), w_heads.float())  # [heads, B * c, D]: W_h^T q_h
            folded = folded.view(heads, B, c, D).permute(1, 3, 0, 2).reshape(B, D, heads * c)
            return keys, torch.bmm(x, folded).softmax(1).mean(-1)  # logits [B, T, heads * c]
        # every row is a query: every head's keys
        k = F.linear(x, attn.k_proj.weight.float(), None if bias is None else bias.float())
        q = attn.q_proj(x_model).float()
        logits = torch.einsum("bqhd,bthd->bhqt", q.view(B, T, heads, d_head), k.view(B, T, heads, d_head))
        return keys, (logits * d_head ** -0.5).softmax(-1).mean((1, 2))


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
