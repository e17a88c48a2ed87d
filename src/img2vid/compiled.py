"""Speed mode: the one function compiled per denoising step, and how the VAE decoder is compiled.

gpt-fast style: `denoise_step` is a whole step (scale, UNet on both guidance halves, guidance, Euler) with sigmas as
device tensors, compiled once as one graph with static shapes, so the loop never syncs with the host. The decoder is
compiled block by block (see `compile_decoder`). `Pipeline.compile` wires these in; eager runs call `denoise_step`
directly, so both modes run the same code. `reuse_full_step` / `reuse_cond_step` are the two kinds of step of the
approximate, opt-in guidance reuse (Pipeline's guidance_reuse > 1), compiled the same way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from img2vid import sampling
from img2vid.precompiled import PrecompiledFunction
from img2vid.vae import VAE, Decoder
from img2vid.vae_blocks import Attention, ResnetBlock2D, TemporalResnetBlock, Upsample2D

DECODER_BLOCKS = (ResnetBlock2D, TemporalResnetBlock, Upsample2D, Attention)  # what compile_decoder compiles
DECODER_RECOMPILE_LIMIT = 256  # compiled shapes per decoder block class (about 20 per video size)


def denoise_step(
    unet: torch.nn.Module,
    latents: torch.Tensor,  # (B, F, 4, h, w)
    image_latents: torch.Tensor,  # (2B or B, F, 4, h, w), uncond half first
    emb: torch.Tensor,  # (2B or B, 1, D)
    time_ids: torch.Tensor,  # (2B or B, 3)
    g: torch.Tensor,  # (1, F, 1, 1, 1) per-frame guidance
    sigma: torch.Tensor,  # () device tensor: no host sync, one compiled graph for every step
    sigma_next: torch.Tensor,
    t: torch.Tensor,  # () c_noise
    cfg: bool,
    split: bool = False,
) -> torch.Tensor:
    """One whole denoising step (scale, UNet, guidance, Euler): the unit that `Pipeline.compile` compiles.

    split runs the two guidance halves one after the other (half the activation memory, same numbers: every op in
    the UNet is per-sample)."""
    if cfg:  # the guided step of guidance reuse, whose delta output is unused here (compiled: not computed)
        return reuse_full_step(unet, latents, image_latents, emb, time_ids, g, sigma, sigma_next, t, split)[0]
    v = velocity(unet, sampling.scale_input(latents, sigma), image_latents, emb, time_ids, t)
    return sampling.euler_step(latents, v, sigma, sigma_next)


def velocity(
    unet: torch.nn.Module,
    x: torch.Tensor,
    image_latents: torch.Tensor,
    emb: torch.Tensor,
    ids: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The UNet's prediction for scaled latents x (N, F, 4, h, w) beside their image latents: the UNet reads both
    as (N, F, 8, h, w) and returns (N, F, 4, h, w)."""
    return unet(torch.cat([x, image_latents], dim=2), t, emb, ids, return_dict=False)[0]


def _guidance_halves(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    image_latents: torch.Tensor,
    emb: torch.Tensor,
    time_ids: torch.Tensor,
    sigma: torch.Tensor,
    t: torch.Tensor,
    split: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_uncond, v_cond), each (B, F, 4, h, w): the UNet on both guidance halves, as one 2B batch or (split) one
    half after the other."""
    if split:
        x = sampling.scale_input(latents, sigma)
        u_lat, c_lat = image_latents.chunk(2)
        u_emb, c_emb = emb.chunk(2)
        u_ids, c_ids = time_ids.chunk(2)
        return velocity(unet, x, u_lat, u_emb, u_ids, t), velocity(unet, x, c_lat, c_emb, c_ids, t)
    x = sampling.scale_input(torch.cat([latents, latents]), sigma)  # (2B, F, 4, h, w)
    v_uncond, v_cond = velocity(unet, x, image_latents, emb, time_ids, t).chunk(2)
    return v_uncond, v_cond


# ---- guidance reuse (APPROXIMATE, opt-in): the unconditional half runs on every N-th step only ------------------
# The steps that run both halves keep delta = v_cond - v_uncond; the steps between run the UNet on the conditional
# half alone (half the batch) and guide with that older delta (sampling.guidance_from_delta). Two functions rather
# than one with a branch, so each is its own static-shape graph under Pipeline.compile.
def reuse_full_step(
    unet: torch.nn.Module,
    latents: torch.Tensor,  # (B, F, 4, h, w)
    image_latents: torch.Tensor,  # (2B, F, 4, h, w), uncond half first
    emb: torch.Tensor,  # (2B, 1, D)
    time_ids: torch.Tensor,  # (2B, 3)
    g: torch.Tensor,  # (1, F, 1, 1, 1)
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    t: torch.Tensor,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """denoise_step with guidance (the same latents), and delta = v_cond - v_uncond (B, F, 4, h, w) for the
    conditional-only steps that follow."""
    v_uncond, v_cond = _guidance_halves(unet, latents, image_latents, emb, time_ids, sigma, t, split)
    v = sampling.apply_guidance(v_uncond, v_cond, g)
    return sampling.euler_step(latents, v, sigma, sigma_next), v_cond - v_uncond


def reuse_cond_step(
    unet: torch.nn.Module,
    latents: torch.Tensor,  # (B, F, 4, h, w)
    image_latents: torch.Tensor,  # (2B, F, 4, h, w), uncond half first: only the cond half is used
    emb: torch.Tensor,  # (2B, 1, D)
    time_ids: torch.Tensor,  # (2B, 3)
    g: torch.Tensor,  # (1, F, 1, 1, 1)
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    t: torch.Tensor,
    delta: torch.Tensor,  # (B, F, 4, h, w) from the last reuse_full_step
) -> torch.Tensor:
    """An approximate guided step: the UNet on the conditional half only (batch B, with or without split)."""
    c_lat, c_emb, c_ids = image_latents.chunk(2)[1], emb.chunk(2)[1], time_ids.chunk(2)[1]
    v_cond = velocity(unet, sampling.scale_input(latents, sigma), c_lat, c_emb, c_ids, t)
    return sampling.euler_step(latents, sampling.guidance_from_delta(v_cond, delta, g), sigma, sigma_next)


REUSE_STEPS = (reuse_full_step, reuse_cond_step)


def compile_modes() -> list[str]:
    """torch.compile's modes as this torch names them ("lite" is new in 2.13): anything else is torch's RuntimeError
    at the first call, after the pipeline changed. Imports inductor, which compiling does anyway."""
    from torch._inductor import list_mode_options

    return list(list_mode_options())


def compile_step(
    mode: str | None = None, step: Callable[..., Any] = denoise_step, cache_dir: str | os.PathLike | None = None
) -> Callable[..., Any]:
    """Static shapes: a new size compiles its own graph rather than a slower shape-generic one. With cache_dir, the
    compiled step is kept there ahead of time (`precompiled`): later processes load it instead of tracing."""
    if cache_dir is not None:
        return PrecompiledFunction(step, cache_dir, mode)
    return torch.compile(step, fullgraph=True, mode=mode, dynamic=False)


def compile_decoder(
    vae: VAE, mode: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Compile the decoder's blocks in place and return the decode function to call.

    Block by block rather than one graph: the decoder runs its per-frame layers a few frames at a time to bound
    memory (VAE.spatial_frame_chunk), and a whole-decoder graph fuses the slices back together (inductor kept every
    slice's output alive: no lower peak on an H100). Compiled blocks keep the slicing's peak and still fuse each
    block's norms, activations and residual adds.

    The output head (norm, SiLU, conv_out; `Decoder._head`, run per frame slice like the blocks) is compiled the
    same way: left eager, its GroupNorm ran PyTorch's channels-last CUDA kernel, 5x slower than the NCHW one (22.5
    vs 4.3 ms for 8 frames of 128 x 576 x 1024, svd_profile's micro-benchmark); compiled, it is `channel_group_norm`.

    With cache_dir, each block class's forward is one `PrecompiledFunction` (an artifact per shape, shared by the
    blocks of that shape) that the block instances call instead of their own forward."""
    precompiled = (
        {cls: PrecompiledFunction(cls.forward, cache_dir, mode) for cls in DECODER_BLOCKS} if cache_dir else {}
    )
    decoder = vae.decoder
    decoder.__dict__.pop("_head", None)  # an earlier compile's binding
    if cache_dir:
        decoder._head = functools.partial(PrecompiledFunction(Decoder._head, cache_dir, mode), decoder)
    else:
        decoder._head = torch.compile(decoder._head, fullgraph=True, mode=mode, dynamic=False)
    for m in decoder.modules():
        if isinstance(m, DECODER_BLOCKS):
            m.__dict__.pop("forward", None)  # an earlier compile(cache_dir=...)'s binding
            if precompiled:
                m._compiled_call_impl = None  # an earlier plain compile() (Module.compile's wrapper) would trace it
                m.forward = functools.partial(precompiled[type(m)], m)
            else:
                m.compile(fullgraph=True, mode=mode, dynamic=False)
    if precompiled:
        return vae.decode_frames  # no dynamo at run time: the recompile limit below does not apply

    def decode(z: torch.Tensor, num_frames: int) -> torch.Tensor:
        # A block class is one code object, compiled once per shape it meets (width, resolution, frames per slice,
        # the last chunk's remainder): about 20 for one SVD video size, over dynamo's default limit of 8 per code
        # object, which fullgraph turns into an error. The limit is raised for the decode only.
        with torch._dynamo.config.patch(recompile_limit=DECODER_RECOMPILE_LIMIT):
            return vae.decode_frames(z, num_frames)

    return decode
