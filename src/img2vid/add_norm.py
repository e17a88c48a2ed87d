"""The transformer blocks' residual add fused with the LayerNorm that follows it: one Triton kernel reads the
residual stream and the sub-layer's output once and writes both the new residual stream and its normalized copy.

Why: at SVD's first level every residual sum is a 295 MB tensor that the next LayerNorm reads and the next residual
add reads again. Eager, the add and the norm are two kernels (5 full-size passes: read 2 and write 1, read 1 and
write 1). Compiled, inductor fuses the add into the norm but does not store the sum: each later reader recomputes it
from its parts, so the norms' kernels and the time mixer's blend re-read two to four full-size tensors each (run 53:
33 full-size passes in a first-level spatio-temporal transformer where 25 would do; the compiled kernels' own list is
in BENCHMARKS.md). Here each sum is written once, beside its norm: 4 passes.

Same function as the reference up to rounding: the sum is formed in float32 and rounded once (the reference rounds
after each add, inductor once, as here), and the norm's statistics are taken in float32 from the rounded sum (as
the reference's LayerNorm kernel does from its input). The same kernel also serves the eager LayerNorms that follow
no add (`layer_norm`): PyTorch's kernel took 0.71 ms a call at SVD's first level (C = 320), 3.5x its bandwidth floor
(run 56). Triton is imported lazily (`fused`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from img2vid import fused
from img2vid.layers import with_bias

ROWS_ELEMENTS = 4096  # elements of a program's tile (rows x the power-of-two width): a few KB per load per warp
WARPS = 4


def norm_supported(x: torch.Tensor, norm: torch.nn.LayerNorm, y: torch.Tensor | None = None) -> bool:
    """Whether to call the ops for these operands: a CUDA float16 forward over the last dim with an affine norm (the
    dtype the kernel was measured in, as `fused.geglu_supported`). Tensor properties only, so that torch.compile
    decides this while tracing."""
    return (
        x.is_cuda
        and x.dtype == torch.float16
        and (y is None or (y.dtype == x.dtype and y.shape == x.shape))
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (x.shape[-1],)
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
        and not (torch.is_grad_enabled() and y is not None and y.requires_grad)
    )


def add_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    vec: torch.Tensor | None,
    vec_div: int,
    vec_in_sum: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain ops of `add_layer_norm` (its fallback and its tests' reference), in x's dtype on x's device."""
    s, t = _sum_and_norm_input(x, y, vec, vec_div, vec_in_sum)
    return s, F.layer_norm(t, t.shape[-1:], weight, bias, eps)


def _sum_and_norm_input(
    x: torch.Tensor, y: torch.Tensor, vec: torch.Tensor | None, vec_div: int, vec_in_sum: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the plain ops for x, y (..., C): the sum s = x + y (with the row vectors if vec_in_sum) and the
    norm's input t (s, plus the row vectors if they are not in it). Token rows count over all leading dims."""
    s = x + y
    if vec is None:
        return s, s
    # (..., C) -> (M, C) -> (..., C)
    with_vec = _add_row_vectors(s.reshape(-1, s.shape[-1]), vec, vec_div).view(s.shape)
    return (with_vec, with_vec) if vec_in_sum else (s, with_vec)


def _add_row_vectors(s: torch.Tensor, vec: torch.Tensor, div: int) -> torch.Tensor:
    """s (M, C) + vec[(r // div) % V] on row r, for vec (V, C), as a broadcast (no (M, C) copy of the vectors)."""
    m, c = s.shape
    v = vec.shape[0]
    if m % (div * v):
        rows = (torch.arange(m, device=s.device) // div) % v  # a ragged last period: index the rows instead
        return s + vec[rows]
    # (M, C) -> (M / (div V), V, div, C): row r sits at [r // (div V), (r // div) % V, r % div]
    return (s.view(-1, v, div, c) + vec[:, None, :]).view(m, c)


def add_layer_norm_impl(
    x: torch.Tensor,
    y: torch.Tensor,
    vec: torch.Tensor | None,
    vec_div: int,
    vec_in_sum: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(t)) for x, y (M, C) and s = x + y, where vec (V, C) or None adds vec[(r // vec_div) % V] to
    row r of s (vec_in_sum) or only to the norm's input t = s + vec (otherwise; t = s without vec). SVD's vectors:
    the one-token cross-attention update per video, the frame embedding per frame.

    Called through the custom op `add_layer_norm` so that torch.compile calls it as one opaque call: its two outputs
    are then stored tensors, which is the point (see the module docstring); directly where that is not needed
    (`fused.direct_calls`). Where the kernel cannot run it returns the plain ops."""
    if not _kernel_fits(x, vec):
        return add_norm_reference(x, y, vec, vec_div, vec_in_sum, weight, bias, eps)
    s, n = torch.empty_like(x), torch.empty_like(x)
    launch_add_norm(x.contiguous(), y.contiguous(), vec, vec_div, vec_in_sum, weight, bias, eps, s, n)
    return s, n


add_layer_norm = torch.library.custom_op("img2vid::add_layer_norm", add_layer_norm_impl, mutates_args=())


@add_layer_norm.register_fake
def _(
    x: torch.Tensor,
    y: torch.Tensor,
    vec: torch.Tensor | None,
    vec_div: int,
    vec_in_sum: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def layer_norm_rows_impl(
    x: torch.Tensor, vec: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """layer_norm over the last dim of x (M, C), or of x + vec for vec (1, C) (a bias its producer left to this
    norm), with the add kernel's norm (no stored sum). Through the custom op `layer_norm_rows` as `add_layer_norm_impl`
    is through its op."""
    if not _kernel_fits(x, vec):
        t = with_bias(x, vec)
        return F.layer_norm(t, t.shape[-1:], weight, bias, eps)
    n = torch.empty_like(x)
    launch_add_norm(x.contiguous(), None, vec, 1, vec is None, weight, bias, eps, None, n)
    return n


layer_norm_rows = torch.library.custom_op("img2vid::layer_norm", layer_norm_rows_impl, mutates_args=())


@layer_norm_rows.register_fake
def _(x: torch.Tensor, vec: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _kernel_fits(x: torch.Tensor, vec: torch.Tensor | None) -> bool:
    """Whether the kernel runs here: Triton on an Ampere or later card (`fused._kernels_run_on`), 2-D operands whose
    elements 32-bit offsets address (the kernel's arithmetic), and a vector on the same device."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] > 0
        and x.numel() < 2**31
        and (vec is None or (vec.device == x.device and vec.dim() == 2 and vec.shape[1] == x.shape[1]))
        and fused._kernels_run_on(x.device)
    )


def launch_add_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    vec: torch.Tensor | None,
    vec_div: int,
    vec_in_sum: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    s: torch.Tensor | None,
    n: torch.Tensor,
) -> None:
    """Run the kernel: n = layer_norm of (x [+ y] [+ vec rows]) and, if s is given, s = the sum (see
    `add_layer_norm` for vec_in_sum); x, y, s, n contiguous (M, C). Also runs under Triton's CPU interpreter
    (TRITON_INTERPRET=1), which is how the CPU tests check its maths and masks."""
    m, c = x.shape
    block_c = 1 << (c - 1).bit_length()
    rows = max(1, ROWS_ELEMENTS // block_c)
    # unread placeholders for the absent operands (their loads and stores are compiled out)
    _kernel()[(fused.triton_cdiv(m, rows),)](
        x, x if y is None else y, x if vec is None else vec.contiguous(), weight.contiguous(), bias.contiguous(),
        n if s is None else s, n, m, vec_div, 1 if vec is None else vec.shape[0], eps,
        C=c, BLOCK_C=block_c, ROWS=rows, HAS_Y=y is not None, HAS_VEC=vec is not None, VEC_IN_SUM=vec_in_sum,
        STORE_SUM=s is not None, num_warps=WARPS,
    )  # fmt: skip


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use: importing img2vid must not need Triton."""
    import triton
    import triton.language as tl

    # Row counts and vector strides change with the level and the video: one build per width serves them all
    @triton.jit(do_not_specialize=["M", "VEC_DIV", "VEC_ROWS"])
    def add_norm_kernel(
        x_ptr, y_ptr, v_ptr, w_ptr, b_ptr, s_ptr, n_ptr, M, VEC_DIV, VEC_ROWS, eps,
        C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, HAS_Y: tl.constexpr, HAS_VEC: tl.constexpr,
        VEC_IN_SUM: tl.constexpr, STORE_SUM: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        col = tl.arange(0, BLOCK_C)  # (BLOCK_C,): C padded to a power of two, the padding masked
        row_ok = row < M
        col_ok = col < C
        mask = row_ok[:, None] & col_ok[None, :]
        offs = row[:, None] * C + col[None, :]  # (ROWS, BLOCK_C)
        dtype = n_ptr.dtype.element_ty
        s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            s += tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_VEC:
            vrow = (row // VEC_DIV) % VEC_ROWS  # (ROWS,): the vector row each token row adds
            v = tl.load(v_ptr + vrow[:, None] * C + col[None, :], mask=mask, other=0.0).to(tl.float32)
            if VEC_IN_SUM:
                s += v
        # The norm reads the sum as the reference holds it, rounded (and, for a vector outside the sum, the sum
        # plus the vector rounded again), as the reference's LayerNorm reads its input
        s_out = s.to(dtype)
        if STORE_SUM:
            tl.store(s_ptr + offs, s_out, mask=mask)
        t = s_out.to(tl.float32)
        if HAS_VEC:
            if not VEC_IN_SUM:
                t = (t + v).to(dtype).to(tl.float32)
        mean = tl.sum(t, axis=1) / C  # padded columns are zeros
        d = tl.where(col_ok[None, :], t - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
        w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        out = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(n_ptr + offs, out.to(dtype), mask=mask)

    return add_norm_kernel


def add_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    norm: torch.nn.LayerNorm,
    vec: torch.Tensor | None = None,
    vec_div: int = 1,
    vec_in_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(t)) for x, y (..., C) and s = x + y, with vec (V, C) added to token row r as vec[(r // vec_div) % V]
    in s (vec_in_sum) or in t = s + vec only (otherwise; without vec t = s). Token rows count over all leading
    dims. The op where it is supported (`norm_supported`), the plain ops otherwise."""
    shape = x.shape
    c = shape[-1]
    if norm_supported(x, norm, y):
        op = add_layer_norm_impl if fused.direct_calls() else add_layer_norm
        # (..., C) -> (M, C): token rows over all leading dims
        s, n = op(x.reshape(-1, c), y.reshape(-1, c), vec, vec_div, vec_in_sum, norm.weight, norm.bias, norm.eps)
        return s.view(shape), n.view(shape)  # (M, C) -> (..., C)
    s, t = _sum_and_norm_input(x, y, vec, vec_div, vec_in_sum)
    return s, norm(t)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, vec: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x), or norm(x + vec) for a row vector vec (C,): eager CUDA float16 calls run the kernel above, compiled
    graphs keep the module (inductor's fused LayerNorm is at the bandwidth floor already: 0.195 ms at SVD's first
    level, run 56, and it fuses the vector's add)."""
    if torch.compiler.is_compiling() or not norm_supported(x, norm):
        return norm(with_bias(x, vec))
    c = x.shape[-1]
    rows = None if vec is None else vec.view(1, c)  # (C,) -> (1, C)
    op = layer_norm_rows_impl if fused.direct_calls() else layer_norm_rows
    return op(x.reshape(-1, c), rows, norm.weight, norm.bias, norm.eps).view(x.shape)  # (M, C) -> (..., C)
