"""The `img2vid` commands that need no model download: selftest, info and convert (`img2vid.cli` parses the
arguments and turns errors into one line), and `generate`'s sampling with its progress bars. Heavy imports stay
inside the functions, so `img2vid --help` stays instant."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from img2vid.pipeline import Pipeline
    from img2vid.run_params import RunParams


def cmd_selftest(args: argparse.Namespace) -> int:
    import numpy as np

    height, width, frames, fps, seed = 32, 48, 3, 7, 1234
    start = time.perf_counter()

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(what)
        if not args.quiet:
            print(f"  ok  {what}", file=sys.stderr)

    try:  # imports too: a missing dependency (PyAV, say) is a failed selftest, not a crash
        import torch

        from img2vid.pipeline import Pipeline
        from img2vid.video import export_video, read_metadata, read_video

        pipe = Pipeline.from_config("tiny")
        pipe.set_progress_bar_config(disable=True)
        y, x = np.mgrid[0:40, 0:56]  # a non-square gradient of another size than the video: exercises the resize
        image = np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)  # (H, W, 3)

        def sample() -> np.ndarray:
            kw = dict(height=height, width=width, num_frames=frames, num_inference_steps=2, decode_chunk_size=2)
            return pipe(image, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames[0]

        video = sample()  # (F, H, W, 3)
        check(video.shape == (frames, height, width, 3), f"sampled and decoded {frames} frames of {width}x{height}")
        check(bool(np.isfinite(video).all()), "every pixel is finite")
        check(bool(np.array_equal(video, sample())), "the same seed gives the same frames")
        with tempfile.TemporaryDirectory() as tmp:
            path = export_video(video, Path(tmp) / "selftest.mp4", fps=fps, metadata={"seed": seed})
            back, back_fps = read_video(path)
            check(back.shape == (frames, height, width, 3), f"exported an mp4 that reads back as {back.shape}")
            check(abs(back_fps - fps) < 1e-6 and read_metadata(path).get("seed") == seed, "fps and seed stored")
    except Exception as e:
        if args.debug:
            raise
        print(f"img2vid: selftest failed: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    from img2vid.cli import DEFAULT_MODEL  # (cli imports this module)

    print(
        f"selftest passed in {time.perf_counter() - start:.1f} s: load, sample, decode, export and read back work.\n"
        "The video was noise: the tiny model has random weights. Real videos need the SVD weights:\n"
        f"  img2vid generate image.png -o out.mp4   downloads {DEFAULT_MODEL} from the Hugging Face\n"
        "  hub (accept its licence there first), or pass --model a local diffusers folder or svd_xt.safetensors"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from img2vid.checkpoint_tools import checkpoint_info
    from img2vid.cli_setup import refuse_variant_of_file
    from img2vid.errors import user_path

    path = user_path(args.checkpoint)
    if path.is_file():
        refuse_variant_of_file(args.variant, "a model folder")
    info = checkpoint_info(path, variant=args.variant, allow_pickle=args.allow_pickle)
    print(info["path"])
    for key in ("format", "variant", "variants", "config", "config_source"):
        if info.get(key) not in (None, []):
            value = info[key]
            print(f"  {key.replace('_', ' ')}: {', '.join(value) if isinstance(value, list) else value}")
    comps = info.get("components", {})
    print(f"  {'component':<14}{'tensors':>9}{'parameters':>16}  dtype")
    for name, c in [*comps.items(), ("total", {k: sum(c[k] for c in comps.values()) for k in ("tensors", "params")})]:
        print(f"  {name:<14}{c['tensors']:>9,}{c['params']:>16,}  {', '.join(c.get('dtypes', []))}".rstrip())
    named = [(f"{n} {k.replace('_', ' ')}", c.get(k)) for n, c in comps.items() for k in ("missing", "unexpected")]
    named += [(f"{n} wrong {k}", c.get(f"wrong_{k}")) for n, c in comps.items() for k in ("shape", "dtype")]
    named += [("unknown tensors", info.get("unknown")), ("unused tensors skipped", info.get("skipped_unused"))]
    for label, names in named:
        if isinstance(names, int):  # a count only (the skipped tensors are known leftovers, not worth listing)
            if names:
                print(f"  {label}: {names}")
        elif names:  # thousands for a wrong file: the count and the first few are what a reader can use
            print(f"  {label} ({len(names)}): {', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''}")
    print(f"  usable as a pipeline: {'yes' if info.get('ok') else 'no'}")
    if "usable_as" in info:  # one component alone: given beside a model (`generate --unet`, `unet=`)
        c = info["usable_as"]
        how = f"--{c} PATH or {c}=PATH" if c in ("unet", "vae") else f"{c}=PATH (Python)"
        print(f"  usable as a component: {f'yes, the {c}: {how}' if c else 'no'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from img2vid.checkpoint_tools import convert
    from img2vid.errors import user_path

    start = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    src, dst = user_path(args.src), user_path(args.dst)
    dst = convert(src, dst, dtype=dtype, variant=args.variant, allow_pickle=args.allow_pickle)
    print(f"wrote {dst} ({time.perf_counter() - start:.1f} s)")
    return 0


def progress_bars(quiet: bool, label: str, totals: dict[str, int]) -> tuple[Callable[..., None], Callable[[], None]]:
    """The pipeline's progress callback as tqdm bars on stderr (time per step, ETA), and a closer for errors. Each
    bar opens when its stage starts (the pipeline reports finished steps only), so its clock measures that stage."""
    from tqdm import tqdm

    def bar(stage: str, total: int) -> Any:
        unit = "step" if stage == "denoise" else "chunk"
        return tqdm(total=total, desc=f"{label} {stage}", unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True)

    bars = {"denoise": bar("denoise", totals["denoise"])}

    def update(stage: str, done: int, total: int) -> None:
        current = bars.get(stage) or bars.setdefault(stage, bar(stage, total))
        current.update(done - current.n)
        if stage == "denoise" and done >= total:
            current.close()
            bars["decode"] = bar("decode", totals["decode"])

    def close() -> None:
        for b in bars.values():
            b.close()

    return update, close


def sample_video(
    pipe: Pipeline, image: PIL.Image.Image, seed: int, run: RunParams, segments: int, quiet: bool, label: str
) -> torch.Tensor:
    """run_params.sample_video with progress bars: each segment of a chain gets its own, labelled "rocket 2/3"."""
    from img2vid import run_params

    totals = {"denoise": run.num_inference_steps, "decode": -(-run.num_frames // run.decode_chunk_size)}
    # The current segment's (update, close); a bar shows once opened, so each segment opens its own
    bars: list[tuple[Callable[..., None], Callable[[], None]]] = []

    def next_bars(k: int, n: int) -> None:  # before segment k of n
        for _, close in bars:
            close()
        bars[:] = [progress_bars(quiet, label if n == 1 else f"{label} {k}/{n}", totals)]

    def progress(stage: str, done: int, total: int) -> None:
        bars[-1][0](stage, done, total)

    try:
        return run_params.sample_video(pipe, image, seed, run, segments, next_bars, progress)
    finally:
        for _, close in bars:
            close()
