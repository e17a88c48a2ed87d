"""The attention along the frame axis of the UNet's temporal blocks, as a Triton kernel (`frame_attention`).

The temporal transformer blocks attend over each pixel's F frames: B x N x heads independent F x F problems (F = 25,
2 x 46080 of them per step at SVD's first level), stored frame-major (`layers.frame_attention`). PyTorch's
memory-efficient kernel ran them at ~1.2 TB/s, 40% of an H100's bandwidth, for a job that reads q, k and v and
writes the output once. Here a program takes a few consecutive (pixel, head) pairs of one video: at each frame they
are one contiguous run of P*D values, so its (P, F, D) tiles load as whole lines, and the P small attentions are two
batched tensor-core products in registers. Run 48b: first level 1.00 -> 0.41 ms a call (2.9 TB/s). Triton is
imported lazily (as in `fused`, whose gates decide where the kernel runs).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from img2vid import fused
from img2vid.attention import frame_attention_sdpa

# Swept on an H100 with the warp count (run 48b): 2 pairs on 2 warps and 4 on 4 are within 2% of each other, the
# other pairings 15-100% slower (why was not profiled)
FRAME_PAIRS_PER_PROGRAM = 2
FRAME_WARPS = 2
FRAME_HEAD_DIMS = (32, 64, 128)  # head widths the kernel is built for (SVD's are 64)


def frame_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether to call `frame_attention` for these (B*F, N, heads*D) projections: a CUDA float16 forward with a head
    width the kernel takes (bfloat16 keeps SDPA: the kernel's split of the probabilities into two halves is exact to
    float32 in float16 only). Tensor properties only, as `fused.geglu_supported`."""
    inner = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype == k.dtype == v.dtype == torch.float16
        and inner % heads == 0
        and inner // heads in FRAME_HEAD_DIMS
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


def frame_kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int) -> bool:
    """Whether the kernel runs here: Triton, an Ampere or later card (`fused._kernels_run_on`), matching shapes, and one
    video's elements addressable with 32-bit offsets (the kernel's in-video arithmetic)."""
    bf = q.shape[0]
    return (
        q.is_cuda
        and q.shape == k.shape == v.shape
        and bf > 0
        and bf % frames == 0
        and q.numel() // (bf // frames) < 2**31
        and fused._kernels_run_on(q.device)
    )


def frame_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v along the frame axis of frame-major q, k, v (B*F, N, heads*D) -> (B*F, N, heads*D).

    Called through the custom op `frame_attention` so that torch.compile calls it as one opaque call, directly where
    that is not needed (`direct_calls`); where the kernel cannot run it returns the SDPA path."""
    if not frame_kernel_fits(q, k, v, frames):
        return frame_attention_sdpa(q, k, v, heads, frames).contiguous()  # the layout register_fake promises
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    launch_frame_attention(q.contiguous(), k.contiguous(), v.contiguous(), out, heads, frames)
    return out


frame_attention = torch.library.custom_op("img2vid::frame_attention", frame_attention_impl, mutates_args=())


@frame_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def launch_frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    heads: int,
    frames: int,
    pairs_per_program: int = FRAME_PAIRS_PER_PROGRAM,
    warps: int = FRAME_WARPS,
) -> None:
    """Run the kernel into out; q, k, v and out contiguous (B*F, N, heads*D). Also runs under Triton's CPU
    interpreter (TRITON_INTERPRET=1), which is how the CPU tests check its maths and masks."""
    bf, n, inner = q.shape
    pairs = n * heads
    blocks_per_video = fused.triton_cdiv(pairs, pairs_per_program)
    # tl.dot wants every dimension of a product at least 16 long: F = 25 pads to 32, F = 14 to 16
    frames_pad = max(16, 1 << (frames - 1).bit_length())
    _frame_kernel()[((bf // frames) * blocks_per_video,)](
        q, k, v, out, pairs, blocks_per_video, (inner // heads) ** -0.5,
        FRAMES=frames, FRAMES_PAD=frames_pad, HEAD_DIM=inner // heads, PAIRS_PER_PROGRAM=pairs_per_program,
        num_warps=warps,
    )  # fmt: skip


@functools.cache
def _frame_kernel() -> Any:
    """The jitted frame-attention kernel, built on first use (as `_kernel`)."""
    import triton
    import triton.language as tl

    # The pair count changes with the UNet level: one build serves them all
    @triton.jit(do_not_specialize=["PAIRS", "BLOCKS_PER_VIDEO"])
    def frame_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, PAIRS, BLOCKS_PER_VIDEO, scale,
        FRAMES: tl.constexpr, FRAMES_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS_PER_PROGRAM: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        video = pid // BLOCKS_PER_VIDEO
        first_pair = (pid % BLOCKS_PER_VIDEO) * PAIRS_PER_PROGRAM
        # A video's (F, N*heads, D) block starts at a 64-bit offset (a batch can pass 2**31 elements); offsets
        # inside it are 32-bit (frame_kernel_fits), which keeps the address arithmetic cheap
        base = video.to(tl.int64) * FRAMES * PAIRS * HEAD_DIM
        pair = first_pair + tl.arange(0, PAIRS_PER_PROGRAM)
        frame = tl.arange(0, FRAMES_PAD)
        col = tl.arange(0, HEAD_DIM)
        # (P, F_pad, D) tile: element [p, f, d] of the (B, F, N*heads, D) view, D fastest: each (pair, frame) row is
        # HEAD_DIM contiguous values and the P rows of one frame follow each other
        offs = pair[:, None, None] * HEAD_DIM + frame[None, :, None] * (PAIRS * HEAD_DIM) + col[None, None, :]
        mask = (pair < PAIRS)[:, None, None] & (frame < FRAMES)[None, :, None]  # padding reads as zeros
        q = tl.load(q_ptr + base + offs, mask=mask, other=0.0)
        k = tl.load(k_ptr + base + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0)

        # (P, F_pad, D) x (P, D, F_pad) -> (P, F_pad, F_pad) scores in float32 (products of halves are exact)
        s = tl.dot(q, tl.permute(k, (0, 2, 1)), out_dtype=tl.float32) * scale
        s = tl.where((frame < FRAMES)[None, None, :], s, float("-inf"))  # padded keys drop out of the softmax
        row_max = tl.max(s, axis=2)  # (P, F_pad)
        p = tl.exp(s - row_max[:, :, None])  # unnormalised probabilities in [0, 1]
        row_sum = tl.sum(p, axis=2)
        # p as a sum of two halves (the second is the first's rounding error, itself rounded: p to about 2**-22), so
        # the half-precision product with v adds no rounding beyond float32's: the memory-efficient kernel rounds p
        # to half once (its error from float64 is 2.5e-4 against 2.1e-4 here, run 48b), for 5% of this kernel's time
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = tl.dot(p_hi, v, out_dtype=tl.float32)  # (P, F_pad, D)
        acc = tl.dot(p_lo, v, acc, out_dtype=tl.float32)
        out = acc / row_sum[:, :, None]
        tl.store(o_ptr + base + offs, out.to(o_ptr.dtype.element_ty), mask=mask)  # padded query rows not stored

    return frame_attention_kernel
