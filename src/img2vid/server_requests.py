"""What a request to the HTTP service (img2vid.server) asks for and gets: its query parameters with the CLI's ranges,
its uploaded image, the checks that need the model's config, and the generation itself, encoded. No HTTP here: the
server's handler calls these, and tests call them directly."""

from __future__ import annotations

import argparse
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import PIL.Image

from img2vid import __version__
from img2vid.errors import InputError
from img2vid.images import SIZE_MODES, frame_size, load_image, video_input
from img2vid.run_params import LIMITS, limited, random_seed, run_params, sample_video

if TYPE_CHECKING:
    from img2vid.configs import PipelineConfig
    from img2vid.pipeline import Pipeline

__all__ = [
    "MAX_PIXELS",
    "MAX_VIDEO_PIXELS",
    "MAX_STEPS",
    "MAX_INPUT_PIXELS",
    "FORMATS",
    "parse_params",
    "check_request",
    "prepare",
    "generate",
]

# Pixels per frame: memory grows with them, and a request for 100000x100000 must get a 400, not the OOM killer.
MAX_PIXELS = 2048 * 2048
# Pixels of a whole video (frames x width x height): a chain of segments stays on the host as float32 until it is
# encoded (12 bytes a pixel), so 2**28 (455 frames at 576x1024) is 3 GiB, and about 1.5 GiB more while its bytes
# are made (two uint8 copies); frames=256&segments=64 asked ~115 GB.
MAX_VIDEO_PIXELS = 2**28
# Denoising steps a request may ask for, all its segments together: the GPU is shared in turn, and steps=1000 with
# segments=64 passed every other check and would have held it for hours. 1000 UNet steps of SVD-XT at 576x1024 take
# about 6 minutes on an H100 (BENCHMARKS.md); the CLI has no such limit.
MAX_STEPS = 1000
# Pixels of an uploaded image, checked from its header before decoding: a 300 KB PNG can declare 13000x13000 16-bit
# pixels (4 GB of memory to decode, before the request waits for the model). 8192x8192 covers any camera's photo.
MAX_INPUT_PIXELS = 8192 * 8192
FORMATS = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}  # formats a browser can show inline
# Query parameter -> parser with the CLI's ranges (one table: run_params.LIMITS), so both front ends accept
# exactly the same values.
PARAMS: dict[str, Callable[[str], Any]] = {name: limited(name) for name in LIMITS}
CHOICES = {"resize": SIZE_MODES, "format": tuple(FORMATS)}
# generate's progress reports: (stage, done, total, segment, segments), as /progress shows them (module docstring)
Report = Callable[[str, int, int, int, int], None]


# What uploads may be: common still-image formats whose header gives the size before any decoding (Pillow's ICO
# decodes its embedded PNG while opening, past MAX_INPUT_PIXELS; DDS, BLP and the like fail with errors of their own)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG opens MPO (phone) files too


def decode_image(data: bytes) -> PIL.Image.Image:
    """Upload bytes -> RGB image; Pillow is lazy, so `.load()` is what surfaces truncated data."""
    if not data:
        raise InputError("no image: send the image file as the request body")
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except MemoryError:
        raise
    except PIL.UnidentifiedImageError:
        raise InputError(
            "the uploaded file is not an image in a format this server takes (PNG, JPEG, WebP, GIF, BMP or TIFF)"
        ) from None
    except Exception as e:  # a malformed header: Pillow's plugins raise many kinds (struct.error, SyntaxError, ...)
        raise InputError(f"the uploaded image is truncated or corrupt: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"the uploaded image is {width}x{height}: over the limit of {MAX_INPUT_PIXELS} pixels; scale it down"
        )
    try:
        image.load()
        return load_image(image)  # EXIF rotation, alpha on white, 16-bit scaling: as for files
    except (InputError, MemoryError):
        raise
    except PIL.Image.DecompressionBombError as e:
        raise InputError(f"the uploaded image is too large to decode safely: {e}") from None
    except Exception as e:  # truncated data or a bad EXIF block, whatever the plugin raises: the caller's input
        raise InputError(f"the uploaded image is truncated or corrupt: {type(e).__name__}: {e}") from None


def parse_params(query: str) -> dict[str, Any]:
    """Query string -> parameters; unknown names, repeats and out-of-range values are InputErrors (one line)."""
    params: dict[str, Any] = {"width": 1024, "height": 576, "steps": 25, "noise_aug_strength": 0.02}
    params.update(min_guidance=1.0, max_guidance=3.0, resize="stretch", format="mp4")
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if name not in PARAMS and name not in CHOICES:
            raise InputError(f"unknown parameter {name!r}; known: {', '.join([*PARAMS, *CHOICES])}")
        if len(values) != 1:
            raise InputError(f"parameter {name!r} is given {len(values)} times")
        if name in CHOICES:
            if values[0] not in CHOICES[name]:
                raise InputError(f"{name} must be one of {', '.join(CHOICES[name])}, got {values[0]!r}")
            params[name] = values[0]
            continue
        try:
            params[name] = PARAMS[name](values[0])
        except argparse.ArgumentTypeError as e:
            raise InputError(f"{name}: {e}") from None
    if params["min_guidance"] > params["max_guidance"]:
        raise InputError(f"min_guidance {params['min_guidance']} is above max_guidance {params['max_guidance']}")
    return params


def check_request(cfg: PipelineConfig, image: PIL.Image.Image, params: dict[str, Any]) -> tuple[int, int]:
    """The video's (width, height) once the checks that need the model's config and the image pass (size rule,
    MAX_PIXELS, segments); else a one-line InputError. Cheap, so the handler runs it before waiting for the lock."""
    from img2vid.longer import check_segments
    from img2vid.video_checks import check_fps, check_frame_size

    check_fps(params.get("fps") or cfg.default_fps, params["format"])  # a GIF at 60 fps: refused now, not after
    width, height = frame_size(image, params["width"], params["height"], params["resize"], cfg.size_multiple)
    if width * height > MAX_PIXELS:
        raise InputError(f"{width}x{height} is over this server's limit of {MAX_PIXELS} pixels per frame")
    check_frame_size(width, height, params["format"])  # what the encoder takes: a side's limit
    frames, segments = params.get("frames") or cfg.num_frames, params.get("segments", 1)
    check_segments(segments, frames)
    if params["steps"] * segments > MAX_STEPS:
        raise InputError(
            f"{params['steps']} steps x {segments} segments is over this server's limit of {MAX_STEPS} steps a request"
        )
    total = segments * (frames - 1) + 1 if segments > 1 else frames  # chained segments share their joining frames
    if total * width * height > MAX_VIDEO_PIXELS:
        raise InputError(
            f"{total} frames of {width}x{height} are over this server's limit of {MAX_VIDEO_PIXELS} pixels a video"
        )
    return width, height


def prepare(
    cfg: PipelineConfig, image: PIL.Image.Image, params: dict[str, Any]
) -> tuple[PIL.Image.Image, tuple[int, int]]:
    """`check_request`, then (the image as the model takes it (`video_input`), the video's (width, height)): what a
    request holds while it waits. Cropped, padded or fitted, that image is the video's size (at most MAX_PIXELS,
    not the upload's up to MAX_INPUT_PIXELS); stretched, the pipeline resizes the upload itself, as diffusers."""
    width, height = check_request(cfg, image, params)
    return video_input(image, width, height, params["resize"]), (width, height)


def generate(
    pipe: Pipeline,
    image: PIL.Image.Image,
    params: dict[str, Any],
    model: str | None,
    report: Report | None = None,
    size: tuple[int, int] | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[bytes, dict]:
    """One video, encoded, and the settings that reproduce it. The caller holds the pipeline lock. report(stage,
    done, total, segment, segments) is called from this thread as the work advances (module docstring, /progress).
    size: given, `image` and `size` are `prepare`'s output (fitting the image again could pick another size).
    settings: how the server runs the model (variant, compile, two GPUs...), added to what is returned."""
    from img2vid.video import export_video

    cfg = pipe.config
    mode = params["resize"]
    model_input, (width, height) = (image, size) if size is not None else prepare(cfg, image, params)  # as the CLI's
    segments = params.get("segments", 1)
    run = run_params(
        pipe,
        width,
        height,
        params["steps"],
        params["min_guidance"],
        params["max_guidance"],
        params["noise_aug_strength"],
        frames=params.get("frames"),
        fps=params.get("fps"),
        motion_bucket_id=params.get("motion_bucket_id"),
        guidance_reuse=params.get("guidance_reuse", 1),
    )
    seed = params["seed"] if "seed" in params else random_seed()
    report = report or (lambda *a: None)
    at = [1, segments]  # the segment running now: the pipeline's own reports do not know it

    def start(k: int, n: int) -> None:  # before segment k of n; a report now covers its CLIP and VAE encoding
        at[:] = [k, n]
        report("denoise", 0, run.num_inference_steps, k, n)

    def progress(stage: str, done: int, total: int) -> None:
        report(stage, done, total, *at)

    # as the CLI: one segment is the plain call's frames; a chain is (N*(F-1)+1, 3, H, W) frames on the CPU
    video = sample_video(pipe, model_input, seed, run, segments, start, progress)
    report("export", 0, 0, segments, segments)  # encoding a long video to a file takes a while too
    info = {"img2vid_version": __version__, "model": model, **(settings or {}), "seed": seed, "resize": mode}
    # num_frames is a segment's, video_frames what the file holds
    info.update(segments=segments, **run.as_dict(), video_frames=len(video))
    if mode == "fit":  # the size asked for (the CLI's --resize fit with it gives this video; fitting 44x100 may not)
        info.update(fit_width=params["width"], fit_height=params["height"])
    # where and in what precision it ran, as the CLI's sidecar says: they change the last bits of the numbers
    info.update(format=params["format"], device=pipe.device.type, dtype=str(pipe.dtype).removeprefix("torch."))
    with tempfile.TemporaryDirectory(prefix="img2vid-serve-") as tmp:
        path = export_video(video, Path(tmp) / f"video.{params['format']}", fps=run.fps, metadata=info)
        return path.read_bytes(), info
