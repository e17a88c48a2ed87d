"""Small building blocks shared by the UNet, the VAE and the image encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention over (B, L, heads*D) projections; returns (B, L, heads*D).

    Goes through scaled_dot_product_attention so the GPU picks flash / cuDNN / memory-efficient kernels. Those keep
    the softmax and its accumulation in float32, which is what stops SVD's large keys from overflowing in float16.
    The CPU's math fallback would compute the scores in half precision, so half inputs are upcast there.
    """
    b, lq, inner = q.shape
    d = inner // heads
    # (B, L, H*D) -> (B, H, L, D)
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    # (B, H, L, D) -> (B, L, H*D)
    return out.transpose(1, 2).reshape(b, lq, inner)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) values -> (N, dim), in float32 (diffusers `get_timestep_embedding`, max_period
    10000, downscale_freq_shift `shift`). flip_sin_to_cos puts cos first, as SVD was trained."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def temporal_conv(x5: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
    """`conv(x5)` for a (3, 1, 1) Conv3d with padding (1, 0, 0) over x5 = (B, C, F, H, W), as matrix products.

    Why: x5 is a transposed view of frames (B*F, C, H, W), which cuDNN cannot read as it is: it first copies the
    view to NCDHW, converts that to NDHWC, and converts its output back, about five full-size tensors at once (the
    VAE decode's memory peak, and a fifth of its time). The kernel only mixes a pixel with itself in the frames
    before and after, so out[f] = W0 @ x[f-1] + W1 @ x[f] + W2 @ x[f+1] + bias, where each frame is a matrix and
    the missing neighbours at the ends are the zero padding. The products accumulate in place into one output,
    read the frames where they lie, and keep the frames' layout. Each tap rounds once (float16: ~5e-4 relative
    from cuDNN's single rounding, under float16's own error of the decode). Other layouts fall back to conv."""
    b, c, f, h, w = x5.shape
    taps = conv.weight.flatten(2)  # (Cout, Cin, 3, 1, 1) -> (Cout, Cin, 3)
    cout = taps.shape[0]
    bias = conv.bias if conv.bias is not None else taps.new_zeros(cout)
    frames = x5.transpose(1, 2)  # (B, F, C, H, W)
    if frames.is_contiguous():
        # NCHW frames: frame f of video i is the (C, H*W) matrix x[i, f]; a batched product over frames.
        x = frames.reshape(b, f, c, h * w)
        videos = []
        for i in range(b):
            o = torch.baddbmm(bias[:, None], taps[:, :, 1].expand(f, cout, c), x[i])  # (F, Cout, H*W)
            if f > 1:
                o[1:].baddbmm_(taps[:, :, 0].expand(f - 1, cout, c), x[i, :-1])
                o[:-1].baddbmm_(taps[:, :, 2].expand(f - 1, cout, c), x[i, 1:])
            videos.append(o)
        out = videos[0][None] if b == 1 else torch.stack(videos)  # (B, F, Cout, H*W)
        return out.view(b, f, cout, h, w).transpose(1, 2)  # -> (B, Cout, F, H, W)
    pixels = frames.permute(0, 1, 3, 4, 2)  # (B, F, H, W, C)
    if pixels.is_contiguous():
        # channels_last frames: every pixel of every frame is a row; frame f is rows f*H*W .. (f+1)*H*W.
        x = pixels.reshape(b, f * h * w, c)
        hw = h * w
        videos = []
        for i in range(b):
            o = torch.addmm(bias, x[i], taps[:, :, 1].t())  # (F*H*W, Cout)
            if f > 1:
                o[hw:].addmm_(x[i, :-hw], taps[:, :, 0].t())
                o[:-hw].addmm_(x[i, hw:], taps[:, :, 2].t())
            videos.append(o)
        out = videos[0][None] if b == 1 else torch.stack(videos)  # (B, F*H*W, Cout)
        return out.view(b, f, h, w, cout).permute(0, 4, 1, 2, 3)  # -> (B, Cout, F, H, W)
    return conv(x5)


def channels_last_(module: torch.nn.Module) -> None:
    """Conv weights in channels-last layout (4D: NHWC, 5D: NDHWC): cuDNN's fast half-precision kernels want them,
    and activations follow the weights' layout from the first convolution on. In place, parameter objects kept.
    `Module.to(memory_format=torch.channels_last)` cannot do this: it refuses the temporal convs' 5-D weights."""
    for p in module.parameters():
        if p.ndim == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        elif p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
