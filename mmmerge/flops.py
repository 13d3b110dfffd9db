"""FLOP counting with ``torch.utils.flop_counter``, including CPU scaled-dot-product attention, and op counting.

``FlopCounterMode`` has no formula for the fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) and silently counts it as 0, which hides the
very cost token merging cuts (quadratic attention). ``count_flops`` adds the standard SDPA formula
for it, so eager, sdpa, CPU and GPU all report the same numbers.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # query/key/value are shapes [B, H, N, d]; 2 matmuls of 2*N*M*d FLOPs per head.
    return sdpa_flop_count(query, key, value)


def _custom_mapping() -> Dict[Any, Callable[..., int]]:
    mapping: Dict[Any, Callable[..., int]] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_flop
    return mapping


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Total FLOPs (multiply and add counted separately) of ``fn(*args, **kwargs)``, run under no_grad."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (one kernel launch each on a GPU, roughly)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Counter:
    """Aten ops dispatched by ``fn(*args, **kwargs)`` under no_grad, by op name (``sum(...)`` for the total).

    On a GPU at small batch every op is a kernel launch, so this counts what merging adds per forward.
    """
    with _OpCounter() as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.ops
