"""Speed mode: the one function compiled per denoising step, and how the VAE decoder is compiled.

gpt-fast style: `denoise_step` is a whole step (scale, UNet on both guidance halves, guidance, Euler) with sigmas as
device tensors, compiled once as one graph with static shapes, so the loop never syncs with the host. The decoder is
compiled block by block (see `compile_decoder`). `Pipeline.compile` wires these in; eager runs call `denoise_step`
directly, so both modes run the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from img2vid import sampling
from img2vid.vae import VAE, Attention, ResnetBlock2D, TemporalResnetBlock, Upsample2D

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
    if cfg and split:
        x = sampling.scale_input(latents, sigma)
        u_lat, c_lat = image_latents.chunk(2)
        u_emb, c_emb = emb.chunk(2)
        u_ids, c_ids = time_ids.chunk(2)
        v_uncond = unet(torch.cat([x, u_lat], dim=2), t, u_emb, u_ids)  # (B, F, 8, h, w) -> (B, F, 4, h, w)
        v_cond = unet(torch.cat([x, c_lat], dim=2), t, c_emb, c_ids)
        return sampling.euler_step(latents, sampling.apply_guidance(v_uncond, v_cond, g), sigma, sigma_next)
    x = torch.cat([latents, latents]) if cfg else latents
    x = torch.cat([sampling.scale_input(x, sigma), image_latents], dim=2)  # (2B, F, 8, h, w)
    v = unet(x, t, emb, time_ids)
    if cfg:
        v_uncond, v_cond = v.chunk(2)
        v = sampling.apply_guidance(v_uncond, v_cond, g)
    return sampling.euler_step(latents, v, sigma, sigma_next)


def compile_step(mode: str | None = None) -> Callable[..., torch.Tensor]:
    # Static shapes: a new size compiles its own graph rather than a slower shape-generic one.
    return torch.compile(denoise_step, fullgraph=True, mode=mode, dynamic=False)


def compile_decoder(vae: VAE, mode: str | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Compile the decoder's blocks in place and return the decode function to call.

    Block by block rather than one graph: the decoder runs its per-frame layers a few frames at a time to bound
    memory (VAE.spatial_frame_chunk), and a whole-decoder graph fuses the slices back together (inductor kept every
    slice's output alive: no lower peak on an H100). Compiled blocks keep the slicing's peak and still fuse each
    block's norms, activations and residual adds."""
    for m in vae.decoder.modules():
        if isinstance(m, DECODER_BLOCKS):
            m.compile(fullgraph=True, mode=mode, dynamic=False)

    def decode(z: torch.Tensor, num_frames: int) -> torch.Tensor:
        # A block class is one code object, compiled once per shape it meets (width, resolution, frames per slice,
        # the last chunk's remainder): about 20 for one SVD video size, over dynamo's default limit of 8 per code
        # object, which fullgraph turns into an error. The limit is raised for the decode only.
        with torch._dynamo.config.patch(recompile_limit=DECODER_RECOMPILE_LIMIT):
            return vae.decode(z, num_frames)

    return decode
