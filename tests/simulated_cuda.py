"""The simulated-CUDA test tier: run a forward "on CUDA" on a CPU-only machine.

``simulated_cuda()`` enters torch's ``FakeTensorMode``; a model built inside it under ``torch.device("cuda")``
has fake CUDA parameters, and a forward runs every op's shape and device rules without running a kernel. Patch
and call the model with the default device left at the CPU, as on a real GPU machine: a tensor the library
makes without naming the device is then a CPU tensor. What a real GPU would do wrong shows up as an exception on the CPU:

- a CPU tensor meeting a CUDA one (a host-built tensor in a forward) raises ``FakeTensorDeviceMismatchError``
  (0-dim CPU scalars excepted, as on CUDA);
- a host read (``.item()``, ``.tolist()``, ``bool(tensor)``) raises ``DataDependentOutputException``, and an op
  whose output shape depends on data (``nonzero``, boolean indexing) ``DynamicOutputShapeException``: on a GPU
  each is a host sync;
- an op without a CUDA kernel for its dtype (``CUDA_KERNEL_GAPS``) raises ``CudaKernelGap``.

Host tensors stay real: an op whose inputs are all ordinary CPU tensors (and a factory that asks for the CPU)
runs for real, so patch-time work (schedules, index tables, reading a lengths list) is not flagged, and its
results become fake CUDA tensors only when moved with ``.to(device)``. Pinning host memory needs a driver, so
``pin_memory()`` hands back the host tensor itself (a copy from it to the device is what a real GPU would do
asynchronously).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

# (op overload packet, dtypes) with no CUDA kernel: the engine must never dispatch these on a CUDA tensor.
CUDA_KERNEL_GAPS = {
    torch.ops.aten.scatter_reduce: (torch.bool,),  # "cuda_scatter_gather_base_kernel_func" not implemented for 'Bool'
    torch.ops.aten.scatter_reduce_: (torch.bool,),
}


class CudaKernelGap(RuntimeError):
    """An op was dispatched on a CUDA tensor of a dtype that op has no CUDA kernel for."""


def _is_host(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.device.type == "cpu"


class SimulatedCuda(FakeTensorMode):
    """FakeTensorMode in which real CPU tensors stay real (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        device = kwargs.get("device")
        wants_host = device is None or torch.device(device).type == "cpu"
        if func.overloadpacket in (torch.ops.aten._pin_memory, torch.ops.aten.is_pinned) and _is_host(args[0]):
            return args[0].clone() if func.overloadpacket is torch.ops.aten._pin_memory else True  # no driver
        if wants_host and all(_is_host(t) for t in tensors) and (tensors or device is not None):
            with unset_fake_temporarily():  # host work (patch time): real
                return func(*args, **kwargs)
        gap = CUDA_KERNEL_GAPS.get(func.overloadpacket)
        if gap and any(t.device.type == "cuda" and t.dtype in gap for t in tensors):
            raise CudaKernelGap(f"{func} has no CUDA kernel for {[t.dtype for t in tensors]}")
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def simulated_cuda() -> Iterator[SimulatedCuda]:
    """Fake tensors with real host tensors (see above). Build the model with ``with torch.device("cuda"):``
    inside it, then patch and call it outside that device context."""
    with SimulatedCuda() as mode:
        yield mode
