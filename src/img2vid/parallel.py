"""Guidance parallelism: the two halves of classifier-free guidance on two GPUs at once.

Every guided SVD step runs the UNet on 2B samples, B unconditional (zero image embedding and latents) and B
conditional. Every op in the UNet is per-sample, so the unconditional half can run on a second GPU, on a copy of the
UNet, while the first GPU runs the conditional half: the numbers of running the halves one after the other (split
guidance, as low-memory mode does), in less time: on two H100s 0.23-0.24 s a step against 0.36 s on one
(BENCHMARKS.md, runs 118-121; each GPU's half takes 0.18 s, the host sets the pace). Per step only the scaled
latents (B, F, 4, h, w) cross to the second GPU and its velocity comes back: 1.8 MB each way at SVD-XT's size.

No call waits for a GPU, so both GPUs run at once as long as the host queues a step faster than they run it. Eager,
queueing a half's kernels takes the host about as long as a GPU takes to run them, so a worker thread queues the
second GPU's half while the caller's thread queues the first's: PyTorch releases the GIL inside its ops, so the two
overlap (0.253-0.258 s a step from one thread, 0.232-0.240 s from two). The cross-device copies are ordered by the
streams (torch makes the receiving stream wait for the sending one), so the result is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from img2vid import compiled, sampling


class GuidanceParallel:
    """A drop-in for `compiled.denoise_step` (the same arguments) whose guided steps run the unconditional half on
    `device` with its own copy of the UNet. Steps without guidance run as before, on the first GPU alone. The copy is
    made when guidance parallelism is enabled: set up the UNet first (weights, forward chunking); `Pipeline.to`,
    `compile` and `enable_fp8` follow it to the copy."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        # A deep copy keeps what the original carries beside its weights (forward chunking, fp8 layers, the conv
        # weights' layout); made where the original is, then moved, so for a moment both copies are there.
        self.unet = copy.deepcopy(unet).to(device).eval().requires_grad_(False)
        self.device = device
        self.velocity: Callable[..., torch.Tensor] = compiled.velocity
        # None: the caller's thread queues both halves (svd_speed.py's +parallel1thread sets it for comparison). Never
        # a worker on the CPU, whose ops run as they are called: two threads' OpenMP teams would fight over the same
        # cores (tests on 2 cores ran ~30x slower).
        threaded = device.type == "cuda"
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="img2vid-guidance") if threaded else None

    def compile(self, mode: str | None) -> None:
        """Both halves through one compiled velocity function (a graph per UNet copy: dynamo guards on the module).
        With CUDA graphs (reduce-overhead) a step costs the host a few launches and torch keeps their state per
        thread, so the caller's thread queues both halves."""
        self.velocity = torch.compile(compiled.velocity, fullgraph=True, mode=mode, dynamic=False)
        if mode in ("reduce-overhead", "max-autotune") and self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Kernels launched by img2vid's own ops (Triton) go to the current device's stream: make it the second GPU
        while its half is queued."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def __call__(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,  # (B, F, 4, h, w) on the first GPU
        image_latents: torch.Tensor,  # (2B or B, F, 4, h, w), uncond half first
        emb: torch.Tensor,  # (2B or B, 1, D)
        time_ids: torch.Tensor,  # (2B or B, 3)
        g: torch.Tensor,  # (1, F, 1, 1, 1) per-frame guidance
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        t: torch.Tensor,
        cfg: bool,
        split: bool = False,
    ) -> torch.Tensor:
        if not cfg:
            return compiled.denoise_step(unet, latents, image_latents, emb, time_ids, g, sigma, sigma_next, t, cfg)
        x = sampling.scale_input(latents, sigma)  # (B, F, 4, h, w): the input of both halves, as split guidance's
        (u_lat, c_lat), (u_emb, c_emb), (u_ids, c_ids) = image_latents.chunk(2), emb.chunk(2), time_ids.chunk(2)
        d = self.device
        # The second GPU's inputs, copied from this thread before either half is queued: a copy out of the first GPU
        # waits for all the work queued there when it is issued, which, issued from the worker, could include part of
        # the first GPU's half. (The conditioning is copied each step: ~2 MB, and nothing goes stale between calls.)
        u_in = (x.to(d), u_lat.to(d), u_emb.to(d), u_ids.to(d), t.to(d))
        # Autocast, like no_grad and the current device, is per thread: the worker's half runs under the caller's
        autocast = torch.is_autocast_enabled(d.type), torch.get_autocast_dtype(d.type)

        def uncond_half() -> torch.Tensor:  # on the second GPU
            with torch.no_grad(), self._on_device(), torch.autocast(d.type, dtype=autocast[1], enabled=autocast[0]):
                return self.velocity(self.unet, *u_in)

        if self._worker is None:
            v_uncond = uncond_half()  # queued first: the second GPU runs it while the host queues the first's
            v_cond = self.velocity(unet, x, c_lat, c_emb, c_ids, t)
        else:
            queued = self._worker.submit(uncond_half)
            try:
                v_cond = self.velocity(unet, x, c_lat, c_emb, c_ids, t)
            except BaseException:  # the worker's half never outlives the step; this half's error is the one raised
                wait([queued])
                raise
            v_uncond = queued.result()
        v = sampling.apply_guidance(v_uncond.to(latents.device), v_cond, g)
        return sampling.euler_step(latents, v, sigma, sigma_next)


def offload_refused(offload: str) -> Exception:
    """The one error for guidance parallelism with CPU offload, whichever was enabled first."""
    from img2vid.images import InputError

    return InputError(f"guidance parallelism keeps a UNet on each GPU; it cannot run with {offload} CPU offload")


def check_devices(main: torch.device, second: torch.device, offload: str | None) -> None:
    """The combinations guidance parallelism cannot run, as one-line errors (InputError from the caller's module)."""
    from img2vid.images import InputError

    if offload is not None:
        raise offload_refused(offload)
    if second.type == "cuda" and (second.index or 0) >= torch.cuda.device_count():
        raise InputError(f"no {second}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if second.type not in ("cuda", "cpu") or second.type != main.type:
        raise InputError(f"the second device {second} must be of the main device's kind ({main})")
    if second.type == "cuda" and (second.index or 0) == (main.index or 0):  # allowed on the CPU: a test of the wiring
        raise InputError(f"the second device {second} is the main device: guidance parallelism needs two GPUs")
