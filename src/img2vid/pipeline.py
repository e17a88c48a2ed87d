"""The image-to-video pipeline: a drop-in for diffusers' StableVideoDiffusionPipeline.

Same call signature, same defaults, same random-number draw order (augmentation noise, then initial latents), so a
seed gives the same video in both. Two places where diffusers is wrong and we are not (see README):
- a decode chunk never spans two videos (diffusers flattens the batch before chunking);
- tensor images are resized for CLIP like PIL images (diffusers feeds tensors to CLIP at their own size), and with
  several images and num_videos_per_prompt > 1 every video is paired with its own image's latents.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from img2vid import checkpoint, compiled, components, sampling
from img2vid.components import Source
from img2vid.configs import PipelineConfig, preset
from img2vid.errors import InputError, NonFiniteVideo
from img2vid.hub import push_folder
from img2vid.image_encoder import ImageEncoder, preprocess
from img2vid.images import check_size
from img2vid.inputs import (
    DiffusersAttributes,
    Generator,
    ImageInput,
    ProgressFn,
    StepCallback,
    as_images,
    callback_tensor_names,
    check_call_args,
    check_conditioning,
    check_generators,
    initial_latents,
    postprocess,
    randn,
    resize_for_vae,
    to_tensor,
)
from img2vid.modes import COMPONENTS, RunModes, orig_module
from img2vid.offload import SequentialOffload, available_device, load_target, weights_dtype
from img2vid.outputs import PipelineOutput
from img2vid.unet import UNet
from img2vid.vae import VAE, decode_videos

if TYPE_CHECKING:
    import PIL.Image
    from huggingface_hub import CommitInfo


class Pipeline(DiffusersAttributes, RunModes):
    """Stable Video Diffusion image-to-video. Build with from_pretrained / from_single_file / from_config."""

    def __init__(self, config: PipelineConfig, unet: UNet, vae: VAE, image_encoder: ImageEncoder) -> None:
        self.config = config
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self._device = torch.device("cpu")  # where inference runs
        self._offload: str | None = None  # None | "model" | "sequential"
        self._sequential: dict[str, SequentialOffload] = {}
        self._progress_bar_config: dict[str, Any] = {}  # tqdm's options (set_progress_bar_config)
        self._step: Callable[..., torch.Tensor] = compiled.denoise_step
        self._reuse_steps: tuple[Callable[..., Any], ...] = compiled.REUSE_STEPS  # guidance_reuse > 1: (full, cond)
        self._split_guidance = False  # run the guidance halves one after the other (low memory)
        self._low_memory: int | None = None  # the chunk size enable_low_memory set, while its settings are on
        self.default_decode_chunk_size: int | None = None  # None: all frames at once, as diffusers
        # The decoder's per-frame layers run 2 frames at a time: same numbers, and on an H100 the activations of an
        # 8-frame decode chunk at 576x1024 fell from 9.6 (all at once) and 6.2 (4 at a time) to 3.9 GiB, for +15%
        # eager decode time (BENCHMARKS.md).
        vae.spatial_frame_chunk = 2
        self._decode: Callable[[torch.Tensor, int], torch.Tensor] = vae.decode_frames
        self._laid_out = False  # whether the conv weights' layout was chosen for the device (`_fit_layout`)
        for m in (unet, vae, image_encoder):
            m.eval().requires_grad_(False)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: PipelineConfig | str, torch_dtype: torch.dtype = torch.float32, seed: int | None = 0
    ) -> Pipeline:
        """Random weights (tests, benchmarks, `img2vid selftest`). The output is noise, not a video."""
        config = preset(config) if isinstance(config, str) else config
        # torch's initialisers draw from the global generator; fork_rng gives the caller's stream back unchanged
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            unet, vae, enc = UNet(config.unet), VAE(config.vae), ImageEncoder(config.image_encoder)
        return cls(config, unet.to(torch_dtype), vae.to(torch_dtype), enc.to(torch_dtype))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        force_download: bool = False,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool = True,
        device_map: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        unet: Source | None = None,
        vae: Source | None = None,
        image_encoder: Source | None = None,
    ) -> Pipeline:
        """A diffusers-format folder or hub id (through huggingface_hub's cache), or a single checkpoint file.
        revision, cache_dir, token and force_download: as in diffusers, for hub ids (a gated repo needs a login or a
        token). diffusers' other loading arguments, so its snippets run: dtype (its newer name for torch_dtype);
        use_safetensors (safetensors are what is read; False asks for pickles, which need allow_pickle);
        low_cpu_mem_usage (always: the models are built on the meta device and filled); device_map naming one
        device (as device=; diffusers' "balanced" split across GPUs is not img2vid's: see enable_guidance_parallel).
        unet / vae / image_encoder: a component from elsewhere, e.g. a fine-tuned UNet, instead of the checkpoint's
        (img2vid.components: an img2vid module, a diffusers / transformers model object, a diffusers component or
        pipeline folder, or a weights file)."""
        if use_safetensors is False and not allow_pickle:
            raise InputError("use_safetensors=False reads pickled .bin weights, which needs allow_pickle=True")
        del low_cpu_mem_usage  # always so
        dev, dtype = load_target(device, device_map, torch_dtype, dtype)  # before any download or read
        given = components.check_sources(dict(unet=unet, vae=vae, image_encoder=image_encoder))
        path = Path(pretrained_model_name_or_path)
        if path.is_file():
            return cls.from_single_file(
                path,
                torch_dtype=dtype,
                device=dev,
                allow_pickle=allow_pickle,
                unet=given.get("unet"),
                vae=given.get("vae"),
                image_encoder=given.get("image_encoder"),
                variant=variant,
            )
        folder = checkpoint.resolve_pretrained(
            str(pretrained_model_name_or_path),
            variant,
            local_files_only,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            force_download=force_download,
            skip=given,
        )
        config, sds = checkpoint.load_folder(folder, variant, dev, dtype, allow_pickle=allow_pickle, skip=given)
        config, modules = components.resolve(given, config, dev, dtype, variant, allow_pickle)
        return cls.from_state_dicts(config, sds, device, modules)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        config: PipelineConfig | str | None = None,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
        unet: Source | None = None,
        vae: Source | None = None,
        image_encoder: Source | None = None,
        variant: str | None = None,
    ) -> Pipeline:
        """Stability's original checkpoints (svd*.safetensors, sgm layout) or our own single files. unet / vae /
        image_encoder: a component from elsewhere (see from_pretrained); variant: the one to read a component
        folder in."""
        config = preset(config) if isinstance(config, str) else config
        dev, dtype = available_device(device), weights_dtype(torch_dtype)
        given = components.check_sources(dict(unet=unet, vae=vae, image_encoder=image_encoder))
        config, sds = checkpoint.load_single_file(Path(path), dev, dtype, config, allow_pickle=allow_pickle, skip=given)
        config, modules = components.resolve(given, config, dev, dtype, variant, allow_pickle)
        return cls.from_state_dicts(config, sds, device, modules)

    @classmethod
    def from_state_dicts(
        cls,
        config: PipelineConfig,
        sds: dict[str, dict[str, torch.Tensor]],
        device: Any = "cpu",
        modules: dict[str, torch.nn.Module] | None = None,
    ) -> Pipeline:
        """Components built on the meta device and filled (strictly, no copy) with in-memory state dicts keyed by
        component name, whose tensors already lie on `device` (what every loader and the benchmarks build from);
        `modules`: components already built, which need no state dict."""
        built = dict(modules or {})
        for c, model in (("unet", UNet), ("vae", VAE), ("image_encoder", ImageEncoder)):
            if c not in built:
                built[c] = checkpoint.build(model, getattr(config, c), sds[c], c)
        pipe = cls(config, built["unet"], built["vae"], built["image_encoder"])
        pipe._device = torch.device(device)
        return pipe

    def save_pretrained(
        self, path: str | os.PathLike, variant: str | None = None, safe_serialization: bool = True
    ) -> Path:
        """A diffusers folder (diffusers loads it). safe_serialization: diffusers' switch to pickles, refused here."""
        if not safe_serialization:
            raise InputError("img2vid writes safetensors only (safe_serialization=False would write pickles)")
        return checkpoint.save_folder(Path(path), self.config, self._state_dicts(), variant=variant)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> CommitInfo:
        """diffusers' push_to_hub: the pipeline saved as save_pretrained saves it, in a temporary folder, and
        uploaded to a hub model repo (created if missing; needs `hf auth login` or token=). Returns the commit."""
        with tempfile.TemporaryDirectory(prefix="img2vid-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", variant=variant, safe_serialization=safe_serialization)
            return push_folder(folder, repo_id, commit_message, private, token, create_pr)

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        return checkpoint.save_single_file(Path(path), self.config, self._state_dicts(), dtype=dtype)

    def _state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {c: orig_module(getattr(self, c)).state_dict() for c in COMPONENTS}

    # ---- the call ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | list[ImageInput],
        height: int | None = 576,
        width: int | None = 1024,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        decode_chunk_size: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
        progress: ProgressFn | None = None,
        guidance_reuse: int = 1,
    ) -> PipelineOutput | Any:
        """diffusers' arguments (see README), plus guidance_reuse: APPROXIMATE, opt-in; N > 1 runs the unconditional
        half of guidance on every N-th step only and reuses its guidance direction in between (1: exact guidance)."""
        self._prepare_call()
        num_frames = num_frames if num_frames is not None else self.config.num_frames
        if decode_chunk_size is None:
            decode_chunk_size = min(self.default_decode_chunk_size or num_frames, num_frames)
        vsf = self.config.vae_scale_factor
        height, width = (v if v is not None else self.config.unet.sample_size * vsf for v in (height, width))
        check_size(width, height, vsf)  # as diffusers: the UNet upsamples to each skip's size (odd latent sides)
        steps = num_inference_steps if sigmas is None else 1  # diffusers ignores it (even None) given sigmas
        check_call_args(num_frames, steps, decode_chunk_size, num_videos_per_prompt, guidance_reuse, output_type)
        fps, motion_bucket_id, noise_aug_strength, min_guidance_scale, max_guidance_scale = check_conditioning(
            fps, motion_bucket_id, noise_aug_strength, min_guidance_scale, max_guidance_scale
        )
        names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        images = as_images(image)
        n_img, nv = len(images), num_videos_per_prompt
        batch = n_img * nv
        check_generators(generator, batch)
        # Guided when any frame's scale is over 1: with min > 1 >= max the first frames are (diffusers decides on
        # max_guidance_scale alone, then guides per frame, and fails on that call)
        cfg = max(min_guidance_scale, max_guidance_scale) > 1
        progress = self._progress(progress)
        emb, image_latents, time_ids = self._conditioning(
            images, nv, num_frames, height, width, (fps, motion_bucket_id, noise_aug_strength), generator, cfg
        )

        # The schedule and the initial latents (B, F, 4, h, w); the augmentation noise was drawn before them.
        sc = self.config.scheduler
        try:
            sig = sampling.schedule(num_inference_steps, sc.sigma_min, sc.sigma_max, sc.rho, sigmas).to(self._device)
        except ValueError as e:  # the sampler's pure functions raise plain ValueErrors; to the user it is input
            raise InputError(str(e)) from None
        shape = (batch, num_frames, self.config.unet.out_channels, height // vsf, width // vsf)
        latents = initial_latents(latents, shape, generator, self._device, self.dtype)
        latents = latents * sampling.init_noise_sigma(sig)
        g = sampling.guidance_scales(min_guidance_scale, max_guidance_scale, num_frames).to(self._device, self.dtype)
        g = g.view(1, num_frames, 1, 1, 1)  # (F,) -> (1, F, 1, 1, 1): per-frame guidance
        self._set_call_state(g, batch, cfg, sig.numel() - 1)  # diffusers' pipe.guidance_scale, num_timesteps, ...

        self._stage("unet")
        cond = (image_latents, emb, time_ids)
        reuse = guidance_reuse if cfg else 1  # without guidance there is no half to skip
        latents = self._denoise(latents, cond, g, sig, cfg, reuse, callback_on_step_end, names, progress)

        if output_type == "latent":
            frames: Any = latents
        else:
            self._stage("vae")
            frames = self._frames(latents, decode_chunk_size, output_type, progress)
        self._stage("none")
        return PipelineOutput(frames=frames) if return_dict else frames

    def _conditioning(
        self,
        images: list[PIL.Image.Image | torch.Tensor],
        nv: int,
        num_frames: int,
        height: int,
        width: int,
        micro: tuple[float, float, float],
        generator: Generator,
        cfg: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's conditioning for `nv` videos of each image, F = num_frames: the CLIP embeddings (B', 1, D),
        the noise-augmented image's latents for every frame (B', F, 4, h, w) and the added time ids (B', 3) from
        micro = (fps, motion_bucket_id, noise_aug_strength); B' = 2B when guided, in diffusers' order [uncond, cond],
        where the unconditional half has zero embeddings and zero image latents. Draws the augmentation noise."""
        device, dtype = self._device, self.dtype
        fps, motion_bucket_id, noise_aug_strength = micro
        # CLIP embedding of each ORIGINAL image (not the WxH one): (n_img, 3, 224, 224) -> (B, 1, D)
        self._stage("image_encoder")
        # On the accelerator: its blur and resize took 39 ms on an H100 host's CPU, 7 ms on the card (run 53)
        pixels = torch.cat([preprocess(to_tensor(im)[None].to(device), self.config.image_encoder) for im in images])
        emb = self.image_encoder(pixels.to(dtype))[:, None].repeat_interleave(nv, dim=0)

        # VAE latents of the noise-augmented WxH image. The noise is drawn before the initial latents.
        vae_in = torch.stack([resize_for_vae(im, height, width) for im in images]).to(device)  # (n_img, 3, H, W)
        vae_in = vae_in + noise_aug_strength * randn(vae_in.shape, generator, device, vae_in.dtype)
        self._stage("vae")
        image_latents = self._encode(vae_in).to(dtype).repeat_interleave(nv, dim=0)  # (B, 4, h, w)
        # (B, 4, h, w) -> (B, F, 4, h, w): every frame is conditioned on the same image
        image_latents = image_latents[:, None].expand(-1, num_frames, -1, -1, -1)

        time_ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=dtype)
        time_ids = time_ids.repeat(emb.shape[0], 1).to(device)  # (1, 3) -> (B, 3)
        if cfg:  # batch order [uncond, cond]; uncond zeroes both the CLIP embedding and the image latents
            emb = torch.cat([torch.zeros_like(emb), emb])
            image_latents = torch.cat([torch.zeros_like(image_latents), image_latents])
            time_ids = torch.cat([time_ids, time_ids])
        return emb, image_latents, time_ids

    def _denoise(
        self,
        latents: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        g: torch.Tensor,
        sig: torch.Tensor,
        cfg: bool,
        reuse: int,
        callback: StepCallback | None,
        names: list[str],
        progress: ProgressFn,
    ) -> torch.Tensor:
        """The Euler loop over the (S + 1,) sigmas: (B, F, 4, h, w) latents at sig[0] -> at sig[-1]. cond:
        (image_latents, emb, time_ids) from `_conditioning`; g: (1, F, 1, 1, 1) per-frame guidance; reuse > 1:
        guidance reuse (APPROXIMATE), the unconditional half only every reuse-th step."""
        n_steps = sig.numel() - 1
        timesteps = sampling.c_noise(sig[:-1])
        delta = None  # v_cond - v_uncond of guidance reuse's last full step
        steered = self._guidance_scale  # what a callback replaces to steer guidance (see below)
        for i in range(n_steps):
            t = timesteps[i]
            step = (self.unet, latents, *cond, g, sig[i], sig[i + 1], t)
            if reuse == 1:
                latents = self._step(*step, cfg, self._split_guidance)
            elif i % reuse == 0:  # both halves; keeps delta = v_cond - v_uncond for the next reuse - 1 steps
                latents, delta = self._reuse_steps[0](*step, self._split_guidance)
            else:
                latents = self._reuse_steps[1](*step, delta)
            if callback is not None:
                out = callback(self, i, t, {k: latents for k in names}) or {}  # names: only "latents"
                latents = out.get("latents", latents)
                if self._guidance_scale is not steered:  # a callback steered guidance, as diffusers' may
                    g = self._callback_guidance(g)
                    steered = self._guidance_scale
            progress("denoise", i + 1, n_steps)
        return latents

    def _frames(self, latents: torch.Tensor, decode_chunk_size: int, output_type: str, progress: ProgressFn) -> Any:
        """Final (B, F, 4, h, w) latents -> the call's frames in output_type (see PipelineOutput)."""
        video = self._decode_videos(latents, decode_chunk_size, progress)  # (B, F, 3, H, W) in [-1, 1]
        if bool(video.isnan().any()):  # one sync; the frames go to the host next anyway
            # diffusers gives black frames here (NaN cast to bytes), silently. Infinities clamp to valid pixels.
            raise NonFiniteVideo(
                "the decoded video holds NaN values: the weights hold NaN or infinite values, or float16 "
                "overflowed (a large guidance scale can do it; try bfloat16 or float32)"
            )
        return postprocess(video, output_type)

    def decode_latents(self, latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14) -> torch.Tensor:
        """diffusers' `decode_latents`: (B, F, 4, h, w) latents of num_frames frames -> (B, 3, F, H, W) float32 in
        [-1, 1], diffusers' layout and arguments (but a chunk never holds two videos: README)."""
        check_call_args(num_frames, 1, decode_chunk_size, 1, 1, "pt")
        if latents.ndim != 5 or latents.shape[1] != num_frames:  # (5, 4) once meant a chunk size of 4, silently
            raise InputError(f"decode_latents takes (B, {num_frames}, 4, h, w) latents, got {tuple(latents.shape)}")
        return self._decode_videos(latents, decode_chunk_size).permute(0, 2, 1, 3, 4)  # (B, F, 3..) -> (B, 3, F..)

    def _decode_videos(
        self, latents: torch.Tensor, decode_chunk_size: int, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """(B, F, 4, h, w) -> (B, F, 3, H, W) float32 (`vae.decode_videos`: a chunk never holds two videos)."""
        self._fit_layout()
        dtype = next(orig_module(self.vae).parameters()).dtype
        scale = self.config.vae.scaling_factor
        return decode_videos(self._decode, latents / scale, decode_chunk_size, dtype, progress)
