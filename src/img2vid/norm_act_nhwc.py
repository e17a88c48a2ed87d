"""`norm_act`'s kernels for channels-last activations: frames stored (R, P, C), each pixel's C channels contiguous.

Why: cuDNN's Hopper convolution kernels read and write NHWC. Given NCHW activations (eager PyTorch's default) it
transposes the input, and the output back, around every convolution: on an H100, 18 ms of a 373 ms eager UNet
step and 39 ms of a 217 ms eager 8-frame decode (run 95, `svd_profile.py`). Eager runs therefore keep the UNet's
and the decoder's activations channels-last (as compiled graphs do), and the norms and the conv epilogue, written
for NCHW rows in `norm_act`, need these twins.

The work is the NCHW kernels' (see `norm_act`), cut the other way: a program reads a (pixels x channels) block,
channels contiguous. `gn_stats_nhwc` writes the same per-(frame, channel, tile) partials as `gn_stats`, so
`norm_act`'s `gn_finish` combines them unchanged: a tile is ITERS blocks of PIXELS pixels of one frame, whose sums
of x - k and (x - k)^2 (k: each channel's first value in the tile, a shift that keeps them from cancelling)
accumulate lane by lane and are reduced once (a reduction per block across the pixel axis ran at half the NCHW
kernel's speed, run 100). `gn_apply_nhwc` and `conv_epilogue_nhwc` are elementwise with a per-channel vector along
the inner axis. Rounding is the NCHW kernels': the same function, the float32 sums in another order. C stays a
specialized argument: Triton then knows that rows of C = 0 mod 16 halves are 32-byte aligned and loads them in
128-bit pieces (unspecialized, the kernels took 1.5-2x the NCHW ones' time: runs 97 and 99). Triton is imported
lazily.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

CHANNELS = 64  # channels a program reads per pixel (128 bytes of float16: one cache line)
PIXELS = 64  # pixels a program reads at a time
TILE_BLOCKS = 16  # blocks of PIXELS pixels a `gn_stats_nhwc` program sums into one partial


class Tiling(NamedTuple):
    pixels: int  # pixels a program reads at a time
    channels: int  # channels it reads of each
    iters: int  # blocks of `pixels` a statistics program sums
    tile: int  # pixels a partial stands for: pixels * iters
    tiles: int  # partials per (frame, channel)


def tiling(c: int, p: int, max_elements: int) -> Tiling:
    """The blocks for frames of C channels of P pixels: CHANNELS channels (fewer for narrow tensors, a power of two)
    times as many pixels as max_elements allows, up to PIXELS."""
    channels = min(CHANNELS, 1 << (c - 1).bit_length())
    pixels = max(1, min(PIXELS, max_elements // channels))
    iters = min(TILE_BLOCKS, -(-p // pixels))
    return Tiling(pixels, channels, iters, pixels * iters, -(-p // (pixels * iters)))


def stats(frames: torch.Tensor, vec: torch.Tensor | None, t: Tiling, warps: int) -> torch.Tensor:
    """(2, R * C * tiles) float32: the tile means and M2s of channels-last frames (R, C, P) (+ vec, (R * C,) or
    None), indexed (frame, channel, tile) as `norm_act`'s `gn_finish` reads them."""
    r, c, p = frames.shape
    partials = torch.empty(2, r * c * t.tiles, device=frames.device, dtype=torch.float32)
    grid = (t.tiles, -(-c // t.channels), r)
    kernels()[0][grid](frames, frames if vec is None else vec, partials[0], partials[1], p, c, t.tiles, t.iters,
                       PIXELS=t.pixels, CHANNELS=t.channels, HAS_VEC=vec is not None, num_warps=warps)  # fmt: skip
    return partials


def apply(
    frames: torch.Tensor,
    vec: torch.Tensor | None,
    scale_shift: torch.Tensor,
    out: torch.Tensor,
    frames_per_sample: int,
    silu: bool,
    t: Tiling,
    warps: int,
) -> None:
    """out = (frames + vec) * scale + shift per (sample, channel), then SiLU if silu; frames and out channels-last
    (R, C, P) (out may be frames), scale_shift (2, samples * C) float32."""
    r, c, p = frames.shape
    grid = (-(-p // t.pixels), -(-c // t.channels), r)
    kernels()[1][grid](frames, frames if vec is None else vec, scale_shift[0], scale_shift[1], out, p, c,
                       frames_per_sample, PIXELS=t.pixels, CHANNELS=t.channels, HAS_VEC=vec is not None, SILU=silu,
                       num_warps=warps)  # fmt: skip


def epilogue(
    h: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor | None, max_elements: int, warps: int
) -> torch.Tensor:
    """`norm_act.conv_epilogue` for channels-last h (R, C, P): h += bias + skip, in place."""
    r, c, p = h.shape
    t = tiling(c, p, max_elements)
    grid = (-(-(r * p) // t.pixels), -(-c // t.channels))
    kernels()[2][grid](h, h if skip is None else skip, h if bias is None else bias, r * p, c, PIXELS=t.pixels,
                       CHANNELS=t.channels, HAS_SKIP=skip is not None, HAS_BIAS=bias is not None,
                       num_warps=warps)  # fmt: skip
    return h


@functools.cache
def kernels() -> tuple[Any, Any, Any]:
    """(gn_stats_nhwc, gn_apply_nhwc, conv_epilogue_nhwc), built on first use."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["P", "TILES", "ITERS"])
    def gn_stats_nhwc(
        x_ptr, v_ptr, mean_ptr, m2_ptr, P, C, TILES, ITERS,
        PIXELS: tl.constexpr, CHANNELS: tl.constexpr, HAS_VEC: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)  # a tile of ITERS * PIXELS pixels
        ch = tl.program_id(1) * CHANNELS + tl.arange(0, CHANNELS)  # (CHANNELS,)
        r = tl.program_id(2)  # the frame
        ch_ok = ch < C
        start = t * ITERS * PIXELS
        rows = (r.to(tl.int64) * P + start) * C  # the tile's first pixel
        # the shift: each channel's first value in the tile (as the norm reads it), near enough its mean that the
        # shifted sums below do not cancel
        k = tl.load(x_ptr + rows + ch, mask=ch_ok, other=0.0).to(tl.float32)
        if HAS_VEC:
            v = tl.load(v_ptr + r * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
            k = (k + v).to(x_ptr.dtype.element_ty).to(tl.float32)
        s1 = tl.zeros((PIXELS, CHANNELS), dtype=tl.float32)  # sums of x - k and of (x - k)^2, per lane: one
        s2 = tl.zeros((PIXELS, CHANNELS), dtype=tl.float32)  # reduction at the end instead of one per block
        for i in range(ITERS):
            pix = start + i * PIXELS + tl.arange(0, PIXELS)
            mask = (pix < P)[:, None] & ch_ok[None, :]  # (PIXELS, CHANNELS)
            x = tl.load(x_ptr + (r.to(tl.int64) * P + pix[:, None]) * C + ch[None, :], mask=mask, other=0.0)
            if HAS_VEC:
                # the reference's norm reads x + vec as a stored tensor: rounded to x's dtype
                x = (x.to(tl.float32) + v[None, :]).to(x_ptr.dtype.element_ty)
            d = tl.where(mask, x.to(tl.float32) - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        n = tl.minimum(P - start, ITERS * PIXELS).to(tl.float32)  # the tile's pixels
        d1 = tl.sum(s1, axis=0)  # (CHANNELS,)
        mean = k + d1 / n
        m2 = tl.maximum(tl.sum(s2, axis=0) - d1 * d1 / n, 0.0)
        out = (r * C + ch).to(tl.int64) * TILES + t
        tl.store(mean_ptr + out, mean, mask=ch_ok)
        tl.store(m2_ptr + out, m2, mask=ch_ok)

    @triton.jit(do_not_specialize=["P", "FRAMES"])
    def gn_apply_nhwc(
        x_ptr, v_ptr, scale_ptr, shift_ptr, out_ptr, P, C, FRAMES,
        PIXELS: tl.constexpr, CHANNELS: tl.constexpr, HAS_VEC: tl.constexpr, SILU: tl.constexpr,
    ):  # fmt: skip
        pix = tl.program_id(0) * PIXELS + tl.arange(0, PIXELS)
        ch = tl.program_id(1) * CHANNELS + tl.arange(0, CHANNELS)
        r = tl.program_id(2)
        ch_ok = ch < C
        at = (r // FRAMES) * C + ch  # (sample, channel)
        scale = tl.load(scale_ptr + at, mask=ch_ok, other=0.0)
        shift = tl.load(shift_ptr + at, mask=ch_ok, other=0.0)
        mask = (pix < P)[:, None] & ch_ok[None, :]  # (PIXELS, CHANNELS)
        offs = (r.to(tl.int64) * P + pix[:, None]) * C + ch[None, :]
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_VEC:
            v = tl.load(v_ptr + r * C + ch, mask=ch_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + v[None, :]).to(dtype)
        y = x.to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            y = y.to(dtype).to(tl.float32)  # the norm's output as stored, which F.silu then reads
            y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + offs, y.to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["N"])
    def conv_epilogue_nhwc(
        h_ptr, s_ptr, b_ptr, N, C,
        PIXELS: tl.constexpr, CHANNELS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        pix = tl.program_id(0) * PIXELS + tl.arange(0, PIXELS)  # of all N = R * P pixels
        ch = tl.program_id(1) * CHANNELS + tl.arange(0, CHANNELS)
        ch_ok = ch < C
        mask = (pix < N)[:, None] & ch_ok[None, :]  # (PIXELS, CHANNELS)
        offs = pix.to(tl.int64)[:, None] * C + ch[None, :]
        y = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SKIP:
            y += tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)

    return gn_stats_nhwc, gn_apply_nhwc, conv_epilogue_nhwc
