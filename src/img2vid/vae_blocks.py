"""The SVD autoencoder's layers: the 2D resnet, the decoder's temporal resnet and its blend, the mid blocks'
attention, the resamplers, and `per_frame` (running a per-frame layer a few frames at a time). `vae` assembles them.

Parameter names are exactly diffusers' (`AutoencoderKLTemporalDecoder`, `AutoencoderKL`), so their state dicts load
with no renaming. Frames travel flattened as (N = videos*frames, C, H, W); the temporal layers see them as
(B, C, F, H, W) through a transpose *view*.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from img2vid import norm_act
from img2vid.attention import attention
from img2vid.layers import (
    conv2d,
    conv_epilogue,
    group_norm,
    temporal_conv,
    upsample_nearest,
    vector_sum,
    video_group_norm,
)

# diffusers hard-codes these; sgm's VideoDecoder uses the same values.
EPS = 1e-6  # every spatial GroupNorm of encoder and decoders
_TEMPORAL_EPS = 1e-5  # the GroupNorms of the decoder's temporal (3,1,1) resnets
TIME_KERNEL = (3, 1, 1)  # (frames, height, width): mixes each pixel with its neighbours in time only
TIME_PADDING = (1, 0, 0)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` without a time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    # Children whose weights this module's own forward reads (group_norm, conv2d), so that sequential offload never
    # streams them as units of their own (offload.plan_units); likewise in the modules below.
    weights_read_here = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only a change of width needs a projected skip path (the reference's rule).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        # One statement per step so each intermediate dies as soon as it is consumed, SiLU goes with its norm, and
        # the second norm may write over the conv output it reads: at 25 x 576 x 1024 every live (N, C, H, W)
        # temporary is gigabytes (the decode's peak).
        # The convs' biases go where they cost no pass of their own (conv2d): the first conv's into the norm that
        # reads its output, the second's (and a shortcut's) into the residual add, in place into the conv's output.
        h = group_norm(x, self.norm1, silu=True)
        h = conv2d(self.conv1, h, None)
        bias1 = None if self.conv1.bias is None else self.conv1.bias.expand(h.shape[0], -1)  # (C,) -> (N, C)
        h = group_norm(h, self.norm2, silu=True, vec=bias1, reuse_input=True)
        h = conv2d(self.conv2, h, None)
        shortcut = self.conv_shortcut
        skip = x if shortcut is None else conv2d(shortcut, x, None)
        return conv_epilogue(h, vector_sum(self.conv2.bias, None if shortcut is None else shortcut.bias), skip)


def per_frame(layer: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None) -> Tensor:
    """`layer(x)` for a layer that treats every frame (batch row) on its own, run `chunk` frames at a time.

    The layer's temporaries (a resnet's norm/conv outputs, an upsample's interpolated input) then exist for `chunk`
    frames only, while x and the result are the only all-frames tensors. The result is preallocated and filled slice
    by slice: a torch.cat would hold every piece and the joined copy at once, which is the very peak being cut.
    The same numbers as `layer(x)` up to the kernels' choice of algorithm for another batch size. A static Python
    loop over fixed slices: torch.compile(fullgraph=True) unrolls it."""
    n = x.shape[0]
    if chunk is None or chunk >= n:
        return layer(x)
    first = layer(x[:chunk])
    # Keep the layer's layout (channels_last on the GPU), so that the temporal layers' transposed views stay free.
    fmt = torch.channels_last if first.dim() == 4 and not first.is_contiguous() else torch.contiguous_format
    out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=fmt)
    out[:chunk] = first
    del first  # before the next slice's temporaries are made
    for start in range(chunk, n, chunk):
        out[start : start + chunk] = layer(x[start : start + chunk])
    return out


def chain(first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """second(first(x)) as one layer for `per_frame` (both per frame); the intermediate dies inside the call."""
    return lambda x: second(first(x))


class TemporalResnetBlock(nn.Module):
    """diffusers `TemporalResnetBlock` (no time embedding), (3,1,1) Conv3ds over (B, C, F, H, W), fused with the
    `AlphaBlender` blend that follows it in the reference, so that the block takes and returns frames.

    GroupNorm over the 5D tensor takes its statistics across all frames of a video, as the reference does."""

    weights_read_here = ("norm1", "conv1", "norm2", "conv2")  # read by video_group_norm and temporal_conv

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=_TEMPORAL_EPS)
        self.conv1 = nn.Conv3d(channels, channels, TIME_KERNEL, padding=TIME_PADDING)
        self.norm2 = nn.GroupNorm(groups, channels, eps=_TEMPORAL_EPS)
        self.conv2 = nn.Conv3d(channels, channels, TIME_KERNEL, padding=TIME_PADDING)

    def forward(self, x: Tensor, num_frames: int, temporal_weight: Tensor) -> Tensor:
        """x: the spatial resnet's output (B*F, C, H, W); temporal_weight: sigmoid(mix_factor), see AlphaBlender."""
        # (B*F, C, H, W) -> (B, F, C, H, W) -> (B, C, F, H, W): views only, whatever the memory format.
        x5 = x.unflatten(0, (-1, num_frames)).transpose(1, 2)
        # Same memory discipline as ResnetBlock2D; the norms are the GroupNorm modules' maths (see video_group_norm).
        # The convs as in-place matrix products (see temporal_conv): cuDNN's layout copies were the decode's peak.
        # Where the time mixer's kernel runs (eager CUDA), the convs' biases are added in the passes after them, as
        # rounded as PyTorch adds them after cuDNN's conv in passes of their own: the first's by the second norm
        # (its per-frame vector), the second's by the blend.
        fold = self.conv2.bias is not None and norm_act.time_mix_runs_on(x)
        h = video_group_norm(x5, self.norm1, silu=True)
        h = temporal_conv(h, self.conv1, add_bias=not fold)
        b, c, f = x5.shape[:3]
        bias1 = self.conv1.bias if fold else None
        vec = None if bias1 is None else bias1.expand(b, f, c)  # (C,) -> (B, F, C), a view
        h = video_group_norm(h, self.norm2, silu=True, vec=vec, reuse_input=True)
        h = temporal_conv(h, self.conv2, add_bias=not fold)
        if fold:
            frames = h.transpose(1, 2).reshape(x.shape)  # (B, C, F, H, W) -> (B*F, C, H, W), a view in both layouts
            if norm_act.time_mix_supported(x, x, frames, self.conv2.bias):
                # The reference's (1 - s) * x + s * (x + (h + bias)), op by op, in one pass written over h
                alpha = 1.0 - temporal_weight
                return norm_act.time_mix(alpha, 1.0 - alpha, x, x, frames, self.conv2.bias)
            h = h + self.conv2.bias.view(-1, 1, 1, 1)  # (C,) -> (C, 1, 1, 1)
        # Elsewhere: (1 - s) * x + s * (x + h) as x + s * h, algebraically the same, in one fused kernel that keeps
        # the layout of x (the first operand), so the way back below is a view again.
        out = torch.addcmul(x5, h, temporal_weight)
        # (B, C, F, H, W) -> (B, F, C, H, W) -> (B*F, C, H, W)
        return out.transpose(1, 2).flatten(0, 1)


class AlphaBlender(nn.Module):
    """Holds the learned spatial/temporal mixing logit (diffusers `AlphaBlender`, merge_strategy "learned").

    With `switch_spatial_to_temporal_mix=True` (what the VAE uses) the reference computes
    `(1 - sigmoid(m)) * spatial + sigmoid(m) * temporal`, i.e. sigmoid(m) is the weight of the TEMPORAL path. The
    "learned" strategy ignores image_only_indicator, so the blend is the same for videos and single images."""

    def __init__(self) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))  # the reference initialises it to merge_factor = 0.0

    def temporal_weight(self, dtype: torch.dtype) -> Tensor:
        # Computed in the parameter's dtype, then cast, like the reference. A (1,) tensor: no host sync.
        return torch.sigmoid(self.mix_factor).to(dtype)


class SpatioTemporalResBlock(nn.ModuleDict):
    """diffusers `SpatioTemporalResBlock` as used by the temporal decoder: a 2D resnet on every frame, then a
    temporal resnet over each video's frames, blended with the 2D result by the learned weight:

        x = block.spatial_res_block(x)
        x = block.temporal_res_block(x, num_frames, block.time_mixer.temporal_weight(x.dtype))

    A container (no forward) whose two halves the caller runs as two statements: a call would keep the block's
    input alive in the caller through the temporal half, and at full resolution that input is gigabytes. A ModuleDict
    so that forward-hook users (sequential offload) hook its halves, which are what actually run."""

    weights_read_here = ("time_mixer",)  # its logit is read by whoever runs the halves

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, groups)
        self.temporal_res_block = TemporalResnetBlock(out_channels, groups)
        self.time_mixer = AlphaBlender()


class Attention(nn.Module):
    """The single-head self-attention of the mid blocks (diffusers `Attention` with group norm and residual)."""

    weights_read_here = ("group_norm",)

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only to keep the name `to_out.0`

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        # (N, C, H, W) -> (N, C, H*W) -> (N, H*W, C); a free view for channels_last activations.
        t = group_norm(x, self.group_norm).flatten(2).transpose(1, 2)
        # One head as wide as the block (head_dim = C): SDPA's default scale 1/sqrt(C) is the reference's.
        o = self.to_out[0](attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1))
        # (N, H*W, C) -> (N, C, H*W) -> (N, C, H, W)
        return x + o.transpose(1, 2).unflatten(2, (h, w))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (diffusers `Downsample2D`, padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (diffusers `Upsample2D`)."""

    weights_read_here = ("conv",)  # read by conv2d (offload.plan_units)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        # the bias in conv_epilogue's pass, which eager CUDA runs faster than PyTorch's broadcast add
        return conv_epilogue(conv2d(self.conv, upsample_nearest(x, (2 * h, 2 * w)), None), self.conv.bias)
