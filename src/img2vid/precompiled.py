"""Compiled functions kept on disk ahead of time, so a new process skips torch.compile's tracing.

A plain torch.compile with a warm inductor cache still re-traces every graph with dynamo in every new process
(~30 s for SVD-XT's step and ~20 decoder block graphs on an H100, BENCHMARKS.md) before its cached kernels load.
`torch.compile(fn, fullgraph=True).aot_compile(example)` instead returns a finished, serializable function for one
set of static shapes; `PrecompiledFunction` keeps one such artifact per input signature in a folder the user names
and loads it in later processes instead of tracing.

The artifacts are pickles written by torch (as are the entries of torch's own inductor cache): only a folder the
user passed explicitly is read, and it must be as trusted as the code itself. Every key covers the img2vid
sources, torch/CUDA/Triton/Python versions and the card (or the CPU model and its instruction set), so a stale
artifact is never picked; one that fails to load or whose guards reject the inputs is compiled again and replaced,
with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import stat
import tempfile
import warnings
import weakref
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from img2vid.errors import InputError, first_line
from img2vid.names import PLAIN

FILE_SUFFIX = ".aot"

STREAMED_MODULES = (
    "the compile cache cannot keep modules whose weights are streamed (sequential offload, low memory): their "
    "hooks are guarded by identity, which no other process can check; compile without a cache folder"
)
_UNSAVED: set[Path] = set()  # cache folders this process could not write to: warned about once


@cache
def _sources_digest() -> str:
    """Hash of this package's Python sources: any change to the engine's code makes every artifact stale."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _module_signature(m: torch.nn.Module) -> str:
    """What a compiled graph depends on in a module argument: its class, structure (repr: layer sizes, eps,
    groups), every submodule's plain attributes (dynamo guards on them: forward chunking's chunk_size, training) and
    every parameter's and buffer's name, shape, dtype and strides (generated kernels index weights with the strides
    they were compiled for: channels-last convs differ), as one digest (a UNet's repr is ~100 kB and its attributes
    5000: re-read on every step they cost milliseconds). The caller adds where the weights lie."""
    tensors = [(n, tuple(t.shape), str(t.dtype), t.stride()) for n, t in [*m.named_parameters(), *m.named_buffers()]]
    attrs = [(k, v) for sub in m.modules() for k, v in vars(sub).items() if isinstance(v, PLAIN)]
    return hashlib.sha256(repr((type(m).__qualname__, repr(m), attrs, tensors)).encode()).hexdigest()


def _arg_signature(a: Any, modules: dict[Any, tuple[weakref.ref, str]]) -> Any:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), str(a.dtype), str(a.device))
    if isinstance(a, torch.nn.Module):
        # Memoized per module, device and dtype: walking a UNet's repr and tensors every step costs milliseconds.
        first = next(a.parameters(), None)
        # A moved, cast or re-laid-out module (`channels_last_` swaps weights' layouts in place): a new memo. The
        # first conv weight stands for the layout (they change together), found near the start of the list.
        conv = next((p for p in a.parameters() if p.dim() >= 4), None)
        layout = None if conv is None else conv.stride()
        place = None if first is None else (str(first.device), str(first.dtype), layout)
        ref, sig = modules.get((id(a), place), (None, None))
        if ref is None or ref() is not a:
            sig = _module_signature(a)
            modules[(id(a), place)] = (weakref.ref(a), sig)
        return ("M", sig, place)
    if a is None or isinstance(a, (bool, int, float, str)):
        return ("V", type(a).__name__, a)
    raise TypeError(f"cannot key a precompiled call on an argument of type {type(a).__name__}")


@cache
def _triton_version() -> str | None:
    """The installed Triton, which built the GPU kernels an artifact holds and runs them (torch keys its own cache
    on it): `pip install triton` can change it under the same torch. Read from the package metadata: no import."""
    for name in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _device_name(args: tuple[Any, ...]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return _cuda_name(a.device.index or 0)
    return _cpu_name()


@cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@cache
def _cpu_name() -> str:
    """The CPU's model and instruction-set flags: inductor's CPU kernels use the vector instructions of the machine
    that compiled them, and a cache folder shared with an older CPU must not hand it those."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()


class PrecompiledFunction:
    """`fn(*args)` run through an ahead-of-time compiled artifact for the static signature of args (shapes,
    strides, dtypes, devices, module structure, plain values, grad mode), loaded from `folder` or compiled and
    saved there. Tested with the default compile mode, the one `Pipeline.compile` uses."""

    def __init__(self, fn: Callable[..., Any], folder: str | os.PathLike, mode: str | None = None) -> None:
        self.fn = fn
        self.folder = Path(folder)
        self.mode = mode
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self._loaded: dict[str, Callable[..., Any]] = {}
        self._modules: dict[Any, tuple[weakref.ref, str]] = {}
        self.compiled = 0  # artifacts compiled in this process (the rest were loaded): for tests and benchmarks
        self.loaded = 0

    def __getstate__(self) -> dict[str, Any]:
        # What it computes, not what it has loaded: torch pickles a module argument's attributes (a decoder block's
        # forward is bound to one of these) into each artifact's guards, and loaded artifacts do not pickle.
        return {**self.__dict__, "_loaded": {}, "_modules": {}}

    def key(self, args: tuple[Any, ...]) -> str:
        parts = (
            self.name,
            self.mode,
            _sources_digest(),
            torch.__version__,
            torch.version.cuda,
            _triton_version(),
            platform.python_version(),
            _device_name(args),
            torch.is_grad_enabled(),
            tuple(_arg_signature(a, self._modules) for a in args),
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{self.fn.__qualname__.replace('.', '-')}-{key}{FILE_SUFFIX}"

    def __call__(self, *args: Any) -> Any:
        fn = self._function(args)
        if not fn.guard_check(*args):
            # The guards saw a change the memoized module signatures missed (an attribute set after the first call,
            # such as unet.enable_forward_chunking()): sign the modules again, which finds or compiles its artifact.
            self._modules.clear()
            fn = self._function(args, stale=fn)
        return fn(*args)

    def _function(self, args: tuple[Any, ...], stale: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """The artifact for args' key: already in memory (unless it is `stale`), loaded, or compiled."""
        key = self.key(args)
        fn = self._loaded.get(key)
        if fn is None or fn is stale:
            fn = self._load(key, args) or self._compile(key, args)
            # Guards are checked in __call__, once a call (the artifact's own check would run them a second time)
            getattr(fn, "disable_guard_check", lambda: None)()
            self._loaded[key] = fn
        return fn

    def _load(self, key: str, args: tuple[Any, ...]) -> Callable[..., Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
            if fn.guard_check(*args):
                self.loaded += 1
                return fn
            why = "its guards reject these inputs"
        except Exception as e:  # a torch upgrade's format, a truncated file: compile again, never fail the video
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"img2vid: recompiling {path.name} ({why})", stacklevel=3)
        return None

    def _compile(self, key: str, args: tuple[Any, ...]) -> Callable[..., Any]:
        # aot_compile is attached only while this flag is on in torch 2.11 (on by default in later versions);
        # the patch is scoped to this call.
        with torch._dynamo.config.patch(enable_aot_compile=True):
            compiled = torch.compile(self.fn, fullgraph=True, dynamic=False, mode=self.mode)
        try:
            fn = compiled.aot_compile((args, {}))
        except torch._dynamo.exc.PackageError as e:
            # Guards no other process could check, such as the identity of the hooks that stream a module's weights
            # (sequential offload, low memory): one line instead of torch's multi-line trace after the tracing.
            why = first_line(e)
            raise InputError(
                f"the compile cache cannot keep {self.name} for these arguments ({why}); with sequential offload or "
                "low memory, compile without a cache folder"
            ) from None
        self.compiled += 1
        try:
            self._save(fn, key)
        except OSError as e:  # a full disk or a read-only folder: this run keeps its compiled function
            if self.folder.resolve() not in _UNSAVED:  # said once a folder: a decoder has ~20 functions to save
                _UNSAVED.add(self.folder.resolve())
                warnings.warn(f"img2vid: compiled functions not cached in {self.folder} ({e})", stacklevel=3)
        return fn

    def _save(self, fn: Any, key: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written in a folder of its own beside its final name and renamed: a killed process never leaves half an
        # artifact to load, and the folder's removal takes torch's own temporary file with it (its writer leaves
        # one behind when a write fails, such as on a full disk).
        work = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tmp-"))
        try:
            tmp = work / "artifact"
            # Created with the umask's permissions, as torch's own cache files are, and kept: torch writes through a
            # private (0600) temporary file, which would lock a cache folder shared by users to its first writer.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = stat.S_IMODE(tmp.stat().st_mode)
            fn.save_compiled_function(str(tmp))
            tmp.chmod(mode)
            os.replace(tmp, self.path(key))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def supported() -> bool:
    """Whether this torch can compile ahead of time (torch.compile(...).aot_compile, torch 2.10 and later)."""
    return hasattr(torch.compiler, "load_compiled_function")


def check_cache_dir(folder: str | os.PathLike) -> None:
    """A one-line error now, not a traceback after minutes of compiling, for a folder that cannot hold the cache."""
    if not supported():
        raise InputError(
            f"a compile cache needs torch 2.10 or later (torch.compile(...).aot_compile); this is {torch.__version__}"
        )
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot use {str(path)!r} as a compile cache: it is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot use {str(path)!r} as a compile cache: {e.strerror or e}") from None
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(f"cannot use {str(path)!r} as a compile cache: not readable")
    if not os.access(path, os.W_OK) and path.resolve() not in _UNSAVED:
        # A cache filled elsewhere and shipped read-only (a container image, another user's folder) still saves
        # the start-up; what it lacks is compiled for this process only (one note, not one per function or check).
        _UNSAVED.add(path.resolve())
        warnings.warn(
            f"img2vid: compile cache {str(path)!r} is read-only: its files are used, new compiles are not saved",
            stacklevel=3,
        )
