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

from img2vid.errors import InputError


def indexed(device: torch.device) -> torch.device:
    """cuda as cuda:N, the current device, as a tensor placed there reports it (and diffusers' `device`)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def available_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has, else a one-line InputError, before any weight is read or moved
    (torch's own errors are an AssertionError for CUDA on a CPU-only build, or blame the checkpoint file). The meta
    device holds no data, and the CPU has no second index: both would fail later, far from the cause."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # "Invalid device string"
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "meta" or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise InputError(f"device {dev} is not available (CUDA GPUs found: {torch.cuda.device_count()})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps is not available")
    backend = getattr(torch, dev.type, None)  # torch.xpu and the like: their own is_available()
    if dev.type not in ("cpu", "cuda", "mps") and not (backend and getattr(backend, "is_available", bool)()):
        raise InputError(f"device {dev} is not available")
    return dev


def load_target(
    device: str | torch.device,
    device_map: str | torch.device | dict | None,
    torch_dtype: torch.dtype | str | None,
    dtype: torch.dtype | str | None,
) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) that from_pretrained loads onto, from diffusers' loading arguments: device_map naming one
    device stands for device= (a split across devices is refused), dtype is diffusers' newer name for torch_dtype."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise InputError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
    if device_map is not None:
        if str(device_map) in ("balanced", "auto", "sequential") or isinstance(device_map, dict):
            raise InputError(
                f"device_map={device_map!r} splits a model across devices, which img2vid does not: load onto one "
                "device (device=) and see enable_guidance_parallel for two GPUs"
            )
        device = device_map
    return available_device(device), weights_dtype(torch_dtype if torch_dtype is not None else dtype)


def weights_dtype(torch_dtype: torch.dtype | str | None, what: str = "torch_dtype") -> torch.dtype:
    """What the weights load or are cast as: float32 by default (as diffusers); a dtype's name ("float16") is taken
    too. Anything else is a one-line error, not torch's "Invalid device string", weights silently cast to integers,
    or float8 / complex weights that no kernel takes."""
    if torch_dtype is None:
        return torch.float32
    dtype = getattr(torch, torch_dtype.removeprefix("torch."), None) if isinstance(torch_dtype, str) else torch_dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputError(f"{what} must be torch.float16, bfloat16, float32 or float64, not {torch_dtype!r}")
    return dtype


def accelerator(gpu_id: int | None, device: str | torch.device | None) -> torch.device:
    """Where offloaded components run: `device` if given, else CUDA device `gpu_id` (default 0). A CUDA device
    this machine lacks is a one-line InputError now, before the pipeline changes, not a failure mid-generation."""
    if device is None and not torch.cuda.is_available():
        # No accelerator: offload degenerates to running on the CPU (kept so scripts written for GPUs still run).
        return torch.device("cpu")
    try:  # one check of every device a user names, one wording (available_device), here with its context
        return available_device(device if device is not None else torch.device("cuda", gpu_id or 0))
    except InputError as e:
        raise InputError(f"cannot offload: {e}") from None


def move_module(module: nn.Module, device: torch.device) -> None:
    """Move parameters in place (module.to keeps Parameter objects, so compiled graphs and hooks keep working)."""
    module.to(device)


def plan_units(module: nn.Module, unit_bytes: int, resident_bytes: int) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Split `module` into streaming units and always-resident parameters (no side effects).

    The root is never a unit (models are entered through methods such as vae.encode_mean, not forward), nor is a
    container without a forward of its own (ModuleList / ModuleDict): their hooks would never fire. Nor is a child
    that its parent names in `weights_read_here` (children whose weights the parent's own forward reads, such as a
    projection whose bias the parent adds elsewhere): when such a parent is split, those children stay resident."""
    units: list[nn.Module] = []
    resident: list[nn.Parameter] = list(module.parameters(recurse=False))

    def visit(m: nn.Module) -> None:
        size = sum(p.numel() * p.element_size() for p in m.parameters())
        if size < resident_bytes:  # not worth a copy; and tiny layers are the ones read without a forward
            resident.extend(m.parameters())
        elif size <= unit_bytes and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            units.append(m)
        else:
            resident.extend(m.parameters(recurse=False))
            read_here = getattr(m, "weights_read_here", ())
            for name, child in m.named_children():
                if name in read_here:
                    resident.extend(child.parameters())
                else:
                    visit(child)

    for child in module.children():
        visit(child)
    return units, resident


class SequentialOffload:
    """Forward hooks that stream weights to `device` one unit at a time, for the duration of the unit's forward.

    A unit is the largest submodule whose weights fit in `unit_bytes` (a resnet, an attention block, a conv). Whole
    units rather than leaf layers, because some parameters are read by their parent module rather than through their
    own forward (a position table, a learned mix factor), where a leaf's hook would never fire. Submodules under
    RESIDENT_BYTES, and parameters owned directly by a module too big to be a unit, stay on the device (norms,
    biases, 1x1 quant convs: a few MB in all).
    """

    RESIDENT_BYTES = 4 << 20

    UNIT_BYTES = 128 << 20

    def __init__(self, module: nn.Module, device: torch.device, unit_bytes: int | None = None) -> None:
        """unit_bytes: the largest unit (default UNIT_BYTES). A module streams under one SequentialOffload at a time:
        the owner removes the last one first (stacked, both would copy every weight)."""
        self.device = device
        # Set to run the module in another dtype without touching its stored weights (the VAE's float32 encode).
        self.compute_dtype: torch.dtype | None = None
        self.cpu_dtype = next(module.parameters()).dtype
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.cpu_copies: dict[nn.Parameter, torch.Tensor] = {}
        self.streamed: dict[nn.Module, list[nn.Parameter]] = {}
        self.resident: list[nn.Parameter] = []
        self.pin = pin = device.type == "cuda"
        # Prefetching: the unit that followed each unit last time, and copies in flight on a side stream.
        self.copy_stream = torch.cuda.Stream(device) if pin else None
        self.next_unit: dict[nn.Module, nn.Module] = {}
        self.pending: dict[nn.Module, tuple[list[torch.Tensor], torch.cuda.Event, torch.dtype | None]] = {}
        self.last: nn.Module | None = None
        units, resident = plan_units(module, unit_bytes or self.UNIT_BYTES, self.RESIDENT_BYTES)
        for p in resident:
            p.data = p.data.to(device)
            self.resident.append(p)
        for unit in units:
            params = list(unit.parameters())
            if not params:
                continue
            self.streamed[unit] = params
            for p in params:
                self.cpu_copies[p] = self._stored(p.data)
                p.data = self.cpu_copies[p]
            self.handles.append(unit.register_forward_pre_hook(self._load))
            self.handles.append(unit.register_forward_hook(self._unload))

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """The CPU copy a weight is streamed from (pinned for CUDA: asynchronous copies)."""
        cpu = t.to("cpu")
        # empty_like keeps the weight's layout (channels-last convs, `Pipeline._fit_layout`) in the copy
        return torch.empty_like(cpu, pin_memory=True).copy_(cpu) if self.pin else cpu

    def refresh(self) -> None:
        """Stream the weights as they are now: module.to (pipe.to(torch.float16)) after streaming began casts the CPU
        copies into new tensors, which the old copies would override. Once per pipeline call, not per unit: a pass
        over every parameter."""
        changed = False
        for params in self.streamed.values():
            for p in params:
                copy = self.cpu_copies[p]
                if p.data_ptr() != copy.data_ptr() or p.dtype != copy.dtype or p.device != copy.device:
                    self.cpu_copies[p] = self._stored(p.data)
                    changed = True
        if changed:
            self.pending.clear()  # prefetched copies of the old weights

    def _copy(self, m: nn.Module) -> list[torch.Tensor]:
        return [
            self.cpu_copies[p].to(self.device, dtype=self.compute_dtype, non_blocking=True) for p in self.streamed[m]
        ]

    def _load(self, m: nn.Module, args: object) -> None:
        """Bring m's weights in (from the prefetch if one is waiting), then start copying the unit that ran after m
        last time on a side stream, so the copy overlaps m's compute. At most two units are on the device."""
        pending = self.pending.pop(m, None)
        if pending is not None and pending[2] == self.compute_dtype:
            tensors, event, _ = pending
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors:  # allocated on the copy stream, used and freed on the compute stream
                t.record_stream(torch.cuda.current_stream(self.device))
        else:
            tensors = self._copy(m)
        for p, t in zip(self.streamed[m], tensors, strict=True):
            p.data = t
        if self.copy_stream is None:
            return
        if self.last is not None and self.last is not m:
            self.next_unit[self.last] = m  # learn the call order on the first pass
        self.last = m
        nxt = self.next_unit.get(m)
        if nxt is not None and nxt not in self.pending:
            with torch.cuda.stream(self.copy_stream):
                tensors = self._copy(nxt)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.pending[nxt] = (tensors, event, self.compute_dtype)

    def _unload(self, m: nn.Module, args: object, output: object) -> None:
        # Dropping the device copy frees it once the kernels that read it have run (the caching allocator is
        # stream-ordered), so no sync is needed here.
        for p in self.streamed[m]:
            p.data = self.cpu_copies[p]

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Run in `dtype` (None: the stored dtype). Resident tensors are cast in place; the round trip
        float16 -> float32 -> float16 is exact."""
        if self.compute_dtype is None and self.resident:
            self.cpu_dtype = self.resident[0].dtype  # the stored dtype now: a pipe.to(dtype) may have cast it
        self.compute_dtype = dtype
        self.pending.clear()
        for p in self.resident:
            p.data = p.data.to(dtype or self.cpu_dtype)

    def remove(self) -> None:
        """Stop streaming: the hooks go; streamed weights stay where they wait between runs (the CPU)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cpu_copies.clear()
        self.pending.clear()
