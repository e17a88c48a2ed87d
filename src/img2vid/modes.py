"""Where and how the pipeline runs: placement (`to`), CPU offload, low memory, guidance parallelism, fp8 and
compiling. Each is a switch on speed and memory that leaves the video as it is (fp8 excepted: opt-in, approximate);
`Pipeline` takes them from `RunModes` and owns the state they set (declared here, set in `Pipeline.__init__`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from img2vid import compiled, fused, offload, parallel, precompiled
from img2vid.configs import PipelineConfig
from img2vid.errors import InputError
from img2vid.fp8 import Fp8Linear, quantize_unet_fp8
from img2vid.layers import channels_last_
from img2vid.offload import SequentialOffload, move_module

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are never evaluated here
    from typing import Self

_FP8_STREAMING = "fp8 mode cannot stream weights (sequential offload, low memory): its weights are buffers"

COMPONENTS = ("image_encoder", "unet", "vae")  # also the model-offload order


def orig_module(m: torch.nn.Module) -> torch.nn.Module:
    """The module behind a torch.compile wrapper (which users may assign to pipe.unet)."""
    return getattr(m, "_orig_mod", m)


class RunModes:
    """The speed and memory switches of `Pipeline`."""

    config: PipelineConfig
    unet: torch.nn.Module
    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    _device: torch.device  # where inference runs
    _offload: str | None  # None | "model" | "sequential"
    _sequential: dict[str, SequentialOffload]
    _step: Callable[..., torch.Tensor]
    _reuse_steps: tuple[Callable[..., Any], ...]
    _split_guidance: bool
    _low_memory: int | None  # the chunk size enable_low_memory set (its settings are undone by another offload)
    _decode: Callable[[torch.Tensor, int], torch.Tensor]
    _laid_out: bool
    default_decode_chunk_size: int | None

    # ---- the VAE encode, which the offload modes and force_upcast both touch -------------------------------------
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mode of (N, 3, H, W) pixels. float16 VAEs whose config says force_upcast encode in float32
        (the encoder's activations overflow in half precision)."""
        vae = orig_module(self.vae)
        dtype = next(vae.parameters()).dtype
        if dtype == torch.float16 and self.config.vae.force_upcast:
            if "vae" in self._sequential:  # weights are streamed: cast the streamed copies, not the stored ones
                self._sequential["vae"].set_compute_dtype(torch.float32)
                try:
                    return vae.encode_mean(pixels.float())
                finally:
                    self._sequential["vae"].set_compute_dtype(None)
            # The encoder and quant_conv only: casting the decoder too, there and back, took 8 ms more (run 72)
            parts = (vae.encoder, vae.quant_conv)
            for m in parts:
                m.float()
            try:
                return vae.encode_mean(pixels.float())
            finally:
                for m in parts:
                    m.to(dtype)
        return vae.encode_mean(pixels.to(dtype))

    # ---- placement ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the models run, under CPU offload too (diffusers' `device` is the CPU there between calls), with
        its index as diffusers reports it (cuda:0 after to("cuda"))."""
        return offload.indexed(self._device)

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' name for where the models run, which scripts and callbacks use to place their tensors."""
        return offload.indexed(self._device)

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """The models by name, as diffusers' `components` (which also holds its scheduler and feature extractor)."""
        return {"unet": self.unet, "vae": self.vae, "image_encoder": self.image_encoder}

    def maybe_free_model_hooks(self) -> None:
        """diffusers' call after a generation that puts offloaded models back on the CPU: here offloading keeps them
        there between calls by itself, so there is nothing to do."""

    @property
    def dtype(self) -> torch.dtype:
        return next(orig_module(self.unet).parameters()).dtype

    def to(
        self,
        *args: Any,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        silence_dtype_warnings: bool = False,
    ) -> Self:
        """pipe.to("cuda"), pipe.to(torch.float16), pipe.to("cuda", torch.float16) or by keyword, as in diffusers
        (silence_dtype_warnings is taken for its scripts: no such warning is given here)."""
        for a in args:  # positional: a device, a dtype, or both
            dtype, device = (a, device) if isinstance(a, torch.dtype) else (dtype, a)
        # checked before anything moves: meta (no data), a missing GPU, float8 or complex weights would fail later
        device = offload.available_device(device) if device is not None else None
        dtype = offload.weights_dtype(dtype, "pipe.to's dtype") if dtype is not None else None
        # "cuda" (no index) names the offload's own device as well as "cuda:0" does: diffusers scripts call to("cuda")
        same = device is not None and device.type == self._device.type and device.index in (None, self._device.index)
        if device is not None and self._offload is not None and device.type != "cpu" and not same:
            # as diffusers: offloaded components run where offloading was set up (a move to the CPU is a no-op)
            raise InputError(
                f"{self._offload} CPU offload runs on {self._device}; enable it again with device={device} instead"
            )
        par = self._step if isinstance(self._step, parallel.GuidanceParallel) else None
        if par is not None and device is not None and self._offload is None:  # before anything moves
            parallel.check_devices(device, par.device, None)
        for c in COMPONENTS:
            m = orig_module(getattr(self, c))
            if dtype is not None:
                m.to(dtype)
            if device is not None and self._offload is None:
                m.to(device)
        if device is not None and self._offload is None:
            self._device = device
        # the second GPU's UNet copy: its half gets inputs in the new dtype (None: a failed copy, made anew next call)
        if par is not None and dtype is not None and par.unet is not None:
            par.unet.to(dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Components wait on the CPU and visit the GPU one at a time (image encoder -> UNet -> VAE)."""
        self._check_no_guidance_parallel("model")
        self._device = offload.accelerator(gpu_id, device)
        self._stop_streaming()
        self._leave_low_memory()
        self._offload = "model"
        for c in COMPONENTS:
            move_module(orig_module(getattr(self, c)), torch.device("cpu"))

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: str | torch.device | None = None
    ) -> None:
        """Every layer's weights wait on the CPU and are streamed to the GPU just for their forward."""
        # Whether enable_fp8 or fp8.quantize_unet_fp8 did it: streaming moves parameters only, and float8 weights are
        # buffers, which would stay on the CPU.
        if any(isinstance(m, Fp8Linear) for m in orig_module(self.unet).modules()):
            raise InputError(_FP8_STREAMING)
        self._check_no_guidance_parallel("sequential")
        self._device = offload.accelerator(gpu_id, device)
        self._stop_streaming()  # enabled again: one streaming at a time (stacked, every weight would copy twice)
        self._leave_low_memory()
        self._fit_layout()  # before the streamed copies are made: they keep the layout
        self._offload = "sequential"
        for c in COMPONENTS:
            m = orig_module(getattr(self, c))
            move_module(m, torch.device("cpu"))
            self._sequential[c] = SequentialOffload(m, self._device)

    def _check_no_guidance_parallel(self, kind: str) -> None:
        """Offload after enable_guidance_parallel: refused as the other order is (`parallel.check_devices`)."""
        if isinstance(self._step, parallel.GuidanceParallel):
            raise parallel.offload_refused(kind)

    def _leave_low_memory(self) -> None:
        """Another offload asked for after enable_low_memory: its chunking, decode chunk size (2, which changes the
        video) and split guidance go with it, as diffusers' offloads change nothing but where weights live. What the
        user set since is theirs and stays."""
        if self._low_memory is None:
            return
        unet = orig_module(self.unet)
        if {m.chunk_size for m in unet.modules() if hasattr(m, "chunk_size")} == {self._low_memory}:
            unet.disable_forward_chunking()
        if self.default_decode_chunk_size == 2:
            self.default_decode_chunk_size = None
        self._split_guidance, self._low_memory = False, None

    def _stop_streaming(self) -> None:
        for s in self._sequential.values():
            s.remove()
        self._sequential.clear()

    def _stage(self, name: str) -> None:
        """Model offload: bring `name` onto the device and send the others home."""
        if self._offload != "model":
            return
        for c in COMPONENTS:
            move_module(orig_module(getattr(self, c)), self._device if c == name else torch.device("cpu"))

    def enable_low_memory(
        self, device: str | torch.device | None = None, chunk_size: int = 25, split_guidance: bool = True
    ) -> Self:
        """Everything that lowers peak GPU memory without changing a number: weights streamed block by block
        (sequential offload, each block's copy overlapping the previous block's compute), the two guidance halves
        run one after the other, feed-forwards in chunks of at most chunk_size frames, and the VAE decoding 2 frames
        at a time by default (an explicit decode_chunk_size still wins; unlike the rest, decode chunking changes the
        temporal decoder's context, as in diffusers).

        chunk_size 25 keeps SVD-XT's frames whole: with the fused GEGLU the feed-forward is not this mode's peak, and
        smaller chunks only cost time (BENCHMARKS.md, run 52); longer videos are still chunked."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:  # before any change
            raise InputError(f"chunk_size must be a positive integer (frames), got {chunk_size!r}")
        self.enable_sequential_cpu_offload(device=device)
        orig_module(self.unet).enable_forward_chunking(chunk_size)
        self._split_guidance = split_guidance  # False: half the weight traffic, more activation memory
        self.default_decode_chunk_size = 2
        orig_module(self.vae).spatial_frame_chunk = 2
        self._low_memory = chunk_size
        return self

    def enable_guidance_parallel(self, device: str | torch.device, cuda_graphs: bool = True) -> Self:
        """Exact, for two GPUs: guided steps run the unconditional half on `device` (a copy of the UNet there) while
        this pipeline's device runs the conditional half (`parallel`): on two H100s 0.18-0.19 s a step instead of
        0.36-0.37. Call after `to()` and before `compile()`; guidance_reuse > 1 still runs on the first GPU alone.
        cuda_graphs: each eager half as a CUDA graph (the host queues a step in microseconds); False queues the
        eager halves op by op from two threads (compiled halves are never graphed here, and on two H100s they were
        no faster than graphed eager halves: BENCHMARKS.md, run 132)."""
        try:
            second = torch.device(device)
        except (RuntimeError, TypeError):  # "Invalid device string", None
            raise InputError(f"unknown device {device!r} for guidance parallelism; use cuda:N") from None
        parallel.check_devices(self._device, second, self._offload)
        if self._step is not compiled.denoise_step:
            raise InputError("enable_guidance_parallel goes before compile(), and once")
        self._fit_layout()  # the copy takes the conv weights' layout with it
        self._step = parallel.GuidanceParallel(orig_module(self.unet), second, cuda_graphs)
        return self

    def enable_fp8(self) -> int:
        """EXPERIMENTAL and APPROXIMATE, opt-in: float8 (e4m3) matrix products for the UNet's transformer linears
        (`fp8.quantize_unet_fp8`). Measured on an H100 it is not yet a speed-up: compiled, 0.482 s per step against
        0.433 s exact; eager, 1.07 s against 0.367 s; the video 45.8 dB from the exact one (BENCHMARKS.md), so the
        CLI does not offer it. Call after placing the pipeline, before compile(). Returns the number of layers
        replaced."""
        if self._offload == "sequential":
            raise InputError(_FP8_STREAMING)
        par = self._step if isinstance(self._step, parallel.GuidanceParallel) else None
        if par is not None and par.unet is not None:  # the second GPU's copy too: both halves alike
            quantize_unet_fp8(par.unet)
        return quantize_unet_fp8(orig_module(self.unet))

    def compile(
        self,
        mode: str | None = None,
        decoder: bool = True,
        channels_last: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> Self:
        """Speed mode (gpt-fast style): one compiled graph for a whole denoising step (scale, both guidance halves
        through the UNet, guidance, Euler) with static shapes and sigmas as device tensors, so no step syncs with the
        host; the VAE decoder is compiled too. Same function: outputs agree with eager to within kernel rounding.
        The first call compiles (minutes for the full model; torch caches the result on disk for later processes).
        channels_last (default) stores the UNet's and the decoder's conv weights NHWC / NDHWC, so activations stay
        channels-last from the first conv on: cuDNN's native layout, with the norms written to compile well in it
        (`channel_group_norm`) and the temporal convs as cuDNN convs (BENCHMARKS.md, run 29 against run 24). It
        changes the modules in place; eager calls after it still give the same numbers.

        cache_dir keeps the compiled graphs in that folder ahead of time (`precompiled`): a later process loads them
        instead of re-tracing (start-up). Its files are pickles written by torch: name only a folder you trust."""
        if mode is not None and mode not in (known := compiled.compile_modes()):
            raise InputError(f"compile mode must be one of {', '.join(known)} or None, not {mode!r}")
        guidance_parallel = isinstance(self._step, parallel.GuidanceParallel)
        if cache_dir is not None:
            if guidance_parallel:
                raise InputError("the compile cache does not keep guidance-parallel steps yet: compile without it")
            if self._offload == "sequential":  # found now, not after minutes of tracing (precompiled says why)
                raise InputError(precompiled.STREAMED_MODULES)
            precompiled.check_cache_dir(cache_dir)
        # What is compiled; the VAE encoder runs eagerly (once a video) and keeps the NCHW kernels it is fast in.
        channels_last_(orig_module(self.unet), channels_last)
        channels_last_(orig_module(self.vae).decoder, channels_last)
        self._laid_out = True  # as asked, also for later eager calls
        if guidance_parallel:
            if self._step.unet is not None:  # the second GPU's copy: its half as fast as the first's
                channels_last_(self._step.unet, channels_last)
            self._step.compile(mode)
        else:
            self._step = compiled.compile_step(mode, cache_dir=cache_dir)
        # compiled on use
        self._reuse_steps = tuple(compiled.compile_step(mode, s, cache_dir) for s in compiled.REUSE_STEPS)
        if decoder:
            self._decode = compiled.compile_decoder(orig_module(self.vae), mode, cache_dir)
        return self

    def _prepare_call(self) -> None:
        """What each call settles before its first step: the conv layout, weights cast since streaming began
        (pipe.to(dtype): they stream as they are now), and whether the guidance halves' CUDA graphs still fit the
        UNets."""
        self._fit_layout()
        for s in self._sequential.values():
            s.refresh()
        if isinstance(self._step, parallel.GuidanceParallel):
            self._step.refresh(orig_module(self.unet))

    def _fit_layout(self) -> None:
        """Before the first eager run on a GPU where `norm_act`'s kernels (which read either layout) run: the UNet's
        and the decoder's conv weights channels-last, as compile() lays them, and with them the activations. On NCHW
        ones cuDNN transposes every conv's input and output (BENCHMARKS.md, run 95). Streamed weights are laid out
        when streaming is set up (`enable_sequential_cpu_offload`), not after."""
        if self._laid_out or self._offload == "sequential" or self._device.type != "cuda":
            return
        if fused._kernels_run_on(self._device):
            channels_last_(orig_module(self.unet))
            channels_last_(orig_module(self.vae).decoder)
        self._laid_out = True
