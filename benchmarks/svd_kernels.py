#!/usr/bin/env python3
"""Micro-benchmarks of img2vid's own kernels against what they replace, at SVD-XT's shapes.

    python benchmarks/svd_kernels.py            # on the GPU: tile sweep of the fused GEGLU, frame attention
    python benchmarks/svd_kernels.py --tiny     # logic check on the CPU (Triton's interpreter, tiny shapes)
    python benchmarks/svd_kernels.py --sections add_norm   # some of the sections below only

1. The fused GEGLU projection (`fused.geglu_linear`) against the compiled reference (`torch.compile` of
   linear + chunk + gelu * h: cuBLAS for the product, one inductor kernel for the gating), per UNet level
   (M tokens = 2 guidance halves x 25 frames x pixels), for a sweep of tile shapes. Relative errors are against the
   same maths in float32.
2. Attention along the frame axis (the temporal blocks, frame-major q, k, v): SDPA's memory-efficient kernel on
   strided views (`attention.frame_attention_sdpa`) against img2vid's Triton kernel (`frame_kernel.frame_attention`),
   both compiled; errors against float64.
3. The VAE mid block's single 512-wide head over a 72x128 latent frame, 8 frames (a decode chunk): SDPA (its
   memory-efficient kernel: flash and cuDNN stop at head dim 256) against `attention.wide_head_attention` compiled
   (what compiled graphs run), errors against float64 on the first frame.
4. The transformer blocks' residual add + LayerNorm per UNet level (s = x + y + a vector per video, n = norm(s),
   both written): PyTorch's eager kernels, the same ops compiled (one inductor kernel), and img2vid's kernel
   (`add_norm.add_layer_norm`); errors of n against float64.
Prints median milliseconds of 20 calls and writes the same table to --out/svd_kernels.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_utils import median_event_ms, rel  # noqa: E402

from img2vid import add_norm, attention, frame_kernel, fused  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--sections", default="geglu,frame,wide,add_norm", help="comma list of: geglu, frame, wide, add_norm")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
args = ap.parse_args()
if args.tiny:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first built, below

DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
DT = torch.float16
# (name, M, K, N): GEGLU projections (K -> 2N) per level; 2 x 25 frames of 72x128, 36x64, 18x32, 9x16 latents
GEGLU_SHAPES = (
    [("tiny", 200, 64, 48)]
    if args.tiny
    else [("L1", 460800, 320, 1280), ("L2", 115200, 640, 2560), ("L3", 28800, 1280, 5120), ("mid", 7200, 1280, 5120)]
)
TILES = (
    [fused.Tiles(64, 32, 32, 4, 2, 1)]
    if args.tiny
    else [
        fused.SHORT_K_TILES,
        fused.LONG_K_TILES,
        fused.Tiles(128, 64, 64, 8, 4, 1),
        fused.Tiles(128, 64, 32, 8, 5, 2),
        fused.Tiles(128, 128, 64, 8, 3, 1),
        fused.Tiles(128, 128, 32, 8, 6, 1),
        fused.Tiles(64, 128, 64, 4, 3, 2),
        fused.Tiles(256, 64, 64, 8, 3, 1),
    ]
)
# (name, videos, frames, pixels, heads): the temporal blocks' attention per UNet level (2 videos: the guidance halves)
ATTN_SHAPES = (
    [("tiny", 2, 5, 6, 2)]
    if args.tiny
    else [("L1", 2, 25, 9216, 5), ("L2", 2, 25, 2304, 10), ("L3", 2, 25, 576, 20), ("L4", 2, 25, 144, 20)]
)
# (frames, tokens, head dim) of the VAE mid-block attention; the tiny check runs float32 (no half bmm on the CPU)
WIDE_SHAPE = (2, 20, 300) if args.tiny else (8, 9216, 512)
# (name, rows M, channels C, videos): the residual stream per level (2 x 25 frames x pixels tokens)
NORM_SHAPES = (
    [("tiny", 60, 40, 2)] if args.tiny else [("L1", 460800, 320, 2), ("L2", 115200, 640, 2), ("L3", 28800, 1280, 2)]
)
ROWS: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    ROWS.append(line)


def median_ms(fn, reps: int) -> float:
    fn()
    if DEV.type != "cuda":
        return float("nan")
    return median_event_ms(fn, reps)


@torch.no_grad()
def geglu_rows() -> None:
    compiled_ref = torch.compile(fused.geglu_reference, fullgraph=True, dynamic=False)
    for name, m, k, n in GEGLU_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(m, k, generator=g).to(DEV, DT)
        w = (torch.randn(2 * n, k, generator=g) / k**0.5).to(DEV, DT)
        b = (torch.randn(2 * n, generator=g) * 0.1).to(DEV, DT)
        truth = fused.geglu_reference(x.float(), w.float(), b.float())
        tflop = 2 * m * k * 2 * n / 1e12
        ref = compiled_ref(x, w, b) if DEV.type == "cuda" else fused.geglu_reference(x, w, b)
        ms = median_ms(partial(compiled_ref, x, w, b), 20) if DEV.type == "cuda" else float("nan")
        say(f"geglu {name:4s} M={m} K={k} N={n}: compiled reference {ms:.3f} ms ({tflop / ms * 1e3:.0f} TF/s), "
            f"err {rel(ref, truth):.1e}")  # fmt: skip
        out = torch.empty(m, n, device=DEV, dtype=DT)
        for t in TILES:
            try:
                ms = median_ms(partial(fused.launch_geglu, x, w, b, out, t), 20)
            except Exception as e:  # a tile shape this card cannot hold (shared memory): report, go on
                say(f"geglu {name:4s}   {tuple(t)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            say(f"geglu {name:4s}   {tuple(t)}: {ms:.3f} ms ({tflop / ms * 1e3:.0f} TF/s), err {rel(out, truth):.1e}, "
                f"vs reference output {rel(out, ref):.1e}")  # fmt: skip
        if DEV.type == "cuda":
            got = fused.geglu_linear(x, w, b)  # the op with its tile choice
            say(f"geglu {name:4s}   op tiles {tuple(fused.tiles_for(k))}: err {rel(got, truth):.1e}")


@torch.no_grad()
def attention_rows() -> None:
    for name, videos, frames, pixels, heads in ATTN_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        # frame-major projections (B*F, N, heads*64), as the temporal blocks hand them to layers.frame_attention
        q, k, v = (torch.randn(videos * frames, pixels, heads * 64, generator=g).to(DEV, DT) for _ in range(3))
        truth = attention.frame_attention_sdpa(q.double(), k.double(), v.double(), heads, frames)
        gb = 4 * q.numel() * q.element_size() / 1e9  # q, k, v read and the output written once
        # SDPA's memory-efficient kernel on strided views (before session 9), and the Triton kernel (fused.py;
        # on the CPU the op falls back to the SDPA path)
        for label, fn in (
            ("sdpa path", attention.frame_attention_sdpa),
            ("frame kernel", frame_kernel.frame_attention),
        ):
            cfn = torch.compile(fn, fullgraph=True, dynamic=False) if DEV.type == "cuda" else fn
            out = cfn(q, k, v, heads, frames)
            ms = median_ms(partial(cfn, q, k, v, heads, frames), 20)
            say(f"frame attention {name} [{videos}x{frames} frames x {pixels} px x {heads} heads x 64] {label}: "
                f"{ms:.3f} ms ({gb / ms:.2f} TB/s), err {rel(out, truth):.1e}, against float64")  # fmt: skip


@torch.no_grad()
def wide_attention_rows() -> None:
    frames, tokens, d = WIDE_SHAPE
    dt = DT if DEV.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    # Scores of a few units (q twice as large as k, v), a sharper softmax than unit ones
    q, k, v = (torch.randn(frames, 1, tokens, d, generator=g).mul(s).to(DEV, dt) for s in (2.0, 1.0, 1.0))
    truth = F.scaled_dot_product_attention(q[:1].double(), k[:1].double(), v[:1].double())
    cwide = torch.compile(attention.wide_head_attention, fullgraph=True, dynamic=False) if DEV.type == "cuda" else None
    for label, fn in (
        ("sdpa", F.scaled_dot_product_attention),
        ("wide_head_attention", cwide or attention.wide_head_attention),
    ):
        out = fn(q, k, v)
        ms = median_ms(partial(fn, q, k, v), 10)
        err = rel(out[:1], truth)
        say(f"wide attention [{frames}x1x{tokens}x{d}] {label}: {ms:.2f} ms, first-frame err {err:.1e}")


def _add_then_norm(x, y, vec, div, w, b):
    """The reference's ops: the residual add, the per-video vector, the LayerNorm (its fallback's maths)."""
    return add_norm.add_norm_reference(x, y, vec, div, True, w, b, 1e-5)


@torch.no_grad()
def add_norm_rows() -> None:
    compiled = torch.compile(_add_then_norm, fullgraph=True, dynamic=False) if DEV.type == "cuda" else _add_then_norm
    for name, m, c, videos in NORM_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        x, y = (torch.randn(m, c, generator=g).to(DEV, DT) for _ in range(2))
        vec = torch.randn(videos, c, generator=g).to(DEV, DT)
        w, b = (torch.randn(c, generator=g).to(DEV, DT) for _ in range(2))
        div = m // videos
        truth = _add_then_norm(x.double(), y.double(), vec.double(), div, w.double(), b.double())[1]
        gb = 4 * m * c * x.element_size() / 1e9  # x, y read; s, n written

        def kernel(x=x, y=y, vec=vec, div=div, w=w, b=b):
            s, n = torch.empty_like(x), torch.empty_like(x)  # the op's outputs
            add_norm.launch_add_norm(x, y, vec, div, True, w, b, 1e-5, s, n)
            return s, n

        eager = partial(_add_then_norm, x.float(), y.float(), vec.float(), div, w.float(), b.float())
        variants = [("eager ops", partial(_add_then_norm, x, y, vec, div, w, b) if DEV.type == "cuda" else eager)]
        if DEV.type == "cuda":
            variants.append(("compiled ops", partial(compiled, x, y, vec, div, w, b)))
        variants.append(("add_norm kernel", kernel))  # on the CPU: Triton's interpreter
        for label, fn in variants:
            n = fn()[1]
            ms = median_ms(fn, 20)
            say(f"add+norm {name} [{m}x{c}] {label}: {ms:.3f} ms ({gb / ms:.2f} TB/s), err {rel(n, truth):.1e}, "
                f"against float64")  # fmt: skip


def main() -> None:
    if DEV.type == "cuda":
        say(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    sections = {"geglu": geglu_rows, "frame": attention_rows, "wide": wide_attention_rows, "add_norm": add_norm_rows}
    for name in args.sections.split(","):
        sections[name]()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "svd_kernels.txt"), "w") as f:
        f.write("\n".join(ROWS) + "\n")


if __name__ == "__main__":
    main()
