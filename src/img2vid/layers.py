"""Small building blocks shared by the UNet, the VAE and the image encoder.

Importing this module registers the custom op img2vid::frame_window_conv with torch.library (as `frame_kernel`,
`fused` and `add_norm` register theirs): the one accepted import-time side effect, namespaced and the standard torch
pattern for opaque kernels under torch.compile."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from img2vid import frame_kernel, fused, norm_act
from img2vid.attention import frame_attention_sdpa


class Placed(torch.nn.Module):
    """A top-level model (UNet, VAE, image encoder) with `dtype` and `device` as diffusers' and transformers' models
    report them, from the first parameter: scripts write `latents.to(pipe.unet.dtype)`."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """Attention along the frame axis for tokens stored frame-major: q, k, v and the result are (B*F, N, heads*D),
    and each (pixel, head) pair attends over its own F frames (the temporal transformer blocks).

    The reference transposes the tokens to (B*N, F, C) around the whole temporal block so that each pixel is one
    batch row; every layer but this one is per token, so the transposition only serves the attention. Viewed as
    (B, F, N*heads, D), each (pixel, head) pair is one attention head of an F-long sequence, and the kernels read
    it in place through the strides: no transposing copy in or out (two full-size copies per temporal block).

    On an Ampere or later GPU in float16 this is img2vid's Triton kernel (`frame_kernel.frame_attention`, 2.5x PyTorch's
    memory-efficient kernel here); elsewhere `frame_attention_sdpa`."""
    if frame_kernel.frame_attention_supported(q, k, v, heads):
        op = frame_kernel.frame_attention_impl if fused.direct_calls() else frame_kernel.frame_attention
        return op(q, k, v, heads, frames)
    return frame_attention_sdpa(q, k, v, heads, frames)


def with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + bias, or x when a layer's bias is None or was already added."""
    return x if bias is None else x + bias


def vector_sum(*vectors: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the given row vectors ((C,) or (V, C), broadcast), None if none is given: the biases and
    per-frame / per-video vectors that the UNet's blocks add in one place instead of one kernel each."""
    present = [v for v in vectors if v is not None]
    if not present:
        return None
    total = present[0]
    for v in present[1:]:
        total = total + v
    return total


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


def _pooled_moments(mean: torch.Tensor, var: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of the union of equal-sized parts, from each part's along `dim` (kept as size 1):
    the law of total variance, mean of the variances plus the variance of the means."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled, var.mean(dim, keepdim=True) + (mean - pooled).square().mean(dim, keepdim=True)


def channel_group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """`norm(x)` for x = (N, C, H, W) or a video (B, C, F, H, W), in the form that compiles well in any layout.

    Why: torch.compile stores convolution outputs channels-last (inductor's layout optimisation; `Pipeline.compile`
    also makes the weights channels-last), and inductor's GroupNorm then reduces each (sample, group) over rows of
    C/G channels that lie C apart: 8-16 contiguous bytes at a time, 2-20x slower than reading the tensor (up to
    17 ms a call in the decoder on an H100). Here the moments are taken per (sample, channel[, frame]) over H and W,
    which is a coalesced reduction in either layout, and combined per group by the law of total variance (equal
    counts): the same statistics, finished in float32 as the reference's kernel does.

    For compiled graphs, where the float32 upcast and the affine fuse into the reduction and the output kernels.
    Run eagerly it would materialise float32 copies of x; `group_norm` and `video_group_norm` send eager calls to
    the GroupNorm kernels instead."""
    n, c = x.shape[:2]
    g = norm.num_groups
    acc = torch.promote_types(x.dtype, torch.float32)  # half inputs: float32 statistics; float64 stays float64
    xa = x.to(acc)
    var_c, mean_c = torch.var_mean(xa, dim=(-2, -1), correction=0)  # (N, C) or (B, C, F)
    mean, var = _pooled_moments(mean_c.reshape(n, g, -1), var_c.reshape(n, g, -1), -1)  # (N, G, C/G[*F]) -> (N, G, 1)
    scale = norm.weight.to(acc).view(1, g, -1) * torch.rsqrt(var + norm.eps)  # (N, G, C/G)
    shift = norm.bias.to(acc).view(1, g, -1) - mean * scale  # (C,) -> (1, G, C/G); (N, G, C/G)
    shape = (n, c) + (1,) * (x.dim() - 2)  # (N, C, 1, 1[, 1]): broadcast over frames and pixels
    return torch.addcmul(shift.reshape(shape), xa, scale.reshape(shape)).to(x.dtype)


def group_norm(
    x: torch.Tensor,
    norm: torch.nn.GroupNorm,
    silu: bool = False,
    vec: torch.Tensor | None = None,
    reuse_input: bool = False,
) -> torch.Tensor:
    """`norm(x + vec)` for (N, C, H, W), then SiLU if silu. vec (N, C) or None: a per-(frame, channel) vector added
    first (the UNet resnets' time embedding). reuse_input: x is not needed after the call, so the result may be
    written over it. Compiled graphs take `channel_group_norm` (inductor fuses the add and the SiLU); eager CUDA
    calls the kernels of `norm_act` (NCHW or channels-last frames); anything else, the module."""
    compiling = torch.compiler.is_compiling()
    rows = None if compiling else norm_act.rows_view(x, 1)  # (N, C, H, W) -> (N, C, H*W): each frame a sample
    if rows is not None and norm_act.supported(rows, norm, vec):
        # (N, C, H*W) -> (N, C, H, W)
        return norm_act.group_norm_rows(rows, norm, 1, silu, vec, reuse_input).view(x.shape)
    if vec is not None:
        x = x + vec[:, :, None, None]  # (N, C) -> (N, C, 1, 1)
    y = channel_group_norm(x, norm) if compiling else norm(x)
    return F.silu(y, inplace=True) if silu else y  # y is fresh


def conv2d(conv: torch.nn.Conv2d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv(x) with `bias` instead of the conv's own (None: none; the caller adds it where it costs nothing: a norm's
    `vec`, `conv_epilogue`). Why: PyTorch adds a cuDNN convolution's bias in a kernel of its own, a full pass over
    the output (see `norm_act`). Compiled graphs peel it off by themselves (inductor), so this helps eager runs (and
    low-memory mode). The caller's forward reads conv's weights: it names conv in its `weights_read_here`
    (offload.plan_units)."""
    return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def upsample_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(x, size, mode="nearest") for x = (N, C, H, W). Eager, channels-last, to twice the size: the
    same values copied by one broadcast copy, 8 bytes an element (PyTorch's channels-last nearest kernel took 1.8 ms
    where this takes 0.9 at the UNet's last upsampling; H100, run 109)."""
    n, c, h, w = x.shape
    # (N, H, W, C) in memory, each pixel's C values a whole number of 8-byte words at an 8-byte offset; compiled
    # graphs take F.interpolate (inductor writes its own kernel)
    fast = (
        not torch.compiler.is_compiling()
        and tuple(size) == (2 * h, 2 * w)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        and (c * x.element_size()) % 8 == 0
        and (x.storage_offset() * x.element_size()) % 8 == 0
    )
    if not fast:
        if x.is_cuda and x.numel() > 2**30 and not x.is_contiguous():
            # CUDA's channels_last nearest kernel silently writes zeros past 2**32 output elements (pytorch#141831);
            # the NCHW kernel is fine, so very large inputs switch layout. Shape-only test: no sync.
            x = x.contiguous()
        return F.interpolate(x, size=size, mode="nearest")
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    src = x.permute(0, 2, 3, 1).view(torch.int64)  # (N, C, H, W) -> (N, H, W, C) -> (N, H, W, K) words
    dst = out.permute(0, 2, 3, 1).view(torch.int64).view(n, h, 2, w, 2, -1)  # (N, 2H, 2W, K) -> (N, H, 2, W, 2, K)
    dst.copy_(src[:, :, None, :, None, :].expand_as(dst))  # each word to its 2 x 2 output pixels
    return out


def conv_epilogue(h: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor | None = None) -> torch.Tensor:
    """h + bias (per channel, (C,) or None) + skip (h's shape, or None) for h = (N, C, H, W), a conv's output computed
    without its bias; h is written over (it is the conv's fresh output). Eager CUDA calls add both in one pass
    (`norm_act.conv_epilogue`); compiled graphs leave the adds to inductor."""
    # (N, C, H, W) -> (N, C, H*W) views, NCHW or channels-last
    rows = None if torch.compiler.is_compiling() else norm_act.rows_view(h, 1)
    skip_rows = None if skip is None or rows is None else norm_act.rows_view(skip, 1)
    kernel = rows is not None and (skip is None) == (skip_rows is None)  # a skip in another layout: the plain adds
    if kernel and norm_act.epilogue_supported(rows, bias, skip_rows):
        return norm_act.conv_epilogue(rows, bias, skip_rows).view(h.shape)  # (N, C, H*W) -> (N, C, H, W)
    in_place = not torch.is_grad_enabled()  # autograd may need h; compiled graphs functionalize either form
    if bias is not None:
        h = h.add_(bias[:, None, None]) if in_place else h + bias[:, None, None]
    if skip is not None:
        h = h.add_(skip) if in_place else h + skip
    return h


def video_group_norm(
    x: torch.Tensor,
    norm: torch.nn.GroupNorm,
    silu: bool = False,
    vec: torch.Tensor | None = None,
    reuse_input: bool = False,
) -> torch.Tensor:
    """`norm(x + vec)` for x = (B, C, F, H, W), then SiLU if silu: statistics per (video, group) over all frames,
    then one multiply-add. vec (B, F, C) or None: a per-(frame, channel) vector added first; reuse_input as in
    `group_norm`.

    Compiled graphs take `channel_group_norm`. Eager: why not F.group_norm: x is a transposed view of frames, which
    F.group_norm first copies to NCDHW (and its output stays NCDHW, so the (3,1,1) conv after it cannot read frames
    in place); and its CUDA kernel gives each (video, group) row one thread block, i.e. only B*32 blocks for
    gigabytes of data (60 ms a call at 25 x 576 x 1024 on an H100). On CUDA the kernels of `norm_act` read the
    frames where they lie; elsewhere var_mean spreads the reduction over the device and reads the view where it
    lies. Same maths as the reference: biased variance, statistics finished in float32, the output keeps x's
    layout."""
    b, c, f = x.shape[:3]
    compiling = torch.compiler.is_compiling()
    frames = x.transpose(1, 2)  # (B, F, C, H, W)
    rows = None if compiling else norm_act.rows_view(frames, 2)  # -> (B*F, C, H*W): each video a sample
    if rows is not None and norm_act.supported(rows, norm, vec):
        # vec (B, F, C) -> (B*F, C): one row per frame, as the rows
        out = norm_act.group_norm_rows(rows, norm, f, silu, None if vec is None else vec.reshape(b * f, c), reuse_input)
        return out.view(frames.shape).transpose(1, 2)  # -> (B, C, F, H, W), x's layout
    if vec is not None:
        x = x + vec.permute(0, 2, 1)[..., None, None]  # (B, F, C) -> (B, C, F, 1, 1)
    y = channel_group_norm(x, norm) if compiling else _video_group_norm_plain(x, norm)
    return F.silu(y, inplace=True) if silu else y  # y is fresh


def _video_group_norm_plain(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """`video_group_norm` without the kernels: var_mean statistics and an addcmul, in x's layout."""
    g = norm.num_groups
    b, c, f = x.shape[:3]
    xg = x.unflatten(1, (g, -1))  # (B, C, F, H, W) -> (B, G, C/G, F, H, W), a view
    frames = x.transpose(1, 2)  # (B, F, C, H, W)
    if frames.is_contiguous() and f > 1:
        # The usual eager case, a transposed view of NCHW frames: each (video, frame, group) is one contiguous row,
        # so the statistics are taken per row (B*F*G rows: the whole GPU busy, coalesced reads) and combined over
        # the frames by the law of total variance (equal counts). One (video, group) reduction over the strided
        # view left most of the GPU idle.
        rows = frames.reshape(b, f, g, -1)  # (B, F, C, H, W) -> (B, F, G, C/G*H*W), a view
        var_f, mean_f = torch.var_mean(rows, dim=-1, correction=0)  # (B, F, G) each
        mean, var = _pooled_moments(mean_f.float(), var_f.float(), 1)  # (B, 1, G) each
        mean, var = (t.view(b, g, 1, 1, 1, 1) for t in (mean, var))  # (B, 1, G) -> (B, G, 1, 1, 1, 1)
    else:
        var, mean = torch.var_mean(xg, dim=(2, 3, 4, 5), correction=0, keepdim=True)  # (B, G, 1, 1, 1, 1)
    rstd = torch.rsqrt(var.float() + norm.eps)
    scale = norm.weight.float().view(1, g, -1, 1, 1, 1) * rstd  # (B, G, C/G, 1, 1, 1)
    shift = norm.bias.float().view(1, g, -1, 1, 1, 1) - mean.float() * scale  # (C,) -> (1, G, C/G, 1, 1, 1)
    # The small operands are broadcast, so the output takes xg's layout and merging the groups back is a view.
    return torch.addcmul(shift.to(x.dtype), xg, scale.to(x.dtype)).flatten(1, 2)  # (B, G, C/G, ...) -> (B, C, ...)


def frame_window_conv_impl(frames: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The (3, 1, 1) temporal conv over NCHW frames (B, F, C, P) with weight (Cout, 3*C) (tap-major: columns
    t*C .. (t+1)*C hold tap t) and bias (Cout,) or None; returns (B, F, Cout, P).

    Frame f of a video is the (C, P) matrix at rows f*C .. (f+1)*C of the video's (F*C, P) memory, so the three
    frames f-1, f, f+1 that output frame f reads are ONE contiguous (3C, P) matrix: out[f] = weight @ window(f), a
    matrix product with K = 3C and a single rounding like cuDNN's. Windows of consecutive frames overlap (the batch
    stride is one frame); cuBLAS reads them as they lie, so there is no im2col copy and no padding: the first and
    last frames, whose outer neighbour is the zero padding, use two thirds of the weight on a two-frame window.
    Called through the custom op `frame_window_conv` so that torch.compile calls it as one opaque kernel instead of
    tracing the overlapping views (and autograd has a backward), directly where that is not needed
    (`fused.direct_calls`)."""
    b, f, c, p = frames.shape
    cout = weight.shape[0]
    x = frames.contiguous()
    out = x.new_empty(b, f, cout, p)
    bias2 = None if bias is None else bias[:, None]  # (Cout, 1): broadcast over pixels
    for i in range(b):
        rows = x[i].reshape(f * c, p)  # (F, C, P) -> (F*C, P)
        if f == 1:
            _product_into(out[i, 0], weight[:, c : 2 * c], rows, bias2)
            continue
        _product_into(out[i, 0], weight[:, c:], rows[: 2 * c], bias2)  # taps 1, 2 on frames 0, 1
        _product_into(out[i, f - 1], weight[:, : 2 * c], rows[(f - 2) * c :], bias2)  # taps 0, 1 on F-2, F-1
        if f > 2:
            windows = rows.as_strided((f - 2, 3 * c, p), (c * p, p, 1))  # window(f) for f = 1 .. F-2, overlapping
            _product_into(out[i, 1 : f - 1], weight.expand(f - 2, cout, 3 * c), windows, bias2)
    return out


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias2: torch.Tensor | None) -> None:
    """out = a @ b (+ bias2), for matrices or batches of them. With a bias PyTorch first copies it, broadcast, into
    out (a full pass over the output) and accumulates the product onto it."""
    batched = a.dim() == 3
    if bias2 is None:
        (torch.bmm if batched else torch.mm)(a, b, out=out)
    else:
        (torch.baddbmm if batched else torch.addmm)(bias2, a, b, out=out)


frame_window_conv = torch.library.custom_op("img2vid::frame_window_conv", frame_window_conv_impl, mutates_args=())


@frame_window_conv.register_fake
def _(frames: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, f, _, p = frames.shape
    return frames.new_empty(b, f, weight.shape[0], p)


def _frame_window_conv_setup(ctx: object, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])  # type: ignore[attr-defined]
    ctx.has_bias = inputs[2] is not None  # type: ignore[attr-defined]


def _frame_window_conv_backward(
    ctx: object, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients through the equivalent Conv3d (training is not this engine's job, but autograd must not break)."""
    frames, weight = ctx.saved_tensors  # type: ignore[attr-defined]
    b, f, c, p = frames.shape
    cout = weight.shape[0]
    x5 = frames.permute(0, 2, 1, 3)[..., None]  # (B, F, C, P) -> (B, C, F, P, 1)
    w5 = weight.view(cout, 3, c).permute(0, 2, 1)[..., None, None]  # (Cout, 3*C) -> (Cout, C, 3, 1, 1)
    g5 = grad.permute(0, 2, 1, 3)[..., None]  # (B, F, Cout, P) -> (B, Cout, F, P, 1)
    gx = torch.nn.grad.conv3d_input(x5.shape, w5, g5, padding=(1, 0, 0))
    gw = torch.nn.grad.conv3d_weight(x5, w5.shape, g5, padding=(1, 0, 0))
    gx = gx[..., 0].permute(0, 2, 1, 3)  # -> (B, F, C, P)
    gw = gw[..., 0, 0].permute(0, 2, 1).reshape(cout, 3 * c)  # (Cout, C, 3) -> (Cout, 3*C)
    return gx, gw, grad.sum(dim=(0, 1, 3)) if ctx.has_bias else None  # type: ignore[attr-defined]


frame_window_conv.register_autograd(_frame_window_conv_backward, setup_context=_frame_window_conv_setup)


def temporal_conv(x5: torch.Tensor, conv: torch.nn.Conv3d, add_bias: bool = True) -> torch.Tensor:
    """`conv(x5)` for a (3, 1, 1) Conv3d with padding (1, 0, 0) over x5 = (B, C, F, H, W), a view of frames;
    without the conv's bias if not add_bias (for a caller that adds it where it costs nothing).

    NCHW frames: x5 is a transposed view that cuDNN cannot read as it is: it first copies the view to NCDHW,
    converts that to NDHWC, and converts its output back, about five full-size tensors at once (the VAE decode's
    memory peak) and most of the conv's time. The kernel only mixes a pixel with itself in the frames before and
    after, so it runs as one matrix product per output frame over a window of three frames (`frame_window_conv`).
    channels_last frames: x5 is then exactly NDHWC (channels_last_3d), the layout cuDNN's kernels read natively, so
    the conv itself runs in place, with the reference's single rounding (the compiled channels-last decoder took
    564 ms a video this way against 691 ms with three accumulating matrix products: H100, run 28). Other layouts:
    the conv too."""
    b, c, f, h, w = x5.shape
    frames = x5.transpose(1, 2)  # (B, F, C, H, W)
    bias = conv.bias if add_bias else None
    if not frames.is_contiguous():
        return F.conv3d(x5, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    taps = conv.weight.flatten(2)  # (Cout, Cin, 3, 1, 1) -> (Cout, Cin, 3)
    cout = taps.shape[0]
    weight = taps.permute(0, 2, 1).reshape(cout, 3 * c)  # (Cout, Cin, 3) -> (Cout, 3, Cin) -> (Cout, 3*Cin)
    op = frame_window_conv_impl if fused.direct_calls() else frame_window_conv
    out = op(frames.reshape(b, f, c, h * w), weight, bias)  # (B, F, Cout, H*W)
    return out.view(b, f, cout, h, w).transpose(1, 2)  # -> (B, Cout, F, H, W)


def channels_last_(module: torch.nn.Module, on: bool = True) -> None:
    """Conv weights in channels-last layout (4D: NHWC, 5D: NDHWC), or back to NCHW if not on: cuDNN's fast
    half-precision kernels want them, and activations follow the weights' layout from the first convolution on. In
    place, parameter objects kept. `Module.to(memory_format=torch.channels_last)` cannot do this: it refuses the
    temporal convs' 5-D weights."""
    for p in module.parameters():
        if p.ndim == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last if on else torch.contiguous_format)
        elif p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d if on else torch.contiguous_format)
