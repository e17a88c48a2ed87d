#!/usr/bin/env python3
"""Loading time of a full SVD-XT fp16 folder onto the GPU in a NEW process (warm page cache).

    python benchmarks/svd_load.py --save /tmp/svdxt          # once: seeded random weights as a diffusers folder
    python benchmarks/svd_load.py --model /tmp/svdxt         # new process: CUDA start, then from_pretrained
    python benchmarks/svd_load.py --model /tmp/svdxt --per-tensor   # the same with safetensors' per-tensor reader

CUDA's own start-up is timed apart (it is paid by any GPU program); "load" is from_pretrained alone.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import img2vid.checkpoint_io as cio  # noqa: E402
from img2vid import Pipeline  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--save", default=None, help="write a random-weight SVD-XT fp16 folder here and exit")
ap.add_argument("--model", default=None)
ap.add_argument("--per-tensor", action="store_true", help="disable the whole-file GPU reader (the old path)")
args = ap.parse_args()

if args.save:
    import img2vid.checkpoint as ck
    from img2vid.configs import preset

    with torch.device("cuda"):
        pipe = Pipeline.from_config("svd-xt", torch_dtype=torch.float16)
    parts = ("unet", "vae", "image_encoder")
    state = {c: {k: v.cpu() for k, v in getattr(pipe, c).state_dict().items()} for c in parts}
    ck.save_folder(Path(args.save), preset("svd-xt"), state, variant="fp16")
    print(f"saved {args.save}")
    sys.exit(0)

if args.per_tensor:
    cio._read_whole_file = lambda *a: None  # benchmark only: force safetensors' per-tensor reader
t_import = time.perf_counter() - T0
torch.cuda.init()
torch.empty(1, device="cuda")
torch.cuda.synchronize()
t_cuda = time.perf_counter() - T0
t1 = time.perf_counter()
pipe = Pipeline.from_pretrained(args.model, torch_dtype=torch.float16, variant="fp16", device="cuda")
torch.cuda.synchronize()
t_load = time.perf_counter() - t1
t1 = time.perf_counter()
again = Pipeline.from_pretrained(args.model, torch_dtype=torch.float16, variant="fp16", device="cuda")
torch.cuda.synchronize()
t_again = time.perf_counter() - t1
reader = "per-tensor (safe_open)" if args.per_tensor else "whole-file"
print(
    f"load [{reader}]: imports {t_import:.1f}s, CUDA start {t_cuda - t_import:.1f}s, "
    f"from_pretrained {t_load:.2f}s (first in this process), {t_again:.2f}s (second)"
)
