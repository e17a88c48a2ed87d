"""What `img2vid.video` checks before it writes, and how it writes atomically: the output formats and their limits,
whether a path can take a video, and the hidden temp names renamed over the target.

No PyAV, Pillow, numpy or torch here: front ends and the checkpoint tools check an output path before any frames
exist, and loading an encoder library to refuse a path would cost them a second of start-up for nothing.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import secrets
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

from img2vid.errors import InputError, user_path

__all__ = [
    "FORMATS",
    "MAX_CRF",
    "MAX_SIDE",
    "infer_format",
    "check_output",
    "check_frame_size",
    "check_fps",
    "check_crf",
    "file_in_the_way",
    "holds_frames",
]

FORMATS = ("mp4", "webm", "gif", "webp", "png", "mkv", "mov")  # "png" = a folder of PNG frames
# mkv and mov: H.264 as in mp4, for editors and players that want those containers (and diffusers' export_to_video
# paths, which imageio writes as the extension says); every H.264 format shares mp4's rows in the tables below
H264_FORMATS = ("mp4", "mkv", "mov")
# The largest crf each encoder takes: 8-bit x264 stops at 51 (it would cap 52..63 silently), VP9 at 63.
MAX_CRF = {"webm": 63} | dict.fromkeys(H264_FORMATS, 51)
# The largest width or height each format's encoder takes (x264 and WebP refuse more; GIF stores 16-bit sizes,
# VP9 up to 65536); past these they fail only after the frames are made, with an encoder's cryptic message.
MAX_SIDE = {"webm": 65536, "gif": 65535, "webp": 16383} | dict.fromkeys(H264_FORMATS, 16384)
_GIF_MAX_CENTIS = 65535  # a GIF frame delay is a 16-bit count of centiseconds
_GIF_MIN_CENTIS = 2  # browsers play shorter delays at 10 cs: 2 is the shortest that plays as written
FOLDER_META = "metadata.json"  # png folders: the sidecar inside the folder (video_read reads it back)
NAME_MAX = 255  # bytes in one file name, on Linux, macOS and Windows file systems alike


def infer_format(path: Path, format: str | None) -> str:
    """The format to write at `path`: `format` if given, else the extension; a one-line InputError if neither is
    one of FORMATS."""
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        shown = format if format else (path.suffix or "no extension")
        raise InputError(f"cannot write {path}: unknown video format {shown!r}; use one of {', '.join(FORMATS)}")
    return fmt


def temp_name(final: Path, tail: str) -> Path:
    """A hidden, unique name beside `final`, ending in `tail`. A long final name is cut to fit NAME_MAX: a name of
    its own that fits could otherwise fail as "File name too long" only after the whole video was made."""
    token = f".{secrets.token_hex(4)}{tail}"
    room = NAME_MAX - 1 - len(token.encode())
    base = final.name.encode()[:room].decode(errors="ignore")  # never half a UTF-8 character
    return final.parent / f".{base}{token}"


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A hidden temp file next to `final` (same extension, so muxers pick the same format), removed on failure."""
    tmp = temp_name(final, f".tmp{final.suffix}")
    # O_EXCL reserves the name; mode 0o666 lets the umask decide permissions as for any ordinary new file.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_frame_folder(folder: Path) -> bool:
    """Only a folder export_video wrote may be replaced: never delete a user's unrelated directory."""
    return all(p.name == FOLDER_META or (p.name.startswith("frame_") and p.suffix == ".png") for p in folder.iterdir())


def holds_frames(folder: Path) -> bool:
    """Whether `folder` is a non-empty folder of frames export_video wrote: a video's output, not a place for videos."""
    return folder.is_dir() and any(folder.glob("frame_*.png")) and _is_frame_folder(folder)


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the folder `tmp` to `final`, replacing a folder of frames there (check_output allowed no other)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # rename() cannot replace a non-empty directory: move the old one aside, swap, then delete it.
    old = temp_name(final, ".old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_in_the_way(path: Path) -> Path | None:
    """The file, if any, where a folder above `path` has to be (writing there fails as "File exists")."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def check_output(path: str | os.PathLike, fmt: str) -> None:
    """A one-line InputError if `export_video` could not put a `fmt` video at `path` for what is there already; a
    front end calls it before the (slow) frames are made, export_video again before writing."""
    final = user_path(path)
    if fmt == "png":
        if final.exists() and not final.is_dir():
            raise InputError(f"cannot write PNG frames to {final}: it exists and is not a directory")
        if final.is_dir() and not _is_frame_folder(final):
            raise InputError(f"refusing to replace {final}: it holds files other than PNG frames")
        return
    if final.is_dir():
        raise InputError(f"cannot write {final}: it is a directory")
    # Found only after the video had been renamed into place, the export would fail with the new video written
    sidecar = final.with_name(final.name + ".json")
    if len(sidecar.name.encode()) > NAME_MAX:  # the video's name fits, its sidecar's would not
        longest = NAME_MAX - len(".json")
        raise InputError(f"the file name {final.name[:24]}... is too long: at most {longest} bytes (with .json beside)")
    if sidecar.is_dir():
        raise InputError(f"cannot write {final}: its metadata file {sidecar} is a directory")


def check_frame_size(width: int, height: int, fmt: str) -> None:
    """A one-line InputError if `fmt`'s encoder cannot take width x height frames (see MAX_SIDE)."""
    limit = MAX_SIDE.get(fmt)
    if limit is not None and max(width, height) > limit:
        raise InputError(f"{width}x{height} frames are too large for {fmt}: at most {limit} pixels a side")


def check_fps(fps: float | Fraction, fmt: str) -> None:
    """A one-line InputError if a `fmt` file cannot play at `fps`: a GIF frame lasts 2..65535 centiseconds (browsers
    slow shorter delays down to 10), so GIFs play at 50 fps at most and 1 frame in 655 s at least."""
    if fmt != "gif":
        return
    if fps > 100 / _GIF_MIN_CENTIS:
        raise InputError(f"fps {float(fps):.4g} is too fast for a GIF (at most {100 // _GIF_MIN_CENTIS} fps)")
    if round(100 / fps) > _GIF_MAX_CENTIS:
        raise InputError(f"fps {float(fps):.4g} is too slow for a GIF (at most {_GIF_MAX_CENTIS / 100} s a frame)")


def check_crf(crf: int | None, fmt: str) -> None:
    """A one-line InputError if `crf` is not a quality `fmt`'s encoder takes (None: the default; gif/webp/png
    ignore crf, so any integer 0..63 passes for them)."""
    top = MAX_CRF.get(fmt, 63)
    # numbers.Integral: numpy's integers register there, so they pass without numpy imported here (bool is refused)
    ok = isinstance(crf, numbers.Integral) and not isinstance(crf, bool) and 0 <= crf <= top
    if crf is not None and not ok:
        raise InputError(f"crf for {fmt} must be an integer in 0..{top}, got {crf!r}")
