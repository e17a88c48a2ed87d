"""Hand-written GPU kernels (Triton) for what torch.compile cannot fuse on its own.

The GEGLU projection: `h, gate = (x @ W.T + b).chunk(2, -1); out = h * gelu(gate)`. cuBLAS writes the whole
(M, 2N) projection and a second kernel reads it back for the gating (inductor fuses the gelu and the product, but not
into the matrix product, because the output reads two column ranges of it). At SVD's first level that is 2.4 GB
written and read again, 15 times a step, for a product with K = 320 that is itself close to bandwidth-bound. Here
each program computes the same tile of h and of gate (two accumulators over the same x tiles) and writes only the
gated (M, N) result: half the bytes out, none read back.

What it measured on an H100 (BENCHMARKS.md, session 5): in the compiled step no faster than cuBLAS plus inductor's
gating kernel (the kernel itself runs below cuBLAS's rate), but 0.54 GiB less activation memory; in eager runs,
where nothing else fuses the gating, 6% off the step (low-memory runs take the same eager path; not measured apart).

Same function as the reference: h and gate are rounded to the input dtype before the gating, as cuBLAS' output is,
and the gelu is the exact erf form (diffusers `GEGLU`). Triton is imported lazily: CPU-only installs of torch do not
ship it, and they never reach these kernels (`geglu_supported`, `kernel_fits`). The tile shapes are fixed (picked from
a sweep on an H100, `benchmarks/svd_kernels.py`) rather than autotuned at run time, so a run's numbers do not depend
on timing noise and a new process starts without a tuning pass.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Tiles(NamedTuple):
    block_m: int
    block_n: int  # columns of h (and of gate) per program
    block_k: int
    warps: int
    stages: int
    per_sm: int  # persistent programs per SM


# Swept on H100s (benchmarks/svd_kernels.py, runs 21-22 in BENCHMARKS.md): the fastest or within 7% of the fastest
# tile shape at each of SVD's four UNet levels.
DEFAULT_TILES = Tiles(128, 64, 64, 8, 3, 2)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused GEGLU: x (..., K), weight (2N, K), bias (2N,) -> (..., N)."""
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def geglu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to call `geglu_linear` for these operands: a CUDA float16 forward (float32 would run the dot products
    in TF32, a different function; bfloat16 is left to the plain ops until the kernel is checked on a GPU in it:
    Triton's CPU interpreter cannot run bfloat16; autograd goes through the plain ops). Tensor properties only, so that
    torch.compile decides this while tracing; whether the kernel itself can run is decided inside the op."""
    return (
        x.is_cuda
        and x.dtype == torch.float16
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs here: Triton present, a Hopper or later card (TMA), and operands that TMA can address
    (16-byte aligned rows). Otherwise the op computes the reference."""
    k, n2 = x.shape[1], weight.shape[0]
    return (
        x.is_cuda
        and x.dtype == weight.dtype == torch.float16  # the dtype measured and checked (see geglu_supported)
        and x.shape[0] > 0
        and has_triton()
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and k % 8 == 0
        and n2 % 16 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


@torch.library.custom_op("img2vid::geglu_linear", mutates_args=())
def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused GEGLU projection: x (M, K), weight (2N, K), bias (2N,) -> (M, N).

    A custom op so torch.compile calls it as one opaque call (as `layers.frame_window_conv`)."""
    if not kernel_fits(x, weight):
        return geglu_reference(x, weight, bias)
    x = x.contiguous()  # a fresh or whole tensor: TMA needs 16-byte aligned rows
    out = x.new_empty(x.shape[0], weight.shape[0] // 2)
    launch_geglu(x, weight, bias.contiguous(), out, DEFAULT_TILES)
    return out


@geglu_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def launch_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, tiles: Tiles) -> None:
    """Run the kernel into out (M, N); x, weight and out contiguous with 16-byte aligned rows. Also runs under
    Triton's CPU interpreter (TRITON_INTERPRET=1), which is how the CPU tests check the kernel's maths.

    Persistent: a few programs per SM loop over the output tiles, and Triton flattens the tile and K loops into one
    pipeline, so the next tile's TMA loads are in flight during this tile's epilogue (K is only 5-20 blocks here,
    so a program per tile spends much of its time filling and draining its pipeline: 2.53 against 2.19 ms at the
    first level on an H100)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = out.shape[1]
    tiles_total = triton_cdiv(m, tiles.block_m) * triton_cdiv(n, tiles.block_n)
    programs = min(tiles_total, tiles.per_sm * _sm_count(x.device))
    _kernel()[(programs,)](
        TensorDescriptor.from_tensor(x, [tiles.block_m, tiles.block_k]),
        TensorDescriptor.from_tensor(weight, [tiles.block_n, tiles.block_k]),
        bias, TensorDescriptor.from_tensor(out, [tiles.block_m, tiles.block_n]), m, n, k, programs,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use: importing img2vid must not need Triton. x, weight and out come as
    TMA tensor descriptors (Hopper and later)."""
    import triton
    import triton.language as tl

    @triton.jit
    def geglu_kernel(
        x_desc, w_desc, b_ptr, out_desc, M, N, K, PROGRAMS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        num_n = tl.cdiv(N, BLOCK_N)
        num_tiles = tl.cdiv(M, BLOCK_M) * num_n
        k_blocks = tl.cdiv(K, BLOCK_K)
        dtype = out_desc.dtype
        for tile in tl.range(tl.program_id(0), num_tiles, PROGRAMS, flatten=True):
            # Column tiles vary fastest: the programs working on one row tile of x at a time read it from L2.
            off_m = (tile // num_n) * BLOCK_M
            off_n = (tile % num_n) * BLOCK_N
            acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kb in range(k_blocks):
                xt = x_desc.load([off_m, kb * BLOCK_K])  # (BLOCK_M, BLOCK_K); out-of-range rows read as zeros
                wh = w_desc.load([off_n, kb * BLOCK_K])  # (BLOCK_N, BLOCK_K): rows of W for h
                wg = w_desc.load([N + off_n, kb * BLOCK_K])  # the matching rows for gate
                acc_h = tl.dot(xt, wh.T, acc_h)
                acc_g = tl.dot(xt, wg.T, acc_g)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            bh = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            bg = tl.load(b_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            h = (acc_h + bh[None, :]).to(dtype).to(tl.float32)
            g = (acc_g + bg[None, :]).to(dtype).to(tl.float32)
            gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype).to(tl.float32)
            out_desc.store([off_m, off_n], (h * gelu).to(dtype))  # rows and columns past (M, N) are not written

    return geglu_kernel
