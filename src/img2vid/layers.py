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
