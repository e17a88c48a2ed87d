"""Helpers shared by the benchmark scripts. Each script runs on its own (`python benchmarks/svd_*.py`), so this
module is found beside them on sys.path; img2vid itself never imports it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def median_event_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of reps calls of fn, each timed on the GPU with CUDA events (callers warm up first)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error |a - b| / |b| (Frobenius), computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def unfuse_geglu(unet: nn.Module) -> None:
    """A/B switch: the UNet's GEGLU projections run as the plain ops instead of `fused.geglu_linear`."""
    from img2vid.unet_transformer import GEGLU

    for m in unet.modules():
        if isinstance(m, GEGLU):
            m.fused = False
