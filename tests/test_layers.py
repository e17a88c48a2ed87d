"""The shared building blocks against their plain PyTorch definitions (float64 on the CPU, so rounding is not
what is tested): the (3,1,1) temporal conv as frame-window matrix products and the layout-keeping video GroupNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import img2vid.layers as layers
from img2vid.attention import attention, wide_head_attention
from img2vid.layers import (
    channel_group_norm,
    frame_attention,
    frame_window_conv,
    group_norm,
    temporal_conv,
    video_group_norm,
)


def _frames(b: int, f: int, c: int, h: int, w: int, channels_last: bool) -> torch.Tensor:
    """A (B, C, F, H, W) transposed view of frames (B*F, C, H, W), as the temporal layers receive it."""
    x = torch.randn(b * f, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.unflatten(0, (b, f)).transpose(1, 2)


@pytest.mark.parametrize("frames", [1, 2, 3, 7])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_temporal_conv_equals_conv3d(frames: int, batch: int, channels_last: bool) -> None:
    torch.manual_seed(frames * 10 + batch)
    conv = torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0)).double()
    x5 = _frames(batch, frames, 6, 3, 4, channels_last)
    expected = F.conv3d(x5.contiguous(), conv.weight, conv.bias, padding=(1, 0, 0))  # plain NCDHW
    if channels_last:  # as `channels_last_` stores them
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    out = temporal_conv(x5, conv)
    assert out.shape == (batch, 5, frames, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if not channels_last:
        # NCHW frames run as matrix products whose result is again a view of NCHW frames (the block's next ops
        # read it in place). channels-last frames run the conv, whose output layout is the backend's (NDHWC with
        # cuDNN; the CPU's float64 kernel returns NCDHW).
        assert out.transpose(1, 2).flatten(0, 1).is_contiguous()


def test_temporal_conv_without_bias_and_odd_layout_falls_back() -> None:
    conv = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), bias=False).double()
    x5 = _frames(1, 5, 4, 2, 3, False)
    torch.testing.assert_close(temporal_conv(x5, conv), conv(x5), rtol=1e-12, atol=1e-12)
    contiguous_5d = x5.contiguous()  # NCDHW: neither frames layout, so plain conv
    torch.testing.assert_close(temporal_conv(contiguous_5d, conv), conv(x5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_temporal_conv_can_leave_the_bias_to_the_caller(channels_last: bool) -> None:
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0)).double()
    x5 = _frames(2, 4, 6, 3, 4, channels_last)
    expected = F.conv3d(x5.contiguous(), conv.weight, None, padding=(1, 0, 0))
    torch.testing.assert_close(temporal_conv(x5, conv, add_bias=False), expected, rtol=1e-12, atol=1e-12)


def test_frame_window_conv_gradients_match_conv3d() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 4, (3, 1, 1), padding=(1, 0, 0)).double()
    x5 = _frames(2, 4, 3, 2, 2, False).detach().requires_grad_(True)
    temporal_conv(x5, conv).square().sum().backward()
    ours = [x5.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    x5.grad = conv.weight.grad = conv.bias.grad = None
    conv(x5).square().sum().backward()
    for a, b in zip(ours, [x5.grad, conv.weight.grad, conv.bias.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_frame_window_conv_compiles_as_one_op() -> None:
    """Under torch.compile the op is opaque (its overlapping views are never traced) and gives the eager numbers."""
    torch._dynamo.reset()
    x = torch.randn(2, 5, 4, 6)
    w, b = torch.randn(3, 12), torch.randn(3)
    compiled = torch.compile(lambda x, w, b: frame_window_conv(x * 2, w, b) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), frame_window_conv(x * 2, w, b) + 1)
    torch.library.opcheck(frame_window_conv, (x, w, b))
    torch.library.opcheck(frame_window_conv, (x, w, None))
    torch.testing.assert_close(frame_window_conv(x, w, None) + b[:, None], frame_window_conv(x, w, b))


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_video_group_norm_equals_group_norm(channels_last: bool, frames: int) -> None:
    # NCHW frames take the per-frame statistics combined over frames; other layouts one reduction per group.
    norm = torch.nn.GroupNorm(2, 6, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x5 = _frames(2, frames, 6, 2, 3, channels_last) * 3 + 1
    out = video_group_norm(x5, norm)
    # Statistics are finished in float32 (as the reference's half-precision kernel does), hence the tolerance.
    torch.testing.assert_close(out, F.group_norm(x5, 2, norm.weight, norm.bias, 1e-5), rtol=1e-5, atol=1e-6)
    # Layout kept (the conv after it reads frames in place): the output is again a view of frames. (A single
    # channels-last frame comes back NCHW: broadcasting cannot tell the layouts apart there; nothing depends on it.)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.transpose(1, 2).flatten(0, 1).is_contiguous(memory_format=fmt) or (frames == 1 and channels_last)


def test_video_group_norm_per_frame_statistics_are_stable() -> None:
    """Frames whose means differ widely and a large common offset: the per-frame statistics combined over the
    frames (law of total variance) stay as accurate in float32 as one reduction over the whole group."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    frames = torch.randn(2 * 5, 8, 6, 7) * 0.1 + torch.randn(2 * 5, 1, 1, 1) * 5 + 300  # (B*F, C, H, W)
    x5 = frames.unflatten(0, (2, 5)).transpose(1, 2)  # (B, C, F, H, W) view
    exact = F.group_norm(x5.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
    out = video_group_norm(x5, norm)
    one_pass = F.group_norm(x5.contiguous(), 4, norm.weight, norm.bias, 1e-6)
    assert (out.double() - exact).abs().max() <= 2 * (one_pass.double() - exact).abs().max() + 1e-5


def _norm(groups: int, channels: int, eps: float) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, channels, eps=eps).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    return norm


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_group_norm_equals_group_norm(video: bool, channels_last: bool) -> None:
    """Per-channel (and per-frame) moments combined per group give the group's statistics, in either layout."""
    torch.manual_seed(int(video) * 2 + int(channels_last))
    norm = _norm(3, 12, 1e-6)
    frames = torch.randn(2 * 4, 12, 5, 3, dtype=torch.float64) * torch.rand(1, 12, 1, 1) * 4 + torch.randn(1, 12, 1, 1)
    if channels_last:
        frames = frames.contiguous(memory_format=torch.channels_last)
    x = frames.unflatten(0, (2, 4)).transpose(1, 2) if video else frames  # (B, C, F, H, W) view or (N, C, H, W)
    expected = F.group_norm(x, 3, norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(channel_group_norm(x, norm), expected, rtol=1e-10, atol=1e-10)
    # float16 in, float16 out, statistics in float32: as close to the float64 result as the half kernel's rounding.
    half = channel_group_norm(x.half(), norm.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=4e-3, atol=4e-3)


def test_norms_take_the_channel_form_inside_compiled_graphs() -> None:
    """group_norm / video_group_norm trace to `channel_group_norm` under torch.compile (eager: the GroupNorm
    kernels); both forms give the module's numbers."""
    torch._dynamo.reset()
    norm = _norm(2, 6, 1e-5)
    x = torch.randn(6, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x5 = x.unflatten(0, (2, 3)).transpose(1, 2)
    expected = (F.group_norm(x, 2, norm.weight, norm.bias, 1e-5), F.group_norm(x5, 2, norm.weight, norm.bias, 1e-5))
    traced: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        traced.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    fn = torch.compile(lambda x, x5: (group_norm(x, norm), video_group_norm(x5, norm)), fullgraph=True, backend=backend)
    for got, want in zip(fn(x, x5), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any("var_mean" in t for t in traced) and not any("group_norm" in t for t in traced)
    for got, want in zip((group_norm(x, norm), video_group_norm(x5, norm)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_head_attention_equals_sdpa(dtype: torch.dtype) -> None:
    """The two-product form for heads wider than the fused kernels (the VAE's 512) is softmax attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 300, dtype=dtype) for _ in range(3))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        wide_head_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("grid", [None, 7])
def test_frame_attention_equals_attention_over_transposed_tokens(monkeypatch: pytest.MonkeyPatch, grid: int) -> None:
    """Frame-major tokens attended along the frame axis in place give what the reference computes: transpose to
    (B*N, F, C), attend, transpose back. grid=7 runs the (pixel, head) pairs in pieces (the CUDA grid cap, made
    small) with a remainder piece."""
    if grid is not None:
        monkeypatch.setattr("img2vid.attention.MAX_GRID_Z", grid)  # where frame_attention_sdpa reads it
    torch.manual_seed(0)
    b, f, n, heads, d = 2, 5, 6, 3, 4
    q, k, v = (torch.randn(b * f, n, heads * d, dtype=torch.float64) for _ in range(3))

    def to_pixels(t: torch.Tensor) -> torch.Tensor:  # (B*F, N, C) -> (B*N, F, C)
        return t.unflatten(0, (b, f)).transpose(1, 2).reshape(b * n, f, -1)

    want = attention(to_pixels(q), to_pixels(k), to_pixels(v), heads)  # (B*N, F, C)
    want = want.unflatten(0, (b, n)).transpose(1, 2).reshape(b * f, n, -1)  # -> (B*F, N, C)
    got = frame_attention(q, k, v, heads, f)
    assert got.shape == (b * f, n, heads * d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_channel_group_norm_statistics_are_stable() -> None:
    """Channels whose means differ widely and a large common offset: per-channel moments combined per group (law of
    total variance) stay as accurate in float32 as one reduction over the whole group."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    x = torch.randn(6, 16, 9, 7) * 0.1 + torch.randn(1, 16, 1, 1) * 5 + 300  # (N, C, H, W)
    for xs in (x, x.unflatten(0, (2, 3)).transpose(1, 2)):  # frames, and a (B, C, F, H, W) video view
        exact = F.group_norm(xs.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
        one_pass = F.group_norm(xs.contiguous(), 4, norm.weight, norm.bias, 1e-6)
        out = channel_group_norm(xs, norm)
        # ~1.5e-5 against one pass's 0.7-3.2e-5 here; a sum-of-squares variance is off by 3e-3
        assert (out.double() - exact).abs().max() <= 3 * (one_pass.double() - exact).abs().max()


class _NotPlainLinear(torch.nn.Linear):
    """Stands in for an fp8 projection: not exactly nn.Linear, so Attention keeps its forward."""


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("frames", [None, 5])
def test_spatial_self_attention_projects_qkv_with_one_product(plain: bool, frames: int | None) -> None:
    """Self-attention over a frame's pixels computes q, k, v with one product of the stacked weights (no
    projection's own call) and gives what three separate projections give; projections that are not plain Linears
    (fp8) are called one by one, and so are all three along the frame axis."""
    from img2vid.unet_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(24, 24, heads=3, head_dim=8).eval()
    if not plain:
        for name in ("to_q", "to_k", "to_v"):
            replaced = _NotPlainLinear(24, 24, bias=False)
            replaced.load_state_dict(getattr(attn, name).state_dict())
            setattr(attn, name, replaced)
    calls: list[str] = []
    for name in ("to_q", "to_k", "to_v"):
        getattr(attn, name).register_forward_hook(lambda m, args, out, name=name: calls.append(name))
    x = torch.randn(2 * 5, 6, 24)  # 2 videos of 5 frames, 6 tokens each
    with torch.no_grad():
        out, bias = attn(x, frames=frames)
        separate = ["to_q", "to_k", "to_v"] if (frames is not None or not plain) else []
        assert calls == separate
        qkv = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        ref = attention(*qkv, 3) if frames is None else frame_attention(*qkv, 3, frames)
        want = attn.to_out[0](ref)
    torch.testing.assert_close(layers.with_bias(out, bias), want, rtol=1e-6, atol=1e-6)


def test_compiled_spatial_self_attention_matches_eager() -> None:
    """The stacked-weight product and its strided q, k, v views trace into one graph and give the eager numbers."""
    from img2vid.unet_transformer import Attention

    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = Attention(24, 24, heads=3, head_dim=8).eval()
    x = torch.randn(2 * 5, 6, 24)
    with torch.no_grad():
        want = layers.with_bias(*attn(x))
        got = layers.with_bias(*torch.compile(attn, fullgraph=True, dynamic=False)(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_upsample_nearest_is_interpolate(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # The broadcast copy of channels-last inputs gives F.interpolate's values and a channels-last result; the cases
    # it does not take (NCHW, a size other than 2x, channels that are not whole 8-byte words, an unaligned view)
    # go to F.interpolate itself
    from img2vid.layers import upsample_nearest

    g = torch.Generator().manual_seed(0)
    last = torch.channels_last
    base = torch.randn(3, 16, 5, 7, generator=g).to(dtype)
    odd = torch.randn(2, 3, 4, 6, generator=g).to(dtype).contiguous(memory_format=last)  # 3 channels: 6 or 12 bytes
    # a channels-last view at an odd element offset: its first channel starts mid-word
    unaligned = torch.randn(2, 4, 5, 17, generator=g).to(dtype).permute(0, 3, 1, 2)[:, 1:]  # (N, 16, 4, 5)
    cases = [
        (base.contiguous(memory_format=last), (10, 14), True),
        (base, (10, 14), False),
        (base.contiguous(memory_format=last), (11, 14), False),
        (odd, (8, 12), False),
        (unaligned, (8, 10), False),
    ]
    interpolate = F.interpolate
    calls: list[int] = []
    for x, size, copied in cases:
        want = interpolate(x, size=size, mode="nearest")
        calls.clear()
        monkeypatch.setattr(layers.F, "interpolate", lambda *a, **k: calls.append(1) or interpolate(*a, **k))
        got = upsample_nearest(x, size)
        monkeypatch.undo()
        assert torch.equal(got, want), (x.shape, size)
        assert bool(calls) != copied, (x.shape, size)
        if copied:
            assert got.is_contiguous(memory_format=last) and not got.is_contiguous()
