"""Between the user's objects and the pipeline's tensors: images in (any accepted kind -> the tensors diffusers'
pipeline would build from them), random draws in diffusers' order and placement, and frames out in diffusers'
output forms, the call's progress reports, and the attributes diffusers' pipeline shows beside its call."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from img2vid.configs import FLOAT16_MAX, PipelineConfig
from img2vid.errors import InputError
from img2vid.images import check_unit_tensor, load_image

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike
Generator = torch.Generator | list[torch.Generator] | None
ProgressFn = Callable[[str, int, int], None]  # (stage "denoise" | "decode", done, total)
# diffusers' callback_on_step_end(pipe, step index, timestep, {name: tensor}) -> tensors to replace (or None)
StepCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


def check_call_args(frames: int, steps: int, chunk: int, nv: int, guidance_reuse: int, output_type: str) -> None:
    """The pipeline call's counts and choices, each a one-line InputError (sizes: images.check_size)."""
    counts = (("num_frames", frames), ("num_inference_steps", steps), ("decode_chunk_size", chunk))
    for name, v in (*counts, ("num_videos_per_prompt", nv)):  # numpy's integers too, as diffusers takes them
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(guidance_reuse, bool) or not isinstance(guidance_reuse, numbers.Integral) or guidance_reuse < 1:
        raise InputError(f"guidance_reuse must be an integer >= 1 (1: exact guidance), got {guidance_reuse!r}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise InputError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")


def check_conditioning(
    fps: float, motion_bucket_id: float, noise_aug: float, min_g: float, max_g: float
) -> tuple[float, float, float, float, float]:
    """The call's real-valued knobs, returned as Python numbers: any number float16 holds, as diffusers takes them
    (a one-element tensor or array too, as diffusers' arithmetic on them works). NaN or infinity would only come out
    as a video of NaN, i.e. black frames, and so would a value past float16's range in a float16 model (a float32
    one refuses to convert past 3.4e38: a RuntimeError)."""
    names = ("fps", "motion_bucket_id", "noise_aug_strength", "min_guidance_scale", "max_guidance_scale")
    values = []
    for name, v in zip(names, (fps, motion_bucket_id, noise_aug, min_g, max_g), strict=True):
        if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
            v = v.item()  # a 0-d tensor (e.g. torch.tensor(7)) or array: its number (a bool one is refused below)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {v!r}")
        if abs(v) > FLOAT16_MAX:
            raise InputError(f"{name} must lie within +-{FLOAT16_MAX:g} (float16's range), got {v!r}")
        values.append(v)
    return values[0], values[1], values[2], values[3], values[4]


def randn(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' randn_tensor draws it (so seeds carry over): on the generator's
    device (a CPU generator draws on the CPU, then moves), one draw per batch item from the first shape[0]
    generators when given a list (the image noise of one image with two videos per prompt uses the first of two)."""
    gens = generator if isinstance(generator, list) else [generator]
    if len(gens) == 1 and isinstance(generator, list):
        generator = gens[0]
    gen_device = gens[0].device if gens[0] is not None else device
    draw_device = torch.device("cpu") if gen_device.type == "cpu" else device
    if isinstance(generator, list):
        if len(generator) < shape[0]:
            raise InputError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in gens[: shape[0]]]
        return torch.cat(parts).to(device)
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def check_generators(generator: Generator, videos: int) -> None:
    """A list of generators must hold one per video (images x num_videos_per_prompt), as diffusers requires, even
    with latents given; the image noise uses the first ones. Checked before any work."""
    if isinstance(generator, list) and len(generator) != videos:
        n = len(generator)
        raise InputError(f"got {n} generators for {videos} videos (images x num_videos_per_prompt): one per video")


def initial_latents(
    latents: torch.Tensor | None,
    shape: tuple[int, ...],
    generator: Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The user's latents, checked, or a draw (after the augmentation noise), in the model's dtype on the device;
    not yet scaled by the schedule's init_noise_sigma (a list of generators: `check_generators`)."""
    if latents is None:
        return randn(shape, generator, device, dtype)
    if tuple(latents.shape) != shape:
        raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise InputError("latents contain NaN or infinite values")
    return latents.to(device, dtype)


def callback_tensor_names(callback: StepCallback | None, names: Sequence[str] | None) -> list[str]:
    """The tensors a step-end callback is handed: diffusers' default ["latents"], the only name its pipeline lists
    (`_callback_tensor_inputs`). Another name is refused rather than silently left out of the callback's dict."""
    names = ["latents"] if names is None else list(names)
    unknown = [n for n in names if n not in DiffusersAttributes._callback_tensor_inputs]
    if callback is not None and unknown:
        raise InputError(f"callback_on_step_end_tensor_inputs may only name 'latents', got {unknown}")
    return names


class DiffusersAttributes:
    """The attributes diffusers' StableVideoDiffusionPipeline exposes beside its call, which users and step-end
    callbacks read: the latest call's guidance (set before its first step), its step count, the VAE's pixel factor.
    Read before any call, the call's ones raise AttributeError, as in diffusers."""

    _callback_tensor_inputs = ["latents"]  # what callback_on_step_end_tensor_inputs may name
    config: PipelineConfig
    _progress_bar_config: dict[str, Any]
    _guidance_scale: torch.Tensor
    _guidance_scale_shape: torch.Size
    _do_classifier_free_guidance: bool
    _num_timesteps: int

    def _set_call_state(self, guidance: torch.Tensor, videos: int, guided: bool, steps: int) -> None:
        """Set by a call before its first step, from its (1, F, 1, 1, 1) per-frame guidance: callbacks read them."""
        self._guidance_scale = guidance.expand(videos, -1, -1, -1, -1)  # (1, F, 1, 1, 1) -> (videos, F, 1, 1, 1)
        self._guidance_scale_shape = self._guidance_scale.shape
        self._do_classifier_free_guidance, self._num_timesteps = guided, steps

    def _callback_guidance(self, g: torch.Tensor) -> torch.Tensor:
        """The per-frame guidance once a step-end callback has assigned pipe._guidance_scale (diffusers' callbacks
        steer guidance so): a number, or a tensor that broadcasts to (videos, F, 1, 1, 1), in `g`'s dtype and place."""
        value = self._guidance_scale
        try:
            new = torch.as_tensor(value).to(g.device, g.dtype)
            torch.broadcast_shapes(new.shape, self._guidance_scale_shape)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"pipe._guidance_scale set by a callback must be a number or a tensor that broadcasts to "
                f"{tuple(self._guidance_scale_shape)}, got {value!r}"
            ) from None
        self._guidance_scale = new
        return new.view(1, 1, 1, 1, 1) if new.ndim == 0 else new  # () -> (1, 1, 1, 1, 1): one scale for all

    @property
    def guidance_scale(self) -> torch.Tensor:
        """(videos, F, 1, 1, 1): each frame's guidance scale, in the model's dtype on the device."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    def set_progress_bar_config(self, **options: Any) -> None:
        """tqdm options for the progress bars (disable=True silences them), as in diffusers."""
        check_tqdm_options(options)
        self._progress_bar_config = dict(options)

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        """A tqdm bar with the set_progress_bar_config options, as diffusers' (for code running its own loop)."""
        from tqdm.auto import tqdm

        if iterable is None and total is None:
            raise InputError("progress_bar needs an iterable or a total")
        return tqdm(iterable, total=total, **self._progress_bar_config)

    # diffusers' attention switches, so its recipes run unchanged. Slicing is a no-op in diffusers for this pipeline
    # too (none of SVD's models has set_attention_slice there); xFormers would replace attention kernels that here
    # are PyTorch's fused memory-efficient ones or img2vid's, whose memory does not grow with the attention matrix.
    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted; changes nothing, as in diffusers for SVD."""

    def disable_attention_slicing(self) -> None:
        """Accepted; changes nothing, as in diffusers for SVD."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Accepted; changes nothing: attention already runs in memory-efficient fused kernels (no xFormers)."""

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Accepted; changes nothing."""

    def _progress(self, progress: ProgressFn | None) -> ProgressFn:
        """The call's progress function: the caller's, else tqdm bars with the set options, else nothing."""
        if progress is not None:
            return progress
        return no_progress if self._progress_bar_config.get("disable") else tqdm_progress(self._progress_bar_config)


def as_images(image: Any) -> list[PIL.Image.Image | torch.Tensor]:
    """Any accepted input -> a list of RGB PIL images or (3, H, W) float tensors in [0, 1]."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("image list is empty")
        return [x for item in image for x in as_images(item)]
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 3:
            t = t[None]  # (3, H, W) -> (1, 3, H, W)
        if t.ndim != 4 or t.shape[1] != 3:
            raise InputError(f"image tensors must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        return _unit_images(t, "image tensor")
    if isinstance(image, np.ndarray) and image.ndim == 4:
        if len(image) == 0:
            raise InputError("image array batch is empty")
        if np.issubdtype(image.dtype, np.floating):  # kept at full precision, like a float tensor
            if image.shape[-1] != 3:  # numpy images are channels-last, as diffusers' numpy inputs
                raise InputError(f"image arrays must be (H, W, 3) or (B, H, W, 3) in [0, 1], got {image.shape}")
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)  # (B,H,W,3)->(B,3,H,W)
            return _unit_images(t, "image array")
        return [load_image(frame) for frame in image]  # integer samples (uint8, 16-bit) scaled as image files are
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating) and image.ndim == 3:
        if image.shape[-1] == 3:
            t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (H,W,3)->(1,3,H,W)
            return _unit_images(t, "image array")
    # A PIL image is taken as its pixels are stored, as diffusers' pipeline takes it: its EXIF orientation is
    # applied where it is read from a file (load_image, the CLI, the server; diffusers' load_image too), not here
    return [load_image(image, transpose=False)]


def _unit_images(t: torch.Tensor, name: str) -> list[torch.Tensor]:
    """(B, 3, H, W) samples (floats in [0, 1], integers in 0..255) -> B x (3, H, W) float32 on the CPU."""
    if t.shape[0] == 0:
        raise InputError(f"{name} batch is empty")
    if t.shape[-2] == 0 or t.shape[-1] == 0:  # as a PIL image of zero size is refused, not a resize's RuntimeError
        raise InputError(f"{name} has zero size: {t.shape[-1]}x{t.shape[-2]}")
    t = (t.float() if t.is_floating_point() else t.float() / 255.0).cpu()  # integer samples: 0..255
    # Checked here, not left to garbage out: [0, 255] floats, [-1, 1] data or NaN would make a video of noise
    check_unit_tensor(t, name)
    return list(t.unbind(0))  # B x (3, H, W)


def to_tensor(img: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; PIL goes through uint8 / 255 as diffusers' pil_to_numpy does."""
    if isinstance(img, torch.Tensor):
        return img
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H,W,3)->(3,H,W)


def resize_for_vae(img: PIL.Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [-1, 1]. PIL: Lanczos stretch, as diffusers. Tensors: antialiased bilinear (diffusers
    uses nearest, which aliases; the two agree whenever no resize is needed)."""
    if isinstance(img, PIL.Image.Image):
        img = img.resize((width, height), resample=PIL.Image.LANCZOS)
        return to_tensor(img) * 2.0 - 1.0
    if tuple(img.shape[-2:]) != (height, width):
        # (3, H, W) -> (1, 3, H, W), interpolate's batch -> (3, height, width)
        img = F.interpolate(img[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
    return img * 2.0 - 1.0


def postprocess(video: torch.Tensor, output_type: str) -> Any:
    """(B, F, 3, H, W) in [-1, 1] -> diffusers' output forms."""
    video = (video / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return video
    if output_type == "np":  # laid out channels-last on the device, then copied
        return to_host(video.float().permute(0, 1, 3, 4, 2)).numpy()  # (B, F, C, H, W) -> (B, F, H, W, C)
    # diffusers rounds (frames * 255) in float32 numpy; the same float32 maths (round half to even) on the frames'
    # device gives the same bytes, with a quarter of them to copy and no single-threaded numpy pass.
    u8 = to_host(to_uint8_tensor(video).permute(0, 1, 3, 4, 2)).numpy()  # (B, F, C, H, W) -> (B, F, H, W, C)
    return [[PIL.Image.fromarray(fr) for fr in vid] for vid in u8]


def to_uint8_tensor(t: torch.Tensor) -> torch.Tensor:
    """Samples in [0, 1] -> uint8 where they lie: clamped to [0, 1], times 255 in float32, rounded half to even (the
    frames of diffusers' PIL output, and images.to_uint8's maths for arrays: the same bytes either way)."""
    return t.float().clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)  # clamp's copy: t is left as it was


def to_host(t: torch.Tensor, stage_bytes: int = 32 * 2**20) -> torch.Tensor:
    """t copied into ordinary host memory. A CUDA tensor crosses through two reused page-locked buffers of
    stage_bytes, each chunk's host-side copy overlapping the next chunk's transfer: a video's 177 MB of float32
    frames took 17 ms that way (59 ms in a process's first call, which allocates the two blocks) against 150 ms
    straight into pageable memory, where the driver stages every byte itself (H100 host, runs 72-73). Handing the
    caller pinned memory instead would be faster still (4 ms), but every video kept alive would hold its own
    locked block, and a new 177 MB block cost 161 ms to allocate (run 54)."""
    if t.device.type != "cuda":
        return t.cpu().contiguous()
    src = t.contiguous().view(-1)  # (...) -> (N,): chunks of the flat samples
    out = torch.empty(t.shape, dtype=t.dtype)
    dst = out.view(-1)  # (...) -> (N,), a view: filled through it
    n = max(1, stage_bytes // t.element_size())
    # Freed at return: torch's caching host allocator hands the same two blocks to the next call
    free = [torch.empty(min(n, src.numel()), dtype=t.dtype, pin_memory=True) for _ in range(2)]
    pending: list[tuple[torch.cuda.Event, torch.Tensor, int, int]] = []  # (done, buffer, start, count), in order
    stream = torch.cuda.current_stream(t.device)

    def drain_oldest() -> None:  # wait for the oldest transfer, empty its buffer into the output, free it
        done, buf, s0, m0 = pending.pop(0)
        done.synchronize()
        dst[s0 : s0 + m0].copy_(buf[:m0])
        free.append(buf)

    for start in range(0, src.numel(), n):
        if not free:  # both buffers in flight
            drain_oldest()
        buf, m = free.pop(), min(n, src.numel() - start)
        buf[:m].copy_(src[start : start + m], non_blocking=True)  # on stream: the tensor's device's current one
        done = torch.cuda.Event()
        done.record(stream)
        pending.append((done, buf, start, m))
    while pending:
        drain_oldest()
    return out


def no_progress(stage: str, done: int, total: int) -> None:
    """The ProgressFn of set_progress_bar_config(disable=True)."""


def check_tqdm_options(options: dict[str, Any]) -> None:
    """Refuse options tqdm does not take now, not at the first bar of a generation already under way."""
    import inspect

    from tqdm.std import tqdm  # tqdm.auto's bar takes *args, **kwargs: the plain one names its options

    known = set(inspect.signature(tqdm.__init__).parameters) - {"self", "iterable", "total", "kwargs", "gui"}
    if unknown := sorted(set(options) - known):
        raise InputError(f"tqdm has no option {', '.join(map(repr, unknown))} (set_progress_bar_config)")


def tqdm_progress(options: dict[str, Any] | None = None) -> ProgressFn:
    """A ProgressFn drawing one tqdm bar per stage, closed when the stage is done; `options` go to every bar (desc
    and leave too: by default each bar is named after its stage and vanishes when done)."""
    from tqdm.auto import tqdm  # imported on use: `import img2vid` stays light

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, **{"desc": stage, "leave": False, **(options or {})})
        bars[stage].update(done - bars[stage].n)
        if done >= total:
            bars.pop(stage).close()

    return update
