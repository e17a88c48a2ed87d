"""Multi-head attention through scaled_dot_product_attention's kernels: over token sequences (`attention`) and
along the frame axis of frame-major tokens (`frame_attention_sdpa`, the fallback of `layers.frame_attention`).
Needs only torch, so `frame_kernel` (which `layers` imports) can import it at the top."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHORT_KEYS = 64  # key sequences up to this length go to the memory-efficient kernel on CUDA (see attention)
MAX_GRID_Z = 65535  # that kernel puts the batch on the grid's z axis and the heads on y, which CUDA caps here
FUSED_HEAD_DIM = 256  # the widest head the flash / cuDNN kernels take (the VAE's mid-block head is 512 wide)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention over (B, L, heads*D) projections; returns (B, L, heads*D).

    Goes through scaled_dot_product_attention so the GPU picks flash / cuDNN / memory-efficient kernels. Those keep
    the softmax and its accumulation in float32, which is what stops SVD's large keys from overflowing in float16.
    """
    b, lq, inner = q.shape
    d = inner // heads
    # (B, L, H*D) -> (B, H, L, D): views, also of the strided q, k, v of one fused projection (`Attention`), which
    # the SDPA kernels read through their strides (no copy)
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, Lk, H*D) -> (B, H, Lk, D)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, Lk, H*D) -> (B, H, Lk, D)
    if q.is_cuda and b > MAX_GRID_Z:  # more rows than the memory-efficient kernel's grid takes
        out = F.scaled_dot_product_attention(q, k, v)
    elif q.is_cuda and d > FUSED_HEAD_DIM and k.shape[2] > SHORT_KEYS and torch.compiler.is_compiling():
        out = wide_head_attention(q, k, v)
    else:
        out = _sdpa(q, k, v)
    # (B, H, L, D) -> (B, L, H*D)
    return out.transpose(1, 2).reshape(b, lq, inner)


def frame_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """`frame_attention` through scaled_dot_product_attention's kernels, on strided views of q, k and v."""
    bf, n, inner = q.shape
    b, d = bf // frames, inner // heads
    # (B*F, N, H*D) -> (B, F, N*H, D) -> (B, N*H, F, D): strided views, the memory stays frame-major
    q4, k4, v4 = (t.view(b, frames, n * heads, d).transpose(1, 2) for t in (q, k, v))
    # The CUDA kernels put the heads on a grid axis capped at 65535 (46080 pairs at 576x1024): larger frames run
    # in pieces, joined by a copy (on every device, so the CPU tests cover it).
    parts = [
        _sdpa(*(t[:, s : s + MAX_GRID_Z] for t in (q4, k4, v4))).transpose(1, 2)  # (B, F, n_part, D)
        for s in range(0, n * heads, MAX_GRID_Z)
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, F, N*H, D)
    # (B, F, N*H, D) -> (B*F, N, H*D): a view when the kernel wrote (B, F, N*H, D) in one piece
    return out.reshape(bf, n, inner)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, H, L, D) through scaled_dot_product_attention's kernels.

    The CPU's math fallback would compute the scores in half precision, so half inputs are upcast there.
    Short key sequences on CUDA (the temporal blocks attend over the 25 frames of each pixel: many tiny problems)
    go straight to the memory-efficient kernel, 1.3-1.7x faster there than the cuDNN kernel SDPA picks on an H100
    (benchmarks/svd_kernels.py). Same maths (float32 softmax), only the kernel differs."""
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    if (
        q.is_cuda
        and k.shape[2] <= SHORT_KEYS
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0  # the kernel's alignment; SVD's heads are 64 wide
    ):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
    return F.scaled_dot_product_attention(q, k, v)


def wide_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, H, L, D) heads, as two matrix products per (batch, head) row.

    For heads wider than the fused kernels take: SDPA then runs the memory-efficient kernel, at about 120 TFLOP/s
    for the VAE's 512-wide head on an H100 (37 ms a 25-frame decode, run 28). Same maths as that kernel: scores
    come out of the half-precision product in float32 (bmm's out_dtype), the softmax is taken in float32, and the
    probabilities are rounded to the inputs' dtype for the second product. One (batch) row at a time, so the
    float32 scores (L x L: 340 MB for a 72 x 128 latent frame) exist for one frame only. Used inside compiled graphs,
    where the scaling, softmax and rounding fuse into one kernel; eager calls keep SDPA."""
    b, _, _, d = q.shape
    scores_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for i in range(b):
        if q.dtype == scores_dtype:
            s = torch.matmul(q[i], k[i].transpose(1, 2))  # (H, L, L)
        else:
            s = torch.bmm(q[i], k[i].transpose(1, 2), out_dtype=scores_dtype)  # (H, L, L) float32, no rounding
        p = torch.softmax(s * d**-0.5, dim=-1).to(q.dtype)
        out[i] = torch.matmul(p, v[i])  # (H, L, D)
    return out
