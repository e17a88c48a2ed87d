#!/usr/bin/env python3
"""Start-up time: a NEW process, from interpreter start to its first finished SVD-XT video, in compiled mode.

    python benchmarks/svd_startup.py --model /path/to/fp16-folder      # run twice: the 2nd finds a warm cache

torch.compile keeps its compiled kernels and graphs on disk (TORCHINDUCTOR_CACHE_DIR, default under /tmp), so the
second process skips code generation and autotuning; what remains is tracing and loading the cached artifacts.
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
args = ap.parse_args()


def sync() -> None:
    torch.cuda.synchronize()


t_import = time.perf_counter() - T0
pipe = Pipeline.from_pretrained(args.model, torch_dtype=torch.float16, variant="fp16", device="cuda")
pipe.set_progress_bar_config(disable=True)
sync()
t_load = time.perf_counter() - T0
pipe.compile()
img = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (576, 1024, 3), dtype=np.uint8))
kw = dict(height=576, width=1024, num_inference_steps=args.steps, decode_chunk_size=args.decode_chunk_size)
pipe(img, generator=torch.manual_seed(0), output_type="np", **kw)
sync()
t_first = time.perf_counter() - T0
t1 = time.perf_counter()
pipe(img, generator=torch.manual_seed(0), output_type="np", **kw)
sync()
t_second = time.perf_counter() - t1
cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)")
print(
    f"startup: imports {t_import:.1f}s, loaded at {t_load:.1f}s, first video done at {t_first:.1f}s "
    f"(process start -> first video), next video {t_second:.1f}s; inductor cache {cache}"
)
