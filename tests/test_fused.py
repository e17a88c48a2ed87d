"""The fused GEGLU kernel (`fused.geglu_linear`) against the plain ops. Its Triton kernel runs on the CPU under
Triton's interpreter (in a subprocess: the interpreter is chosen when the kernel is first built), so CI checks the
kernel's maths and its edge tiles without a GPU; speed is measured by benchmarks/svd_kernels.py on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs_triton

from img2vid import frame_kernel, fused
from img2vid.unet_transformer import GEGLU


@needs_triton
def test_kernel_matches_reference_under_interpreter() -> None:
    # Shapes with ragged edges: M and N not multiples of the tile, K not a multiple of BLOCK_K, and more tiles than
    # programs (the CPU counts as 4 SMs), so each persistent program loops over several tiles.
    script = textwrap.dedent(
        """
        import torch
        from img2vid import fused
        torch.manual_seed(0)
        for m, k, n, tiles in [
            (256, 64, 64, fused.Tiles(64, 32, 32, 4, 2, 1)),
            (200, 96, 40, fused.Tiles(64, 32, 32, 4, 2, 1)),
            (130, 72, 48, fused.Tiles(32, 16, 32, 4, 2, 2)),
            (136, 320, 80, fused.tiles_for(320)),  # the tiles the op runs at SVD's shapes, with ragged edges
            (136, 1280, 72, fused.tiles_for(1280)),
        ]:
            x = torch.randn(m, k, dtype=torch.float64)
            w = torch.randn(2 * n, k, dtype=torch.float64) / k**0.5
            b = torch.randn(2 * n, dtype=torch.float64)
            exact = fused.geglu_reference(x, w, b)
            half = fused.geglu_reference(x.half(), w.half(), b.half()).double()
            ref_err = ((half - exact).norm() / exact.norm()).item()
            # the TMA kernel (Hopper on), then the one that loads through pointers (Ampere, Ada) with its own tiles
            # and with small ones (several K blocks, ragged last ones)
            for launch, t in [(fused.launch_geglu, tiles), (fused.launch_geglu_loads, fused.LOAD_TILES),
                              (fused.launch_geglu_loads, fused.Tiles(32, 16, 16, 4, 2, 1))]:  # fmt: skip
                out = torch.full((m, n), float("nan"), dtype=torch.float16)
                launch(x.half(), w.half(), b.half(), out, t)
                err = ((out.double() - exact).norm() / exact.norm()).item()
                print(m, k, n, err, ref_err, bool(torch.isfinite(out).all()))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    rows = [line.split() for line in lines if line.strip()]
    assert len(rows) == 5 * 3
    for m, k, n, err, ref_err, finite in rows:
        assert finite == "True", (m, k, n)  # every output element written
        # The same function as the plain float16 ops: its error from the exact value is theirs, up to rounding.
        assert float(err) < 1e-3 and float(err) < 1.5 * float(ref_err) + 1e-4, (m, k, n, err, ref_err)


def test_op_computes_the_reference_where_the_kernel_cannot_run() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(10, 16), torch.randn(24, 16), torch.randn(24)
    assert not fused.kernel_fits(x, w)  # not a CUDA tensor
    torch.testing.assert_close(fused.geglu_linear(x, w, b), fused.geglu_reference(x, w, b))
    torch.library.opcheck(fused.geglu_linear, (x, w, b))


def test_geglu_module_off_gpu_uses_the_plain_ops() -> None:
    torch.manual_seed(0)
    m = GEGLU(8, 12)
    x = torch.randn(2, 5, 8)
    assert not fused.geglu_supported(x, m.proj.weight)
    h, gate = m.proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(m(x), h * torch.nn.functional.gelu(gate))


@pytest.mark.parametrize(
    "capability, hip, kernels, tma",
    [((7, 5), None, False, False), ((8, 0), None, True, False), ((8, 6), None, True, False),
     ((9, 0), None, True, True), ((10, 0), None, True, True), ((9, 4), "6.2", False, False)],
)  # fmt: skip
def test_which_cards_run_the_kernels(monkeypatch: pytest.MonkeyPatch, capability, hip, kernels, tma) -> None:
    # NVIDIA Ampere and later run the kernels, Hopper and later the GEGLU's too (TMA); older cards and ROCm builds
    # (whose torch.cuda reports AMD capabilities) keep PyTorch's ops
    monkeypatch.setattr(fused, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    device = torch.device("cuda", 0)
    for gate in (fused._kernels_run_on, fused._tma_runs_on):
        gate.cache_clear()
    try:
        assert fused._kernels_run_on(device) == kernels
        assert fused._tma_runs_on(device) == tma
    finally:  # the answers cached for this fake card must not outlive it
        for gate in (fused._kernels_run_on, fused._tma_runs_on):
            gate.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tma", [True, False])
def test_op_on_a_gpu_matches_float64_as_the_plain_ops_do(monkeypatch: pytest.MonkeyPatch, tma: bool) -> None:
    # The op on a GPU: the TMA kernel where the card has TMA (Hopper on), else (simulated on this card: an Ampere or
    # Ada card's path) the kernel that loads through pointers. SVD's level widths, rows not a multiple of the tile.
    if not tma:
        monkeypatch.setattr(fused, "_tma_runs_on", lambda device: False)
    g = torch.Generator(device="cuda").manual_seed(0)
    for k in (320, 640, 1280):
        x = torch.randn(1000, k, generator=g, device="cuda", dtype=torch.float64)
        w = torch.randn(8 * k, k, generator=g, device="cuda", dtype=torch.float64) / k**0.5
        b = torch.randn(8 * k, generator=g, device="cuda", dtype=torch.float64)
        assert fused.kernel_fits(x.half(), w.half()) == fused._kernels_run_on(x.device)
        exact = fused.geglu_reference(x, w, b)
        with torch.no_grad():
            out = fused.geglu_linear_impl(x.half(), w.half(), b.half()).double()
        half = fused.geglu_reference(x.half(), w.half(), b.half()).double()
        err, ref_err = (((t - exact).norm() / exact.norm()).item() for t in (out, half))
        assert err < 1e-3 and err < 1.5 * ref_err + 1e-4, (k, err, ref_err)


# ---- the frame-attention kernel ----------------------------------------------------------------------------------


@needs_triton
def test_frame_kernel_matches_float64_under_interpreter() -> None:
    # Frame counts that pad to 32 and to 16, pair counts that are not multiples of the pairs per program (the last
    # program of each video is partial), two videos (the per-video offset), and every head width the kernel takes.
    script = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from img2vid import frame_kernel
        torch.manual_seed(0)
        for b, f, n, heads, d, per, warps in [
            (2, 25, 6, 2, 64, frame_kernel.FRAME_PAIRS_PER_PROGRAM, frame_kernel.FRAME_WARPS),
            (2, 14, 13, 3, 32, 4, 4),
            (1, 3, 5, 1, 128, 2, 2),
            (2, 25, 7, 1, 64, 4, 4),
        ]:
            q, k, v = (torch.randn(b * f, n, heads * d, dtype=torch.float64) for _ in range(3))
            def heads_view(t):  # (B*F, N, H*D) -> (B, N*H, F, D)
                return t.view(b, f, n * heads, d).transpose(1, 2)
            def frames_view(t):  # (B, N*H, F, D) -> (B*F, N, H*D)
                return t.transpose(1, 2).reshape(b * f, n, heads * d)
            exact = frames_view(F.scaled_dot_product_attention(*(heads_view(t) for t in (q, k, v))))
            q16, k16, v16 = q.half(), k.half(), v.half()
            # what torch computes from the same half inputs in float32, rounded once: the bar to meet
            bar = frames_view(F.scaled_dot_product_attention(*(heads_view(t.float()) for t in (q16, k16, v16)))).half()
            out = torch.full_like(q16, float("nan"))
            frame_kernel.launch_frame_attention(q16, k16, v16, out, heads, f, per, warps)
            err = ((out.double() - exact).norm() / exact.norm()).item()
            bar_err = ((bar.double() - exact).norm() / exact.norm()).item()
            print(b, f, n, heads, d, err, bar_err, bool(torch.isfinite(out).all()))
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.split("\n") if line.strip()]
    assert len(rows) == 4
    for *shape, err, bar_err, finite in rows:
        assert finite == "True", shape  # every (frame, pair) of every video written
        assert float(err) < 1e-3 and float(err) < 1.2 * float(bar_err) + 1e-5, (shape, err, bar_err)


def test_frame_attention_op_runs_sdpa_where_the_kernel_cannot() -> None:
    from img2vid import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * 5, 6, 2 * 8) for _ in range(3))  # 2 videos of 5 frames, 6 pixels, 2 heads of 8
    assert not frame_kernel.frame_attention_supported(q, k, v, 2)  # a CPU tensor: layers keeps SDPA itself
    assert not frame_kernel.frame_kernel_fits(q, k, v, 5)
    out = frame_kernel.frame_attention(q, k, v, 2, 5)
    torch.testing.assert_close(out, attention.frame_attention_sdpa(q, k, v, 2, 5))
    assert out.is_contiguous()
    torch.library.opcheck(frame_kernel.frame_attention, (q, k, v, 2, 5))


def test_layers_frame_attention_dispatches_to_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the op is supported, layers.frame_attention calls it (inside compiled graphs too: the op's fake
    implementation traces), or in eager inference its function directly (fused.direct_calls); on the CPU the
    function then returns the SDPA path."""
    from img2vid import attention, layers

    calls = []
    real_impl, real_op = frame_kernel.frame_attention_impl, frame_kernel.frame_attention

    def spy(kind, fn):
        def call(*args):
            calls.append((kind, *args[3:]))
            return fn(*args)

        return call

    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * 3, 4, 2 * 8) for _ in range(3))
    expected = attention.frame_attention_sdpa(q, k, v, 2, 3)
    monkeypatch.setattr(frame_kernel, "frame_attention_supported", lambda *a: True)
    monkeypatch.setattr(frame_kernel, "frame_attention_impl", spy("impl", real_impl))
    monkeypatch.setattr(frame_kernel, "frame_attention", spy("op", real_op))
    torch.testing.assert_close(layers.frame_attention(q, k, v, 2, 3), expected)  # autograd on: the op
    with torch.no_grad():
        torch.testing.assert_close(layers.frame_attention(q, k, v, 2, 3), expected)
    assert calls == [("op", 2, 3), ("impl", 2, 3)]
    monkeypatch.setattr(frame_kernel, "frame_attention_impl", real_impl)
    monkeypatch.setattr(frame_kernel, "frame_attention", real_op)
    compiled = torch.compile(layers.frame_attention, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, 2, 3), expected)
