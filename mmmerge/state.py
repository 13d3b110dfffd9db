"""TokenState: what travels with the tokens from layer to layer.

Every tensor is per batch element. ``N`` is the current number of tokens, ``N0`` the number of
original tokens (protected ones included). Merging never changes ``N0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

# How a coordinate combines when tokens merge.
MERGE_RULES = ("mean", "min", "max")


@dataclass
class TokenState:
    """Bookkeeping for a set of (possibly merged) tokens.

    Attributes:
        size: ``[B, N]`` float, how many original tokens each token stands for. Sums to ``N0``.
        source: ``[B, N0]`` long or None: index of the current token that holds each original token.
            Unmerge is a gather: ``x_orig = x.gather(1, source)``.
        coords: name -> ``[B, N]`` float coordinate (time, row, col, band, span ends ...).
        rules: name -> merge rule of that coordinate: ``"mean"`` (size-weighted centroid),
            ``"min"`` or ``"max"`` (span ends). Missing names default to ``"mean"``.
        protected: number of leading tokens (CLS, distillation, registers) that never merge or move.
        valid: ``[B, N]`` bool or None; False marks padding. Padding never merges with real tokens.
    """

    size: Tensor
    source: Optional[Tensor] = None
    coords: Dict[str, Tensor] = field(default_factory=dict)
    rules: Dict[str, str] = field(default_factory=dict)
    protected: int = 0
    valid: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.size.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.size.shape[1]

    def rule(self, name: str) -> str:
        return self.rules.get(name, "mean")

    def replace(self, **changes) -> "TokenState":
        return replace(self, **changes)

    def to(self, *args, **kwargs) -> "TokenState":
        """The same state with every tensor moved (``Tensor.to`` arguments); lets accelerate's device hooks
        move a merged layer's input like any other."""
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(*args, **kwargs)

        return replace(self, size=move(self.size), source=move(self.source),
                       coords={k: move(v) for k, v in self.coords.items()}, valid=move(self.valid))

    def validate(self, num_tokens: Optional[int] = None) -> None:
        """Raise ValueError if the fields disagree in shape (cheap; shapes only, no host sync)."""
        if self.size.dim() != 2:
            raise ValueError(f"TokenState.size must be [B, N], got shape {tuple(self.size.shape)}")
        B, N = self.size.shape
        if num_tokens is not None and N != num_tokens:
            raise ValueError(
                f"TokenState describes {N} tokens but the tokens tensor has {num_tokens}; "
                "pass the state returned together with these tokens"
            )
        if self.source is not None and (self.source.dim() != 2 or self.source.shape[0] != B):
            raise ValueError(f"TokenState.source must be [B={B}, N0], got {tuple(self.source.shape)}")
        for name, c in self.coords.items():
            if tuple(c.shape) != (B, N):
                raise ValueError(f"coordinate '{name}' must be [B={B}, N={N}], got {tuple(c.shape)}")
            if self.rule(name) not in MERGE_RULES:
                raise ValueError(f"coordinate '{name}' has unknown merge rule '{self.rule(name)}'; use one of {MERGE_RULES}")
        if self.valid is not None and tuple(self.valid.shape) != (B, N):
            raise ValueError(f"TokenState.valid must be [B={B}, N={N}], got {tuple(self.valid.shape)}")
        if not 0 <= self.protected < N:
            raise ValueError(f"protected={self.protected} must be in [0, N-1] for N={N} tokens")


def init_state(
    batch_size: int,
    num_tokens: int,
    *,
    device: torch.device | str | None = None,
    protected: int = 0,
    trace_source: bool = True,
    coords: Optional[Mapping[str, Tensor]] = None,
    rules: Optional[Mapping[str, str]] = None,
    valid: Optional[Tensor] = None,
) -> TokenState:
    """State of ``num_tokens`` unmerged tokens: size 1 each, source = identity.

    ``coords`` may be given as ``[N]`` (shared by the batch) or ``[B, N]``; they are stored as float32.
    """
    size = torch.ones(batch_size, num_tokens, device=device, dtype=torch.float32)
    source = None
    if trace_source:
        source = torch.arange(num_tokens, device=device).unsqueeze(0).expand(batch_size, -1).contiguous()
    full_coords: Dict[str, Tensor] = {}
    for name, c in (coords or {}).items():
        c = torch.as_tensor(c, device=device, dtype=torch.float32)
        if c.dim() == 1:
            c = c.unsqueeze(0).expand(batch_size, -1)
        full_coords[name] = c.contiguous()
    if valid is not None:
        valid = torch.as_tensor(valid, device=device, dtype=torch.bool)
        if valid.dim() == 1:
            valid = valid.unsqueeze(0).expand(batch_size, -1)
    state = TokenState(size=size, source=source, coords=full_coords, rules=dict(rules or {}),
                       protected=protected, valid=valid)
    state.validate(num_tokens)
    return state
