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
The formats' limits, the output-path checks and the temp-file helpers are img2vid.video_checks (no PyAV there).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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
from img2vid.video_checks import (  # the checks re-exported: img2vid.video.check_output and the like
    FOLDER_META,
    FORMATS,
    H264_FORMATS,
    check_crf,
    check_fps,
    check_frame_size,
    check_output,
    infer_format,
    replace_folder,
    staged_file,
    temp_name,
)
from img2vid.video_read import EXIF_IMAGE_DESCRIPTION, PNG_FPS_KEY, PNG_META_KEY, read_metadata, read_video

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

LOOP_MODES = ("none", "loop", "pingpong")
DEFAULT_CRF = 18  # x264/VP9 constant quality: 18 is visually lossless for x264, lower = bigger and better
WEBP_QUALITY = 90
_CODECS = {"webm": "libvpx-vp9"} | dict.fromkeys(H264_FORMATS, "libx264")
_CONTAINERS = {"mkv": "matroska"}  # ffmpeg's muxer names where they differ from the extension
FRAMES_PER_CHUNK = 16  # frames rounded to bytes at once (to_uint8_frames)
_BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709 share the value 1 in ffmpeg's enums
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG ("tv" range, what players expect from yuv420p)


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

        from img2vid.inputs import to_host, to_uint8_tensor  # imported on use, as torch

        t = frames.detach()
        if t.is_floating_point():
            # Rounded where the frames are, in their own layout (elementwise): for a GPU video a quarter of the
            # bytes cross to the host, and no single numpy thread makes a pass over 44M samples. The same checks
            # as images.to_uint8, and to_uint8_tensor is its maths, so the same bytes.
            v = t.float()
            check_unit_tensor(v, "frames")
            # A few frames at a time: a float32 copy of a whole long video (a chain of segments, gigabytes on the
            # host) would double its memory for a moment; chunks add one chunk's copy
            t = torch.empty(v.shape, dtype=torch.uint8, device=v.device)
            if v.ndim >= 4 and v.is_contiguous():
                flat, out = v.flatten(0, -4), t.flatten(0, -4)  # (..., a, b, c) -> (N, a, b, c), views
            else:  # an odd shape (refused below) or a strided view: in one piece
                flat, out = v[None], t[None]  # (...) -> (1, ...)
            for start in range(0, flat.shape[0], FRAMES_PER_CHUNK):
                part = flat[start : start + FRAMES_PER_CHUNK]
                out[start : start + FRAMES_PER_CHUNK] = to_uint8_tensor(part)
        if t.ndim == 5 and t.shape[0] == 1:
            t = t[0]  # (1, F, ...) -> (F, ...)
        if t.ndim == 4 and t.shape[1] in (1, 3) and (t.shape[-1] not in (1, 3) or t.shape[1] == t.shape[-1]):
            t = t.permute(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C): torch layout, also for ambiguous shapes
        return _stack_uint8(to_host(t).numpy())  # the (F, H, W, C) copy made where the frames are
    if isinstance(frames, np.ndarray):
        return _stack_uint8(frames)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or len(frames) == 0:
        raise InputError(f"expected a non-empty list of frames, an array or a tensor, got {type(frames).__name__}")
    if all(isinstance(f, PIL.Image.Image) for f in frames):
        arrays = [np.asarray(f.convert("RGB")) for f in frames]
    elif all(is_tensor(f) for f in frames):
        # each frame (C, H, W) or (H, W, C) -> (1, ...) -> (H, W, 3); stacked F x (H, W, 3) -> (F, H, W, 3)
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
        centis = round(100 / rate)  # 2..65535 (video_checks.check_fps)
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
    fmt = infer_format(final, format)
    rate = _fps_fraction(fps)
    pixels = apply_loop(to_uint8_frames(frames), loop)
    comment = _metadata_json(metadata)
    check_crf(crf, fmt)
    check_fps(rate, fmt)
    check_frame_size(pixels.shape[2], pixels.shape[1], fmt)
    final.parent.mkdir(parents=True, exist_ok=True)
    check_output(final, fmt)
    if fmt == "png":
        tmp = temp_name(final, ".tmp")
        tmp.mkdir()
        try:
            with _named_failures(final):
                _write_png_folder(pixels, tmp, rate, comment)
                replace_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    sidecar = final.with_name(final.name + ".json")
    with _named_failures(final), staged_file(final) as tmp_video:
        if fmt in _CODECS:
            _write_av(pixels, tmp_video, fmt, rate, DEFAULT_CRF if crf is None else crf, bitrate, comment)
        else:
            _write_pillow(pixels, tmp_video, fmt, rate, comment, forever=loop != "none")
        if comment is None:
            os.replace(tmp_video, final)
            sidecar.unlink(missing_ok=True)  # an older export's parameters would now describe the wrong video
            return final
        with staged_file(sidecar) as tmp_sidecar:
            tmp_sidecar.write_text(comment + "\n", encoding="utf-8")
            os.replace(tmp_video, final)
            os.replace(tmp_sidecar, sidecar)
    return final
