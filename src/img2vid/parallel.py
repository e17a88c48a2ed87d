"""Guidance parallelism: the two halves of classifier-free guidance on two GPUs at once.

Every guided SVD step runs the UNet on 2B samples, B unconditional (zero image embedding and latents) and B
conditional. Every op in the UNet is per-sample, so the unconditional half can run on a second GPU, on a copy of the
UNet, while the first GPU runs the conditional half: the numbers of running the halves one after the other (split
guidance, as low-memory mode does), in less time: on two H100s 0.18-0.19 s a step against 0.36-0.37 s on one
(BENCHMARKS.md, runs 126, 131; each GPU's half takes 0.18 s). Per step only the scaled latents (B, F, 4, h, w)
cross to the second GPU and its velocity comes back: 1.8 MB each way at SVD-XT's size.

No call waits for a GPU, so both GPUs run at once as long as the host queues a step faster than they run it.
Queueing an eager half's ~2000 kernels takes the host about as long as a GPU takes to run them, so on CUDA each half
is a CUDA graph (`HalfGraph`): captured on the first guided step, then one launch a half. A graph replays the
kernels and the memory it captured, so it is captured again when the inputs' shapes or dtypes, autocast, or either
UNet (its weights' memory, its modules' settings such as forward chunking) change; its activations' memory stays
reserved between calls. Where no graph runs (compiled halves, or `cuda_graphs=False`), a worker thread queues the
second GPU's half while the caller's thread queues the first's: PyTorch releases the GIL inside its ops, so the two
overlap (0.253-0.258 s a step from one thread, 0.191-0.268 s from two: runs 118-131). The cross-device copies are
ordered by the streams (torch makes the receiving stream wait for the sending one), so the result is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from img2vid import compiled, sampling
from img2vid.errors import first_line
from img2vid.names import PLAIN
from img2vid.offload import available_device

# What a CUDA graph of a module depends on beyond its inputs (`module_key`): each tensor's (data_ptr, dtype, shape,
# strides), then each submodule's (type, its plain settings).
ModuleKey = tuple[
    tuple[tuple[int, torch.dtype, torch.Size, tuple[int, ...]], ...],
    tuple[tuple[type, tuple[tuple[str, object], ...]], ...],
]
# A graphed half's inputs: each one's (shape, dtype), and the autocast state it was captured under
GraphKey = tuple[tuple[tuple[torch.Size, torch.dtype], ...], object]
# What the second GPU's copy must match (`source_key`): ((id, ModuleKey), each weight's bit sum)
SourceKey = tuple[tuple[int, ModuleKey], torch.Tensor]


class GuidanceParallel:
    """A drop-in for `compiled.denoise_step` (the same arguments) whose guided steps run the unconditional half on
    `device` with its own copy of the UNet. Steps without guidance run as before, on the first GPU alone. The copy is
    made when guidance parallelism is enabled and follows the UNet before every pipeline call (`sync`): weights loaded
    or changed in place, a new UNet assigned, forward chunking set; `Pipeline.to`, `compile` and `enable_fp8` change
    both alike."""

    def __init__(self, unet: torch.nn.Module, device: torch.device, cuda_graphs: bool = True) -> None:
        # A deep copy keeps what the original carries beside its weights (forward chunking, fp8 layers, the conv
        # weights' layout); made where the original is, then moved, so for a moment both copies are there.
        self.device = device
        self.unet: torch.nn.Module | None = self._copy_of(unet)  # None after a copy that failed (`sync`)
        self._synced: SourceKey | None = source_key(unet)  # the UNet as the copy last matched it (`sync`)
        self.velocity: Callable[..., torch.Tensor] = compiled.velocity
        # None: the caller's thread queues both halves (svd_speed.py's +parallel1thread sets it for comparison). Never
        # a worker on the CPU, whose ops run as they are called: two threads' OpenMP teams would fight over the same
        # cores (tests on 2 cores ran ~30x slower).
        threaded = device.type == "cuda"
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="img2vid-guidance") if threaded else None
        # Each eager half as a CUDA graph, on CUDA (svd_speed.py's +parallelnograph turns it off for comparison;
        # set on the CPU, the capture is refused with an error)
        self.graphs = cuda_graphs and device.type == "cuda"
        self._graphed: list[HalfGraph] = []  # [second GPU's half, first GPU's half] once captured
        self._unets_key: tuple[ModuleKey, ModuleKey] | None = None  # both UNets as the graphs captured them (`refresh`)
        self._failed: str | None = None  # a failed capture's error: every later step raises it (see _graphed_halves)

    def _copy_of(self, unet: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(unet).to(self.device).eval().requires_grad_(False)

    def sync(self, unet: torch.nn.Module) -> ModuleKey:
        """Make the copy the UNet's twin again if the UNet changed since it last was: weights changed in place
        (load_state_dict, copy_, writes through .data such as a LoRA merge: their bits' sums tell) are copied into
        the copy's memory, settings (forward chunking) copied over; a UNet of another build (assigned, or modules
        swapped) is copied anew. Without this the unconditional halves would run the old weights: a wrong video,
        silently. Returns the UNet's `module_key`, which the graphs' check needs too."""
        key = source_key(unet)
        if self._synced is not None and key[0] == self._synced[0] and torch.equal(key[1], self._synced[1]):
            return key[0][1]
        src, dst = list(unet.modules()), list(self.unet.modules()) if self.unet is not None else []
        src_t, dst_t = _tensors(unet), _tensors(self.unet) if self.unet is not None else []
        same_build = (
            len(src) == len(dst)
            and all(type(a) is type(b) for a, b in zip(src, dst, strict=True))
            and len(src_t) == len(dst_t)
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(src_t, dst_t, strict=True))
        )
        self._synced = None  # until the copy below is done: an error in it leaves the next call to copy again
        if same_build:
            with torch.no_grad():
                for a, b in zip(src_t, dst_t, strict=True):
                    b.copy_(a)  # across GPUs: ordered by the streams, as the steps' copies are
            for a, b in zip(src, dst, strict=True):
                for name, value in vars(a).items():
                    if isinstance(value, PLAIN) and isinstance(vars(b).get(name, ()), PLAIN):
                        setattr(b, name, value)
        else:
            self._graphed, self.unet = [], None  # the old copy's memory (and its graphs') first
            self.unet = self._copy_of(unet)
        self._synced = key
        return key[0][1]

    def refresh(self, unet: torch.nn.Module) -> None:
        """Once a pipeline call, before its steps: the copy made the UNet's twin (`sync`), then the graphs go if
        either UNet changed since their capture (weights cast, moved or re-laid, modules swapped for fp8 ones, forward
        chunking set). Weights replaced in place (load_state_dict) need no new capture."""
        unet_key = self.sync(unet)
        if not self._graphs_run():
            return
        key = (unet_key, module_key(self.unet))
        if key != self._unets_key:
            self._graphed = []
            self._unets_key = key

    def compile(self, mode: str | None) -> None:
        """Both halves through one compiled velocity function (a graph per UNet copy: dynamo guards on the module).
        With CUDA graphs (reduce-overhead) a step costs the host a few launches and torch keeps their state per
        thread, so the caller's thread queues both halves."""
        self.velocity = torch.compile(compiled.velocity, fullgraph=True, mode=mode, dynamic=False)
        self._graphed = []  # the eager halves' graphs: their memory back
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
        if self._failed is not None:
            raise RuntimeError(self._failed)
        if not cfg:
            return compiled.denoise_step(unet, latents, image_latents, emb, time_ids, g, sigma, sigma_next, t, cfg)
        x = sampling.scale_input(latents, sigma)  # (B, F, 4, h, w): the input of both halves, as split guidance's
        (u_lat, c_lat), (u_emb, c_emb), (u_ids, c_ids) = image_latents.chunk(2), emb.chunk(2), time_ids.chunk(2)
        # Autocast, like no_grad and the current device, is per thread: the worker's half runs under the caller's
        autocast = torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(self.device.type)
        # The second GPU's inputs, still on the first GPU. A copy out of the first GPU runs on its stream, after all
        # the work queued there when it is issued: every copy is issued before the first GPU's half is queued.
        # (The conditioning crosses each step: ~2 MB, and nothing goes stale between calls.)
        u_src, c_in = (x, u_lat, u_emb, u_ids, t), (x, c_lat, c_emb, c_ids, t)
        halves = self._graphed_halves(unet, u_src, c_in, autocast)
        v_uncond, v_cond = halves if halves is not None else self._queued_halves(unet, u_src, c_in, autocast)
        v = sampling.apply_guidance(v_uncond.to(latents.device), v_cond, g)
        return sampling.euler_step(latents, v, sigma, sigma_next)

    def _queued_halves(
        self, unet: torch.nn.Module, u_src: tuple[torch.Tensor, ...], c_in: tuple[torch.Tensor, ...], autocast: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_uncond on the second GPU, v_cond), each half queued op by op: the second GPU's from the worker thread
        (or first, from this one), the first GPU's from this thread."""
        d = self.device
        u_in = tuple(a.to(d) for a in u_src)  # from this thread, before either half is queued (see __call__)

        def uncond_half() -> torch.Tensor:  # on the second GPU
            with torch.no_grad(), self._on_device(), torch.autocast(d.type, dtype=autocast[1], enabled=autocast[0]):
                return self.velocity(self.unet, *u_in)

        if self._worker is None:
            v_uncond = uncond_half()  # queued first: the second GPU runs it while the host queues the first's
            return v_uncond, self.velocity(unet, *c_in)
        queued = self._worker.submit(uncond_half)
        try:
            v_cond = self.velocity(unet, *c_in)
        except BaseException:  # the worker's half never outlives the step; this half's error is the one raised
            wait([queued])
            raise
        return queued.result(), v_cond

    def _graphs_run(self) -> bool:
        return self.graphs and self.velocity is compiled.velocity

    def _graphed_halves(
        self, unet: torch.nn.Module, u_src: tuple[torch.Tensor, ...], c_in: tuple[torch.Tensor, ...], autocast: tuple
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(v_uncond on the second GPU, v_cond) through the halves' CUDA graphs, captured first where none fits;
        None where no graph runs. The second GPU's inputs (u_src, on the first GPU) are copied straight into its
        graph's buffers. Both outputs are the graphs' own buffers: read before the next step's replay."""
        if not self._graphs_run() or hasattr(unet, "_orig_mod"):
            # pipe.unet = torch.compile(pipe.unet, ...), diffusers style: compiled code keeps its own graphs
            return None
        if self._unets_key is None:  # called outside a pipeline call
            self.refresh(unet)
        key = (tuple((a.shape, a.dtype) for a in c_in), autocast)
        if not self._graphed or self._graphed[0].key != key:
            self._graphed = []  # the old graphs' memory first
            halves = [(self.unet, self.device, u_src), (unet, c_in[0].device, c_in)]
            try:
                self._graphed = capture_halves(self.velocity, halves, key)
            except RuntimeError as e:
                # Not run eagerly instead, now or in a later call (a server's next request): after a failed capture
                # torch's allocator cannot be trusted (run 125's eager halves after one gave non-finite frames)
                why = first_line(e)
                self._failed = (
                    f"CUDA graphs of the guidance halves failed ({why}); start a new process and enable guidance "
                    "parallelism with cuda_graphs=False (CLI: --no-cuda-graphs)"
                )
                raise RuntimeError(self._failed) from None

        second, first = self._graphed
        with self._on_device():
            v_uncond = second(u_src)
        return v_uncond, first(c_in)


class HalfGraph:
    """One guidance half's UNet call as a CUDA graph for one key (the inputs' shapes and dtypes, autocast). Each call
    copies its inputs into the graph's static buffers (across devices for the second GPU's half: ordered by the
    streams) and replays the forward's ~2000 kernels in one launch. The output is the graph's static buffer,
    overwritten by the next replay; the caller reads it before then, in stream order."""

    WARMUPS = 3  # eager calls before capture: lazy set-up (kernel loads, library plans) must not happen in a capture

    def __init__(
        self, velocity: Callable[..., torch.Tensor], unet: torch.nn.Module, device: torch.device, key: GraphKey
    ) -> None:
        self.velocity, self.unet, self.device, self.key = velocity, unet, device, key

    def warm_up(self, args: tuple[torch.Tensor, ...]) -> None:
        """Queue the warm-up calls on a side stream (capture needs the work before it off the capturing stream)."""
        with torch.cuda.device(self.device), torch.no_grad():
            self.inputs = [torch.empty_like(a, device=self.device).copy_(a) for a in args]
            self.side = torch.cuda.Stream(self.device)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                for _ in range(self.WARMUPS):
                    self.velocity(self.unet, *self.inputs)

    def capture(self) -> None:
        with torch.cuda.device(self.device), torch.no_grad():
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.graph = torch.cuda.CUDAGraph()
            # On the warm-up's stream, which is this GPU's: torch's default capture stream is one per process, made on
            # the device of the first capture, so a second GPU's capture on it fails (runs 121, 125). thread_local:
            # other threads' CUDA calls (a server's) do not invalidate this capture.
            with torch.cuda.graph(self.graph, stream=self.side, capture_error_mode="thread_local"):
                self.output = self.velocity(self.unet, *self.inputs)

    def __call__(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, a in zip(self.inputs, args, strict=True):
            buffer.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.output


def capture_halves(
    velocity: Callable[..., torch.Tensor],
    halves: list[tuple[torch.nn.Module, torch.device, tuple[torch.Tensor, ...]]],
    key: GraphKey,
) -> list[HalfGraph]:
    """A graph per (unet, device, inputs): the warm-ups of all are queued first, so the GPUs run them at once."""
    for _, device, _ in halves:
        if device.type != "cuda":
            raise RuntimeError(f"CUDA graphs run on CUDA devices, not {device}")
    graphs = [HalfGraph(velocity, unet, device, key) for unet, device, _ in halves]
    for graph, (_, _, args) in zip(graphs, halves, strict=True):
        graph.warm_up(args)
    for graph in graphs:
        graph.capture()
    return graphs


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a tensor's bits as integers


def source_key(module: torch.nn.Module) -> SourceKey:
    """What the second GPU's copy must match: (the module, its `module_key`: tensors' memory, dtypes, shapes and
    strides, its modules' settings) and, per tensor, the sum of its bits read as integers. Any change of a weight
    changes its sum but for changes that cancel exactly; version counters would miss writes through .data (PEFT's
    merges) and tensors made under inference_mode. One reduction a tensor and one sync: a few ms for SVD's UNet,
    once a pipeline call."""
    with torch.no_grad():
        sums = [t.detach().view(_INT_OF_SIZE[t.element_size()]).sum(dtype=torch.int64) for t in _tensors(module)]
    return (id(module), module_key(module)), (torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64))


def module_key(module: torch.nn.Module) -> ModuleKey:
    """What a CUDA graph of `module`'s forward depends on beyond its inputs: where each weight lives (dtype, shape,
    strides, memory) and every submodule's plain settings (forward chunking, fused projections, ...). ~10 ms for
    SVD's UNet, so once a call, not once a step."""
    tensors = tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in _tensors(module))
    settings = tuple(
        (type(m), tuple((k, v) for k, v in vars(m).items() if isinstance(v, PLAIN))) for m in module.modules()
    )
    return tensors, settings


def offload_refused(offload: str) -> Exception:
    """The one error for guidance parallelism with CPU offload, whichever was enabled first."""
    from img2vid.errors import InputError

    return InputError(f"guidance parallelism keeps a UNet on each GPU; it cannot run with {offload} CPU offload")


def check_devices(main: torch.device, second: torch.device, offload: str | None) -> None:
    """The combinations guidance parallelism cannot run, as one-line errors (InputError from the caller's module)."""
    from img2vid.errors import InputError

    if offload is not None:
        raise offload_refused(offload)
    try:  # a GPU this machine lacks, cpu:1, meta: named before the copy is made
        available_device(second)
    except InputError as e:
        raise InputError(f"guidance parallelism: {e}") from None
    if second.type not in ("cuda", "cpu") or second.type != main.type:
        raise InputError(f"the second device {second} must be of the main device's kind ({main})")
    if second.type == "cuda" and (second.index or 0) == (main.index or 0):  # allowed on the CPU: a test of the wiring
        raise InputError(f"the second device {second} is the main device: guidance parallelism needs two GPUs")
