#!/usr/bin/env python3
"""The compiled VAE decode in several layouts and frame slices (run 17 in BENCHMARKS.md).

    python benchmarks/svd_decode.py                        # all variants, full SVD-XT VAE on the GPU
    python benchmarks/svd_decode.py --variants nchw:2 --tiny   # logic check on the CPU

Random full-size fp16 weights; 25 frames of 72x128 latents decoded in chunks of 8 (8, 8, 8, 1) like the pipeline's
decode_chunk_size=8, through `compiled.compile_decoder` (block by block). A variant is LAYOUT:SLICE, LAYOUT nchw or
channels_last (weights and activations), SLICE the decoder's frames per slice (`VAE.spatial_frame_chunk`). Prints
median seconds of 5 decodes, the activation peak over the weights, and the error against the eager NCHW decode,
and writes the same table to --out/svd_decode.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from img2vid import compiled  # noqa: E402
from img2vid.configs import preset  # noqa: E402
from img2vid.layers import channels_last_  # noqa: E402
from img2vid.vae import VAE  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--variants", default="nchw:2,nchw:4,channels_last:2,channels_last:4")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)

DEV = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
DT = torch.float16 if DEV.type == "cuda" else torch.float32
CFG = preset("tiny" if args.tiny else "svd-xt")
LH, LW, FRAMES, CHUNK = (8, 12, 5, 2) if args.tiny else (72, 128, 25, 8)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    with torch.device(DEV):
        vae = VAE(CFG.vae).to(DT).eval().requires_grad_(False)
    z = torch.randn(FRAMES, 4, LH, LW, device=DEV, dtype=DT)

    def decode_all(dec, zz: torch.Tensor) -> torch.Tensor:  # (F, 4, h, w) -> (F, 3, H, W), chunk by chunk
        return torch.cat([dec(zz[s : s + CHUNK], zz[s : s + CHUNK].shape[0]) for s in range(0, FRAMES, CHUNK)])

    ref = decode_all(vae.decode_frames, z).float()
    dec = compiled.compile_decoder(vae)
    rows = []
    for variant in args.variants.split(","):
        layout, slices = variant.split(":")
        if layout == "channels_last":
            channels_last_(vae)  # stays so for the variants after it: list nchw ones first
        vae.spatial_frame_chunk = int(slices)
        zz = z.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else z
        t0 = time.perf_counter()
        out = decode_all(dec, zz)
        sync()
        first = time.perf_counter() - t0
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            decode_all(dec, zz)
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEV.type == "cuda" else float("nan")
        rows.append((variant, sorted(times)[2], peak, err, first))
    lines = [
        f"{torch.cuda.get_device_name(0) if DEV.type == 'cuda' else 'cpu'} torch {torch.__version__}",
        "| variant | decode s | activation peak GiB | rel err vs eager NCHW | first call s |",
        "|---|---|---|---|---|",
        *(f"| {v} | {t:.3f} | {p:.2f} | {e:.1e} | {f:.0f} |" for v, t, p, e, f in rows),
    ]
    print("\n".join(lines))
    with open(os.path.join(args.out, "svd_decode.txt"), "w") as out:  # the table, kept with the other results
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
