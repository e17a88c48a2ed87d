"""The residual add fused with the next LayerNorm (`add_norm`): its Triton kernel under Triton's CPU interpreter
against float64, the op's fallback, and the dispatch from the transformer blocks (eager and compiled). Speed is a
benchmark's business (BENCHMARKS.md), not a test's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_triton

from img2vid import add_norm as an


def plain(x, y, vec, div, norm, vec_in_sum=True):
    """The reference's ops, row vectors indexed one row at a time (no broadcast tricks)."""
    s = x + y
    t = s
    if vec is not None:
        t = s + vec[torch.arange(s.shape[0]) // div % vec.shape[0]]
        s = t if vec_in_sum else s
    return s, F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)


@needs_triton
def test_kernel_matches_float64_under_interpreter() -> None:
    # Widths that pad to a power of two (320 -> 512, 40 -> 64) and one that does not pad, rows that leave the last
    # program partial, vectors per video and per frame, in the sum or in the norm's input only, one with a ragged
    # last period; and the plain norm (no y, no stored sum: the rows with y = 0 below), alone and of the input plus a
    # bias vector (`layer_norm_rows`)
    script = textwrap.dedent(
        """
        import torch
        from img2vid import add_norm as an
        torch.manual_seed(0)
        for m, c, v, div, in_sum, has_y in [(64, 320, 2, 32, 1, 1), (50, 40, 5, 3, 1, 1), (7, 1280, 0, 1, 1, 1),
                                            (33, 96, 4, 1, 0, 1), (21, 64, 3, 5, 0, 1), (40, 320, 0, 1, 1, 0),
                                            (48, 320, 1, 1, 0, 0)]:
            x, y = torch.randn(m, c, dtype=torch.float64), torch.randn(m, c, dtype=torch.float64)
            y = y if has_y else torch.zeros_like(x)
            vec = torch.randn(v, c, dtype=torch.float64) if v else None
            w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
            s_ref, n_ref = an.add_norm_reference(x, y, vec, div, bool(in_sum), w, b, 1e-5)
            h = [t.half() if t is not None else None for t in (x, y, vec, w, b)]
            s_half, n_half = an.add_norm_reference(h[0].float(), h[1].float(), h[2].float() if v else None, div,
                                                   bool(in_sum), h[3].float(), h[4].float(), 1e-5)
            s, n = (torch.full((m, c), float("nan"), dtype=torch.float16) for _ in range(2))
            if has_y:
                an.launch_add_norm(h[0], h[1], h[2], div, bool(in_sum), h[3], h[4], 1e-5, s, n)
            else:
                an.launch_add_norm(h[0], None, h[2], div, bool(in_sum), h[3], h[4], 1e-5, None, n)
                s = h[0]  # not written: the input itself is the sum
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
    assert len(rows) == 7
    for m, c, err_s, err_n, bar, finite in rows:
        assert finite == "True", (m, c)  # every row and column written
        assert float(err_s) < 1e-3 and float(err_n) < 1e-3, (m, c, err_s, err_n)
        assert max(float(err_s), float(err_n)) < 1.5 * float(bar) + 1e-5, (m, c, err_s, err_n, bar)


@pytest.mark.parametrize("vec_in_sum", [True, False])
@pytest.mark.parametrize("vec_rows, div", [(0, 1), (2, 12), (3, 4), (5, 7)])  # (5, 7): a ragged last period
def test_op_off_gpu_is_the_plain_ops(vec_rows: int, div: int, vec_in_sum: bool) -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x, y = torch.randn(24, 16), torch.randn(24, 16)
    vec = torch.randn(vec_rows, 16) if vec_rows else None
    assert not an.norm_supported(x, norm, y)  # a CPU tensor: the wrappers run the plain ops themselves
    expected = plain(x, y, vec, div, norm, vec_in_sum)
    w, b = norm.weight.detach(), norm.bias.detach()  # the ops have no autograd formula (gradients take the plain ops)
    for got in (
        an.add_layer_norm(x, y, vec, div, vec_in_sum, w, b, norm.eps),
        an.add_norm(x, y, norm, vec, div, vec_in_sum),
    ):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    torch.library.opcheck(an.add_layer_norm, (x, y, vec, div, vec_in_sum, w, b, norm.eps))
    row = torch.randn(16)
    for v in (None, row[None]):
        torch.library.opcheck(an.layer_norm_rows, (x, v, w, b, norm.eps))
    torch.testing.assert_close(an.layer_norm(x, norm), norm(x))
    torch.testing.assert_close(an.layer_norm(x, norm, row), norm(x + row))  # a bias left to the norm


def test_wrapper_dispatches_to_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the op is supported, add_norm calls it with the tokens flattened to rows: eager inference its function
    directly (fused.direct_calls), the custom op itself under a dispatch mode and inside compiled graphs (the op's
    fake implementation traces); on the CPU the function then returns the plain ops."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = []
    real_impl, real_op = an.add_layer_norm_impl, an.add_layer_norm

    def spy(kind, fn):
        def call(*args):
            calls.append((kind, tuple(args[0].shape), args[3], args[4]))
            return fn(*args)

        return call

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8).eval()
    x, y = torch.randn(6, 5, 8), torch.randn(6, 5, 8)  # (B*F, L, C): 2 videos of 3 frames, 5 tokens
    pos = torch.randn(3, 8)  # one vector per frame: token row r is in frame (r // 5) % 3
    expected = plain(x.reshape(30, 8), y.reshape(30, 8), pos, 5, norm, vec_in_sum=False)
    monkeypatch.setattr(an, "norm_supported", lambda *a: True)
    monkeypatch.setattr(an, "add_layer_norm_impl", spy("impl", real_impl))
    monkeypatch.setattr(an, "add_layer_norm", spy("op", real_op))
    with torch.no_grad():
        s, n = an.add_norm(x, y, norm, pos, 5, vec_in_sum=False)
        with FlopCounterMode(display=False):
            an.add_norm(x, y, norm, pos, 5, vec_in_sum=False)
    assert s.shape == n.shape == (6, 5, 8)
    torch.testing.assert_close(s.reshape(30, 8), expected[0])
    torch.testing.assert_close(n.reshape(30, 8), expected[1])
    assert calls == [("impl", (30, 8), 5, False), ("op", (30, 8), 5, False)]
    monkeypatch.setattr(an, "add_layer_norm_impl", real_impl)
    monkeypatch.setattr(an, "add_layer_norm", real_op)
    compiled = torch.compile(lambda *a: an.add_norm(*a), fullgraph=True, dynamic=False)
    with torch.no_grad():
        s, n = compiled(x, y, norm, pos, 5, False)
    torch.testing.assert_close(n.reshape(30, 8), expected[1])


def test_transformer_blocks_take_the_fused_path_per_video_and_per_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spatio-temporal transformer sends its residual adds through add_norm, with the cross-attention update
    as one vector per video and the frame embedding as one vector per frame (its values against diffusers are
    test_unet's parity tests)."""
    from img2vid import unet_transformer as ub

    torch.manual_seed(0)
    m = ub.SpatioTemporalTransformer(32, 2, 16, 1, 8).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2 * 3, 32, 2, 3)  # 2 videos of 3 frames, 2x3 pixels
    ctx = torch.randn(2, 1, 16)
    seen = []
    real = an.add_norm

    def spy(x, y, norm, vec=None, div=1, vec_in_sum=True):
        seen.append((None if vec is None else tuple(vec.shape), div, vec_in_sum))
        return real(x, y, norm, vec, div, vec_in_sum)

    monkeypatch.setattr(ub, "add_norm", spy)
    with torch.no_grad():
        assert torch.isfinite(m(x, ctx, 3)).all()
    # spatial: the cross update per video (2 vectors, 3 frames x 6 tokens a video); the spatial output with the
    # temporal block's first norm of it plus the frame embedding (3 vectors, one per 6 tokens), then the frame
    # embedding in the first residual add, then the cross update again
    assert seen == [((2, 32), 18, True), ((3, 32), 6, False), ((3, 32), 6, True), ((2, 32), 18, True)]
