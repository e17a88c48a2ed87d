"""The `img2vid` command: generate, selftest, info, convert, serve (the bodies of selftest, info and convert, and
generate's sampling with its progress bars, are in `img2vid.cli_tools`; the arguments' checks and the model's
loading in `img2vid.cli_setup`; parsing and error handling are here).

Every user mistake is caught before the (slow, large) model loads and ends as ONE line `img2vid: error: ...` with
exit code 2; torch and the pipeline are imported inside the commands so `img2vid --help` stays instant.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from typing import Any, NoReturn

from img2vid import __version__
from img2vid.cli_setup import (
    FORMATS,
    check_compile_cache,
    component_sources,
    device_dtype,
    expand_images,
    guidance_device,
    load_pipeline,
    model_source,
    output_paths,
    run_settings,
    stem,
    video_size,
)
from img2vid.cli_tools import cmd_convert, cmd_info, cmd_selftest, sample_video
from img2vid.run_params import MAX_SEED, limited, number, random_seed, run_params

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"
DTYPES = ("float16", "bfloat16", "float32")
OOM_HINT = "try --low-memory, --offload model (or sequential) or --decode-chunk-size 2"
HOST_OOM_HINT = "try a smaller --width/--height, fewer --frames or --decode-chunk-size 2"
_VARIANT = re.compile(r"^[\w-]+$")
# torch's CPU allocator reports a failed allocation as a plain RuntimeError carrying this text
_CPU_ALLOC_FAILED = "DefaultCPUAllocator: can't allocate memory"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of ours, instead of argparse's usage block.
        self.exit(2, f"img2vid: error: {message} (see `{self.prog} --help`)\n")


def _variant(text: str) -> str:
    """An argparse type: a variant is part of a file name (model.fp16.safetensors), never a path."""
    if not _VARIANT.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a variant name (letters, digits, _ and -, e.g. fp16)")
    return text


# ---- argument definitions ------------------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="hub id, diffusers folder or single file (default: SVD-XT)")
    g.add_argument(
        "--variant",
        type=_variant,
        help="weight variant, e.g. fp16 (default: fp16 for float16 from the hub; 'none': off)",
    )
    g.add_argument("--revision", help="a hub model's branch, tag or commit (default: main)")
    for c in ("unet", "vae"):
        g.add_argument(
            f"--{c}",
            metavar="PATH",
            help=f"a {c.upper()} of its own (e.g. fine-tuned) instead of the model's: a diffusers {c} folder, a "
            "pipeline folder, or a weights file (diffusers or sgm names)",
        )
    g.add_argument("--offline", action="store_true", help="use only the local hub cache, never the network")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (they can run code)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the model's / diffusers')")
    g.add_argument("--frames", type=limited("frames"), help="frames (default: the model's, 25 for SVD-XT)")
    g.add_argument(
        "--segments",
        type=limited("segments"),
        default=1,
        metavar="N",
        help="longer video: N segments, each continuing from the last frame of the one before (N*(F-1)+1 frames)",
    )
    g.add_argument("--steps", type=limited("steps"), default=25, help="denoising steps (default %(default)s)")
    g.add_argument("--fps", type=limited("fps"), help="conditioning fps (default: the model's, 7; 6 for 1.1)")
    g.add_argument("--export-fps", type=number(float, 1, 240), help="playback fps of the file (default: --fps)")
    g.add_argument("--motion-bucket-id", type=limited("motion_bucket_id"), help="more = more motion (default 127)")
    g.add_argument("--noise-aug-strength", type=limited("noise_aug_strength"), default=0.02, help="default %(default)s")
    g.add_argument("--min-guidance", type=limited("min_guidance"), default=1.0, help="first frame's CFG (default 1.0)")
    g.add_argument("--max-guidance", type=limited("max_guidance"), default=3.0, help="last frame's CFG (default 3.0)")
    g.add_argument("--seed", type=limited("seed"), help="random seed (default: random, printed and stored)")
    g.add_argument(
        "-n",
        "--videos",
        type=number(int, 1, 1000),
        default=1,
        metavar="N",
        help="videos per image, seeds --seed, --seed+1, ... (each one reproducible on its own)",
    )
    g.add_argument("--decode-chunk-size", type=number(int, 1), help="frames decoded at once (default: all)")
    g.add_argument("--height", type=limited("height"), default=576, help="default %(default)s")
    g.add_argument("--width", type=limited("width"), default=1024, help="default %(default)s")
    g.add_argument(
        "--resize",
        choices=("stretch", "crop", "pad", "fit"),
        default="stretch",
        help="how the image meets WxH: stretch (diffusers), crop (centre), pad (white bars), fit (aspect, ~W*H pixels)",
    )


def _add_runtime_args(p: argparse.ArgumentParser, guidance_reuse: bool = False) -> None:
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="default: float16 on GPU, float32 on CPU")
    g.add_argument("--offload", choices=("none", "model", "sequential"), help="CPU offload (default none)")
    g.add_argument(
        "--low-memory",
        action="store_true",
        help="least GPU memory: sequential offload, chunking, decode 2 frames at a time",
    )
    g.add_argument("--forward-chunking", action="store_true", help="chunk the UNet feed-forwards (less memory)")
    g.add_argument(
        "--guidance-device",
        metavar="DEVICE",
        help="a second GPU (e.g. cuda:1) for the unconditional half of guidance: faster steps, same numbers",
    )
    g.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="with --guidance-device: queue each half op by op instead of replaying it as a CUDA graph",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the denoising step and the VAE decoder (minutes at the first call, faster after)",
    )
    g.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="--compile, keeping the compiled graphs in DIR: later runs load them instead of compiling again "
        "(DIR's files are pickles written by torch: name only a folder you trust)",
    )
    if guidance_reuse:  # generate only: serve takes generation parameters per request, and not this one yet
        g.add_argument(
            "--guidance-reuse",
            type=limited("guidance_reuse"),
            default=1,
            metavar="N",
            help="approximate: the unconditional guidance half runs every N-th step only, its guidance direction is "
            "reused in between (half the UNet batch on the other steps; default 1: exact guidance)",
        )


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", required=True, help="file; with several videos a folder or a {stem}/{seed} pattern"
    )
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, help="default: from the output's extension, mp4 if none")
    g.add_argument(
        "--loop",
        choices=("none", "loop", "pingpong"),
        default="loop",
        help="gif/webp play forever (loop, the default) or once (none); pingpong: forward then back, forever (2F-2 "
        "frames); mp4/mkv/mov/webm carry no loop flag (players decide)",
    )
    g.add_argument(
        "--crf", type=number(int, 0, 63), help="mp4/mkv/mov (0..51), webm (0..63) quality, lower = better (default 18)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="img2vid", description="Stable Video Diffusion: one image in, a short video out.")
    parser.add_argument("--version", action="version", version=f"img2vid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand must not reset a --debug given before it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="make videos from images")
    gen.add_argument("images", nargs="+", metavar="IMAGE", help="image files, URLs or glob patterns")
    _add_output_args(gen)
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_runtime_args(gen, guidance_reuse=True)
    gen.set_defaults(func=cmd_generate)

    test = sub.add_parser(
        "selftest",
        parents=[common],
        help="run the whole path on a tiny random model (seconds)",
        description="Sample a short video with a tiny random SVD model, check the same seed repeats it, export it as "
        "mp4 and read it back: a check of this installation (torch, the video encoder) with no download.",
    )
    test.set_defaults(func=cmd_selftest)

    info = sub.add_parser(
        "info",
        parents=[common],
        help="describe a checkpoint file or folder",
        description="Describe a checkpoint from its headers (no weights are loaded): format, variant, config, and per "
        "component the tensor and parameter counts, dtypes and any missing, unexpected or wrong-shape tensors.",
    )
    info.add_argument("checkpoint", help="a single .safetensors file (Stability's or ours) or a diffusers folder")
    info.add_argument("--variant", type=_variant, help="a folder's variant files to describe, e.g. fp16")
    info.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (they can run code)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser(
        "convert",
        parents=[common],
        help="convert a checkpoint (single file <-> diffusers folder)",
        description="Convert a single .safetensors file (Stability's original or ours) to a diffusers folder, or a "
        "diffusers folder to a single file, with the same weights (optionally cast with --dtype).",
    )
    conv.add_argument("src", help="a checkpoint file (.safetensors; .ckpt with --allow-pickle) or a diffusers folder")
    conv.add_argument("dst", help="the other kind: a folder for a file, a .safetensors file for a folder")
    conv.add_argument(
        "--dtype", choices=DTYPES, help="cast weights (default: keep them, but fp16 / bf16 for a folder's variant)"
    )
    conv.add_argument(
        "--variant",
        type=_variant,
        help="the folder side's variant files, e.g. fp16 (default: a source folder's only variant, else none)",
    )
    conv.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin pickles (they can run code)")
    conv.set_defaults(func=cmd_convert)

    srv = sub.add_parser("serve", parents=[common], help="serve a web page and POST /generate over HTTP")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine)")
    srv.add_argument("--port", type=number(int, 0, 65535), default=8000, help="default %(default)s")
    _add_model_args(srv)
    _add_runtime_args(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


# ---- entry point ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse errors: return the code for in-process callers
        return e.code if isinstance(e.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored on exit: in-process callers keep theirs
            return args.func(args)
    except KeyboardInterrupt:
        print("img2vid: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        # One line; exit 2 for the user's inputs and environment, 1 for our own bugs.
        torch, text = sys.modules.get("torch"), " ".join(str(e).split()) or type(e).__name__
        if torch is not None and isinstance(e, torch.OutOfMemoryError):
            text, code = f"out of memory on the device; {OOM_HINT}", 2
        elif _host_out_of_memory(e):  # the user's sizes against this machine's RAM, not a bug of ours
            text, code = f"out of memory in host RAM; {HOST_OOM_HINT}", 2
        elif isinstance(e, (ValueError, OSError)) or type(e).__module__.startswith("huggingface_hub"):
            code = 2  # InputError / CheckpointError / bad values / missing or unreadable files / hub refusals
        else:
            text, code = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)", 1
        print(f"img2vid: error: {text}", file=sys.stderr)
        return code


def _host_out_of_memory(e: Exception) -> bool:
    """Python's MemoryError (numpy, Pillow) or torch's CPU allocator failing."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _CPU_ALLOC_FAILED in str(e))


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
    """Our own warnings ("img2vid: ..." notes, such as a compile-cache file compiled again) as one line on stderr;
    everyone else's in Python's usual form."""
    if str(message).startswith("img2vid: "):
        print(f"{message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno).rstrip(), file=sys.stderr)


# ---- generate, serve ---------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from img2vid.errors import InputError
    from img2vid.images import check_size, load_image, video_input
    from img2vid.longer import check_segments

    if args.min_guidance > args.max_guidance:
        raise InputError(f"--min-guidance {args.min_guidance} is above --max-guidance {args.max_guidance}")
    check_segments(args.segments, args.frames)  # --frames 1 cannot be chained
    sources = expand_images(args.images)
    seed = args.seed if args.seed is not None else random_seed()
    if seed + args.videos - 1 > MAX_SEED:
        raise InputError(f"--seed {seed} with --videos {args.videos} runs past the largest seed, 2**63 - 1")
    jobs, fmt = output_paths(sources, args.output, args.format, list(range(seed, seed + args.videos)), args.crf)
    if args.export_fps or args.fps:  # else the model's default (7 or 6): any format plays it
        from img2vid.video_checks import check_fps

        check_fps(args.export_fps or args.fps, fmt)
    kind, multiple = model_source(args.model, args.variant, args.revision)
    component_sources(args)  # a mistyped --unet fails now, not after the images and the model load
    if args.resize != "fit":
        check_size(args.width, args.height, multiple)
    images = {s: load_image(s) for s in sources}  # unreadable images fail now, not after a long model load
    sizes = {s: video_size(args, image, multiple, fmt) for s, image in images.items()}
    device, dtype = device_dtype(args)
    second = guidance_device(args, device)  # checked now: the model loads after
    check_compile_cache(args)

    from img2vid.video import export_video

    pipe, variant = load_pipeline(args, kind, device, dtype, second)
    if not args.quiet:
        print(f"seed {seed}" if args.videos == 1 else f"seeds {seed}..{seed + args.videos - 1}", file=sys.stderr)
    # Everything needed to regenerate the video exactly (device and dtype change the last bits of the numbers).
    run = dict(img2vid_version=__version__, model=args.model, **run_settings(args, pipe, variant, second))
    run.update(dtype=str(dtype).removeprefix("torch."), device=device.type, resize=args.resize, loop=args.loop)
    run.update(export_fps=args.export_fps or args.fps or pipe.config.default_fps, segments=args.segments)
    if args.resize == "fit":  # the size asked for: fitting the image again to its result can pick another size
        run.update(fit_width=args.width, fit_height=args.height)
    for source, seed, path in jobs:  # one video at a time: the memory of one, whatever the count
        start = time.perf_counter()
        width, height = sizes[source]
        model_input = video_input(images[source], width, height, args.resize)
        params = run_params(
            pipe,
            width,
            height,
            args.steps,
            args.min_guidance,
            args.max_guidance,
            args.noise_aug_strength,
            frames=args.frames,
            fps=args.fps,
            motion_bucket_id=args.motion_bucket_id,
            decode_chunk_size=args.decode_chunk_size,
            guidance_reuse=args.guidance_reuse,
        )
        label = stem(source) if args.videos == 1 else f"{stem(source)} seed {seed}"
        video = sample_video(pipe, model_input, seed, params, args.segments, args.quiet, label)
        n = max(len(video), 2 * len(video) - 2) if args.loop == "pingpong" else len(video)  # (F, 3, H, W) frames
        # num_frames is a segment's (what regenerates it); video_frames what the file holds: segments and loop in
        metadata = {**run, "seed": seed, "image": source, **params.as_dict(), "video_frames": n}
        export_video(video, path, fps=run["export_fps"], format=fmt, crf=args.crf, loop=args.loop, metadata=metadata)
        took = time.perf_counter() - start  # the seed here too: --quiet leaves this line alone
        print(f"wrote {path} ({n} frames, {width}x{height}, seed {seed}, {took:.1f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from img2vid.errors import user_path
    from img2vid.server import make_server, serve

    kind, _ = model_source(args.model, args.variant, args.revision)
    components = component_sources(args)
    device, dtype = device_dtype(args)
    second = guidance_device(args, device)  # checked now: the model loads after
    check_compile_cache(args)
    # What clients read (/health, X-Img2vid-Params): a hub id, or a local model's own name, not where it lies on
    # this machine (a server given --host answers anyone on the network)
    shown = args.model if kind == "hub" else user_path(args.model).resolve().name
    # Bound before the (long) model load: a port in use is an error now, not after it
    server = make_server(None, args.host, args.port, model=shown, quiet=args.quiet)
    try:
        server.pipe, variant = load_pipeline(args, kind, device, dtype, second)
        settings = run_settings(args, server.pipe, variant, second)
        server.settings = {**settings, **{c: p.resolve().name for c, p in components.items()}}  # in every response
    except BaseException:
        server.server_close()
        raise
    return serve(server, model=args.model)
