"""Videos back in: the frames, frame rate and metadata of a file or PNG folder written by `img2vid.video` (or any
video PyAV reads), for tests, `img2vid info`-style tools and longer-video chains. Damaged or foreign files are
one-line InputErrors, like every other input.

Where `export_video` keeps its metadata (see img2vid.video) is defined here, beside the code that reads it back;
only a PNG folder's sidecar name, FOLDER_META, lives in img2vid.video_checks, which tells such folders apart.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import PIL.Image

from img2vid.errors import InputError, user_path
from img2vid.video_checks import FOLDER_META

__all__ = ["read_video", "read_metadata"]

EXIF_IMAGE_DESCRIPTION = 0x010E  # webp: the metadata's copy goes in this EXIF tag
PNG_META_KEY = "img2vid"  # png frames: an iTXt chunk of this name
PNG_FPS_KEY = "img2vid-fps"


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[PIL.Image.Image]:
    """PIL.Image.open for reading back: a damaged or foreign file is a one-line InputError, as av's failures are."""
    try:
        with PIL.Image.open(path) as image:
            yield image
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # not an image, truncated, bad header
        raise InputError(f"cannot decode {path}: {e}") from None


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("frame_*.png"))
    if not files:
        raise InputError(f"{folder} holds no frame_*.png files")
    return files


def _read_png_folder(folder: Path) -> tuple[np.ndarray, float]:
    files = _frame_files(folder)
    frames = []
    for file in files:
        with _open_image(file) as image:
            frames.append(np.asarray(image.convert("RGB")))
    with _open_image(files[0]) as first:
        rate = first.info.get(PNG_FPS_KEY)
    fps = float(Fraction(rate)) if rate else _stored_fps(folder)
    return np.stack(frames), fps  # F x (H, W, 3) -> (F, H, W, 3)


def _read_pillow(path: Path) -> tuple[np.ndarray, float]:
    frames, durations = [], []
    with _open_image(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(float(image.info.get("duration", 0) or 0))
    mean_ms = sum(durations) / len(durations)
    # A one-frame WebP is a still image (Pillow writes no animation chunk): no duration, so the stored fps, if any
    fps = 1000.0 / mean_ms if mean_ms > 0 else _stored_fps(path)
    return np.stack(frames), fps  # F x (H, W, 3) -> (F, H, W, 3)


def _stored_fps(path: Path) -> float:
    """The frame rate in the metadata `export_video` stored with the video, where the file itself keeps none: the
    CLI's export_fps (its fps is the model's conditioning, which --export-fps may differ from), else fps; else 0."""
    meta = read_metadata(path)
    fps = meta.get("export_fps", meta.get("fps"))
    return float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 else 0.0


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode a file written by `export_video` (or any PyAV-readable video) -> ((F, H, W, 3) uint8, fps)."""
    source = user_path(path)
    if not source.exists():
        raise InputError(f"video not found: {source}")
    if source.is_dir():
        return _read_png_folder(source)
    if source.suffix.lower() in (".gif", ".webp"):
        return _read_pillow(source)
    try:
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            # to_ndarray converts with the stream's tagged matrix (BT.709 for our files).
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.FFmpegError, IndexError) as e:
        raise InputError(f"cannot decode {source}: {e}") from None
    if not frames:
        raise InputError(f"{source} has no video frames")
    return np.stack(frames), float(rate or 0.0)  # F x (H, W, 3) -> (F, H, W, 3)


def _parse(text: str | bytes | None) -> dict[str, Any]:
    """Container copies may have been written by other tools: anything that is not a JSON object is ignored."""
    if not text:
        return {}
    try:
        value = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _container_metadata(source: Path) -> dict[str, Any]:
    if source.is_dir():
        with _open_image(_frame_files(source)[0]) as image:
            return _parse(image.info.get(PNG_META_KEY))
    suffix = source.suffix.lower()
    if suffix == ".gif":
        with _open_image(source) as image:
            return _parse(image.info.get("comment"))
    if suffix == ".webp":
        with _open_image(source) as image:
            return _parse(image.getexif().get(EXIF_IMAGE_DESCRIPTION))
    try:
        with av.open(str(source)) as container:
            tags = {key.lower(): value for key, value in container.metadata.items()}  # matroska upper-cases tags
    except av.FFmpegError:
        return {}
    return _parse(tags.get("comment"))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict stored by `export_video`: the sidecar JSON, else the copy inside the file, else {}."""
    source = user_path(path)
    if not source.exists():
        raise InputError(f"video not found: {source}")
    sidecar = source / FOLDER_META if source.is_dir() else source.with_name(source.name + ".json")
    if sidecar.is_file():
        try:
            value = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InputError(f"{sidecar} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InputError(f"{sidecar} does not hold a JSON object")
        return value
    return _container_metadata(source)
