"""Videos out: frames -> mp4 (H.264) / webm (VP9) / gif / animated webp / a folder of PNGs, written atomically.

Choices worth knowing:
- mp4/webm are yuv420p, which needs an even width and height: odd sizes are padded by repeating the last row/column
  (one pixel, invisible) rather than refused, so any frame size exports. SVD sizes (multiples of 64) are untouched.
- Colour: RGB -> YUV uses BT.709 (limited range) and the stream is tagged so, because players assume BT.709 for
  untagged content at these sizes; an untagged BT.601 conversion shifts saturated colours visibly.
- Metadata (seed, model, parameters) is a sidecar `<path>.json` (png folder: `metadata.json` inside) and, where the
  format has a place for it, a copy in the file: mp4/webm container `comment`, gif comment, webp EXIF
  ImageDescription, an iTXt chunk "img2vid" in every PNG frame. The sidecar wins when both exist.
- Nothing ever appears under the final name half-written: everything goes to a hidden temp in the same directory
  and is renamed over the target; on any exception (Ctrl-C included) the temp is removed, an older file survives.
Reading these files back (frames, fps, metadata) is img2vid.video_read; read_video and read_metadata are also here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from img2vid.errors import InputError, user_path
from img2vid.images import check_unit_tensor, is_tensor, to_uint8
from img2vid.video_read import EXIF_IMAGE_DESCRIPTION, FOLDER_META, PNG_FPS_KEY, PNG_META_KEY, read_metadata, read_video

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMATS",
    "LOOP_MODES",
    "to_uint8_frames",
    "apply_loop",
    "check_output",
    "check_frame_size",
    "check_crf",
    "check_fps",
    "export_video",
    "read_video",
    "read_metadata",
]

FORMATS = ("mp4", "webm", "gif", "webp", "png", "mkv", "mov")  # "png" = a folder of PNG frames
LOOP_MODES = ("none", "loop", "pingpong")
DEFAULT_CRF = 18  # x264/VP9 constant quality: 18 is visually lossless for x264, lower = bigger and better
WEBP_QUALITY = 90
# mkv and mov: H.264 as in mp4, for editors and players that want those containers (and diffusers' export_to_video
# paths, which imageio writes as the extension says); every H.264 format shares mp4's rows in the tables below
_H264 = ("mp4", "mkv", "mov")
_CODECS = {"webm": "libvpx-vp9"} | dict.fromkeys(_H264, "libx264")
_CONTAINERS = {"mkv": "matroska"}  # ffmpeg's muxer names where they differ from the extension
# The largest crf each encoder takes: 8-bit x264 stops at 51 (it would cap 52..63 silently), VP9 at 63.
MAX_CRF = {"webm": 63} | dict.fromkeys(_H264, 51)
FRAMES_PER_CHUNK = 16  # frames rounded to bytes at once (to_uint8_frames)
_BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709 share the value 1 in ffmpeg's enums
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG ("tv" range, what players expect from yuv420p)
# The largest width or height each format's encoder takes (x264 and WebP refuse more; GIF stores 16-bit sizes,
# VP9 up to 65536); past these they fail only after the frames are made, with an encoder's cryptic message.
MAX_SIDE = {"webm": 65536, "gif": 65535, "webp": 16383} | dict.fromkeys(_H264, 16384)
_GIF_MAX_CENTIS = 65535  # a GIF frame delay is a 16-bit count of centiseconds
_GIF_MIN_CENTIS = 2  # browsers play shorter delays at 10 cs: 2 is the shortest that plays as written


def _stack_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]  # (1, F, H, W, C) -> (F, H, W, C): one video of a pipeline batch
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise InputError(f"frames have unsupported shape {tuple(array.shape)}; expected (F, H, W, 3)")
    if 0 in array.shape:
        raise InputError(f"frames are empty (shape {tuple(array.shape)})")
    pixels = to_uint8(array, "frames")
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)  # (F, H, W, 1) -> (F, H, W, 3)
    return np.ascontiguousarray(pixels)


def to_uint8_frames(frames: Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
    """list[PIL.Image] / (F, H, W, 3) array (float [0, 1] or uint8) / (F, 3, H, W) or (F, H, W, 3) tensor
    -> (F, H, W, 3) uint8. Floats are rounded (like diffusers' PIL output), not truncated."""
    if is_tensor(frames):
        import torch  # already loaded: the caller holds a tensor

        t = frames.detach()
        if t.is_floating_point():
            # Rounded where the frames are, in their own layout (elementwise): for a GPU video a quarter of the
            # bytes cross to the host, and no single numpy thread makes a pass over 44M samples. The same checks
            # and float32 maths as images.to_uint8 (round half to even, like np.rint), so the same bytes.
            v = t.float()
            check_unit_tensor(v, "frames")
            # A few frames at a time: a float32 copy of a whole long video (a chain of segments, gigabytes on the
            # host) would double its memory for a moment; chunks add one chunk's copy
            t = torch.empty(v.shape, dtype=torch.uint8, device=v.device)
            if v.ndim >= 4 and v.is_contiguous():
                flat, out = v.flatten(0, -4), t.flatten(0, -4)  # (..., a, b, c) -> (N, a, b, c), views
            else:  # an odd shape (refused below) or a strided view: in one piece
                flat, out = v[None], t[None]
            for start in range(0, flat.shape[0], FRAMES_PER_CHUNK):
                part = flat[start : start + FRAMES_PER_CHUNK]
                out[start : start + FRAMES_PER_CHUNK] = part.clamp(0.0, 1.0).mul_(255.0).round_()
        if t.ndim == 5 and t.shape[0] == 1:
            t = t[0]  # (1, F, ...) -> (F, ...)
        if t.ndim == 4 and t.shape[1] in (1, 3) and (t.shape[-1] not in (1, 3) or t.shape[1] == t.shape[-1]):
            t = t.permute(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C): torch layout, also for ambiguous shapes
        from img2vid.inputs import to_host  # imported on use, as torch

        return _stack_uint8(to_host(t).numpy())  # the (F, H, W, C) copy made where the frames are
    if isinstance(frames, np.ndarray):
        return _stack_uint8(frames)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or len(frames) == 0:
        raise InputError(f"expected a non-empty list of frames, an array or a tensor, got {type(frames).__name__}")
    if all(isinstance(f, PIL.Image.Image) for f in frames):
        arrays = [np.asarray(f.convert("RGB")) for f in frames]
    elif all(is_tensor(f) for f in frames):
        return to_uint8_frames(np.stack([to_uint8_frames(f[None])[0] for f in frames]))
    elif all(isinstance(f, np.ndarray) for f in frames):
        arrays = list(frames)
    else:
        raise InputError("frames must all be PIL images, all numpy arrays or all tensors")
    if len({a.shape for a in arrays}) != 1:
        raise InputError(f"frames differ in size: {sorted({a.shape for a in arrays})}")
    return _stack_uint8(np.stack(arrays))  # F x (H, W, C) -> (F, H, W, C)


def apply_loop(frames: np.ndarray, loop: str) -> np.ndarray:
    """The frames of a loop mode: none / loop unchanged; pingpong 0..F-1 then F-2..1, so that looping playback never
    shows the turning frames twice in a row. (Whether a GIF / WebP plays once or forever: `export_video`.)"""
    if loop not in LOOP_MODES:
        raise InputError(f"unknown loop mode {loop!r}; choose one of {', '.join(LOOP_MODES)}")
    if loop != "pingpong":
        return frames
    return np.concatenate([frames, frames[-2:0:-1]], axis=0)  # (F, ...) -> (2F - 2, ...) for F >= 2


def _infer_format(path: Path, format: str | None) -> str:
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        shown = format if format else (path.suffix or "no extension")
        raise InputError(f"cannot write {path}: unknown video format {shown!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _fps_fraction(fps: float | Fraction) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.integer, np.floating)):
        raise InputError(f"fps must be a number, got {fps!r}")
    if not math.isfinite(float(fps)) or fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    # 1001 recovers NTSC rates from their float spelling (29.97002997 -> 30000/1001) and keeps 12.5 exact.
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(1001)
    if rate == 0:  # below 1/2002 fps the nearest fraction is 0, and a frame would last forever
        raise InputError(f"fps {fps} is too small; use 0.001 or more")
    return rate


def _json_default(value: object) -> object:
    """Make common non-JSON values storable (numpy scalars/arrays, paths, fractions, dtypes) instead of failing."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or is_tensor(value):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _metadata_json(metadata: dict | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    # ASCII-only so the same string fits everywhere, including EXIF's ASCII ImageDescription.
    return json.dumps(metadata, ensure_ascii=True, default=_json_default)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (F, H, W, 3) -> even H, W


def _write_av(
    frames: np.ndarray, path: Path, fmt: str, rate: Fraction, crf: int, bitrate: int | None, comment: str | None
) -> None:
    frames = _pad_even(frames)
    # +faststart moves the moov index before the media data so browsers can start playing while downloading.
    options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
    with av.open(str(path), mode="w", format=_CONTAINERS.get(fmt, fmt), options=options) as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream(_CODECS[fmt], rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"  # the only 4:2:0 flavour every browser decodes
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc = _BT709, _BT709, _BT709
        ctx.color_range = _LIMITED_RANGE
        if bitrate is not None:
            stream.bit_rate = int(bitrate)
            codec_options = {}
        else:
            codec_options = {"crf": str(int(crf))}
            if fmt == "webm":
                codec_options["b:v"] = "0"  # VP9 only honours crf as constant quality with the bitrate cap off
        if fmt == "webm":
            codec_options.update({"row-mt": "1", "cpu-used": "2"})
        stream.options = codec_options
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def _write_pillow(frames: np.ndarray, path: Path, fmt: str, rate: Fraction, comment: str | None, forever: bool) -> None:
    images = [PIL.Image.fromarray(f) for f in frames]
    if fmt == "gif":
        # GIF delays are whole centiseconds (Pillow truncates ms / 10), and browsers slow delays under 2 cs down to
        # 10 cs, so round to the nearest valid value ourselves: fps 7 plays at 100 / 14 = 7.14.
        centis = round(100 / rate)  # 2.._GIF_MAX_CENTIS (check_fps)
        extra = {"duration": centis * 10, "optimize": False}
        if comment is not None:
            extra["comment"] = comment
    else:
        extra = {"duration": max(1, round(1000 / rate)), "quality": WEBP_QUALITY, "method": 4}
        if comment is not None:
            exif = PIL.Image.Exif()
            exif[EXIF_IMAGE_DESCRIPTION] = comment
            extra["exif"] = exif.tobytes()
    # Loop count 0 is forever. Once: a GIF without the looping (NETSCAPE) block, a WebP with a count of 1.
    if forever or fmt == "webp":
        extra["loop"] = 0 if forever else 1
    images[0].save(path, format=fmt.upper(), save_all=True, append_images=images[1:], **extra)


def _write_png_folder(frames: np.ndarray, folder: Path, rate: Fraction, comment: str | None) -> None:
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(PNG_FPS_KEY, str(rate))  # a folder has no container to carry the frame rate
    if comment is not None:
        info.add_itxt(PNG_META_KEY, comment)
        (folder / FOLDER_META).write_text(comment + "\n", encoding="utf-8")
    for index, pixels in enumerate(frames):
        PIL.Image.fromarray(pixels).save(folder / f"frame_{index:05d}.png", pnginfo=info)


NAME_MAX = 255  # bytes in one file name, on Linux, macOS and Windows file systems alike


def _temp_name(final: Path, tail: str) -> Path:
    """A hidden, unique name beside `final`, ending in `tail`. A long final name is cut to fit NAME_MAX: a name of
    its own that fits could otherwise fail as "File name too long" only after the whole video was made."""
    token = f".{secrets.token_hex(4)}{tail}"
    room = NAME_MAX - 1 - len(token.encode())
    base = final.name.encode()[:room].decode(errors="ignore")  # never half a UTF-8 character
    return final.parent / f".{base}{token}"


@contextlib.contextmanager
def _staged_file(final: Path) -> Iterator[Path]:
    """A hidden temp file next to `final` (same extension, so muxers pick the same format), removed on failure."""
    tmp = _temp_name(final, f".tmp{final.suffix}")
    # O_EXCL reserves the name; mode 0o666 lets the umask decide permissions as for any ordinary new file.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_frame_folder(folder: Path) -> bool:
    """Only a folder this module wrote may be replaced: never delete a user's unrelated directory."""
    return all(p.name == FOLDER_META or (p.name.startswith("frame_") and p.suffix == ".png") for p in folder.iterdir())


def holds_frames(folder: Path) -> bool:
    """Whether `folder` is a non-empty folder of frames this module wrote: a video's output, not a place for videos."""
    return folder.is_dir() and any(folder.glob("frame_*.png")) and _is_frame_folder(folder)


def _replace_folder(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    # rename() cannot replace a non-empty directory: move the old one aside, swap, then delete it.
    old = _temp_name(final, ".old")
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
    if crf is not None and not (isinstance(crf, (int, np.integer)) and not isinstance(crf, bool) and 0 <= crf <= top):
        raise InputError(f"crf for {fmt} must be an integer in 0..{top}, got {crf!r}")


@contextlib.contextmanager
def _named_failures(final: Path) -> Iterator[None]:
    """An OSError while writing (a full disk, a folder gone) names the video the user asked for, not the hidden
    temp file that was being written."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
        raise OSError(e.errno, f"cannot write {final}: {reason}") from e


def export_video(
    frames: Sequence | np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    fps: float | Fraction,
    format: str | None = None,
    crf: int | None = None,
    loop: str = "loop",
    metadata: dict | None = None,
    bitrate: int | None = None,
) -> Path:
    """Write frames as mp4 / mkv / mov / webm / gif / webp / png-folder (format from the extension unless given).

    crf: constant quality for mp4/mkv/mov/webm (default 18; ignored by gif/webp/png). bitrate: a fixed bitrate in
    bit/s for those instead of crf. loop: "loop" (GIF and WebP play forever), "none" (they play once) or "pingpong"
    (forward then back, forever; see `apply_loop`); the other containers have no loop flag, players decide. metadata: a
    JSON-able dict stored in a sidecar and in the file (see module doc); without it a stale sidecar of an earlier
    export is removed.
    """
    final = user_path(path)
    fmt = _infer_format(final, format)
    rate = _fps_fraction(fps)
    pixels = apply_loop(to_uint8_frames(frames), loop)
    comment = _metadata_json(metadata)
    check_crf(crf, fmt)
    check_fps(rate, fmt)
    check_frame_size(pixels.shape[2], pixels.shape[1], fmt)
    final.parent.mkdir(parents=True, exist_ok=True)
    check_output(final, fmt)
    if fmt == "png":
        tmp = _temp_name(final, ".tmp")
        tmp.mkdir()
        try:
            with _named_failures(final):
                _write_png_folder(pixels, tmp, rate, comment)
                _replace_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    sidecar = final.with_name(final.name + ".json")
    with _named_failures(final), _staged_file(final) as tmp_video:
        if fmt in _CODECS:
            _write_av(pixels, tmp_video, fmt, rate, DEFAULT_CRF if crf is None else crf, bitrate, comment)
        else:
            _write_pillow(pixels, tmp_video, fmt, rate, comment, forever=loop != "none")
        if comment is None:
            os.replace(tmp_video, final)
            sidecar.unlink(missing_ok=True)  # an older export's parameters would now describe the wrong video
            return final
        with _staged_file(sidecar) as tmp_sidecar:
            tmp_sidecar.write_text(comment + "\n", encoding="utf-8")
            os.replace(tmp_video, final)
            os.replace(tmp_sidecar, sidecar)
    return final
