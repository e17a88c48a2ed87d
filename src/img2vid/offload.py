"""Keeping weights off the GPU until they are needed.

Two granularities, as in diffusers:
- model offload: whole components (image encoder -> UNet -> VAE) live on the CPU and move to the GPU one at a time,
  just before they run. Peak memory is the largest component plus its activations.
- sequential offload: every leaf module's weights live on the CPU (pinned, so copies are asynchronous) and are copied
  to the GPU right before that module runs and dropped right after. Peak memory is activations plus one layer.
Neither changes a single number: the same kernels run on the same values.
"""

from __future__ import annotations

import torch
from torch import nn


def move_module(module: nn.Module, device: torch.device) -> None:
    """Move parameters in place (module.to keeps Parameter objects, so compiled graphs and hooks keep working)."""
    module.to(device)


class SequentialOffload:
    """Forward hooks that stream weights to `device` one unit at a time, for the duration of the unit's forward.

    A unit is the largest submodule whose weights fit in `unit_bytes` (a resnet, an attention block, a conv). Whole
    units rather than leaf layers, because some parameters are read by their parent module rather than through their
    own forward (a position table, a learned mix factor), where a leaf's hook would never fire. Submodules under
    RESIDENT_BYTES, and parameters owned directly by a module too big to be a unit, stay on the device (norms,
    biases, 1x1 quant convs: a few MB in all).
    """

    RESIDENT_BYTES = 4 << 20

    def __init__(self, module: nn.Module, device: torch.device, unit_bytes: int = 128 << 20) -> None:
        self.device = device
        # Set to run the module in another dtype without touching its stored weights (the VAE's float32 encode).
        self.compute_dtype: torch.dtype | None = None
        self.cpu_dtype = next(module.parameters()).dtype
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.cpu_copies: dict[nn.Parameter, torch.Tensor] = {}
        self.streamed: dict[nn.Module, list[nn.Parameter]] = {}
        self.resident: list[nn.Parameter] = []
        pin = device.type == "cuda"
        # The root is never a unit: models are entered through methods (vae.encode / vae.decode), not forward.
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
            self.resident.append(p)
        for unit in (u for child in module.children() for u in self._units(child, unit_bytes)):
            params = list(unit.parameters())
            if not params:
                continue
            self.streamed[unit] = params
            for p in params:
                cpu = p.data.to("cpu")
                self.cpu_copies[p] = cpu.pin_memory() if pin else cpu
                p.data = self.cpu_copies[p]
            self.handles.append(unit.register_forward_pre_hook(self._load))
            self.handles.append(unit.register_forward_hook(self._unload))

    def _units(self, m: nn.Module, budget: int) -> list[nn.Module]:
        size = sum(p.numel() * p.element_size() for p in m.parameters())
        if size < self.RESIDENT_BYTES:  # not worth a copy; and tiny layers are the ones read without a forward
            for p in m.parameters():
                p.data = p.data.to(self.device)
                self.resident.append(p)
            return []
        if size <= budget:
            return [m]
        for p in m.parameters(recurse=False):
            p.data = p.data.to(self.device)
            self.resident.append(p)
        return [u for child in m.children() for u in self._units(child, budget)]

    def _load(self, m: nn.Module, args: object) -> None:
        for p in self.streamed[m]:
            p.data = self.cpu_copies[p].to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def _unload(self, m: nn.Module, args: object, output: object) -> None:
        # Dropping the device copy frees it once the kernels that read it have run (the caching allocator is
        # stream-ordered), so no sync is needed here.
        for p in self.streamed[m]:
            p.data = self.cpu_copies[p]

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Run in `dtype` (None: the stored dtype). Resident tensors are cast in place; the round trip
        float16 -> float32 -> float16 is exact."""
        self.compute_dtype = dtype
        for p in self.resident:
            p.data = p.data.to(dtype or self.cpu_dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cpu_copies.clear()
