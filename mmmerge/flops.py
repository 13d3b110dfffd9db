"""FLOP counting with ``torch.utils.flop_counter``, including CPU scaled-dot-product attention.

``FlopCounterMode`` has no formula for the fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) and silently counts it as 0, which hides the
very cost token merging cuts (quadratic attention). ``count_flops`` adds the standard SDPA formula
for it, so eager, sdpa, CPU and GPU all report the same numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
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
