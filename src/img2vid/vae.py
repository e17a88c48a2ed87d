"""The SVD autoencoder: a 2D image encoder plus a video (temporal) or per-frame 2D decoder.

Parameter names are exactly those of diffusers' `AutoencoderKLTemporalDecoder` (`VAEConfig.temporal_decoder`) or
`AutoencoderKL` (the `*_image_decoder` checkpoints), so their safetensors files load with a strict `load_state_dict`.
No buffers anywhere: the model can be built on the meta device and filled with `load_state_dict(..., assign=True)`.

Layout notes (the decode of 25 frames at 576x1024 is the pipeline's memory peak):
- Frames travel flattened as (N = videos*frames, C, H, W). The temporal layers see them as (B, C, F, H, W) through a
  transpose *view*; their (3,1,1) convs run as matrix products on the frames in place (`layers.temporal_conv`).
- Everything is plain conv / group_norm / silu / SDPA with static shapes: no host syncs, torch.compile-friendly.
- `VAE.spatial_frame_chunk` runs the up blocks' per-frame layers a few frames at a time (see `per_frame`): only the
  temporal layers' inputs and outputs are then all-frames tensors (live activations at 25 x 576 x 1024 fp16,
  counted on the meta device: 17.6 -> 10.6 GiB).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from img2vid.configs import VAEConfig
from img2vid.layers import Placed, group_norm
from img2vid.outputs import FieldOutput, SampleOutput
from img2vid.vae_blocks import (
    EPS,
    TIME_KERNEL,
    TIME_PADDING,
    Attention,
    Downsample2D,
    ResnetBlock2D,
    SpatioTemporalResBlock,
    Upsample2D,
    chain,
    per_frame,
)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet, attention, resnet. The 2D blocks (diffusers `UNetMidBlock2D`) hold exactly two resnets.

    The temporal decoder's `MidBlockTemporalDecoder` builds `layers_per_block` resnets but one attention and runs
    resnets[0], attention, resnets[1] only (a zip over the single attention): with layers_per_block = 1 its attention
    is never run, with more than 2 the extra resnets are dead weights. SVD (layers_per_block 2) is unaffected; the
    same quirk is kept so that every diffusers config gives the same numbers."""

    def __init__(self, channels: int, groups: int, num_resnets: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        if temporal:
            resnets: list[nn.Module] = [SpatioTemporalResBlock(channels, channels, groups) for _ in range(num_resnets)]
        else:
            resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(num_resnets)]
        # The reference registers attentions before resnets; only the state-dict names matter, not this order.
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList(resnets)

    def _resnet(self, i: int, x: Tensor, num_frames: int) -> Tensor:
        resnet = self.resnets[i]
        if not self.temporal:
            return resnet(x)
        x = resnet.spatial_res_block(x)
        return resnet.temporal_res_block(x, num_frames, resnet.time_mixer.temporal_weight(x.dtype))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        x = self._resnet(0, x, num_frames)
        if len(self.resnets) > 1:
            x = self.attentions[0](x)
            x = self._resnet(1, x, num_frames)
        return x


class UpDecoderBlock(nn.ModuleDict):
    """diffusers `UpDecoderBlock2D` (2D resnets) or `UpBlockTemporalDecoder` (spatio-temporal resnets), then an
    optional x2 upsample. A container with no forward: `Decoder.forward` runs its layers (see there why). It is a
    ModuleDict so that forward-hook users (sequential offload) know its own forward never runs and hook its layers."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool, temporal: bool
    ) -> None:
        super().__init__()
        block = SpatioTemporalResBlock if temporal else ResnetBlock2D
        self.resnets = nn.ModuleList(
            block(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None


class Encoder(nn.Module):
    """diffusers `Encoder` with DownEncoderBlock2D blocks; outputs 2 * latent_channels moments (mean, logvar)."""

    weights_read_here = ("conv_norm_out",)

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        ch = c.block_out_channels
        g = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, num_resnets=2, temporal=False)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, num_frames=1)
        x = group_norm(x, self.conv_norm_out, silu=True, reuse_input=True)
        return self.conv_out(x)


class Decoder(nn.Module):
    """diffusers `TemporalDecoder` (temporal=True) or the 2D `Decoder` with UpDecoderBlock2D blocks."""

    weights_read_here = ("conv_norm_out",)

    def __init__(self, c: VAEConfig, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        rev = tuple(reversed(c.block_out_channels))
        g = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        # 2D: one mid layer (two resnets); temporal: layers_per_block resnets (see MidBlock).
        mid_resnets = c.layers_per_block if temporal else 2
        self.mid_block = MidBlock(rev[0], g, mid_resnets, temporal)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, g, upsample=i < len(rev) - 1, temporal=temporal
            )
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)
        # The video decoder's last layer also mixes the RGB output over time.
        self.time_conv_out = (
            nn.Conv3d(c.out_channels, c.out_channels, TIME_KERNEL, padding=TIME_PADDING) if temporal else None
        )

    def _head(self, x: Tensor) -> Tensor:
        # norm, SiLU and conv_out are per frame: `per_frame` can run them on a few frames at a time.
        return self.conv_out(group_norm(x, self.conv_norm_out, silu=True))

    def forward(self, z: Tensor, num_frames: int, frame_chunk: int | None = None) -> Tensor:
        """frame_chunk: run the up blocks' per-frame layers (2D resnets, upsamplers, output head) on that many
        frames at a time (see `per_frame`); None runs all frames at once. The temporal layers always see all."""
        if frame_chunk is not None and frame_chunk >= z.shape[0]:
            frame_chunk = None  # one slice of everything: the plain path, which also runs the upsamplers on their own
        x = self.mid_block(self.conv_in(z), num_frames)
        # The up blocks' layers run from this frame, one statement each: a call keeps its argument alive in the
        # caller until it returns, so calling a whole block (or a whole spatio-temporal resnet) would hold the
        # block's input - up to 256 x 576 x 1024 per frame - through all of its layers. Rebinding `x` frees it
        # (about 4.4 GiB less peak at 25 x 576 x 1024 in float16, 9 GiB in float32).
        # With slices, an upsampler runs inside the next block's first slice loop, so that its 4x larger output
        # exists a slice at a time too (at 25 x 576 x 1024 that output is the biggest tensor of the decode). Not
        # without slices: the call would then hold the upsampler's input through the resnet.
        up: Upsample2D | None = None
        for block in self.up_blocks:
            for resnet in block.resnets:
                spatial = resnet.spatial_res_block if self.temporal else resnet
                x = per_frame(spatial if up is None else chain(up, spatial), x, frame_chunk)
                up = None
                if self.temporal:
                    x = resnet.temporal_res_block(x, num_frames, resnet.time_mixer.temporal_weight(x.dtype))
            if block.upsamplers is not None:
                up = block.upsamplers[0]
                if frame_chunk is None:
                    x = up(x)
                    up = None
        x = per_frame(self._head if up is None else chain(up, self._head), x, frame_chunk)
        if self.time_conv_out is not None:
            # (B*F, C, H, W) -> (B, F, C, H, W) -> (B, C, F, H, W)
            x5 = x.unflatten(0, (-1, num_frames)).transpose(1, 2)
            # (B, C, F, H, W) -> (B, F, C, H, W) -> (B*F, C, H, W); only 3 channels, so a copy here is cheap.
            x = self.time_conv_out(x5).transpose(1, 2).flatten(0, 1)
        return x


class LatentDistribution:
    """diffusers' DiagonalGaussianDistribution: the encoder's posterior from its (N, 2 * latent, h, w) moments
    (mean, then log-variance, clamped as diffusers clamps it)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (N, 2L, h, w) -> 2 x (N, L, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * noise, the noise drawn as diffusers' randn_tensor draws it (the same seed, the same draw)."""
        from img2vid.inputs import randn

        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)


class EncoderOutput(FieldOutput):
    """diffusers' AutoencoderKLOutput: out.latent_dist, out["latent_dist"] or out[0]."""

    def __init__(self, latent_dist: LatentDistribution) -> None:
        super().__init__(latent_dist=latent_dist)

    @property
    def latent_dist(self) -> LatentDistribution:
        return dict.__getitem__(self, "latent_dist")


class VAE(Placed):
    """The autoencoder. `encode_mean` gives the posterior mode, `decode_frames` takes unscaled latents (the caller
    owns the scaling_factor); `encode` / `decode` are the same called as diffusers' are (`.latent_dist`, `.sample`,
    return_dict). Runs in whatever dtype/device the module is in; the pipeline decides about upcasting."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.decoder = Decoder(config, temporal=config.temporal_decoder)
        self.post_quant_conv = None if config.temporal_decoder else nn.Conv2d(latent, latent, 1)
        # Frames per slice for the decoder's per-frame up-block layers (`Decoder.forward`); None: all at once. An
        # attribute rather than a decode argument, so that a compiled `decode(z, num_frames)` keeps its signature
        # (dynamo guards on it: changing it recompiles). Same numbers either way, up to kernel choice.
        self.spatial_frame_chunk: int | None = None

    def encode(self, x: Tensor, return_dict: bool = True) -> EncoderOutput | tuple[LatentDistribution]:
        """diffusers' encode: (N, in_channels, H, W) in [-1, 1] -> the posterior as `.latent_dist` (`.mode()`,
        `.sample(generator)`), or `(latent_dist,)` with return_dict=False."""
        # Called through the module, not its weights, so forward hooks (sequential offload) see it.
        dist = LatentDistribution(self.quant_conv(self.encoder(x)))
        return EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z: Tensor, num_frames: int, return_dict: bool = True) -> SampleOutput | tuple[Tensor]:
        """diffusers' decode: `decode_frames`' frames as `.sample`, or `(frames,)` with return_dict=False."""
        frames = self.decode_frames(z, num_frames)
        return SampleOutput(frames) if return_dict else (frames,)

    def encode_mean(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) in [-1, 1] -> the posterior mean (N, latent_channels, H/8, W/8) for SVD's four
        blocks (each downsample halves, rounding down), NOT multiplied by scaling_factor."""
        h = self.encoder(x)
        latent = self.config.latent_channels
        # The mode is the first half of quant_conv's output (the rest is the log-variance). Called through the
        # module, not its weights, so forward hooks (sequential offload) see it.
        return self.quant_conv(h)[:, :latent]

    def decode_frames(self, z: Tensor, num_frames: int) -> Tensor:
        """(N, latent_channels, h, w) unscaled latents, N = videos * num_frames, frames of a video consecutive ->
        (N, out_channels, 8h, 8w) for four blocks, in about [-1, 1]. The temporal decoder mixes each video's
        num_frames frames; the 2D decoder treats every frame alone and ignores num_frames. With
        `spatial_frame_chunk` set, the per-frame layers of the up blocks run that many frames at a time."""
        chunk = self.spatial_frame_chunk
        if chunk is not None and chunk < 1:
            raise ValueError(f"spatial_frame_chunk must be a positive number of frames or None, not {chunk}")
        if self.post_quant_conv is not None:
            return self.decoder(self.post_quant_conv(z), 1, chunk)
        if num_frames < 1 or z.shape[0] % num_frames != 0:
            raise ValueError(f"batch of {z.shape[0]} latents is not a whole number of {num_frames}-frame videos")
        return self.decoder(z, num_frames, chunk)


def decode_videos(
    decode: Callable[[Tensor, int], Tensor],
    z: Tensor,
    chunk: int,
    dtype: torch.dtype,
    progress: Callable[[str, int, int], None] | None = None,
) -> Tensor:
    """(B, F, 4, h, w) unscaled latents -> (B, F, 3, H, W) float32 through `decode` (`VAE.decode` or its compiled
    form), each video on its own in chunks of `chunk` frames: the temporal decoder mixes the frames of a chunk, so a
    chunk must never hold two videos (diffusers flattens the batch first, and its chunks do). progress("decode",
    done, total) after each chunk."""
    b, f = z.shape[:2]
    chunks = [(v, s) for v in range(b) for s in range(0, f, chunk)]
    out = []
    for k, (v, s) in enumerate(chunks):
        part = z[v, s : s + chunk].to(dtype)  # (n, 4, h, w)
        out.append(decode(part, part.shape[0]).float())
        if progress is not None:
            progress("decode", k + 1, len(chunks))
    frames = torch.cat(out)  # (B*F, 3, H, W)
    return frames.view(b, f, *frames.shape[1:])  # -> (B, F, 3, H, W)
