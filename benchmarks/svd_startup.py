#!/usr/bin/env python3
"""Start-up time: a NEW process, from interpreter start to its first finished SVD-XT video, in compiled mode
(or, with --eager, in the default eager mode).

    python benchmarks/svd_startup.py --model /path/to/fp16-folder      # run twice: the 2nd finds a warm cache
    python benchmarks/svd_startup.py --model /path/to/fp16-folder --compile-cache /path/to/dir   # ahead of time
    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/svd_startup.py --model /path/to/fp16-folder --eager

torch.compile keeps its compiled kernels and graphs on disk (TORCHINDUCTOR_CACHE_DIR, default under /tmp), so the
second process skips code generation and autotuning; what remains is tracing and loading the cached artifacts.
With --compile-cache, `Pipeline.compile(cache_dir=...)` keeps the compiled functions themselves ahead of time, so a
later process loads them without tracing either. Eager runs compile nothing but img2vid's Triton kernels, once per
machine (Triton's cache, TRITON_CACHE_DIR, default ~/.triton/cache); an empty cache dir shows that first run's cost.
--save-frames writes the first video's frames (.npy) to compare
processes.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from img2vid import Pipeline  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--steps", type=int, default=25)
ap.add_argument("--decode-chunk-size", type=int, default=8)
ap.add_argument("--compile-cache", help="Pipeline.compile(cache_dir=...): compiled functions kept ahead of time")
ap.add_argument("--eager", action="store_true", help="the default eager mode: no pipe.compile()")
ap.add_argument("--save-frames", help="write the first video's frames here (.npy)")
args = ap.parse_args()


def sync() -> None:
    torch.cuda.synchronize()


t_import = time.perf_counter() - T0
pipe = Pipeline.from_pretrained(args.model, torch_dtype=torch.float16, variant="fp16", device="cuda")
pipe.set_progress_bar_config(disable=True)
sync()
t_load = time.perf_counter() - T0
if not args.eager:
    pipe.compile(cache_dir=args.compile_cache)
img = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (576, 1024, 3), dtype=np.uint8))
kw = dict(height=576, width=1024, num_inference_steps=args.steps, decode_chunk_size=args.decode_chunk_size)
marks: dict[str, float] = {}  # when the first step / decode chunk was queued (not synced: a rough split)


def progress(stage: str, done: int, total: int) -> None:
    marks.setdefault(stage, time.perf_counter() - T0)


first = pipe(img, generator=torch.manual_seed(0), output_type="np", progress=progress, **kw).frames
sync()
t_first = time.perf_counter() - T0
t1 = time.perf_counter()
pipe(img, generator=torch.manual_seed(0), output_type="np", **kw)
sync()
t_second = time.perf_counter() - t1
cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)")
if args.eager:
    cache = f"none (eager); Triton cache {os.environ.get('TRITON_CACHE_DIR', '(default)')}"
elif args.compile_cache:
    fns = [
        pipe._step,
        *{id(m.forward.func): m.forward.func for m in pipe.vae.decoder.modules() if "forward" in vars(m)}.values(),
    ]
    loaded, compiled = sum(f.loaded for f in fns), sum(f.compiled for f in fns)
    cache += f", compile cache {args.compile_cache}: {loaded} functions loaded, {compiled} compiled"
if args.save_frames:
    np.save(args.save_frames, first)
print(
    f"startup: imports {t_import:.1f}s, loaded at {t_load:.1f}s, first video done at {t_first:.1f}s "
    f"(process start -> first video; first step queued at {marks['denoise']:.1f}s, first decode chunk at "
    f"{marks['decode']:.1f}s), next video {t_second:.1f}s; {'eager' if args.eager else 'compiled'}, "
    f"inductor cache {cache}"
)
