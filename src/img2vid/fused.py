"""Hand-written GPU kernels (Triton) for what torch.compile and PyTorch's kernels do not do well: the GEGLU
projection here (the attention along the frame axis is `frame_kernel`), and the gates every kernel of img2vid asks
(which cards run them, `direct_calls`).

The GEGLU projection: `h, gate = (x @ W.T + b).chunk(2, -1); out = h * gelu(gate)`. cuBLAS writes the whole
(M, 2N) projection and a second kernel reads it back for the gating (inductor fuses the gelu and the product, but not
into the matrix product, because the output reads two column ranges of it). At SVD's first level that is 2.4 GB
written and read again, 15 times a step, for a product with K = 320 that is itself close to bandwidth-bound. Here
each program computes the same columns of h and of gate (one accumulator over the same x tiles) and writes only the
gated (M, N) result: half the bytes out, none read back.

What it measured on an H100 (BENCHMARKS.md): in session 5, two products per tile (h and gate, 64 columns each),
no faster in the compiled step than cuBLAS plus inductor's gating kernel, but 0.54 GiB less activation memory, and
6% off the eager step. Session 8 (runs 39-40): one product per tile over W viewed as (2, N, K), whose (2, BLOCK_N,
BLOCK_K) tile holds the h rows and the gate rows of the same columns, so each x tile feeds one wider matrix product
instead of two narrow ones: 12-14% faster at every level (first level 2.31 -> 1.97 ms).

Cards before Hopper have no TMA: there a second kernel loads its tiles through pointers, one tile per program, two
products per tile (`launch_geglu_loads`). On an H100 that path took the eager step 0.393 s, against 0.369 s with the
TMA kernel and 0.441 s with the plain ops (BENCHMARKS.md, runs 105 and 107); Ampere and Ada cards were not measured.

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


# Swept on H100s (benchmarks/svd_kernels.py; runs 21-22 and 39-40 in BENCHMARKS.md). Short reductions (K = 320
# and 640, SVD's first two levels) want two programs per SM, so that one program's epilogue (the erf) runs while the
# other's products do; at K = 1280 wider tiles with a deeper pipeline win (their 192 KB of stages leave room for one
# program per SM only). Either choice is within 4% of the other at K = 640.
SHORT_K_TILES = Tiles(128, 64, 64, 8, 3, 2)
LONG_K_TILES = Tiles(128, 128, 64, 8, 4, 1)


def tiles_for(k: int) -> Tiles:
    """The tile shape for a reduction of length k (the GEGLU's input width)."""
    return SHORT_K_TILES if k < 1024 else LONG_K_TILES


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused GEGLU: x (..., K), weight (2N, K), bias (2N,) -> (..., N)."""
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(gate)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# The oldest cards img2vid's Triton kernels run on. Ampere (sm_80) and later: the GroupNorm, epilogue, time-mixer,
# add + LayerNorm and frame-attention kernels use nothing newer (tests/test_kernel_targets.py builds them for sm_80
# and sm_86 on the CPU), and PyTorch's ops they replace are just as slow there (one thread block per (sample, group)
# in its GroupNorm statistics, whatever the card). They were timed on H100s only (BENCHMARKS.md). The GEGLU kernel
# loads through TMA descriptors, which Hopper (sm_90) introduced; before it, its twin loads through pointers.
KERNELS_MIN_CAPABILITY = (8, 0)
TMA_MIN_CAPABILITY = (9, 0)


@functools.cache
def _kernels_run_on(device: torch.device) -> bool:
    """Whether this CUDA device runs the kernels here: Triton present and an NVIDIA Ampere or later card (ROCm
    builds answer torch.cuda too, with capabilities of their own: the kernels were never built nor checked on AMD
    cards, which keep PyTorch's ops). Once per device, not once per call."""
    return (
        has_triton()
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device) >= KERNELS_MIN_CAPABILITY
    )


@functools.cache
def _tma_runs_on(device: torch.device) -> bool:
    """Whether this CUDA device runs the GEGLU kernel: `_kernels_run_on` and a Hopper or later card (TMA)."""
    return _kernels_run_on(device) and torch.cuda.get_device_capability(device) >= TMA_MIN_CAPABILITY


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
    """Whether a kernel runs here: Triton present, an NVIDIA Ampere or later card (`_kernels_run_on`: the TMA kernel
    on Hopper and later, the one that loads through pointers before), and operands that TMA can address (16-byte
    aligned rows; the same alignment lets the other kernel load 8 halves at a time). Otherwise the op computes the
    reference."""
    k, n2 = x.shape[1], weight.shape[0]
    return (
        x.is_cuda
        and x.dtype == weight.dtype == torch.float16  # the dtype measured and checked (see geglu_supported)
        and x.shape[0] > 0
        and _kernels_run_on(x.device)
        and k % 8 == 0
        and n2 % 16 == 0
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
    )


def direct_calls() -> bool:
    """Whether img2vid's custom ops may be skipped for their functions: plain eager inference (not traced by
    torch.compile, no autograd, no dispatch mode such as FlopCounterMode watching the ops). Why: a custom op runs its
    function under dynamo.disable, so its first call imports torch._dynamo (and sympy, ...): 2.8 s on a CPU with
    bytecode caches, ~6 s of a new process's first video on the H100 machine (run 89). Each call also pays the
    dispatcher's wrapping, ~20,000 calls a video."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the C call below
        return False
    # the depth of the Python dispatch-mode stack, as torch.utils._python_dispatch reads it (no public accessor)
    return not torch.is_grad_enabled() and torch._C._len_torch_dispatch_stack() == 0


def geglu_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused GEGLU projection: x (M, K), weight (2N, K), bias (2N,) -> (M, N).

    Called through the custom op `geglu_linear` so that torch.compile calls it as one opaque call (as
    `layers.frame_window_conv`), directly where that is not needed (`direct_calls`)."""
    if not kernel_fits(x, weight):
        return geglu_reference(x, weight, bias)
    x = x.contiguous()  # a fresh or whole tensor: TMA needs 16-byte aligned rows
    out = x.new_empty(x.shape[0], weight.shape[0] // 2)
    if _tma_runs_on(x.device):
        launch_geglu(x, weight, bias.contiguous(), out, tiles_for(x.shape[1]))
    else:
        launch_geglu_loads(x, weight, bias.contiguous(), out)
    return out


geglu_linear = torch.library.custom_op("img2vid::geglu_linear", geglu_linear_impl, mutates_args=())


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
    # (2N, K) -> (2, N, K): a (2, BLOCK_N, BLOCK_K) box holds the h rows and the gate rows of the same columns
    w_pairs = weight.view(2, n, k)
    tiles_total = triton_cdiv(m, tiles.block_m) * triton_cdiv(n, tiles.block_n)
    programs = min(tiles_total, tiles.per_sm * _sm_count(x.device))
    _kernel()[(programs,)](
        TensorDescriptor.from_tensor(x, [tiles.block_m, tiles.block_k]),
        TensorDescriptor.from_tensor(w_pairs, [2, tiles.block_n, tiles.block_k]),
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
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)  # [h | gate] of this tile's columns
            for kb in range(k_blocks):
                xt = x_desc.load([off_m, kb * BLOCK_K])  # (BLOCK_M, BLOCK_K); out-of-range rows read as zeros
                # (2, BLOCK_N, BLOCK_K) -> (2*BLOCK_N, BLOCK_K): h rows, then the gate rows of the same columns
                wt = w_desc.load([0, off_n, kb * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
                acc = tl.dot(xt, wt.T, acc)
            # (BLOCK_M, 2*BLOCK_N) -> (BLOCK_M, BLOCK_N, 2) -> h, gate (BLOCK_M, BLOCK_N) each
            acc_h, acc_g = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
            offs_n = off_n + tl.arange(0, BLOCK_N)
            bh = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            bg = tl.load(b_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            h = (acc_h + bh[None, :]).to(dtype)
            g = (acc_g + bg[None, :]).to(dtype).to(tl.float32)
            gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype)
            # A half-precision product of half-precision values is the float32 product rounded once (it is exact
            # in float32), as the reference's; rows and columns past (M, N) are not written
            out_desc.store([off_m, off_n], h * gelu)

    return geglu_kernel


# Cards before Hopper (Ampere, Ada) have no TMA. There the kernel loads its tiles through pointers, and Triton
# pipelines those loads (cp.async). One program per output tile (the persistent loop's gain was measured with TMA
# only), and two products per x tile, h and gate, into two accumulators: the one-product form splits its wide
# accumulator through shared memory, which Ampere's smaller shared memory (99 KB a block on sm_86) cannot spare
# beside a deep pipeline. These tiles were not swept on such a card (none here): they keep each stage at 16 KB and
# the kernel at 48 KB of shared memory (tests/test_kernel_targets.py builds it for sm_80 and sm_86). Both kernels
# add the same 16-deep products into one float32 accumulator in the same order: on an H100 their videos were
# identical (run 107).
LOAD_TILES = Tiles(128, 64, 32, 4, 4, 1)  # per_sm unused: one program per tile


def launch_geglu_loads(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, tiles: Tiles = LOAD_TILES
) -> None:
    """`launch_geglu` for cards without TMA: the same function, its tiles loaded through pointers; x, weight and out
    contiguous. Also runs under Triton's CPU interpreter."""
    m, k = x.shape
    n = out.shape[1]
    grid = (triton_cdiv(m, tiles.block_m) * triton_cdiv(n, tiles.block_n),)
    _load_kernel()[grid](
        x, weight, bias, out, m, n, k,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip


@functools.cache
def _load_kernel() -> Any:
    """The jitted pointer-load GEGLU kernel, built on first use (as `_kernel`)."""
    import triton
    import triton.language as tl

    # The row count changes with the level and the video: one build per (N, K) serves them all
    @triton.jit(do_not_specialize=["M"])
    def geglu_loads_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        num_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        # Column tiles vary fastest: the programs working on one row tile of x at a time read it from L2.
        rows = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        depth = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * K  # (BLOCK_M, 1): M * K may pass 2**31
        h_rows = w_ptr + cols[:, None] * K  # (BLOCK_N, 1): W's rows of h, then those of gate N rows further
        g_rows = w_ptr + (cols + N)[:, None] * K
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + depth < K)[None, :]
            xt = tl.load(x_rows + k0 + depth[None, :], mask=row_ok[:, None] & k_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
            wh = tl.load(h_rows + k0 + depth[None, :], mask=col_ok[:, None] & k_ok, other=0.0)  # (BLOCK_N, BLOCK_K)
            wg = tl.load(g_rows + k0 + depth[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
            acc_h = tl.dot(xt, wh.T, acc_h)
            acc_g = tl.dot(xt, wg.T, acc_g)
        dtype = out_ptr.dtype.element_ty
        bh = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        bg = tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)
        # the TMA kernel's epilogue: h and gate rounded as cuBLAS' output is, the exact erf gelu, one rounded product
        h = (acc_h + bh[None, :]).to(dtype)
        g = (acc_g + bg[None, :]).to(dtype).to(tl.float32)
        gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype)
        out = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out, h * gelu, mask=row_ok[:, None] & col_ok[None, :])

    return geglu_loads_kernel
