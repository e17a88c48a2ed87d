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
    """Forward hooks that stream each leaf module's parameters to `device` for the duration of its forward."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        # Set to run the module in another dtype without touching its stored weights (the VAE's float32 encode).
        self.compute_dtype: torch.dtype | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.cpu_copies: dict[nn.Parameter, torch.Tensor] = {}
        pin = device.type == "cuda"
        for m in module.modules():
            params = list(m.parameters(recurse=False))
            if not params:
                continue
            for p in params:
                cpu = p.data.to("cpu")
                self.cpu_copies[p] = cpu.pin_memory() if pin else cpu
                p.data = self.cpu_copies[p]
            self.handles.append(m.register_forward_pre_hook(self._load))
            self.handles.append(m.register_forward_hook(self._unload))

    def _load(self, m: nn.Module, args: object) -> None:
        for p in m.parameters(recurse=False):
            p.data = self.cpu_copies[p].to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def _unload(self, m: nn.Module, args: object, output: object) -> None:
        # Dropping the device copy frees it once the kernels that read it have run (the caching allocator is
        # stream-ordered), so no sync is needed here.
        for p in m.parameters(recurse=False):
            p.data = self.cpu_copies[p]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cpu_copies.clear()
