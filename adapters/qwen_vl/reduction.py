"""The reduction: each image's (video's) LM tokens, reduced with the core engine, batched per grid shape.

The model's own ``get_image_features`` / ``get_video_features`` runs (tower and patch merger, untouched); its
``pooler_output`` (one ``[F_i, C]`` tensor per item: the LM's visual inputs) is reduced to ``K_i`` tokens per
item. Items of the same shape (grid and budget) form one batched engine call ``[G, F, C] -> [G, K, C]``, so a
call makes one engine call per distinct shape, never one per image. Qwen3-VL's deepstack features (the same
tokens after earlier tower layers, added to the LM's first layers) ride along as extra channels of the same
call, so they are merged by exactly the same plan as the tokens they belong to.

Metric and score: the tower's attention runs packed over all items (``cu_seqlens``) with rotary embeddings in
sdpa / flash kernels that return no attention probabilities, and Qwen towers have no [CLS] token. So the
similarity metric is the item's LM tokens themselves (float32 cosine in the engine; the patch merger's output is
what the tower computed last), and the methods that take an importance score (``tps``, ``prune``,
``dominant``) use the engine's default importance, minus the PiToMe energy (redundant tokens go first).
Recomputing one layer's attention per image would cost ``O(N^2)`` memory per head (a 1280x720 image has ~4,700
patches). ``cdpruner`` compares each item's tokens with its prompt's text embeddings (the LM's own embedding
table), ``divprune`` measures diversity on the tokens being reduced.

Where a reduced token sits: each token's (time, row, col) rides along as three more channels of the same
engine call, merged exactly like the token's value, which gives every output token the weighted centre of what it
is made of (the merge's own weights: sizes for ``tome``, the similarity softmax for ``tps``, 0 for dropped
values). The token then sits at the original token of its group nearest that centre (ties: the earliest). So a
token kept as it is (every selection method, ``prune``, ``divprune`` / ``cdpruner`` with
``drop_unselected=True``, ``dominant``'s dominant tokens) keeps its own cell, a merged one takes the cell of the
member at the middle of what it merged, and no two tokens share a cell. Each item's tokens are sorted by cell
(raster order over time, row, col); ``cells`` (the index ``(t * rows + row) * cols + col`` in the item, per
output token) give the position the unreduced model gave that cell (``positions.py``).
All of it stays on the device: index tables are host arithmetic on the grids (read on the host by the model
itself), moved once per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmmerge.constraints import parse_constraint
from mmmerge.reduce import reduce_tokens
from mmmerge.state import TokenState, init_state

from .kinds import Item, QwenContext

SELF_METRIC = ("divprune", "cdpruner")  # compare the tokens being reduced (the metric is always x here)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-built index tensor to ``device`` without a synchronising copy (pinned memory on CUDA)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def grid_cells(rows: int, cols: int, frames: int, device: torch.device) -> Tensor:
    """``[frames * rows * cols, 3]`` float (time, row, col) of every token of an item, raster order."""
    t, r, c = torch.meshgrid(torch.arange(frames, device=device), torch.arange(rows, device=device),
                             torch.arange(cols, device=device), indexing="ij")
    return torch.stack([t, r, c], -1).reshape(-1, 3).float()


def place(y: Tensor, source: Tensor, cells: Tensor) -> Tuple[Tensor, Tensor]:
    """Where each reduced token sits: the original token of its group nearest the weighted centre of what it was
    made of (ties: the earliest), so a token kept as it is sits at its own cell and no two tokens share one.

    Args:
        y: ``[G, K, C' + 3]`` reduced tokens; the last 3 channels are their merged (time, row, col).
        source: ``[G, N]`` output token of each original token. cells: ``[N, 3]`` (time, row, col) of each.
    Returns:
        ``(tokens [G, K, C'] in raster order, representative [G, K] in [0, N), increasing)``.
    """
    G, K = y.shape[:2]
    N = source.shape[1]
    centre = y[..., -3:].float().gather(1, source.unsqueeze(-1).expand(G, N, 3))  # [G, N, 3]: of its group
    distance = (cells.unsqueeze(0) - centre).square().sum(-1)  # [G, N]
    nearest = distance.new_full((G, K), float("inf")).scatter_reduce(1, source, distance, reduce="amin")
    index = torch.arange(N, device=y.device).expand(G, N)
    candidate = torch.where(distance <= nearest.gather(1, source), index, torch.full_like(index, N))
    representative = torch.full((G, K), N, dtype=torch.long, device=y.device).scatter_reduce(
        1, source, candidate, reduce="amin")
    representative, order = representative.sort(dim=1)
    return y[..., :-3].gather(1, order.unsqueeze(-1).expand(G, K, y.shape[-1] - 3)), representative


def _place_frames(y: Tensor, source: Tensor, cells: Tensor) -> Tuple[Tensor, Tensor]:
    """``place`` for rows with their own cells ``[R, n, 3]`` (the frames of ``within_frame``)."""
    R, n = source.shape
    flat_source = source + (torch.arange(R, device=y.device) * y.shape[1]).unsqueeze(1)  # rows as one batch
    tokens, rep = place(y.reshape(1, R * y.shape[1], -1), flat_source.reshape(1, R * n), cells.reshape(R * n, 3))
    rep = rep.view(R, -1) - (torch.arange(R, device=y.device) * n).unsqueeze(1)
    return tokens.view(R, y.shape[1], -1), rep


def _engine(ctx: QwenContext, x: Tensor, C: int, keep: int, state: Optional[TokenState] = None,
            constraint: Any = None, query: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """``x`` ``[G, N, C']`` (the metric: its first C channels) to ``([G, keep, C'], source [G, N])``."""
    hyper = dict(ctx.hyper)
    if query is not None:
        hyper["query"], hyper["query_mask"] = query
    y, state = reduce_tokens(x, keep, ctx.method, metric=x[..., :C], state=state, constraint=constraint,
                             check_layout=False, **hyper)  # time-major by construction
    return y, state.source


@dataclass(frozen=True)
class Group:
    """Items of one shape (frames, rows, cols, kept, kept per frame): one batched engine call."""

    shape: Tuple[int, int, int, int, int]
    members: Tensor  # [G] item indices, on the device (cdpruner's prompt rows)
    take: Tensor  # [G, F] rows of the items' tokens in the concatenated input
    put: Tensor  # [G, K] rows of their reduced tokens in the concatenated output


def plan(ctx: QwenContext, items: Sequence[Item], device: torch.device) -> List[Group]:
    """The groups of a call's items, with their index tables on ``device``: host arithmetic on the grids, done
    once per layout (memo on the context) and moved without a synchronising copy."""
    key = (tuple((i.frames, i.rows, i.cols, i.kept, i.per_frame) for i in items), str(device))
    groups = ctx.plans.get(key)
    if groups is not None:
        return groups
    starts_in, starts_out, at_in, at_out = [], [], 0, 0
    for item in items:
        starts_in.append(at_in)
        starts_out.append(at_out)
        at_in, at_out = at_in + item.tokens, at_out + item.kept
    members: Dict[Tuple, List[int]] = {}
    for i, shape in enumerate(key[0]):
        members.setdefault(shape, []).append(i)
    groups = []
    for shape, idx in members.items():
        T, rows, cols, K, _ = shape
        take = torch.tensor([starts_in[i] for i in idx]).unsqueeze(1) + torch.arange(T * rows * cols)
        put = torch.tensor([starts_out[i] for i in idx]).unsqueeze(1) + torch.arange(K)
        groups.append(Group(shape, to_device(torch.tensor(idx), device), to_device(take, device),
                            to_device(put, device)))
    if len(ctx.plans) > 64:
        ctx.plans.clear()
    ctx.plans[key] = groups
    return groups


def reduce_items(ctx: QwenContext, tokens: Sequence[Tensor], extras: Sequence[Sequence[Tensor]],
                 items: Sequence[Item], video: bool, query: Optional[Tuple[Tensor, Tensor, Tensor]] = None
                 ) -> Tuple[List[Tensor], List[List[Tensor]], Tensor]:
    """Reduce every item's LM tokens to its budget.

    Args:
        tokens: per item ``[F_i, C]`` (the model's ``pooler_output``). extras: per extra feature (deepstack
            layer), per item ``[F_i, C_e]``; reduced with the same plan.
        items: the budgets (``QwenContext.item``). video: time modes apply.
        query: cdpruner's ``(embeddings [R, L, C], mask [R, L], row of each item [items])``, or None.
    Returns:
        ``(tokens per item [K_i, C], extras per feature per item, cells [sum K_i])``: ``cells`` holds, per output
        token in order, the index inside its item of the grid cell it sits at.
    """
    device = tokens[0].device
    widths = [tokens[0].shape[-1]] + [e[0].shape[-1] for e in extras]
    x_all = torch.cat(list(tokens), 0)
    if extras:
        x_all = torch.cat([x_all] + [torch.cat(list(e), 0).to(x_all.dtype) for e in extras], -1)
    total = sum(item.kept for item in items)
    out = x_all.new_empty(total, x_all.shape[-1])
    cells = torch.empty(total, dtype=torch.long, device=device)
    C = widths[0]
    for group in plan(ctx, items, device):  # one engine call per distinct item shape
        (T, rows, cols, K, per_frame), take, put = group.shape, group.take, group.put
        n, F = rows * cols, T * rows * cols
        x = x_all[take]  # [G, F, C']
        G = x.shape[0]
        q = None
        if query is not None:
            rows_of = query[2][group.members]
            q = (query[0][rows_of], query[1][rows_of])
        if K == F:
            out[put.flatten()] = x.flatten(0, 1)
            cells[put.flatten()] = torch.arange(F, device=device).repeat(G)
            continue
        # (time, row, col) ride along as 3 more channels: merged like the tokens, they say where each one sits.
        grid = grid_cells(rows, cols, T, device)  # [F, 3]
        x = torch.cat([x, grid.to(x.dtype).expand(G, F, 3)], -1)
        if video and ctx.time_mode == "within_frame":
            qf = None if q is None else tuple(v.repeat_interleave(T, dim=0) for v in q)
            y, source = _engine(ctx, x.reshape(G * T, n, -1), C, per_frame, query=qf)
            frame_cells = grid.view(T, n, 3).repeat(G, 1, 1)  # [G*T, n, 3]: each row's own cells
            y, cell = _place_frames(y, source, frame_cells)
            cell = (cell + (torch.arange(T, device=device) * n).repeat(G).unsqueeze(1)).reshape(G, K)
            y = y.reshape(G, K, -1)
        else:
            if video and T > 1:
                t = torch.arange(T, device=device, dtype=torch.float32).repeat_interleave(n)
                state = init_state(G, F, device=device, coords={"t": t, "t_min": t, "t_max": t},
                                   rules={"t_min": "min", "t_max": "max"})
                y, source = _engine(ctx, x, C, K, state=state,
                                    constraint=parse_constraint(ctx.time_mode, steps={"t": T}), query=q)
            else:
                y, source = _engine(ctx, x, C, K, query=q)
            y, cell = place(y, source, grid)
        out[put.flatten()] = y.flatten(0, 1)
        cells[put.flatten()] = cell.flatten()
    sizes = [item.kept for item in items]
    split = list(out.split(sizes))
    main = [s[:, :C] for s in split]
    extra_out, at = [], C
    for width in widths[1:]:
        extra_out.append([s[:, at:at + width].to(e.dtype) for s, e in zip(split, extras[len(extra_out)])])
        at += width
    return main, extra_out, cells
