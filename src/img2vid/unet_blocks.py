"""Layers of the spatio-temporal UNet other than its transformers (those are in `unet_transformer`): the time
embeddings, the learned spatial/temporal blend, the resnets and their temporal twins, the resamplers.

Every module's attribute names are the ones diffusers uses (`UNetSpatioTemporalConditionModel`), so its state dict
loads with no renaming. Activations flow between blocks as (B*F, C, H, W) "frame batches"; a temporal layer views
them as videos only for the ops that actually mix frames.

Time conditioning: the UNet computes silu(time embedding) once, one row per frame, and every resnet takes that
already-activated `temb` (diffusers applies the same silu inside each resnet; the values are identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from img2vid import norm_act
from img2vid.layers import (
    conv2d,
    conv_epilogue,
    group_norm,
    temporal_conv,
    upsample_nearest,
    vector_sum,
    video_group_norm,
    with_bias,
)


class TimeEmbedding(nn.Module):
    """Linear -> SiLU -> Linear over a sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        # The sinusoids are float32; like diffusers, run the MLP in the weights' dtype.
        return self.linear_2(F.silu(self.linear_1(x.to(self.linear_1.weight.dtype))))


class TimeMixer(nn.Module):
    """Learned blend of a spatial and a temporal branch (diffusers `AlphaBlender`, "learned_with_images").

    For video the `image_only_indicator` is all zeros, so the blend factor is simply sigmoid(mix_factor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, spatial: Tensor, x: Tensor, update: Tensor, bias: Tensor | None = None) -> Tensor:
        """The blend of the spatial output and the temporal branch's output x + (update + bias) (its residual add,
        and the last conv's bias (C,) if the branch left it, are done here); spatial may be x itself. update is dead
        after the call: eager CUDA runs write the result over it."""
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        beta = 1.0 - alpha
        # Same expression (and so the same half-precision rounding) as the reference, not a lerp: on CUDA in one
        # pass (norm_act.time_mix), elsewhere as the reference's four ops (compiled graphs fuse them).
        if not torch.compiler.is_compiling() and norm_act.time_mix_supported(spatial, x, update, bias):
            return norm_act.time_mix(alpha, beta, spatial, x, update, bias)
        if bias is not None:
            update = update + bias.view(-1, *(1,) * (update.dim() - 2))  # (C,) -> (C, 1, ...): per channel
        return alpha * spatial + beta * (x + update)


# ---------------------------------------------------------------------------------------------------------------------
# Resnets


class SpatialResBlock(nn.Module):
    """Per-frame resnet (diffusers `ResnetBlock2D` with default options)."""

    # read by conv2d and group_norm (offload.plan_units)
    weights_read_here = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B*F, C_in, H, W); temb: (B*F, T), already through silu."""
        # The SiLUs are the norms' (one kernel with them on CUDA). The first conv's bias joins the time embedding's
        # per-frame vector, which the second norm adds as it reads h (its output overwrites h: one fewer full-size
        # temporary in eager runs); the second conv's and a shortcut's biases join the residual add (conv2d,
        # conv_epilogue: one pass after the convs instead of PyTorch's bias kernels and the add).
        h = conv2d(self.conv1, group_norm(x, self.norm1, silu=True), None)
        vec = with_bias(self.time_emb_proj(temb), self.conv1.bias)  # (B*F, C), added to h inside the norm
        h = group_norm(h, self.norm2, silu=True, vec=vec, reuse_input=True)
        h = conv2d(self.conv2, h, None)
        shortcut = self.conv_shortcut
        skip = x if shortcut is None else conv2d(shortcut, x, None)
        return conv_epilogue(h, vector_sum(self.conv2.bias, None if shortcut is None else shortcut.bias), skip)


class TemporalResBlock(nn.Module):
    """Resnet over the frame axis with (3, 1, 1) kernels (diffusers `TemporalResnetBlock`).

    Its GroupNorms see a whole video at once (statistics over C/G x F x H x W), as trained. x is a transposed view of
    the frames; the norms and the convs read it where it lies (`video_group_norm`, `temporal_conv`) instead of
    F.group_norm's and cuDNN's layout copies, so every tensor here keeps the frames' layout."""

    weights_read_here = ("norm1", "conv1", "norm2", "conv2")  # read by those helpers (offload.plan_units)

    def __init__(self, ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch, eps=eps)
        self.conv1 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_ch, ch)
        self.norm2 = nn.GroupNorm(groups, ch, eps=eps)
        self.conv2 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: (B, C, F, H, W); temb: (B, F, T), already through silu. Returns the branch h without the residual
        add, and the last conv's bias (C,) if it is left to the caller (else None): the block's output is x + (h +
        bias), which its caller forms where it costs nothing (`TimeMixer`'s kernel)."""
        # the first conv's bias joins the time embedding's per-frame vector, which the second norm adds as it reads h
        h = temporal_conv(video_group_norm(x, self.norm1, silu=True), self.conv1, add_bias=False)
        vec = with_bias(self.time_emb_proj(temb), self.conv1.bias)  # (B, F, C), added to h inside the norm
        h = video_group_norm(h, self.norm2, silu=True, vec=vec, reuse_input=True)
        # Where the mixer's kernel runs (eager CUDA), it adds the bias: PyTorch would add it after cuDNN's conv in a
        # full pass of its own. detach(): a tensor of its own on the device's copy of the bias, which outlives this
        # call where sequential offload streams the weights.
        defer = self.conv2.bias is not None and norm_act.time_mix_runs_on(h)
        h = temporal_conv(h, self.conv2, add_bias=not defer)
        return h, self.conv2.bias.detach() if defer else None


class SpatioTemporalResBlock(nn.Module):
    """Spatial resnet, then its temporal twin, blended by a learned factor (diffusers `SpatioTemporalResBlock`)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, eps: float, groups: int) -> None:
        super().__init__()
        self.spatial_res_block = SpatialResBlock(in_ch, out_ch, temb_ch, eps, groups)
        self.temporal_res_block = TemporalResBlock(out_ch, temb_ch, eps, groups)
        self.time_mixer = TimeMixer()

    def forward(self, x: Tensor, temb: Tensor, num_frames: int) -> Tensor:
        x = self.spatial_res_block(x, temb)
        bf, c, h, w = x.shape
        b = bf // num_frames
        # Views, not copies, whatever the memory format: the temporal branch keeps the frames' layout.
        video = x.reshape(b, num_frames, c, h, w).permute(0, 2, 1, 3, 4)  # (B*F, C, H, W) -> (B, C, F, H, W)
        branch, bias = self.temporal_res_block(video, temb.reshape(b, num_frames, -1))  # temb -> (B, F, T)
        branch = branch.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)  # (B, C, F, H, W) -> (B*F, C, H, W)
        return self.time_mixer(x, x, branch, bias)  # the temporal resnet's output is x + (branch + bias)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (diffusers `Downsample2D(use_conv=True, padding=1)`)."""

    weights_read_here = ("conv",)  # read by conv2d (offload.plan_units)

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # the bias in conv_epilogue's pass, which eager CUDA runs faster than PyTorch's broadcast add
        return conv_epilogue(conv2d(self.conv, x, None), self.conv.bias)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip connection's size, then a 3x3 conv (diffusers `Upsample2D`).

    Interpolating to an explicit size equals scale_factor=2 when sizes are even and, like diffusers' forwarded
    `upsample_size`, matches the skip connection when a latent side is not a multiple of the total downsampling.
    """

    weights_read_here = ("conv",)  # read by conv2d (offload.plan_units)

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return conv_epilogue(conv2d(self.conv, upsample_nearest(x, size), None), self.conv.bias)
