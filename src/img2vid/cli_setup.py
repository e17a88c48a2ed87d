"""From `img2vid generate` / `serve` arguments to what the run needs: image sources, output paths and format, each
video's frame size, the device and dtype, and the loaded pipeline with its memory and speed modes. Every check that
can fail runs before the model loads (`img2vid.cli` turns the errors into one line); heavy imports stay inside."""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from img2vid.names import REPO_ID, WEIGHT_SUFFIXES
from img2vid.video_checks import FORMATS  # no PyAV there: --help stays import-free

if TYPE_CHECKING:  # annotations only: --help imports no torch or PIL
    import PIL.Image
    import torch

    from img2vid.pipeline import Pipeline


def expand_images(patterns: list[str]) -> list[str]:
    """Paths, URLs and glob patterns (expanded here too, so a quoted pattern works) -> sources, in order."""
    from img2vid.errors import InputError, user_path
    from img2vid.image_sources import is_url

    sources: list[str] = []
    for pattern in patterns:
        if is_url(pattern):
            sources.append(pattern)
            continue
        path = user_path(pattern)
        if glob.has_magic(pattern) and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"no image matches {pattern!r}")
            sources.extend(matches)
        elif path.is_dir():
            raise InputError(f"{pattern} is a directory, not an image file (a glob such as DIR/*.png takes its images)")
        elif not path.exists():
            raise InputError(f"image not found: {pattern}")
        else:  # a pipe or a device is refused by load_image, which reads every source before the model loads
            sources.append(str(path))
    # One path named twice (x.png ./x.png, or a pattern that matches a file named too) would write its videos twice,
    # or clash in one output. Two names of one file (a symlink beside its target, as a glob over a folder of photos
    # may match) are two images with outputs of their own, as the user named them: not resolved, not refused.
    seen: dict[str, str] = {}
    for source in sources:
        key = source if is_url(source) else os.path.abspath(source)
        if key in seen:
            also = "" if seen[key] == source else f" (also as {seen[key]})"
            raise InputError(f"{source} is given twice{also}; --videos N makes several videos of one image")
        seen[key] = source
    return sources


def stem(source: str) -> str:
    """The name {stem} stands for: the file's name without its extension. Dots alone (an image named "...png" has
    the stem "..") would name the folder above in a pattern such as out/{stem}/clip.mp4: such names become "video"."""
    name = Path(source.split("?")[0]).stem
    return name if name.strip(".") else "video"


def output_paths(
    sources: list[str], output: str, fmt: str | None, seeds: list[int], crf: int | None = None
) -> tuple[list[tuple[str, int, Path]], str]:
    """(source, seed, output path) of every video, each source's seeds in turn, and the format. Several videos need a
    folder (named stem.ext, or stem-seed.ext with several seeds) or a pattern with {stem} and/or {seed}; a pattern
    may name folders too (out/{stem}/ or out/{stem}/{seed}.mp4), which the export creates."""
    from img2vid.errors import InputError, user_path
    from img2vid.video_checks import check_crf, check_output, file_in_the_way, holds_frames

    if not output:
        raise InputError("-o is empty; give a file, a folder or a pattern such as {stem}.mp4")
    if output == "-":  # the usual spelling of standard output, which would have named a file "-.mp4"
        raise InputError("-o - (standard output) is not supported; give a file, a folder or a pattern")
    out = user_path(output)
    # An earlier PNG-frames video at -o is replaced by this one, not taken for a folder to put videos in
    frames_again = (fmt == "png" or out.suffix.lower() == ".png") and holds_frames(out)
    as_folder = (out.is_dir() and not frames_again) or output.endswith(("/", os.sep))
    pattern = "{stem}" in output or "{seed}" in output
    jobs = [(s, seed) for s in sources for seed in seeds]
    if not as_folder and len(jobs) > 1 and not pattern:
        what = f"{len(sources)} images" if len(seeds) == 1 else f"{len(jobs)} videos"
        raise InputError(f"{what} need -o to be a folder or a pattern containing {{stem}} or {{seed}}, not {output}")
    if not as_folder:
        suffix = out.suffix.lower().lstrip(".")
        if suffix and suffix not in FORMATS:
            raise InputError(f"unknown video format {out.suffix!r} in {output}; use one of {', '.join(FORMATS)}")
        if suffix and fmt and suffix != fmt:
            raise InputError(f"--format {fmt} does not match the extension of {output}")
        fmt = fmt or suffix or "mp4"
    fmt = fmt or "mp4"
    check_crf(crf, fmt)
    ext = "" if fmt == "png" else f".{fmt}"  # png = a folder of frames

    def fill(s: str, seed: int) -> Path:
        return Path(str(out).replace("{stem}", stem(s)).replace("{seed}", str(seed)))

    if as_folder:
        paths = [fill(s, seed) / f"{stem(s)}{f'-{seed}' if len(seeds) > 1 else ''}{ext}" for s, seed in jobs]
    else:
        paths = [fill(s, seed) for s, seed in jobs]
        paths = [p if p.suffix.lower().lstrip(".") in FORMATS else p.with_name(p.name + ext) for p in paths]
    if len(set(paths)) < len(paths):
        by_stem: dict[str, set[str]] = {}
        for s in sources:
            by_stem.setdefault(stem(s), set()).add(s)
        twins = next((sorted(group) for group in by_stem.values() if len(group) > 1), None)
        if twins:  # no pattern tells a/x.png from b/x.png apart
            raise InputError(
                f"images with the same name would write the same video ({', '.join(twins[:2])}); "
                "rename them or run them separately"
            )
        need = "{stem}" if len(seeds) == 1 else "{stem} and {seed}" if len(sources) > 1 else "{seed}"
        raise InputError(f"several videos would write the same file; use a pattern with {need} (got {output})")
    # The folder that must exist already: the one above the first placeholder of a pattern, that of a folder given
    # with a trailing slash (which the export creates), or the video's own. Folders below it are created.
    if pattern:
        first = next(i for i, part in enumerate(out.parts) if "{stem}" in part or "{seed}" in part)
        bases = {Path(*out.parts[:first]) if first else Path(".")}
    else:
        bases = {out if out.is_dir() else out.parent} if as_folder else {p.parent for p in paths}
    for folder in bases:
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            why = "is not writable" if folder.is_dir() else "is a file" if folder.exists() else "does not exist"
            raise InputError(f"output folder {folder} {why}")
    for path in paths:
        if (blocker := file_in_the_way(path)) is not None:
            raise InputError(f"cannot write {path}: {blocker} is a file, not a folder")
    if fmt != "png" and any(p.is_dir() for p in paths):
        raise InputError(f"output {next(p for p in paths if p.is_dir())} is a folder; give a file name")
    for path in paths:  # what export_video would refuse (a file where PNG frames go, ...), before the model loads
        check_output(path, fmt)
    return [(s, seed, path) for (s, seed), path in zip(jobs, paths, strict=True)], fmt


def video_size(args: argparse.Namespace, image: PIL.Image.Image, multiple: int, fmt: str) -> tuple[int, int]:
    """The (width, height) of `image`'s video, checked against the output format's largest frame."""
    from img2vid.images import frame_size
    from img2vid.video_checks import check_frame_size

    width, height = frame_size(image, args.width, args.height, args.resize, multiple)
    check_frame_size(width, height, fmt)
    return width, height


def model_source(model: str, variant: str | None = None, revision: str | None = None) -> tuple[str, int]:
    """("folder" | "file" | "hub", the size multiple), without loading weights: a typo fails fast, not as a hub
    lookup, and so do a --variant given with a single file and a --revision given with anything but a hub id (ignored,
    they would still be recorded in the sidecar).
    Sizes must survive the VAE's (levels - 1) halvings and the UNet's (levels - 1) more; every published SVD model
    (hub ids, Stability's single files) needs 64, folders and our single files carry their config."""
    from img2vid import checkpoint
    from img2vid.errors import user_path

    path, config = user_path(model), None
    if path.is_dir():
        kind, config = "folder", checkpoint.read_pipeline_config(path)
    elif path.is_file():
        kind, config = "file", checkpoint.peek_config(path)
    elif REPO_ID.match(model) and not model.lower().endswith(WEIGHT_SUFFIXES):
        kind = "hub"
    else:
        raise checkpoint.CheckpointError(f"model not found: {model} (want a hub id, a diffusers folder or a file)")
    from img2vid.errors import InputError

    if kind == "file":
        refuse_variant_of_file(variant)
    if kind != "hub" and revision is not None:
        raise InputError(f"--revision {revision} picks a version of a hub model; {model} is a local {kind}")
    if config is None:
        return kind, 64
    return kind, config.size_multiple


def component_sources(args: argparse.Namespace) -> dict[str, Path]:
    """--unet / --vae as paths that exist ({component: path} of those given): a hub id is not taken there (download
    it first), and a typo is an error before anything loads. What the path holds is read with the model."""
    from img2vid.errors import InputError, user_path

    given = {c: getattr(args, c) for c in ("unet", "vae") if getattr(args, c) is not None}
    for c, source in given.items():
        if not user_path(source).exists():
            raise InputError(f"--{c} {source}: no such folder or file (a hub model must be downloaded first)")
    return {c: user_path(source) for c, source in given.items()}


def refuse_variant_of_file(variant: str | None, picks_from: str = "a model folder or hub repo") -> None:
    """A --variant given with a single file would be ignored, yet recorded in the sidecar: refused (generate, serve,
    info, which reads folders and files only). "none", the default's spelling, is no variant."""
    from img2vid.errors import InputError

    if variant not in (None, "none"):
        raise InputError(f"--variant {variant} picks files of {picks_from}, not of one file")


def run_settings(
    args: argparse.Namespace, pipe: Pipeline, variant: str | None, second: torch.device | None
) -> dict[str, Any]:
    """How the loaded model runs, for generate's sidecar and serve's X-Img2vid-Params alike: the revision and variant
    read, the config, and the compile / two-GPU modes (they change the last bits of the numbers)."""
    compiled = bool(args.compile or args.compile_cache)
    given = {c: getattr(args, c) for c in ("unet", "vae") if getattr(args, c) is not None}  # named only when given
    return dict(
        revision=args.revision,
        model_config=pipe.config.name,
        **given,
        variant=variant,
        compiled=compiled,
        guidance_parallel=second is not None,
    )


def device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    import torch

    from img2vid.errors import InputError

    if args.low_memory and args.offload not in (None, "none"):  # low memory is its own offload: one would be dropped
        raise InputError(f"--low-memory streams the weights itself; drop --offload {args.offload}")
    if args.compile_cache and (args.low_memory or args.offload == "sequential"):  # known now, not after tracing
        raise InputError(
            "--compile-cache cannot keep streamed weights (--low-memory, --offload sequential): use --compile"
        )
    from img2vid.offload import available_device

    device = available_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device is None and device.type == "cpu" and not args.quiet:
        # A newcomer on a machine without CUDA would otherwise wait a very long time without knowing why.
        import sys

        print(
            "img2vid: no CUDA GPU found, so this runs on the CPU in float32, far slower than on a GPU for SVD's "
            "models (`img2vid selftest` checks the install in seconds; --device cpu silences this note)",
            file=sys.stderr,
        )
    return device, getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))


def guidance_device(args: argparse.Namespace, device: torch.device) -> torch.device | None:
    """--guidance-device as a torch.device, or None; what it cannot run with is an error before the model loads."""
    import torch

    from img2vid.errors import InputError
    from img2vid.parallel import check_devices

    if args.guidance_device is None:
        if args.no_cuda_graphs:
            raise InputError("--no-cuda-graphs is an option of --guidance-device: give both, or neither")
        return None
    try:
        second = torch.device(args.guidance_device)
    except RuntimeError:
        raise InputError(f"unknown device {args.guidance_device!r} for --guidance-device; use cuda:N") from None
    if args.compile_cache:
        raise InputError("--compile-cache does not keep guidance-parallel steps yet: use --compile with it")
    offload = (
        "sequential (--low-memory)" if args.low_memory else None if args.offload in (None, "none") else args.offload
    )
    check_devices(device, second, offload)
    return second


def check_compile_cache(args: argparse.Namespace) -> None:
    """--compile-cache naming a file or a place that cannot be written: an error now, not after the model loads.
    Called after the option checks, since it creates the folder."""
    if args.compile_cache:
        from img2vid.errors import user_path
        from img2vid.precompiled import check_cache_dir

        check_cache_dir(user_path(args.compile_cache))


def load_pipeline(
    args: argparse.Namespace, kind: str, device: torch.device, dtype: torch.dtype, second: torch.device | None = None
) -> tuple[Pipeline, str | None]:
    """The pipeline as the runtime options ask; second: guidance_device's checked --guidance-device, or None."""
    import torch

    from img2vid.pipeline import Pipeline

    # The hub's fp16 files for float16: half the download, the same float16 weights.
    variant = args.variant or ("fp16" if kind == "hub" and dtype == torch.float16 else None)
    if kind == "folder":  # one variant alone, e.g. what `img2vid convert ... --variant fp16` writes
        from img2vid.errors import user_path
        from img2vid.folders import folder_variant

        variant = folder_variant(user_path(args.model), variant, args.allow_pickle)
    variant = None if variant == "none" else variant  # a hub id's or a single file's
    offload = args.offload or "none"
    load_to = "cpu" if args.low_memory or offload != "none" else device  # offloaded weights wait on the CPU
    given = component_sources(args)
    pipe = Pipeline.from_pretrained(
        args.model,
        torch_dtype=dtype,
        variant=variant,
        device=load_to,
        local_files_only=args.offline,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        unet=given.get("unet"),
        vae=given.get("vae"),
    )
    if args.low_memory:  # sequential offload, split guidance halves, forward chunking, decode chunks of 2
        pipe.enable_low_memory(device=device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    if args.forward_chunking and not args.low_memory:  # low memory chunks already, in its own slice size
        pipe.unet.enable_forward_chunking()
    if second is not None:  # after forward chunking (the copy takes it), before compiling
        pipe.enable_guidance_parallel(second, cuda_graphs=not args.no_cuda_graphs)
    if args.compile or args.compile_cache:
        # the whole denoising step and the decoder as compiled graphs (fullgraph), kept ahead of time in a cache dir
        pipe.compile(cache_dir=args.compile_cache)
    pipe.set_progress_bar_config(disable=True)
    return pipe, variant
