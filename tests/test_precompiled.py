"""Compiled functions kept on disk ahead of time (`img2vid.precompiled`, `Pipeline.compile(cache_dir=...)`): saved
once, loaded by a later caller without compiling, keyed on everything the graph depends on, and a broken or
mismatched artifact is compiled again with a warning instead of failing the call."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_image

from img2vid import Pipeline, precompiled
from img2vid.compiled import DECODER_BLOCKS
from img2vid.errors import InputError
from img2vid.layers import channels_last_
from img2vid.precompiled import FILE_SUFFIX, PrecompiledFunction

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"),
    pytest.mark.skipif(not precompiled.supported(), reason="this torch has no aot_compile"),
]


def affine_silu(x: torch.Tensor, layer: torch.nn.Linear, scale: float) -> torch.Tensor:
    return torch.nn.functional.silu(layer(x) * scale)  # (N, in) -> (N, out)


def artifacts(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@torch.no_grad()
def test_saved_once_then_loaded_and_keyed_on_every_input(tmp_path):
    layer = torch.nn.Linear(8, 16).requires_grad_(False)
    x = torch.randn(4, 8)
    first = PrecompiledFunction(affine_silu, tmp_path)
    want = affine_silu(x, layer, 0.5)
    torch.testing.assert_close(first(x, layer, 0.5), want)
    assert (first.compiled, first.loaded) == (1, 0)
    files = artifacts(tmp_path)
    assert len(files) == 1 and files[0].endswith(FILE_SUFFIX) and files[0].startswith("affine_silu-")  # no temp file

    later = PrecompiledFunction(affine_silu, tmp_path)  # a new process's view: nothing in memory
    torch.testing.assert_close(later(x, layer, 0.5), want)
    torch.testing.assert_close(later(x * 2, layer, 0.5), affine_silu(x * 2, layer, 0.5))  # same signature: reused
    assert (later.compiled, later.loaded) == (0, 1)

    # A new shape, a new plain value, a module of another structure: each its own artifact, none mistaken for another.
    wider = torch.nn.Linear(8, 32).requires_grad_(False)
    for args in [(torch.randn(2, 8), layer, 0.5), (x, layer, 2.0), (x, wider, 0.5)]:
        torch.testing.assert_close(later(*args), affine_silu(*args))
    assert (later.compiled, later.loaded) == (3, 1) and len(artifacts(tmp_path)) == 4
    # Another module of the same structure shares the artifact: weights are inputs, not constants.
    other = torch.nn.Linear(8, 16).requires_grad_(False)
    torch.testing.assert_close(later(x, other, 0.5), affine_silu(x, other, 0.5))
    assert later.compiled == 3


@torch.no_grad()
def test_broken_or_mismatched_artifact_is_compiled_again_with_a_warning(tmp_path):
    layer = torch.nn.Linear(8, 16).requires_grad_(False)
    x, y = torch.randn(4, 8), torch.randn(3, 8)
    f = PrecompiledFunction(affine_silu, tmp_path)
    f(x, layer, 1.0)
    path = f.path(f.key((x, layer, 1.0)))

    path.write_bytes(b"not an artifact")  # truncated by a crash, or written by another torch
    g = PrecompiledFunction(affine_silu, tmp_path)
    with pytest.warns(UserWarning, match="recompiling"):
        torch.testing.assert_close(g(x, layer, 1.0), affine_silu(x, layer, 1.0))
    assert g.compiled == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaced by a good one: the next caller loads it quietly
        h = PrecompiledFunction(affine_silu, tmp_path)
        h(x, layer, 1.0)
    assert (h.compiled, h.loaded) == (0, 1)

    # An artifact under the wrong key (its guards see another shape) is never run on these inputs.
    shutil.copy(path, f.path(f.key((y, layer, 1.0))))
    k = PrecompiledFunction(affine_silu, tmp_path)
    with pytest.warns(UserWarning, match="guards reject"):
        torch.testing.assert_close(k(y, layer, 1.0), affine_silu(y, layer, 1.0))
    assert k.compiled == 1


@torch.no_grad()
def test_a_failed_save_warns_and_the_call_still_returns(tmp_path, monkeypatch):
    layer = torch.nn.Linear(8, 16).requires_grad_(False)
    x = torch.randn(4, 8)

    def disk_full(self, path, external_data=None):  # torch's writer, failing half way through the file
        Path(path).write_bytes(b"half an artifact")
        raise OSError(28, "No space left on device")

    from torch._dynamo.aot_compile import AOTCompiledFunction

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", disk_full)
    f = PrecompiledFunction(affine_silu, tmp_path)
    with pytest.warns(UserWarning, match="not cached .*No space left"):
        torch.testing.assert_close(f(x, layer, 1.0), affine_silu(x, layer, 1.0))
    assert artifacts(tmp_path) == []  # no temporary file left behind either
    torch.testing.assert_close(f(x, layer, 1.0), affine_silu(x, layer, 1.0))  # kept in memory: compiled once
    assert f.compiled == 1


def test_cache_folder_errors_are_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (a_file, a_file / "sub"):
        with pytest.raises(InputError, match="cannot use .* as a compile cache") as e:
            precompiled.check_cache_dir(bad)
        assert "\n" not in str(e.value)
    precompiled.check_cache_dir(tmp_path / "new" / "dir")  # made on the way
    assert (tmp_path / "new" / "dir").is_dir()
    monkeypatch.setattr(precompiled, "supported", lambda: False)
    with pytest.raises(InputError, match="needs torch 2.10"):
        Pipeline.from_config("tiny").compile(cache_dir=tmp_path)


def test_pipeline_compile_cache_is_loaded_by_the_next_pipeline(tiny_model_dir, tmp_path):
    """The whole step and every decoder block shape are saved by the first compiled pipeline and loaded by the next
    one (another process in real use) without compiling; both give eager's frames to float rounding."""
    kw = dict(image=make_image(), height=32, width=48, num_frames=3, num_inference_steps=2, output_type="pt")
    first = Pipeline.from_pretrained(tiny_model_dir)
    first.set_progress_bar_config(disable=True)
    ref = first(generator=torch.manual_seed(5), decode_chunk_size=2, **kw).frames
    first.compile(cache_dir=tmp_path)
    out = first(generator=torch.manual_seed(5), decode_chunk_size=2, **kw).frames
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)

    def functions(p: Pipeline) -> list[PrecompiledFunction]:
        blocks = [m for m in p.vae.decoder.modules() if isinstance(m, DECODER_BLOCKS)]
        return [p._step, p.vae.decoder._head.func, *{id(m.forward.func): m.forward.func for m in blocks}.values()]

    saved = len(artifacts(tmp_path))
    assert saved == sum(f.compiled for f in functions(first)) >= 3  # the step and decoder blocks of several shapes

    second = Pipeline.from_pretrained(tiny_model_dir).compile(cache_dir=tmp_path)
    second.set_progress_bar_config(disable=True)
    again = second(generator=torch.manual_seed(5), decode_chunk_size=2, **kw).frames
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-4)
    assert sum(f.compiled for f in functions(second)) == 0 and sum(f.loaded for f in functions(second)) == saved

    second.compile()  # back to plain torch.compile: the blocks' and the head's cache bindings are gone
    assert not any("forward" in vars(m) for m in second.vae.decoder.modules())
    assert not hasattr(second.vae.decoder._head, "func")
    second.compile(cache_dir=tmp_path)  # and forth: plain compile's block wrappers are gone, the cache is read again
    blocks = [m for m in second.vae.decoder.modules() if isinstance(m, DECODER_BLOCKS)]
    assert all(m._compiled_call_impl is None and "forward" in vars(m) for m in blocks)
    torch.testing.assert_close(second(generator=torch.manual_seed(5), decode_chunk_size=2, **kw).frames, again)
    assert sum(f.compiled for f in functions(second)) == 0


def conv_silu(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return torch.nn.functional.silu(conv(x))


@torch.no_grad()
def test_keyed_on_the_weights_layout(tmp_path):
    """Channels-last weights (what Pipeline.compile stores by default) and NCHW weights are different graphs: the
    same module, re-laid-out in place, must not load the other layout's artifact."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 3, 5, 6)
    fn = PrecompiledFunction(conv_silu, tmp_path)
    torch.testing.assert_close(fn(x, conv), conv_silu(x, conv))
    channels_last_(conv)
    torch.testing.assert_close(fn(x, conv), conv_silu(x, conv))
    assert fn.compiled == 2 and len(artifacts(tmp_path)) == 2


def custom_ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """img2vid's custom ops as a compiled step calls them on a GPU (here each computes its fallback inside)."""
    from img2vid import add_norm, frame_kernel, fused

    h = fused.geglu_linear(x, w, b)  # (6*4, 8) -> (24, 16)
    s, n = add_norm.add_layer_norm(h, h * 0.5, vec, 4, False, b[:16], b[16:], 1e-5)  # vec (3, 16): one per 4 rows
    q = n.view(6, 4, 16)  # 2 videos of 3 frames, 4 tokens, 2 heads of 8
    return frame_kernel.frame_attention(q, q, s.view(6, 4, 16), 2, 3) + add_norm.layer_norm_rows(
        s, vec[:1], b[:16], b[16:], 1e-5
    ).view(6, 4, 16)


@torch.no_grad()
def test_img2vid_ops_are_saved_in_and_loaded_from_artifacts(tmp_path):
    """The compiled step's artifacts hold calls of img2vid's custom ops (with optional tensors, ints, floats and
    bools among their arguments): a later caller loads and runs them without compiling."""
    torch.manual_seed(0)
    args = (torch.randn(24, 8), torch.randn(32, 8), torch.randn(32), torch.randn(3, 16))
    want = custom_ops(*args)
    first = PrecompiledFunction(custom_ops, tmp_path)
    torch.testing.assert_close(first(*args), want)
    later = PrecompiledFunction(custom_ops, tmp_path)
    torch.testing.assert_close(later(*args), want)
    assert (first.compiled, later.compiled, later.loaded) == (1, 0, 1)


class Chunked(torch.nn.Module):
    """A layer with a plain attribute that picks the graph, as forward chunking's chunk_size does in the UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.chunk: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk is None:
            return self.lin(x)
        return torch.cat([self.lin(c) for c in x.split(self.chunk)])


def relu_of(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
    return torch.relu(m(x))


@torch.no_grad()
def test_a_module_attribute_set_after_the_first_call_gets_its_own_artifact(tmp_path):
    """pipe.compile(cache_dir=...) then pipe.unet.enable_forward_chunking(): the next call runs the chunked graph
    (the stale artifact's guards used to fail the call), and each setting keeps its own file, so processes with and
    without chunking sharing a cache load theirs instead of compiling over each other's."""
    m, x = Chunked().requires_grad_(False), torch.randn(4, 8)
    f = PrecompiledFunction(relu_of, tmp_path)
    torch.testing.assert_close(f(x, m), relu_of(x, m))
    m.chunk = 2
    torch.testing.assert_close(f(x, m), relu_of(x, m))
    assert f.compiled == 2 and len(artifacts(tmp_path)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "recompiling": each setting finds its own file
        for chunk in (None, 2):
            m.chunk = chunk
            later = PrecompiledFunction(relu_of, tmp_path)
            torch.testing.assert_close(later(x, m), relu_of(x, m))
            assert (later.compiled, later.loaded) == (0, 1)


@torch.no_grad()
def test_artifacts_are_readable_as_the_umask_allows_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A cache folder shared by several users (or filled at a container's build and read by its service user) needs
    files with the umask's permissions, as torch's own cache writes them, not a private 0600 temporary file's. A
    write that fails half way (torch's own writer, on a full disk) leaves no temporary file behind in the folder."""
    import os

    from torch._dynamo.aot_compile import AOTCompiledFunction

    layer, x = torch.nn.Linear(8, 16).requires_grad_(False), torch.randn(4, 8)
    old = os.umask(0o022)
    try:
        f = PrecompiledFunction(affine_silu, tmp_path)
        f(x, layer, 1.0)
    finally:
        os.umask(old)
    (name,) = artifacts(tmp_path)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644

    def disk_full(self, path, *args, **kwargs):  # as torch's writer fails: its temporary file beside `path` left
        Path(path).with_name(".tmp-torch-writer").write_bytes(b"half an artifact")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", disk_full)
    g = PrecompiledFunction(affine_silu, tmp_path)
    with pytest.warns(UserWarning, match="not cached .*No space left"):
        torch.testing.assert_close(g(x, layer, 2.0), affine_silu(x, layer, 2.0))
    assert artifacts(tmp_path) == [name]


def test_keyed_on_the_triton_version(monkeypatch):
    """Triton builds and runs the GPU kernels an artifact holds, and can be upgraded under the same torch (`pip
    install triton`): another version must not load this one's artifacts."""
    f, args = PrecompiledFunction(affine_silu, "unused"), (torch.randn(4, 8), torch.nn.Linear(8, 16), 1.0)
    keys = set()
    for version in ("triton 3.5.0", "triton 3.9.0", None):
        monkeypatch.setattr(precompiled, "_triton_version", lambda v=version: v)
        keys.add(f.key(args))
    assert len(keys) == 3


@torch.no_grad()
def test_a_read_only_cache_folder_is_loaded_from(tmp_path, monkeypatch):
    """A cache filled once and then shipped read-only (a container image, a folder another user filled) still
    saves the start-up: one note that new compiles are not saved, its artifacts loaded, a missing one compiled
    for this process with no further note. A folder that cannot be read stays an error."""
    import os

    layer, x = torch.nn.Linear(8, 16).requires_grad_(False), torch.randn(4, 8)
    PrecompiledFunction(affine_silu, tmp_path)(x, layer, 1.0)
    os.chmod(tmp_path, 0o555)
    try:
        real_access = os.access

        def access(path, mode, **kw):  # root passes every access check: answer as for an ordinary user
            return not (mode & (os.W_OK if Path(path) == tmp_path else 0)) and real_access(path, mode, **kw)

        monkeypatch.setattr(os, "access", access)
        with pytest.warns(UserWarning, match="read-only: its files are used"):
            precompiled.check_cache_dir(tmp_path)
        f = PrecompiledFunction(affine_silu, tmp_path)
        torch.testing.assert_close(f(x, layer, 1.0), affine_silu(x, layer, 1.0))
        assert (f.compiled, f.loaded) == (0, 1)

        def read_only(self, path, external_data=None):  # what root's writes would meet as an ordinary user
            raise PermissionError(13, "Permission denied", path)

        from torch._dynamo.aot_compile import AOTCompiledFunction

        monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", read_only)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once already, by check_cache_dir
            torch.testing.assert_close(f(x, layer, 2.0), affine_silu(x, layer, 2.0))
        assert f.compiled == 1
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
        with pytest.raises(InputError, match="not readable"):
            precompiled.check_cache_dir(tmp_path)
    finally:
        os.chmod(tmp_path, 0o755)


@torch.no_grad()
def test_streamed_modules_are_refused_in_one_line(tmp_path, monkeypatch):
    """A module whose weights are streamed (sequential offload, low memory) is guarded on its hooks' identity, which
    no artifact can hold: a one-line InputError, not torch's packaging trace, and nothing left in the folder."""
    from img2vid.offload import SequentialOffload

    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 0)  # these small layers would stay resident
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).requires_grad_(False)
    assert len(SequentialOffload(m, torch.device("cpu"), unit_bytes=64 * 65 * 4).streamed) == 2
    f = PrecompiledFunction(relu_of, tmp_path)
    with pytest.raises(InputError, match="compile cache cannot keep .*sequential offload") as e:
        f(torch.randn(4, 64), m)
    assert "\n" not in str(e.value) and artifacts(tmp_path) == []
