"""Proportional attention: a token that stands for s originals gets s times the attention mass.

softmax(q k^T / sqrt(d) + log s) over merged tokens equals attention over the originals duplicated
s times (same key and value), which is what keeps a merged model close to the unmerged one.
"""
from __future__ import annotations

import torch
from torch import Tensor


def size_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Additive attention bias ``log(size)`` of shape ``[B, 1, 1, N]`` (broadcasts over heads and queries)."""
    B, N = size.shape
    bias = size.log().view(B, 1, 1, N)
    return bias if dtype is None else bias.to(dtype)
