"""The offload entry points called as users call them (`img2vid.offload`, Pipeline.enable_*_offload and
enable_low_memory): twice, one after another, before a cast, and towards a device this machine lacks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from img2vid import Pipeline, compiled
from img2vid.errors import InputError
from img2vid.offload import SequentialOffload

KW = dict(height=32, width=32, num_frames=3, num_inference_steps=2, output_type="pt", decode_chunk_size=2)


@pytest.fixture(autouse=True)
def small_units(monkeypatch):
    # The tiny model would fit in the always-resident small-layer allowance: stream most of it, in small units,
    # keeping the smallest layers resident (both kinds of weight are then exercised).
    monkeypatch.setattr(SequentialOffload, "RESIDENT_BYTES", 1 << 10)
    monkeypatch.setattr(SequentialOffload, "UNIT_BYTES", 16 << 10)


def frames(pipe: Pipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(make_image(), generator=torch.manual_seed(4), **KW).frames


def hooks(pipe: Pipeline) -> int:
    return sum(len(m._forward_pre_hooks) for c in (pipe.unet, pipe.vae, pipe.image_encoder) for m in c.modules())


def test_streaming_enabled_again_replaces_the_first():
    """enable_sequential_cpu_offload twice, or enable_low_memory after it (low memory streams too): one set of
    hooks, not two stacked ones each copying every weight (twice the pinned host memory and the transfers)."""
    once = Pipeline.from_config("tiny")
    once.enable_sequential_cpu_offload(device="cpu")
    want, n = frames(once), hooks(once)
    assert n > 0
    twice = Pipeline.from_config("tiny")
    twice.enable_sequential_cpu_offload(device="cpu")
    twice.enable_sequential_cpu_offload(device="cpu")
    assert hooks(twice) == n
    assert torch.equal(frames(twice), want)
    low = Pipeline.from_config("tiny")
    low.enable_sequential_cpu_offload(device="cpu")
    low.enable_low_memory(device="cpu")
    assert hooks(low) == n and all(len(s.cpu_copies) > 0 for s in low._sequential.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("mode", ["sequential", "low-memory"])
def test_a_cast_after_streaming_is_streamed(mode, dtype):
    """pipe.to(dtype) after the weights are streamed (as diffusers allows): the cast weights run, not the copies
    made before it (float32 streamed weights against cast inputs failed mid-generation). float16 also takes the
    VAE's force_upcast encode, which casts the resident weights there and back."""

    def offload(p: Pipeline) -> None:
        if mode == "sequential":
            p.enable_sequential_cpu_offload(device="cpu")
        else:
            p.enable_low_memory(device="cpu")

    cast_first = Pipeline.from_config("tiny").to(dtype)
    offload(cast_first)
    cast_after = Pipeline.from_config("tiny")
    offload(cast_after)
    cast_after.to(dtype)
    assert cast_after.dtype == dtype
    assert torch.equal(frames(cast_after), frames(cast_first))
    assert {c.dtype for s in cast_after._sequential.values() for c in s.cpu_copies.values()} == {dtype}


@pytest.mark.parametrize("enable", ["enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_low_memory"])
def test_offload_to_a_missing_gpu_is_a_one_line_error_that_changes_nothing(enable):
    """A CUDA device this machine lacks (any on a CPU-only one, one past the last otherwise) fails at once, with
    the pipeline as it was, rather than on the first generation (model offload) or half set up (sequential)."""
    pipe = Pipeline.from_config("tiny")
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(InputError, match=f"cannot offload: device {missing} is not available") as e:
        getattr(pipe, enable)(device=missing)
    assert "\n" not in str(e.value)
    assert pipe.device == torch.device("cpu") and pipe._offload is None and hooks(pipe) == 0
    frames(pipe)  # still runs where it was
    with pytest.raises(InputError, match="unknown device"):
        pipe.enable_model_cpu_offload(device="gpu")


@torch.no_grad()
def test_streamed_modules_compile():
    """A compiled function around streamed modules (pipe.compile() after sequential offload, fullgraph): dynamo
    traces the streaming hooks, which must hold nothing it cannot trace (a data-pointer comparison did)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).requires_grad_(False)
    x = torch.randn(4, 64)
    want = m(x)
    streaming = SequentialOffload(m, torch.device("cpu"), unit_bytes=64 * 65 * 4)
    assert len(streaming.streamed) == 2
    torch.testing.assert_close(torch.compile(m, fullgraph=True, dynamic=False)(x), want)


def test_model_offload_after_streaming_stops_the_streaming():
    pipe = Pipeline.from_config("tiny")
    pipe.enable_sequential_cpu_offload(device="cpu")
    want = frames(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hooks(pipe) == 0 and pipe._sequential == {} and pipe._offload == "model"
    assert torch.equal(frames(pipe), want)


@pytest.mark.parametrize("enable", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_to_a_device_under_offload(enable, monkeypatch):
    """As diffusers: offloaded components run where offloading was set up; .to("cpu") changes nothing, and a move
    to another device is an error, not inputs and weights on two devices at the first generation."""
    pipe = Pipeline.from_config("tiny")
    getattr(pipe, enable)(device="cpu")
    import img2vid.offload

    monkeypatch.setattr(img2vid.offload, "available_device", torch.device)  # "meta" stands for another GPU here
    assert pipe.to("cpu").device == torch.device("cpu")
    with pytest.raises(InputError, match="CPU offload runs on cpu; enable it again with device=meta"):
        pipe.to("meta")
    assert pipe.device == torch.device("cpu")
    frames(pipe)


def test_to_the_offload_device_without_its_index_is_a_no_op(monkeypatch):
    """enable_model_cpu_offload() runs on cuda:0; a diffusers script's later pipe.to("cuda") names that device and
    changes nothing (it was refused as another device). Faked on the CPU: no move is made under offload."""
    import img2vid.offload

    monkeypatch.setattr(img2vid.offload, "available_device", torch.device)  # no GPU here: names only
    pipe = Pipeline.from_config("tiny")
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._device = torch.device("cuda", 0)
    assert pipe.to("cuda").device == torch.device("cuda", 0)
    assert pipe.to("cuda:0", torch.float32).device == torch.device("cuda", 0)
    assert pipe._execution_device == torch.device("cuda", 0)  # diffusers' name, which scripts use for their tensors
    with pytest.raises(InputError, match="CPU offload runs on cuda:0; enable it again with device=cuda:1"):
        pipe.to("cuda:1")
    assert next(pipe.unet.parameters()).device == torch.device("cpu")


def test_compile_cache_with_streamed_weights_is_refused_before_tracing(tmp_path):
    pipe = Pipeline.from_config("tiny")
    pipe.enable_low_memory(device="cpu")
    with pytest.raises(InputError, match="cannot keep modules whose weights are streamed"):
        pipe.compile(cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_to_low_memory_and_guidance_parallel_refuse_bad_values_before_any_change():
    """meta, float8, complex, a non-integer chunk or a device name torch cannot parse: one line, pipeline as it was
    (pipe.to("meta") dropped the weights for good; chunk_size=2.5 left sequential offload on, then failed deep)."""
    pipe = Pipeline.from_config("tiny")
    for args, message in (
        (("meta",), "unknown device 'meta'"),
        ((torch.float8_e4m3fn,), "pipe.to's dtype must be torch.float16, bfloat16, float32 or float64"),
        ((torch.complex64,), "pipe.to's dtype must be"),
        (("xyz",), "unknown device 'xyz'"),
    ):
        with pytest.raises(InputError, match=message):
            pipe.to(*args)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    with pytest.raises(InputError, match="chunk_size must be a positive integer"):
        pipe.enable_low_memory(device="cpu", chunk_size=2.5)
    assert pipe._offload is None and hooks(pipe) == 0
    for device in ("xyz", None):
        with pytest.raises(InputError, match="for guidance parallelism"):
            pipe.enable_guidance_parallel(device)
    with pytest.raises(InputError, match="compile mode must be one of default, .*reduce-overhead.* not 'bogus'"):
        pipe.compile(mode="bogus")  # torch's RuntimeError at the first call, after the layout changed
    assert pipe._step is compiled.denoise_step
    frames(pipe)  # still runs where it was


def test_another_offload_after_low_memory_drops_its_chunking():
    """enable_low_memory then enable_model_cpu_offload: model offload alone, as asked (low memory's decode chunk
    size of 2, which changes the video, and its forward chunking and split guidance stayed on)."""
    pipe = Pipeline.from_config("tiny")
    pipe.enable_low_memory(device="cpu", chunk_size=1)
    chunked = [m for m in pipe.unet.modules() if getattr(m, "chunk_size", None) == 1]
    assert chunked and pipe._split_guidance and pipe.default_decode_chunk_size == 2
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(m.chunk_size is None for m in chunked)
    assert not pipe._split_guidance and pipe.default_decode_chunk_size is None and pipe._offload == "model"
    plain = Pipeline.from_config("tiny")
    assert torch.equal(frames(pipe), frames(plain))
    # a user's own chunking, set without low memory or after it, is theirs to keep
    pipe.unet.enable_forward_chunking(1)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert all(m.chunk_size == 1 for m in chunked)
    pipe.enable_low_memory(device="cpu")
    pipe.unet.enable_forward_chunking(3)
    pipe.default_decode_chunk_size = 8
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(m.chunk_size == 3 for m in chunked) and pipe.default_decode_chunk_size == 8


def test_model_offload_moves_one_component_at_a_time_on_any_machine(monkeypatch):
    """The placement the CUDA test below checks on a GPU, on any machine: every move model offload makes is recorded.
    The run device is `cpu:0` here, which torch runs as the CPU but which compares unequal to the `cpu` that
    components are sent home to, so the recorded moves show which component was where as each one ran."""
    import img2vid.modes

    pipe = Pipeline.from_config("tiny")
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._device = torch.device("cpu", 0)  # the "accelerator": the CPU under another name
    comps = {"image_encoder": pipe.image_encoder, "unet": pipe.unet, "vae": pipe.vae}
    names = {id(m): c for c, m in comps.items()}
    at = dict.fromkeys(comps, "home")
    seen: list[tuple[str, dict[str, str]]] = []
    move = img2vid.modes.move_module

    def recording_move(module: torch.nn.Module, device: torch.device) -> None:
        at[names[id(module)]] = "run" if device == torch.device("cpu", 0) else "home"
        move(module, device)

    monkeypatch.setattr(img2vid.modes, "move_module", recording_move)

    def record(name: str):  # a forward pre-hook: where every component is as `name` starts
        return lambda module, args: seen.append((name, dict(at)))

    for name, module in (("image_encoder", pipe.image_encoder), ("unet", pipe.unet)):
        module.register_forward_pre_hook(record(name))
    pipe.vae.encoder.register_forward_pre_hook(record("vae"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae"))
    out = frames(pipe)
    assert {name for name, _ in seen} == set(comps)
    for name, where in seen:
        assert where == {c: "run" if c == name else "home" for c in comps}, (name, where)
    assert at == dict.fromkeys(comps, "home")  # all home after the call
    assert torch.equal(out, frames(Pipeline.from_config("tiny")))  # and the frames of a plain run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_offload_keeps_one_component_on_the_gpu_at_a_time():
    """Model offload's point: while each component runs, it alone is on the GPU (its frames are checked elsewhere;
    on the CPU both places are the same, so only a GPU shows where the weights are)."""
    pipe = Pipeline.from_config("tiny")
    pipe.enable_model_cpu_offload(device="cuda")
    comps = {"image_encoder": pipe.image_encoder, "unet": pipe.unet, "vae": pipe.vae}
    seen: list[tuple[str, dict[str, str]]] = []

    def record(name: str):  # a forward pre-hook: where every component's weights are as `name` starts
        return lambda module, args: seen.append((name, {c: next(m.parameters()).device.type for c, m in comps.items()}))

    for name, module in (("image_encoder", pipe.image_encoder), ("unet", pipe.unet)):
        module.register_forward_pre_hook(record(name))
    pipe.vae.encoder.register_forward_pre_hook(record("vae"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae"))
    frames(pipe)
    assert {name for name, _ in seen} == set(comps)
    for name, where in seen:
        assert where == {c: "cuda" if c == name else "cpu" for c in comps}, (name, where)
