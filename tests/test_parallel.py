"""Guidance parallelism (img2vid.parallel): the unconditional half of each guided step on a second device. On the
CPU both "devices" are the CPU, which checks the wiring and the numbers; the two-GPU test needs a machine with two."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_image

from img2vid import Pipeline
from img2vid.configs import TINY_UNET
from img2vid.errors import InputError
from img2vid.parallel import GuidanceParallel
from img2vid.unet import UNet

H, W = 32, 48
KW = dict(height=H, width=W, num_frames=3, num_inference_steps=3, decode_chunk_size=2, output_type="pt")


def tiny(device: str = "cpu", dtype: torch.dtype = torch.float32, split: bool = False) -> Pipeline:
    """The tiny pipeline; split: its guidance halves one after the other, the numbers guidance parallelism gives."""
    pipe = Pipeline.from_config("tiny", dtype, seed=1).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe._split_guidance = split
    return pipe


def batches(unet: torch.nn.Module) -> list[int]:
    """The batch sizes the module's forward sees from now on."""
    seen: list[int] = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


def deeper_unet() -> UNet:
    """A UNet of another build than the tiny pipeline's (two transformer layers at the first level), same inputs."""
    torch.manual_seed(5)
    return UNet(dataclasses.replace(TINY_UNET, transformer_layers_per_block=(2, 1))).eval().requires_grad_(False)


def video(pipe: Pipeline, **kw) -> torch.Tensor:
    return pipe(make_image(56, 40), generator=torch.manual_seed(3), **{**KW, **kw}).frames


def test_guidance_parallel_gives_the_split_halves_numbers():
    """The same numbers as split guidance (the halves one after the other), each UNet copy running one half."""
    split = tiny(split=True)
    par = tiny().enable_guidance_parallel("cpu")
    step = par._step
    assert isinstance(step, GuidanceParallel) and step.unet is not par.unet
    main_seen, second_seen = batches(par.unet), batches(step.unet)
    expected = video(split)
    assert torch.equal(video(par), expected)
    assert main_seen == second_seen == [1, 1, 1]  # each step: one video's half on each copy
    # and the plain 2B batch agrees to rounding
    torch.testing.assert_close(video(tiny()), expected, rtol=1e-5, atol=1e-5)


def test_guidance_parallel_without_guidance_runs_on_the_main_device_only():
    par = tiny().enable_guidance_parallel("cpu")
    second_seen = batches(par._step.unet)
    assert torch.equal(video(par, max_guidance_scale=1.0), video(tiny(), max_guidance_scale=1.0))
    assert second_seen == []


def test_guidance_parallel_refuses_what_it_cannot_run():
    with pytest.raises(InputError, match="cannot run with model CPU offload"):
        pipe = tiny()
        pipe.enable_model_cpu_offload(device="cpu")
        pipe.enable_guidance_parallel("cpu")
    pipe = tiny().enable_guidance_parallel("cpu")
    with pytest.raises(InputError, match="before compile\\(\\), and once"):
        pipe.enable_guidance_parallel("cpu")
    with pytest.raises(InputError, match="compile cache does not keep guidance-parallel steps"):
        pipe.compile(cache_dir="/tmp/never-used")
    for bad in ("meta", "cpu:1"):  # no data; a CPU that is not there
        with pytest.raises(InputError, match=f"guidance parallelism: unknown device '{bad}'"):
            tiny().enable_guidance_parallel(bad)
    n = torch.cuda.device_count()
    with pytest.raises(
        InputError, match=f"guidance parallelism: device cuda:{n} is not available \\(CUDA GPUs found: {n}\\)"
    ):
        tiny().enable_guidance_parallel(f"cuda:{n}")


def test_the_copy_follows_the_unet_changed_after_enabling():
    """Weights loaded into the UNet after enabling, a new UNet assigned, forward chunking set: the second device's
    copy follows before the next call (its unconditional halves ran the old weights: a wrong video, silently)."""
    other = Pipeline.from_config("tiny", torch.float32, seed=7).unet  # other weights, the same build
    par = tiny().enable_guidance_parallel("cpu")
    copy_ = par._step.unet
    par.unet.load_state_dict(other.state_dict())
    split = tiny(split=True)
    split.unet.load_state_dict(other.state_dict())
    assert torch.equal(video(par), video(split))
    assert par._step.unet is copy_  # copied into the copy's memory, not copied anew
    with torch.no_grad():  # an in-place change of one weight
        next(par.unet.parameters()).mul_(1.5)
        next(split.unet.parameters()).mul_(1.5)
    assert torch.equal(video(par), video(split))
    # through .data, as PEFT merges LoRA weights: no version counter sees it
    next(par.unet.parameters()).data.mul_(1.5)
    next(split.unet.parameters()).data.mul_(1.5)
    assert torch.equal(video(par), video(split))
    par.unet.enable_forward_chunking(1)
    video(par)
    assert all(m.chunk_size == 1 for m in par._step.unet.modules() if hasattr(m, "chunk_size"))
    # a UNet of another build assigned: copied anew
    par.unet = split.unet = deeper_unet()
    assert torch.equal(video(par), video(split))
    assert par._step.unet is not copy_ and len(list(par._step.unet.modules())) == len(list(par.unet.modules()))


def test_the_copy_follows_weights_made_under_inference_mode_and_a_failed_copy_is_made_again(monkeypatch):
    """Tensors made under torch.inference_mode keep no version counter: weights loaded there are followed too. A new
    copy that fails (out of memory on the second GPU) raises, and the next call makes it again, not a broken step."""
    other = Pipeline.from_config("tiny", torch.float32, seed=7).unet.state_dict()
    with torch.inference_mode():
        par, split = tiny().enable_guidance_parallel("cpu"), tiny(split=True)
        video(par)
        par.unet.load_state_dict(other)
        split.unet.load_state_dict(other)
        assert torch.equal(video(par), video(split))
    par, split = tiny().enable_guidance_parallel("cpu"), tiny(split=True)  # outside: inference tensors stay inside
    step = par._step
    real = GuidanceParallel._copy_of

    def out_of_memory(self, unet):
        raise torch.OutOfMemoryError("no room on the second device")

    monkeypatch.setattr(GuidanceParallel, "_copy_of", out_of_memory)
    par.unet = deeper_unet()  # another build: copied anew, which fails
    with pytest.raises(torch.OutOfMemoryError):
        video(par)
    assert step.unet is None
    par.to(torch.float64)  # with no copy in hand: nothing to cast, the next copy is made from the cast UNet
    monkeypatch.setattr(GuidanceParallel, "_copy_of", real)
    split.to(torch.float64).unet = par.unet
    assert torch.equal(video(par), video(split)) and step.unet is not None


def test_compiled_guidance_parallel_matches_eager():
    eager = video(tiny().enable_guidance_parallel("cpu"))
    compiled = tiny().enable_guidance_parallel("cpu").compile(decoder=False)
    torch.testing.assert_close(video(compiled), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_guidance_parallel_on_two_gpus_gives_the_split_halves_numbers():
    split = tiny("cuda:0", torch.float16, split=True)
    par = tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1")
    assert next(par._step.unet.parameters()).device == torch.device("cuda:1")
    got, expected = video(par, height=64, width=64), video(split, height=64, width=64)
    assert got.device == expected.device
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


def test_to_after_guidance_parallel_keeps_the_copy_in_step():
    """pipe.to(dtype) after enabling casts the second device's UNet copy too (it failed the call on mixed dtypes);
    a move that would leave the copy on the main device, or on another kind of device, is refused before it moves."""
    par = tiny().enable_guidance_parallel("cpu").to(torch.float64)
    assert next(par._step.unet.parameters()).dtype == torch.float64
    split = tiny(split=True).to(torch.float64)
    assert torch.equal(video(par), video(split))
    with pytest.raises(InputError, match="unknown device 'meta'"):  # no data: refused before the guidance check
        par.to("meta")
    assert par.device == torch.device("cpu") and next(par.unet.parameters()).device == torch.device("cpu")


def test_compile_lays_out_the_copy_as_the_unet():
    """compile()'s conv layout (channels_last, default on) reaches the second device's UNet copy made before it."""

    def strides(unet: torch.nn.Module) -> list[tuple[int, ...]]:
        return [p.stride() for p in unet.parameters() if p.ndim in (4, 5)]

    for on in (True, False):
        pipe = tiny().enable_guidance_parallel("cpu")
        before = strides(pipe._step.unet)
        pipe.compile(decoder=False, channels_last=on)
        assert strides(pipe._step.unet) == strides(pipe.unet)
        assert (strides(pipe.unet) != before) == on  # on the CPU the copy starts NCHW


def test_fp8_after_guidance_parallel_quantizes_both_halves(monkeypatch):
    """enable_fp8 after enable_guidance_parallel: the second device's copy too (it stayed exact while the first half
    ran float8). At the tiny model's widths only with a smaller min_features."""
    import functools

    from img2vid import modes
    from img2vid.fp8 import Fp8Linear

    monkeypatch.setattr(modes, "quantize_unet_fp8", functools.partial(modes.quantize_unet_fp8, min_features=16))
    pipe = tiny().enable_guidance_parallel("cpu")
    assert pipe.enable_fp8() > 0

    def fp8_layers(unet: torch.nn.Module) -> list[str]:
        return [name for name, m in unet.named_modules() if isinstance(m, Fp8Linear)]

    assert fp8_layers(pipe._step.unet) == fp8_layers(pipe.unet)


def test_offload_after_guidance_parallel_is_refused_as_before_it():
    pipe = tiny().enable_guidance_parallel("cpu")
    with pytest.raises(InputError, match="cannot run with model CPU offload"):
        pipe.enable_model_cpu_offload(device="cpu")
    for enable in (pipe.enable_sequential_cpu_offload, pipe.enable_low_memory):
        with pytest.raises(InputError, match="cannot run with sequential CPU offload"):
            enable(device="cpu")
    assert pipe._offload is None and not pipe._sequential and not pipe._split_guidance


def worker_step() -> tuple[GuidanceParallel, tuple]:
    """A GuidanceParallel with its worker thread (only CUDA devices get one by default) and a guided step's args."""
    from concurrent.futures import ThreadPoolExecutor

    step = GuidanceParallel(torch.nn.Linear(1, 1), torch.device("cpu"))
    step._worker = ThreadPoolExecutor(1)
    x, lat = torch.zeros(1, 2, 4, 2, 2), torch.zeros(2, 2, 4, 2, 2)
    s = torch.tensor(1.0)
    args = (torch.nn.Linear(1, 1), x, lat, torch.zeros(2, 1, 3), torch.zeros(2, 3), torch.ones(1, 2, 1, 1, 1), s, s, s)
    return step, args


def test_the_callers_half_error_is_raised_after_the_workers_half_ends():
    step, args = worker_step()
    finished = []

    def velocity(unet, *a):
        if unet is step.unet:  # the worker's half: fails too, later
            import time

            time.sleep(0.2)
            finished.append(True)
            raise RuntimeError("second half failed")
        raise ValueError("first half failed")

    step.velocity = velocity
    with pytest.raises(ValueError, match="first half failed"):
        step(*args, True)
    assert finished == [True]  # waited for, not left running into the next step


def test_the_workers_half_runs_under_the_callers_autocast():
    step, args = worker_step()
    seen = []

    def velocity(unet, x, *a):
        seen.append((unet is step.unet, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.zeros_like(x)

    step.velocity = velocity
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(*args, True)
    assert sorted(seen) == [(False, True, torch.bfloat16), (True, True, torch.bfloat16)]
    seen.clear()
    step(*args, True)
    assert sorted(seen) == [(False, False, torch.bfloat16), (True, False, torch.bfloat16)]


def test_compile_with_cuda_graphs_queues_both_halves_from_the_callers_thread():
    step, _ = worker_step()
    step.compile("reduce-overhead")
    assert step._worker is None


class FakeGraph:
    """Stands in for parallel.HalfGraph on the CPU: the eager half, plus a record of its capture."""

    def __init__(self, velocity, unet: torch.nn.Module, key: tuple) -> None:
        self.velocity, self.unet, self.key = velocity, unet, key

    def __call__(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.velocity(self.unet, *args)


def fake_captures(monkeypatch) -> list[tuple]:
    """Every capture_halves call from now on, as (key, the UNets of its halves), with FakeGraphs as the graphs."""
    from img2vid import parallel

    calls: list[tuple] = []

    def capture(velocity, halves, key):
        calls.append((key, [unet for unet, _, _ in halves]))
        return [FakeGraph(velocity, unet, key) for unet, _, _ in halves]

    monkeypatch.setattr(parallel, "capture_halves", capture)
    return calls


def test_graphs_are_captured_again_only_when_shapes_or_the_unets_change(monkeypatch):
    """A CUDA graph replays the kernels and memory it captured: a new video size, a cast, re-laid or chunked UNet
    needs a new capture; the same call again, or weights loaded in place, does not. The graphed halves give the split
    halves' numbers."""
    captures = fake_captures(monkeypatch)
    split = tiny(split=True)
    pipe = tiny().enable_guidance_parallel("cpu")
    step = pipe._step
    assert step.graphs is False  # on by default on CUDA only
    step.graphs = True
    assert torch.equal(video(pipe), video(split))
    assert len(captures) == 1 and captures[0][1] == [step.unet, pipe.unet]  # [second device's half, first's]
    video(pipe)
    pipe.unet.load_state_dict(pipe.unet.state_dict())  # copied into the same memory
    video(pipe)
    assert len(captures) == 1
    video(pipe, height=48)
    assert len(captures) == 2
    pipe.unet.enable_forward_chunking(1)
    video(pipe, height=48)
    assert len(captures) == 3
    pipe.to(torch.float64)
    video(pipe, height=48)
    assert len(captures) == 4 and captures[-1][0][0][0][1] == torch.float64  # key: ((shape, dtype), ...), autocast
    pipe.compile(decoder=False)  # compiled halves run no graphs of these
    assert step._graphed == []
    video(pipe, height=48)
    assert len(captures) == 4


def test_a_failed_capture_is_an_error_that_says_how_to_run_without_graphs():
    """On the CPU capture_halves refuses (no CUDA graphs there), as a capture that fails on a GPU raises. It is not
    run eagerly instead, then or in a later call (a server's next request): after a failed capture torch's allocator
    gave non-finite frames (run 125)."""
    pipe = tiny().enable_guidance_parallel("cpu")
    pipe._step.graphs = True
    with pytest.raises(
        RuntimeError,
        match=r"graphs of the guidance halves failed \(CUDA graphs run on CUDA dev.*"
        r"cuda_graphs=False \(CLI: --no-cuda-graphs\)",
    ):
        video(pipe)
    pipe._step.graphs = False  # and every later call, graphs or not, until a new process: no frames from it
    with pytest.raises(RuntimeError, match="graphs of the guidance halves failed"):
        video(pipe, max_guidance_scale=1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphed_halves_on_two_gpus_are_the_eager_halves():
    """On two GPUs the halves run as CUDA graphs by default: the same frames as the eager halves, bit for bit, one
    capture for two calls of one size, and another for a new size."""
    eager = tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1", cuda_graphs=False)
    assert eager._step.graphs is False
    graphed = tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1")
    assert graphed._step.graphs is True
    first = video(graphed, height=64, width=64)
    graphs = list(graphed._step._graphed)
    assert len(graphs) == 2 and graphs[0].device == torch.device("cuda:1")
    assert torch.equal(first, video(eager, height=64, width=64))
    assert torch.equal(video(graphed, height=64, width=64), first)
    assert graphed._step._graphed == graphs  # replayed, not captured again
    assert torch.equal(video(graphed, height=64, width=96), video(eager, height=64, width=96))
    assert graphed._step._graphed != graphs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphed_copy_on_the_second_gpu_follows_weights_loaded_after_enabling():
    """Weights loaded into the UNet after the graphs were captured: copied into the second GPU's copy, whose graph
    replays them (its memory is the one captured): the split halves' frames with the new weights, no new capture."""
    other = Pipeline.from_config("tiny", torch.float16, seed=7).unet.state_dict()
    par = tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1")
    video(par, height=64, width=64)
    graphs = list(par._step._graphed)
    par.unet.load_state_dict(other)
    split = tiny("cuda:0", torch.float16, split=True)
    split.unet.load_state_dict(other)
    got, expected = video(par, height=64, width=64), video(split, height=64, width=64)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
    assert par._step._graphed == graphs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_compiled_guidance_parallel_on_two_gpus_matches_eager():
    """Compiled halves (one compiled function, a graph per UNet copy) on two GPUs: the eager halves' frames."""
    eager = video(tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1"), height=64, width=64)
    pipe = tiny("cuda:0", torch.float16).enable_guidance_parallel("cuda:1").compile(decoder=False)
    got = video(pipe, height=64, width=64)
    # fp16 frames through compiled and eager kernels: within 1e-2 (runs 127-128: 5.1e-3 at 1 of 36864 values)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-2)
    assert (got.float() - eager.float()).abs().mean() < 1e-3
    assert pipe._step._graphed == []  # compiled: no eager graphs


def test_a_unet_compiled_diffusers_style_runs_its_halves_without_these_graphs(monkeypatch):
    """pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead") keeps CUDA graphs of its own, which cannot be
    captured inside another: that half is not graphed (a stand-in wrapper here: compiling is slow on the CPU)."""

    class Compiled(torch.nn.Module):  # what torch.compile returns, as far as the pipeline looks: _orig_mod
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = module

        def forward(self, *args: torch.Tensor, return_dict: bool = True) -> object:
            return self._orig_mod(*args, return_dict=return_dict)

    captures = fake_captures(monkeypatch)
    split = tiny(split=True)
    pipe = tiny().enable_guidance_parallel("cpu")
    pipe._step.graphs = True
    pipe.unet = Compiled(pipe.unet)
    assert torch.equal(video(pipe), video(split))
    assert captures == []
