"""Drop-in stand-ins for `diffusers.utils.load_image` / `export_to_video`, so diffusers example code runs unchanged.

They keep diffusers' signatures and semantics (noted where diffusers' behaviour is surprising) but use our own IO:
stdlib urllib instead of `requests`, PyAV instead of imageio/ffmpeg.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageOps

from img2vid.errors import InputError
from img2vid.image_sources import fetch_url, is_url, open_decoded
from img2vid.images import is_tensor
from img2vid.video import FORMATS, export_video, to_uint8_frames

if TYPE_CHECKING:  # annotations only: importing utils must not import torch
    import torch

__all__ = ["load_image", "export_to_video", "export_to_gif"]

# imageio-ffmpeg leaves x264 at its own default when quality is None.
_X264_DEFAULT_CRF = 23


def load_image(
    image: str | os.PathLike | PIL.Image.Image,
    convert_method: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
) -> PIL.Image.Image:
    """diffusers' `load_image`: a path, http(s) URL or PIL image -> EXIF-transposed, then `convert_method(image)`
    or `image.convert("RGB")`.

    Like diffusers, transparency is DROPPED by convert("RGB") (hidden colours show through), not composited; use
    `img2vid.images.load_image` for compositing, 16-bit scaling and one-line errors. Unlike diffusers, files are
    fully decoded here, so a truncated file fails now rather than later.
    """
    if isinstance(image, (str, os.PathLike)):
        if is_url(image):
            image = open_decoded(io.BytesIO(fetch_url(str(image))), str(image))
        elif os.path.isfile(image):
            image = open_decoded(io.BytesIO(Path(image).read_bytes()), os.fspath(image))
        else:
            raise InputError(
                f"Incorrect path or URL. URLs must start with `http://` or `https://`, and {image} is not a valid path."
            )
    elif not isinstance(image, PIL.Image.Image):
        raise InputError(
            "Incorrect format used for the image. Should be a URL linking to an image, a local path, or a PIL image."
        )
    image = PIL.ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def _diffusers_uint8(frame: np.ndarray | PIL.Image.Image) -> np.ndarray:
    """One frame as (H, W, 3) uint8, as imageio-ffmpeg would encode it."""
    if isinstance(frame, PIL.Image.Image):
        return np.asarray(frame.convert("RGB"))
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[-1] in (1, 3, 4)):
        # grey (H, W) or (H, W, 1), RGB, or RGBA whose alpha the yuv420p video drops (imageio writes all four)
        rgb = (
            np.repeat(frame.reshape(*frame.shape[:2], 1), 3, axis=2)  # (H, W) or (H, W, 1) -> (H, W, 1) -> (H, W, 3)
            if frame.ndim == 2 or frame.shape[-1] == 1
            else frame[..., :3]
        )
    else:
        raise InputError(f"a frame must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {frame.shape}")
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    # diffusers truncates (frame * 255).astype(uint8); we keep the truncation so files match its output, but clip
    # first so slight overshoot cannot wrap around to black.
    return (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _to_macro_blocks(frames: list[np.ndarray], block: int) -> list[np.ndarray]:
    """imageio scales frames UP to the next multiple of the macroblock size (ffmpeg's scale filter, bicubic)."""
    height, width = frames[0].shape[:2]
    new_w, new_h = -(-width // block) * block, -(-height // block) * block
    if (new_w, new_h) == (width, height):
        return frames
    warnings.warn(
        f"resizing frames from {width}x{height} to {new_w}x{new_h} to be divisible by macro_block_size={block}",
        stacklevel=3,
    )
    return [np.asarray(PIL.Image.fromarray(f).resize((new_w, new_h), PIL.Image.BICUBIC)) for f in frames]


def _uint8_frames(
    video_frames: Sequence[np.ndarray | PIL.Image.Image | torch.Tensor] | np.ndarray | torch.Tensor, who: str
) -> list[np.ndarray]:
    """diffusers' frames (float arrays in [0, 1] or PIL images), or tensors / a (F, H, W, 3) array -> F x (H, W, 3)
    uint8, as diffusers' export functions take them; anything else is a one-line InputError naming `who`."""
    if is_tensor(video_frames) or (isinstance(video_frames, (list, tuple)) and any(map(is_tensor, video_frames))):
        video_frames = list(to_uint8_frames(video_frames))  # F x (H, W, 3) uint8
    elif isinstance(video_frames, np.ndarray) and video_frames.ndim in (3, 4):
        # (F, H, W[, C]) -> F frames, what iterating it gives diffusers (a 3-D array is grey frames to imageio)
        video_frames = list(video_frames)
    if not isinstance(video_frames, (list, tuple)):
        raise InputError(f"{who} takes a list of frames, got {type(video_frames).__name__}")
    if not video_frames:
        raise InputError(f"{who} got no frames")
    if not all(isinstance(f, (np.ndarray, PIL.Image.Image)) for f in video_frames):
        kinds = sorted({type(f).__name__ for f in video_frames})
        raise InputError(f"{who} takes numpy arrays, PIL images or tensors as frames, got {kinds}")
    return [_diffusers_uint8(f) for f in video_frames]


def export_to_video(
    video_frames: Sequence[np.ndarray | PIL.Image.Image | torch.Tensor] | np.ndarray | torch.Tensor,
    output_video_path: str | None = None,
    fps: int = 10,
    quality: float = 5.0,
    bitrate: int | None = None,
    macro_block_size: int | None = 16,
) -> str:
    """diffusers' `export_to_video`: frames (float arrays in [0, 1] or PIL images) -> an H.264 yuv420p mp4.

    quality 0..10 maps to x264 crf int((1 - quality / 10) * 51) as imageio-ffmpeg does (5 -> crf 25); a bitrate
    (bit/s) replaces it. Sizes not divisible by macro_block_size are scaled up to the next multiple (None or 1:
    off). Without a path a temporary .mp4 is created. Returns the path.

    Beyond diffusers: a (F, H, W, 3) array, and torch tensors, as `output_type="pt"` and `img2vid.longer` return
    frames ((F, 3, H, W) floats in [0, 1], or a list of (3, H, W)); tensors are rounded to bytes as the pipeline's
    PIL output is (`video.to_uint8_frames`), not truncated as diffusers' float arrays are.
    """
    if quality is not None and not 0 <= quality <= 10:
        raise InputError(f"quality must be in 0..10, got {quality}")
    frames = _uint8_frames(video_frames, "export_to_video")
    if macro_block_size is not None and macro_block_size > 1:
        frames = _to_macro_blocks(frames, macro_block_size)
    if output_video_path is None:
        fd, output_video_path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
    suffix = Path(output_video_path).suffix.lower().lstrip(".")
    # imageio picks the container from the extension too (H.264 in each); one we cannot write is an error, not an mp4
    # under another name
    if suffix not in FORMATS or suffix == "png":
        raise InputError(
            f"export_to_video writes .mp4, .mkv, .mov, .webm, .gif or .webp files, not {output_video_path}"
        )
    crf = None if bitrate is not None else (int((1 - quality / 10) * 51) if quality is not None else _X264_DEFAULT_CRF)
    export_video(frames, output_video_path, fps=fps, format=suffix, crf=crf, bitrate=bitrate)
    return output_video_path


def export_to_gif(
    image: Sequence[np.ndarray | PIL.Image.Image | torch.Tensor] | np.ndarray | torch.Tensor,
    output_gif_path: str | None = None,
    fps: int = 10,
) -> str:
    """diffusers' `export_to_gif`: frames -> a GIF that loops forever, at 1000 // fps ms a frame as diffusers writes
    it (GIF delays are whole centiseconds: fps 7 is 14 cs). Without a path a temporary .gif is created. Returns the
    path. Beyond diffusers: the frames export_to_video takes (arrays, tensors), and an atomic write."""
    frames = _uint8_frames(image, "export_to_gif")
    if output_gif_path is None:
        fd, output_gif_path = tempfile.mkstemp(suffix=".gif")
        os.close(fd)
    export_video(frames, output_gif_path, fps=fps, format="gif")
    return output_gif_path
