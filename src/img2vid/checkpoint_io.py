"""Checkpoint files on disk: safetensors (and, only when asked, tensor-only pickles) read straight to a device and
dtype, headers read without tensor data, atomic writes, which file of a diffusers folder holds what, and
PipelineConfig <-> the plain dicts stored as JSON (our single files' metadata, a diffusers folder's config files).
What to load where, and strictness, is img2vid.checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from img2vid import config_checks, configs
from img2vid.configs import PipelineConfig
from img2vid.errors import CheckpointError, first_line
from img2vid.names import PICKLE_SUFFIXES

StateDict = dict[str, torch.Tensor]
Device = str | torch.device
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "image_encoder": "model"}
CONFIG_KEY = "img2vid_config"  # safetensors metadata key of our single files
DIFFUSERS_VERSION = "0.24.0"  # the first diffusers with StableVideoDiffusionPipeline
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


# ---- PipelineConfig <-> plain dict (JSON in our single files' metadata) --------------------------------------------
def config_to_dict(config: PipelineConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _dataclass_from_dict(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) - names:
        raise CheckpointError(f"stored {cls.__name__} has unknown fields: {sorted(set(data) - names)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            value = _dataclass_from_dict(kind, value)
        elif typing.get_origin(kind) is tuple:
            value = tuple(value)  # JSON has lists
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    return _dataclass_from_dict(PipelineConfig, data)


def stored_config(path: Path, metadata: dict[str, str]) -> PipelineConfig | None:
    """The config our single files keep in their safetensors metadata, or None for a file without one."""
    if CONFIG_KEY not in metadata:
        return None
    try:
        config = config_from_dict(json.loads(metadata[CONFIG_KEY]))
        config_checks.check(config)
        config_checks.check_pipeline(config)
        return config
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {CONFIG_KEY} metadata ({e})") from None


# ---- reading tensors ------------------------------------------------------------------------------------------------
def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle file that can run code when loaded; pass allow_pickle=True / --allow-pickle if you trust "
        "it (or convert it to .safetensors)"
    )


def _open_safetensors(path: Path, device: Device = "cpu") -> Any:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        dev = torch.device(device)  # safetensors takes "cpu" but not "cpu:0", and blamed the file for it
        return safe_open(str(path), framework="pt", device="cpu" if dev.type == "cpu" else str(dev))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


_READERS = 4  # threads reading one file, each over its own contiguous range
# Bytes per pinned staging buffer, two per reader. Small: pinning host memory is slow the first time in a process
# (32 MB buffers made a new process's first load 1.7 s instead of 0.8 s).
_STAGE = 8 << 20
_ALIGN = 256  # device placement of every tensor: what cudaMalloc gives, what compiled kernels assume


# A tensor's bytes in the file's data section [start, end), and where they go in the device buffer.
Placement = tuple[int, int, int]


def _stream_range(path: Path, base: int, part: list[Placement], buf: torch.Tensor, device: torch.device) -> None:
    """The file bytes of `part` (consecutive tensors, sorted) into their places in buf, through two pinned staging
    buffers on a stream of this thread's own, so the disk read of one chunk overlaps the copies of the last."""
    cuda = device.type == "cuda"  # (the CPU path exists for the tests of this reader's bookkeeping)
    stages = [torch.empty(_STAGE, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]
    stream = torch.cuda.Stream(device) if cuda else None
    start, stop = part[0][0], part[-1][1]
    j = 0
    with open(path, "rb", buffering=0) as fh, torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        fh.seek(base + start)
        for i, off in enumerate(range(start, stop, _STAGE)):
            stage, size = stages[i % 2], min(_STAGE, stop - off)
            event = done[i % 2]
            if event is not None:
                event.synchronize()  # this staging buffer's previous copies have left it
            view = memoryview(stage.numpy())[:size]
            got = 0
            while got < size:
                r = fh.readinto(view[got:])
                if not r:
                    raise CheckpointError(f"{path}: file ended early")
                got += r
            # Every tensor piece in this chunk to its aligned place (a tensor may span chunks).
            while j < len(part) and part[j][0] < off + size:
                s, e, d = part[j]
                a, b = max(s, off), min(e, off + size)
                if a < b:
                    buf[d + a - s : d + b - s].copy_(stage[a - off : b - off], non_blocking=True)
                if e > off + size:
                    break
                j += 1
            if stream is not None:
                done[i % 2] = torch.cuda.Event()
                done[i % 2].record(stream)
    if stream is not None:
        stream.synchronize()  # the staging buffers are freed on return


def _read_whole_file(path: Path, device: torch.device, dtype: torch.dtype | None) -> StateDict | None:
    """The whole file in one device buffer, read by a few threads through pinned staging buffers (see
    `_stream_range`), every tensor a view into it at a 256-byte aligned offset (safetensors packs tensors at any
    even offset; kernels compiled for aligned inputs fault on such views). safe_open copies tensor by tensor from
    pageable memory instead: about 4.5 GB/s, most of a full SVD-XT load. None when this path does not apply (a
    tensor that needs a cast, so the buffer would not be the final memory; an odd layout), and the caller reads
    per tensor."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        spans = {k: (v["dtype"], v["shape"], *v["data_offsets"]) for k, v in header.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # the per-tensor reader gives the proper error
    base = 8 + n
    order = sorted(spans, key=lambda k: spans[k][2])
    place: dict[str, Placement] = {}
    size = end = 0
    for k in order:
        kind, shape, s, e = spans[k]
        t = _ST_DTYPES.get(kind)
        if t is None or (dtype is not None and t.is_floating_point and t != dtype):
            return None
        # A valid file packs its tensors back to back with exactly their bytes; anything else (overlaps, gaps,
        # a shape that disagrees with its byte count) goes to safe_open, which names the problem.
        if s != end or e - s != math.prod(shape) * t.itemsize:
            return None
        place[k] = (s, e, size)
        size += -(-(e - s) // _ALIGN) * _ALIGN
        end = e
    if base + end > path.stat().st_size:
        return None
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    # A few readers at once, each over its own run of tensors: one thread copies from the page cache at ~5 GB/s.
    readers = max(1, min(_READERS, size // _STAGE))
    parts: list[list[Placement]] = [[]]
    for k in order:  # runs of about size / readers bytes
        if parts[-1] and place[k][2] >= size * len(parts) // readers:
            parts.append([])
        parts[-1].append(place[k])
    parts = [p for p in parts if p]
    with ThreadPoolExecutor(len(parts) or 1) as pool:
        for r in pool.map(lambda part: _stream_range(path, base, part, buf, device), parts):
            del r  # re-raises a reader's error here
    # flat bytes -> dtype -> the header's shape
    return {k: buf[d : d + e - s].view(_ST_DTYPES[spans[k][0]]).view(spans[k][1]) for k, (s, e, d) in place.items()}


def read_safetensors(path: Path, device: Device, dtype: torch.dtype | None, keys: list[str] | None = None) -> StateDict:
    """Each tensor goes straight to `device` and is cast there, so the whole file is never held twice. A whole file
    for a CUDA device is read in large chunks through pinned memory (`_read_whole_file`)."""
    if keys is None and torch.device(device).type == "cuda":
        fast = _read_whole_file(Path(path), torch.device(device), dtype)
        if fast is not None:
            return fast
    with _open_safetensors(Path(path), device) as f:
        return {k: cast(f.get_tensor(k), dtype) for k in (f.keys() if keys is None else keys)}


def read_state_dict(
    path: Path, device: Device = "cpu", dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> StateDict:
    """A .safetensors file (or a sharded one's .index.json), or - with allow_pickle - a .ckpt/.bin/.pt/.pth."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_safetensors(path, device, dtype)
    if ".safetensors.index." in path.name and path.suffix == ".json":  # sharded: read every shard
        try:
            weight_map = configs.read_json(path).get("weight_map")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{path}: no weight_map of tensor names to shard file names")
        out: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(path.parent / shard, device, dtype))
        return out
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, a folder, or a pickle)")
    if not allow_pickle:
        raise refuse_pickle(path)
    try:
        obj = torch.load(path, map_location=torch.device(device), weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary Python objects with an UnpicklingError
        raise CheckpointError(f"{path}: cannot load as a tensor-only pickle ({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / sgm training checkpoints
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: cast(t, dtype) for k, t in obj.items() if isinstance(t, torch.Tensor)}


def read_keys(
    path: Path, keys: list[str], device: Device, dtype: torch.dtype | None, allow_pickle: bool = False
) -> StateDict:
    """Some tensors of a checkpoint file: read alone from a .safetensors file, picked from a loaded pickle."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path, device, dtype, keys)
    full = read_state_dict(path, device, dtype, allow_pickle)
    return {k: full[k] for k in keys}


def read_header(path: Path, allow_pickle: bool = False) -> tuple[StateDict, dict[str, str]]:
    """Names, shapes and dtypes as meta tensors (no data read for safetensors), and the safetensors metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {k: t.to("meta") for k, t in read_state_dict(path, "cpu", None, allow_pickle).items()}, {}
    with _open_safetensors(path) as f:
        sd = {}
        for k in f.keys():
            info = f.get_slice(k)
            sd[k] = torch.empty(info.get_shape(), dtype=_ST_DTYPES.get(info.get_dtype(), torch.uint8), device="meta")
        return sd, dict(f.metadata() or {})


# ---- writing --------------------------------------------------------------------------------------------------------
def _complete(t: torch.Tensor) -> torch.Tensor:
    """safetensors writes each tensor's whole storage by pointer: views (q/k/v chunks, transposes) get their own."""
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if t.is_contiguous() and whole else t.contiguous().clone()


def _atomic_write(path: Path, write: typing.Callable[[Path], None]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file. The temporary
    name is short (a name of the user's that fits could otherwise not fit with a suffix added), and a failure is an
    OSError that names `path`, not it."""
    tmp = path.with_name(f".img2vid-{secrets.token_hex(6)}.tmp")  # made by write(): the umask's permissions
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:  # write()'s own, naming path already
            raise
        raise OSError(f"cannot write {path}: {e.strerror}") from None  # not "[Errno 2] ...: '.img2vid-....tmp'"
    finally:
        with contextlib.suppress(OSError):  # no folder to hold it, or already renamed: nothing to remove
            tmp.unlink(missing_ok=True)


def _sort_metadata(path: Path) -> None:
    """safetensors writes the metadata from a hash map whose order changes from one process to the next, so the same
    tensors and metadata (our single files have two entries) gave files with different bytes and checksums on every
    conversion. The same JSON with the entries sorted has the same length: the header is rewritten in place."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # (always, unless some escaping differs: then the file stays as it is, valid)
            fh.seek(8)
            fh.write(text.ljust(n))  # safetensors pads the header with spaces too


def write_safetensors(path: Path, sd: StateDict, metadata: dict[str, str], dtype: torch.dtype | None = None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if dtype is not None and not dtype.is_floating_point:  # int8 would truncate every weight, and never reload
        raise CheckpointError(f"cannot save weights as {dtype}: pick a floating-point dtype (float16, bfloat16, ...)")
    tensors = {k: _complete(cast(t, dtype)) for k, t in sd.items()}

    def write(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o666))  # the mode the umask gives a new file
        mode = tmp.stat().st_mode & 0o777
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        except SafetensorError as e:  # its I/O failures (a full disk, a missing folder) are not OSErrors
            raise OSError(f"cannot write {path}: {' '.join(str(e).split())}") from None
        os.chmod(tmp, mode)  # safetensors writes through a private temporary file: 0600, whatever the umask
        _sort_metadata(tmp)

    _atomic_write(Path(path), write)


def write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


# ---- PipelineConfig -> a diffusers folder's JSON files ---------------------------------------------------------------
def _preprocessor_config(c: configs.CLIPVisionConfig) -> dict[str, Any]:
    size = c.image_size
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(c.image_mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(c.image_std),
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }


def folder_json_files(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """{path inside the folder: JSON content} of a diffusers folder for `config`, model_index.json last (written
    last, so an interrupted save does not look like a complete folder)."""
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    vae_class = "AutoencoderKLTemporalDecoder" if config.vae.temporal_decoder else "AutoencoderKL"
    index = {
        "_class_name": "StableVideoDiffusionPipeline",
        **version,
        # Ours: what diffusers' configs can't say (ignored by diffusers, which skips "_" keys).
        "_img2vid": {k: getattr(config, k) for k in ("name", "default_fps", "default_motion_bucket_id")},
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", vae_class],
    }
    return {
        "unet/config.json": {**configs.unet_to_diffusers(config.unet), **version},
        "vae/config.json": {**configs.vae_to_diffusers(config.vae), **version},
        "image_encoder/config.json": configs.clip_to_transformers(config.image_encoder),
        "scheduler/scheduler_config.json": {**configs.scheduler_to_diffusers(config.scheduler)},
        "feature_extractor/preprocessor_config.json": _preprocessor_config(config.image_encoder),
        "model_index.json": index,
    }
