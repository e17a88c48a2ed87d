"""The eager kernels around the resnets' convs (`norm_act`): GroupNorm (+ per-channel add, + SiLU), the conv
epilogue (bias + residual) and the UNet's time mixer (`time_mix`). Their Triton kernels under Triton's CPU
interpreter against float64 or the reference's ops, the dispatch in `layers.group_norm` / `video_group_norm` /
`conv_epilogue` / `TimeMixer` off the GPU (and under autograd), and the kernels against PyTorch's on a GPU where
there is one. Speed is a benchmark's business (BENCHMARKS.md), not a test's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_triton

from img2vid import fused, layers, norm_act


def reference(frames: torch.Tensor, norm: torch.nn.GroupNorm, fps: int, silu: bool, vec: torch.Tensor | None):
    """float64 GroupNorm of (R, C, P) frames with statistics over fps-frame samples, of frames + vec (rounded to
    the frames' dtype, as a stored tensor is), then SiLU of the norm's output rounded to that dtype."""
    r, c, p = frames.shape
    x = frames if vec is None else (frames.float() + vec.float()[:, :, None]).to(frames.dtype)
    s = r // fps
    # (R, C, P) -> (S, fps, C, P) -> (S, C, fps*P): one sample's frames side by side
    xv = x.double().view(s, fps, c, p).transpose(1, 2).reshape(s, c, fps * p)
    y = F.group_norm(xv, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    y = y.view(s, c, fps, p).transpose(1, 2).reshape(r, c, p)
    return F.silu(y.to(frames.dtype).double()) if silu else y


def interpreted(script: str) -> list[list[str]]:
    """Run script under Triton's CPU interpreter in a process of its own (the variable must be set before Triton is
    imported); returns its printed lines, split into words. The repository root is importable (tests.*)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]  # tests.* and their conftest
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    run = [sys.executable, "-c", script]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line.split() for line in proc.stdout.split("\n") if line.strip()]


@needs_triton
def test_kernels_match_float64_under_interpreter() -> None:
    # Small tiles so that rows span several tiles (the tile that divides the row, and a masked last tile when none
    # does), short rows share a program (several to a tile, the last program's rows partly masked), and a group's
    # partials span several finishing chunks (and frames): per-frame and per-video samples, float32 and float16,
    # with and without the added vector and the SiLU, the result written over the input.
    script = textwrap.dedent(
        """
        import itertools
        import torch
        from img2vid import norm_act, norm_act_nhwc
        from tests.test_norm_act import reference
        norm_act.MAX_TILE, norm_act.MIN_TILE, norm_act.FINISH_TILE = 64, 16, 8
        # channels-last: 4-channel blocks (the last one masked where C is not a multiple), 8-pixel blocks merged
        # three to a partial (a row's last partial part past its end)
        norm_act_nhwc.CHANNELS, norm_act_nhwc.PIXELS, norm_act_nhwc.TILE_BLOCKS = 4, 8, 3
        torch.manual_seed(0)
        cases = [
            (2, 8, 96, 1, 4, 0, 1, 0, 0), (6, 8, 100, 3, 2, 0, 1, 1, 0), (4, 6, 130, 2, 3, 1, 1, 1, 1),
            (3, 4, 7, 1, 4, 0, 0, 0, 0), (4, 12, 200, 4, 1, 1, 0, 1, 0), (2, 16, 64, 2, 4, 1, 1, 0, 1),
            (5, 6, 12, 5, 3, 1, 1, 1, 0), (3, 10, 33, 1, 5, 0, 1, 1, 1),
        ]
        for (r, c, p, fps, g, half, silu, has_vec, reuse), last in itertools.product(cases, (0, 1)):
            dt = torch.float16 if half else torch.float32
            norm = torch.nn.GroupNorm(g, c, eps=1e-6)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.5)
                norm.bias.normal_()
            norm = norm.to(dt)
            frames = (torch.randn(r, c, p) * 3 + 5).to(dt)  # an offset mean: where sums of squares would cancel
            vec = torch.randn(r, c).to(dt) if has_vec else None
            want = reference(frames, norm, fps, bool(silu), vec)
            # (R, C, P) rows, contiguous or channels-last: (R, P, C) in memory
            x = frames.transpose(1, 2).contiguous().transpose(1, 2) if last else frames.clone()
            assert norm_act.channels_last_rows(x) == bool(last)
            with torch.no_grad():
                out = norm_act.group_norm_rows(x, norm, fps, bool(silu), vec, reuse_input=bool(reuse))
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            same_memory, same_layout = out.data_ptr() == x.data_ptr(), out.stride() == x.stride()
            print(r, c, p, half, err, bool(torch.isfinite(out).all()), same_memory, reuse, same_layout)
        """
    )
    rows = interpreted(script)
    assert len(rows) == 16
    for r, c, p, half, err, finite, same_memory, reuse, same_layout in rows:
        assert finite == "True" and same_layout == "True", (r, c, p)  # every element written, in x's layout
        # float32: float rounding only; float16: the output's own rounding (2^-11 relative) and the SiLU's input's
        assert float(err) < (2e-3 if half == "1" else 1e-6), (r, c, p, err)
        assert same_memory == str(reuse == "1"), (r, c, p)


@needs_triton
def test_conv_epilogue_under_interpreter() -> None:
    # h + bias + skip in one pass, in place, summed in float32 and rounded once to h's dtype (the plain ops round
    # after each add); rows that share a program and rows cut into tiles; each operand absent
    script = textwrap.dedent(
        """
        import itertools
        import torch
        from img2vid import norm_act, norm_act_nhwc
        norm_act.MAX_TILE, norm_act.MIN_TILE = 64, 16
        norm_act_nhwc.CHANNELS, norm_act_nhwc.PIXELS = 4, 8
        torch.manual_seed(0)
        cases = [(2, 3, 10, 0, 1, 1), (3, 4, 200, 1, 1, 1), (2, 5, 96, 0, 0, 1), (4, 2, 7, 1, 1, 0)]
        for (r, c, p, half, has_bias, has_skip), last in itertools.product(cases, (0, 1)):
            dt = torch.float16 if half else torch.float32
            h, skip = torch.randn(r, c, p).to(dt), torch.randn(r, c, p).to(dt)
            if last:  # channels-last rows: (R, P, C) in memory
                h, skip = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (h, skip))
            bias = torch.randn(c).to(dt)
            want = h.float() + (bias.float()[:, None] if has_bias else 0) + (skip.float() if has_skip else 0)
            x = h.clone()
            out = norm_act.conv_epilogue(x, bias if has_bias else None, skip if has_skip else None)
            exact = torch.equal(out, want.to(dt))  # the same float32 adds in the same order, one rounding to dt
            print(r, c, p, exact, out.data_ptr() == x.data_ptr(), norm_act.channels_last_rows(x) == bool(last))
        """
    )
    rows = interpreted(script)
    assert len(rows) == 8
    for r, c, p, exact, in_place, layout in rows:
        assert exact == "True" and in_place == "True" and layout == "True", (r, c, p)


def mix_reference(alpha: torch.Tensor, spatial: torch.Tensor, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The reference's time mixer after its temporal residual add, op by op (each rounded to the dtype)."""
    return alpha * spatial + (1.0 - alpha) * (x + update)


@needs_triton
def test_time_mix_under_interpreter() -> None:
    # One pass, bit-identical to the reference's four ops (each product and sum rounded as they store it), written
    # over `update`; spatial a tensor of its own or x itself; a masked last block
    script = textwrap.dedent(
        """
        import torch
        from img2vid import norm_act
        from tests.test_norm_act import mix_reference
        norm_act.MIX_BLOCK = 64
        torch.manual_seed(0)
        # flat tensors, and channels-last (B*F, C, H, W) ones of 2 * 3 * 5 * 7 = 210 elements (the kernel walks memory)
        for n, half, same in [(64 * 5, 1, 0), (1000, 1, 1), (130, 0, 0), (777, 0, 1), (210, 1, 0)]:
            dt = torch.float16 if half else torch.float32
            alpha = torch.sigmoid(torch.randn(1)).to(dt)
            x, u, s = (torch.randn(n).to(dt) * k for k in (4, 1, 4))
            if n == 210:
                x, u, s = (t.view(2, 3, 5, 7).contiguous(memory_format=torch.channels_last) for t in (x, u, s))
            s = x if same else s
            want = mix_reference(alpha, s, x, u)
            upd = u.clone()
            out = norm_act.time_mix(alpha, 1.0 - alpha, s, x, upd)
            print(n, torch.equal(out, want), out.data_ptr() == upd.data_ptr(), bool((want != x + u).any()))
        """
    )
    rows = interpreted(script)
    assert len(rows) == 5
    for n, exact, in_place, mixed in rows:
        assert exact == "True" and in_place == "True" and mixed == "True", n


def mix_reference_bias(alpha: torch.Tensor, spatial: torch.Tensor, x: torch.Tensor, update: torch.Tensor, bias):
    """The reference after a conv whose bias PyTorch adds in an op of its own: the add rounded, then the mixer."""
    return mix_reference(alpha, spatial, x, update + bias.view(-1, *(1,) * (update.dim() - 2)))


@needs_triton
def test_time_mix_with_bias_under_interpreter() -> None:
    # The temporal conv's bias (C,) added in the same pass, rounded as PyTorch's separate add rounds it: the channel
    # of an element in NCHW (4-D and 3-D) and channels-last memory, channel counts that do not divide the block
    script = textwrap.dedent(
        """
        import torch
        from img2vid import norm_act
        from tests.test_norm_act import mix_reference_bias
        norm_act.MIX_BLOCK = 64
        torch.manual_seed(0)
        for shape, last, half, same in [((2, 3, 5, 7), 0, 1, 1), ((2, 3, 5, 7), 1, 1, 0), ((3, 6, 4, 5), 1, 0, 1),
                                        ((4, 5, 9), 0, 0, 0), ((2, 12, 3, 3), 1, 1, 1)]:
            dt = torch.float16 if half else torch.float32
            alpha = torch.sigmoid(torch.randn(1)).to(dt)
            x, u, s = (torch.randn(shape).to(dt) * k for k in (4, 1, 4))
            bias = torch.randn(shape[1]).to(dt) * 2
            if last:
                x, u, s = (t.contiguous(memory_format=torch.channels_last) for t in (x, u, s))
            s = x if same else s
            want = mix_reference_bias(alpha, s, x, u, bias)
            upd = u.clone()
            out = norm_act.time_mix(alpha, 1.0 - alpha, s, x, upd, bias)
            unbiased = norm_act.time_mix(alpha, 1.0 - alpha, s, x, u.clone())
            biased = bool((out != unbiased).any())
            print(len(shape), last, torch.equal(out, want), out.data_ptr() == upd.data_ptr(), biased)
        """
    )
    rows = interpreted(script)
    assert len(rows) == 5
    for dims, last, exact, in_place, biased in rows:
        assert exact == "True" and in_place == "True" and biased == "True", (dims, last)


def test_time_mixer_off_gpu() -> None:
    # The module's fallback is the reference's expression; the kernel is for CUDA
    from img2vid.unet_blocks import TimeMixer

    torch.manual_seed(0)
    mixer = TimeMixer()
    with torch.no_grad():
        mixer.mix_factor.fill_(0.3)
    s, x, u = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    assert not norm_act.time_mix_supported(s, x, u)
    alpha = torch.sigmoid(mixer.mix_factor)
    with torch.no_grad():
        assert torch.equal(mixer(s, x, u), mix_reference(alpha, s, x, u))
        assert torch.equal(mixer(x, x, u), mix_reference(alpha, x, x, u))
        bias = torch.randn(2)  # the temporal conv's bias, left to the mixer: added per channel (dim 1) first
        assert torch.equal(mixer(x, x, u, bias), mix_reference_bias(alpha, x, x, u, bias))


@pytest.mark.parametrize("shortcut", [False, True])
def test_conv_epilogue_off_gpu(shortcut: bool) -> None:
    torch.manual_seed(0)
    h, skip, bias = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5), torch.randn(4)
    assert not norm_act.epilogue_supported(h, bias, skip)
    want = h + bias[:, None, None] + skip
    with torch.no_grad():
        got = layers.conv_epilogue(h.clone(), bias, skip if shortcut else None)
    torch.testing.assert_close(got, want if shortcut else want - skip)
    # with autograd on, the plain ops run out of place and keep the graph
    hg = h.clone().requires_grad_()
    out = layers.conv_epilogue(hg, bias, skip)
    out.sum().backward()
    assert torch.equal(hg.grad, torch.ones_like(h))


def test_tile_for() -> None:
    assert norm_act.tile_for(576 * 1024) == (1, norm_act.MAX_TILE)  # the decoder's full resolution: 144 whole tiles
    assert norm_act.tile_for(72 * 128) == (1, 1024)  # the UNet's first level: 9 whole tiles a row
    assert norm_act.tile_for(100_003) == (1, norm_act.MAX_TILE)  # a prime: a masked last tile
    assert norm_act.tile_for(36 * 64) == (1, 4096)  # the second level: one masked tile a row
    assert norm_act.tile_for(9 * 16) == (norm_act.MAX_TILE // 256, 256)  # the fourth level: rows to a program


@pytest.mark.parametrize("vec", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_off_gpu_is_the_module(silu: bool, vec: bool) -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    x = torch.randn(3, 8, 5, 6)
    v = torch.randn(3, 8) if vec else None
    assert not norm_act.supported(x, norm, v)  # CPU: the kernels are for CUDA
    want = norm(x if v is None else x + v[:, :, None, None])
    want = F.silu(want) if silu else want
    keep = x.clone()
    got = layers.group_norm(x, norm, silu=silu, vec=v, reuse_input=True)
    assert torch.equal(got, want)
    assert torch.equal(x, keep)  # the fallback never writes over its input


@pytest.mark.parametrize("vec", [False, True])
def test_video_group_norm_off_gpu(vec: bool) -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 6)
    frames = torch.randn(2, 5, 6, 4, 3)  # (B, F, C, H, W) NCHW frames
    v = torch.randn(2, 5, 6) if vec else None  # (B, F, C)
    x5 = frames.transpose(1, 2)  # (B, C, F, H, W), the view the temporal blocks see
    got = layers.video_group_norm(x5, norm, silu=True, vec=v)
    xin = x5 if v is None else x5 + v.permute(0, 2, 1)[..., None, None]
    want = F.silu(F.group_norm(xin.contiguous(), 2, norm.weight, norm.bias, norm.eps))
    assert got.stride() == x5.stride()  # the frames' layout is kept
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("last", [False, True])
def test_kernels_on_gpu(dtype: torch.dtype, last: bool) -> None:
    # Where the kernels run (Ampere or later), they agree with float64 as closely as PyTorch's own kernel does, on
    # NCHW frames and on channels-last ones (whose layout the output keeps)
    g = torch.Generator(device="cuda").manual_seed(0)
    for r, c, p, fps in [(2, 128, 96 * 160, 1), (6, 64, 48 * 64, 3), (4, 96, 1000, 2)]:
        norm = torch.nn.GroupNorm(32, c, eps=1e-6).cuda().to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(c, generator=g, device="cuda") * 0.5 + 1)
            norm.bias.copy_(torch.randn(c, generator=g, device="cuda"))
        frames = (torch.randn(r, c, p, generator=g, device="cuda") * 2 + 1).to(dtype)
        vec = torch.randn(r, c, generator=g, device="cuda").to(dtype)
        if last:  # (R, P, C) in memory
            frames = frames.transpose(1, 2).contiguous().transpose(1, 2)
        with torch.no_grad():
            x5 = frames.view(r // fps, fps, c, p, 1).transpose(1, 2)  # (B, C, F, P, 1)
            got = layers.video_group_norm(x5, norm, silu=True, vec=vec.view(r // fps, fps, c))
            assert got.stride() == x5.stride()
            want = reference(frames, norm, fps, True, vec)
            torch_kernel = F.silu(
                F.group_norm(
                    x5.contiguous() + vec.view(r // fps, fps, c).permute(0, 2, 1)[..., None, None],
                    32,
                    norm.weight,
                    norm.bias,
                    norm.eps,
                )
            )
        got = got.transpose(1, 2).reshape(r, c, p).double()
        torch_kernel = torch_kernel.transpose(1, 2).reshape(r, c, p).double()
        err = ((got - want).abs().max() / want.abs().max()).item()
        bar = ((torch_kernel - want).abs().max() / want.abs().max()).item()
        assert err <= 1.5 * bar + 1e-6, (r, c, p, err, bar)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("last", [False, True])
def test_conv_epilogue_on_gpu(last: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    fmt = torch.channels_last if last else torch.contiguous_format
    for n, c, hw in [(2, 128, (48, 64)), (3, 40, (9, 16))]:
        h = torch.randn(n, c, *hw, generator=g, device="cuda").half().contiguous(memory_format=fmt)
        skip = torch.randn(n, c, *hw, generator=g, device="cuda").half().contiguous(memory_format=fmt)
        bias = torch.randn(c, generator=g, device="cuda").half()
        want = (h.float() + bias.float()[:, None, None] + skip.float()).half()  # float32 adds, one rounding
        with torch.no_grad():
            got = layers.conv_epilogue(h.clone(), bias, skip)
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_time_mix_on_gpu(dtype: torch.dtype) -> None:
    # Where the kernel runs (Ampere or later), the UNet's time mixer equals the reference's four kernels bit for bit
    from img2vid.unet_blocks import TimeMixer

    g = torch.Generator(device="cuda").manual_seed(0)
    mixer = TimeMixer().cuda().to(dtype)
    with torch.no_grad():
        mixer.mix_factor.fill_(-0.7)
    alpha = torch.sigmoid(mixer.mix_factor).to(dtype)
    for shape, fmt in [((50, 320, 72, 128), torch.contiguous_format), ((6, 1000, 7), torch.contiguous_format),
                       ((10, 64, 9, 16), torch.channels_last)]:  # fmt: skip
        s, x, u = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(3))
        s, x, u = (t.contiguous(memory_format=fmt) for t in (s, x, u))
        bias = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
        for spatial, b in [(s, None), (x, None), (x, bias), (s, bias)]:
            want = mix_reference(alpha, spatial, x, u) if b is None else mix_reference_bias(alpha, spatial, x, u, b)
            upd = u.clone()
            with torch.no_grad():
                runs = fused._kernels_run_on(torch.device("cuda"))
                assert norm_act.time_mix_supported(spatial, x, upd, b) == runs
                got = mixer(spatial, x, upd, b)
            assert torch.equal(got, want)
