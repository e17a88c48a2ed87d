"""The residual add fused with the next LayerNorm (`add_norm`): its Triton kernel under Triton's CPU interpreter
against float64, the op's fallback, and the dispatch from the transformer blocks (eager and compiled). Speed is a
benchmark's business (BENCHMARKS.md), not a test's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from img2vid import add_norm as an

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def plain(x, y, vec, div, norm):
    """The reference's ops, row vectors indexed one row at a time (no broadcast tricks)."""
    s = x + y
    if vec is not None:
        rows = torch.arange(s.shape[0]) // div % vec.shape[0]
        s = s + vec[rows]
    return s, F.layer_norm(s, s.shape[-1:], norm.weight, norm.bias, norm.eps)


@needs_triton
def test_kernel_matches_float64_under_interpreter() -> None:
    # Widths that pad to a power of two (320 -> 512, 40 -> 64) and one that does not pad, rows that leave the last
    # program partial, vectors per video and per frame, and one with a ragged last period
    script = textwrap.dedent(
        """
        import torch
        from img2vid import add_norm as an
        torch.manual_seed(0)
        for m, c, v, div in [(64, 320, 2, 32), (50, 40, 5, 3), (7, 1280, 0, 1), (33, 96, 4, 1), (21, 64, 3, 5)]:
            x, y = torch.randn(m, c, dtype=torch.float64), torch.randn(m, c, dtype=torch.float64)
            vec = torch.randn(v, c, dtype=torch.float64) if v else None
            w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
            s_ref, n_ref = an.add_norm_reference(x, y, vec, div, w, b, 1e-5)
            h = [t.half() if t is not None else None for t in (x, y, vec, w, b)]
            s_half, n_half = an.add_norm_reference(h[0].float(), h[1].float(), h[2].float() if v else None, div,
                                                   h[3].float(), h[4].float(), 1e-5)
            s, n = (torch.full((m, c), float("nan"), dtype=torch.float16) for _ in range(2))
            an.launch_add_norm(h[0], h[1], h[2], div, h[3], h[4], 1e-5, s, n)
            rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
            finite = bool(torch.isfinite(s).all() and torch.isfinite(n).all())
            # the error of the float16 inputs alone (computed in float32, rounded once), against the kernel's
            bar = max(rel(s_half.half(), s_ref), rel(n_half.half(), n_ref))
            print(m, c, rel(s, s_ref), rel(n, n_ref), bar, finite)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.split("\n") if line.strip()]
    assert len(rows) == 5
    for m, c, err_s, err_n, bar, finite in rows:
        assert finite == "True", (m, c)  # every row and column written
        assert float(err_s) < 1e-3 and float(err_n) < 1e-3, (m, c, err_s, err_n)
        assert max(float(err_s), float(err_n)) < 1.5 * float(bar) + 1e-5, (m, c, err_s, err_n, bar)


@pytest.mark.parametrize("vec_rows, div", [(0, 1), (2, 12), (3, 4), (5, 7)])  # (5, 7): a ragged last period
def test_op_off_gpu_is_the_plain_ops(vec_rows: int, div: int) -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, y = torch.randn(24, 16), torch.randn(24, 16)
    vec = torch.randn(vec_rows, 16) if vec_rows else None
    assert not an.add_norm_supported(x, y, norm)  # a CPU tensor: the wrapper runs the plain ops itself
    expected = plain(x, y, vec, div, norm)
    for got in (an.add_layer_norm(x, y, vec, div, norm.weight, norm.bias, norm.eps), an.add_norm(x, y, norm, vec, div)):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    # the op has no autograd formula (add_norm_supported sends gradients to the plain ops): plain tensors here
    torch.library.opcheck(an.add_layer_norm, (x, y, vec, div, norm.weight.detach(), norm.bias.detach(), norm.eps))


def test_wrapper_dispatches_to_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the op is supported, add_norm calls it with the tokens flattened to rows (inside compiled graphs too:
    the op's fake implementation traces); on the CPU the op itself then returns the plain ops."""
    calls = []
    real_op = an.add_layer_norm

    def spy(*args):
        calls.append((tuple(args[0].shape), args[3]))
        return real_op(*args)

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8).eval()
    x, y = torch.randn(6, 5, 8), torch.randn(6, 5, 8)  # (B*F, L, C): 2 videos of 3 frames, 5 tokens
    pos = torch.randn(3, 8)  # one vector per frame: token row r is in frame (r // 5) % 3
    expected = plain(x.reshape(30, 8), y.reshape(30, 8), pos, 5, norm)
    monkeypatch.setattr(an, "add_norm_supported", lambda *a: True)
    monkeypatch.setattr(an, "add_layer_norm", spy)
    s, n = an.add_norm(x, y, norm, pos, 5)
    assert s.shape == n.shape == (6, 5, 8)
    torch.testing.assert_close(s.reshape(30, 8), expected[0])
    torch.testing.assert_close(n.reshape(30, 8), expected[1])
    assert calls == [((30, 8), 5)]
    monkeypatch.setattr(an, "add_layer_norm", real_op)
    compiled = torch.compile(lambda *a: an.add_norm(*a), fullgraph=True, dynamic=False)
    with torch.no_grad():
        s, n = compiled(x, y, norm, pos, 5)
    torch.testing.assert_close(n.reshape(30, 8), expected[1])


def test_transformer_blocks_take_the_fused_path_per_video_and_per_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spatio-temporal transformer sends its residual adds through add_norm, with the cross-attention update
    as one vector per video and the frame embedding as one vector per frame (its values against diffusers are
    test_unet's parity tests)."""
    from img2vid import unet_blocks as ub

    torch.manual_seed(0)
    m = ub.SpatioTemporalTransformer(32, 2, 16, 1, 8).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2 * 3, 32, 2, 3)  # 2 videos of 3 frames, 2x3 pixels
    ctx = torch.randn(2, 1, 16)
    seen = []
    real = an.add_norm

    def spy(x, y, norm, vec=None, div=1):
        seen.append((None if vec is None else tuple(vec.shape), div))
        return real(x, y, norm, vec, div)

    monkeypatch.setattr(ub, "add_norm", spy)
    with torch.no_grad():
        assert torch.isfinite(m(x, ctx, 3)).all()
    # spatial: cross update per video (2 vectors, 3 frames x 6 tokens a video); temporal: the frame embedding
    # (3 vectors, one per 6 tokens), then the cross update again
    assert seen == [((2, 32), 18), ((3, 32), 6), ((2, 32), 18)]
