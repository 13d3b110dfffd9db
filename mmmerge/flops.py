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


# In-place ops that write only the rows their source holds: what they write is the source's bytes.
_WRITES_SOURCE = {"scatter_": "src", "scatter_add_": "src", "index_copy_": "source", "index_add_": "source",
                  "index_put_": "values", "masked_scatter_": "source"}


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (one kernel launch each on a GPU, roughly), and the bytes
    each one writes: its outputs' sizes, none for views, the source's size for a scatter into a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        out = func(*args, **kwargs)
        if not func.is_view:
            source = _WRITES_SOURCE.get(name.rsplit(".", 1)[-1])
            names = [a.name for a in func._schema.arguments]
            if source is None:
                written = sum(t.nbytes for t in _tensors(out))
            elif source in names:
                index = names.index(source)
                written = sum(t.nbytes for t in _tensors(kwargs.get(source, args[index] if index < len(args) else None)))
            else:  # a scalar written at every index
                written = _tensors(kwargs.get("index", args[2] if len(args) > 2 else None))[0].numel() * out.element_size()
            self.bytes[name] += written
        return out


def _tensors(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Counter:
    """Aten ops dispatched by ``fn(*args, **kwargs)`` under no_grad, by op name (``sum(...)`` for the total).

    On a GPU at small batch every op is a kernel launch, so this counts what merging adds per forward.
    """
    with _OpCounter() as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.ops


def count_bytes(fn: Callable[[], Any]) -> Counter:
    """Bytes written by the aten ops ``fn()`` dispatches, under no_grad, by op name (``sum(...)`` for the
    total): every op's outputs, nothing for views, and for an in-place scatter (``scatter_``, ``index_put_``,
    ...) the rows it writes (its source). Runs on the ``meta`` device too (no data is touched)."""
    with _OpCounter() as counter, torch.no_grad():
        fn()
    return counter.bytes
