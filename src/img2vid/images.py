"""Images in: load anything image-like as an RGB PIL image, and size it for SVD.

Every user-facing problem raises `InputError` with a one-line message naming the input, so the CLI can print it and
exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageOps

from img2vid.errors import InputError  # re-exported: img2vid.images.InputError
from img2vid.image_sources import open_source

if TYPE_CHECKING:
    import torch

__all__ = ["InputError", "load_image", "resize_image", "fit_size", "check_size", "to_uint8", "is_tensor", "SIZE_MODES"]

SIZE_MODES = ("stretch", "crop", "pad", "fit")
# Pillow's names for 16-bit and 32-bit integer sample modes (all big/little/native endian variants of I;16).
_INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def is_tensor(value: object) -> bool:
    """isinstance(value, torch.Tensor) without importing torch: if torch is not loaded, nothing can be a tensor."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


COMPOSITE_ROWS = 256  # rows blended at once: float32 copies of a whole 8192x8192 image took ~3 GB at a time


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Blend (H, W, 3) uint8 colour over the background with (H, W) uint8 alpha (straight, not premultiplied)."""
    bg = np.asarray(background, dtype=np.float32)
    out = np.empty(rgb.shape, dtype=np.uint8)
    for top in range(0, rgb.shape[0], COMPOSITE_ROWS):
        rows = slice(top, top + COMPOSITE_ROWS)
        a = alpha[rows].astype(np.float32)[..., None] / 255.0  # (h, W) -> (h, W, 1)
        blended = rgb[rows].astype(np.float32) * a + bg * (1.0 - a)
        out[rows] = np.clip(np.rint(blended), 0, 255)
    return out


def _check_background(background: tuple[int, int, int]) -> tuple[int, int, int]:
    values = tuple(background)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise InputError(f"background must be three integers in 0..255, got {background!r}")
    return (int(values[0]), int(values[1]), int(values[2]))


def check_unit_floats(finite: bool, lo: float, hi: float, name: str) -> None:
    """The check of float samples meant to lie in [0, 1] (`to_uint8` and `video.to_uint8_frames`' tensors)."""
    if not finite:
        raise InputError(f"{name} contains NaN or infinite values")
    # A little slack for decoder overshoot; a real range error ([-1, 1] or [0, 255] data) is reported.
    if lo < -0.01 or hi > 1.01:
        # the two usual other conventions, named with their fix (diffusers guesses [-1, 1] from a negative minimum)
        hint = "; for [-1, 1] data pass (x + 1) / 2" if lo >= -1.01 and hi <= 1.01 else ""
        hint = "; for 0..255 data divide by 255" if lo >= -0.01 and hi <= 255.5 else hint
        raise InputError(f"{name} float values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")


def check_unit_tensor(t: torch.Tensor, name: str) -> None:
    """check_unit_floats for a float tensor, read where it lies (no torch import here: tensor methods only)."""
    finite = bool(t.isfinite().all())
    lo, hi = (float(x) for x in t.aminmax()) if finite and t.numel() else (0.0, 0.0)
    check_unit_floats(finite, lo, hi, name)


def to_uint8(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Samples of any supported dtype -> uint8 with the full range mapped (16-bit scaled, never clipped)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        # 65535 / 257 = 255 exactly, so the full 16-bit range lands on the full 8-bit range.
        return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        finite = bool(np.isfinite(values).all())
        lo, hi = (float(values.min()), float(values.max())) if finite else (0.0, 0.0)  # unused when not finite
        check_unit_floats(finite, lo, hi, name)
        # The maths of inputs.to_uint8_tensor (clamp to [0, 1], * 255 in float32, round half to even as np.rint and
        # torch.round both do), so an array and a tensor of the same frames give the same bytes
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise InputError(f"{name} has unsupported dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")


def _from_array(array: np.ndarray, background: tuple[int, int, int], name: str = "image array") -> PIL.Image.Image:
    """(H, W), (H, W, 1|2|3|4) arrays -> RGB image; 2 and 4 channels carry alpha and are composited."""
    if array.ndim == 2:
        array = array[..., None]  # (H, W) -> (H, W, 1)
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{name} has unsupported shape {tuple(array.shape)}; expected HxW or HxWx1/2/3/4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(array.shape)})")
    pixels = to_uint8(array, name)
    channels = pixels.shape[-1]
    if channels in (1, 2):
        rgb = np.repeat(pixels[..., :1], 3, axis=-1)  # (H, W, 1) -> (H, W, 3)
    else:
        rgb = pixels[..., :3]
    if channels in (2, 4):
        rgb = _composite(rgb, pixels[..., -1], background)
    return PIL.Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _from_tensor(tensor: torch.Tensor, background: tuple[int, int, int]) -> PIL.Image.Image:
    """3xHxW (torch layout) or HxWx3 tensors; a leading batch of one is accepted."""
    import torch  # already loaded: the caller holds a tensor

    t = tensor.detach().to("cpu")
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # (1, C, H, W) -> (C, H, W)
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        # Channels first is torch's convention, so it also wins the ambiguous cases (e.g. 3x3x3).
        t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # numpy has no bfloat16
    if t.dtype not in (torch.uint8, torch.bool) and not t.dtype.is_floating_point:
        raise InputError(f"image tensor has unsupported dtype {t.dtype}; use uint8 or float in [0, 1]")
    return _from_array(t.numpy(), background, name="image tensor")


def _bits_per_sample(image: PIL.Image.Image) -> int | None:
    """A TIFF's BitsPerSample (tag 258) for its first sample, else None (other formats do not say)."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) else None


def _to_rgb(image: PIL.Image.Image, background: tuple[int, int, int], name: str) -> PIL.Image.Image:
    """Any Pillow mode -> RGB: alpha composited on the background, 16/32-bit samples scaled down, not clipped."""
    if image.width == 0 or image.height == 0:
        raise InputError(f"{name} has zero size ({image.width}x{image.height})")
    mode = image.mode
    if mode in _INT16_MODES or mode == "I":
        # Pillow opens 16-bit grayscale PNG/TIFF as I;16 or I; its own convert("L") clips at 255, turning most
        # of the picture white, so scale 0..65535 -> 0..255 ourselves.
        samples = np.asarray(image, dtype=np.float32)
        scaled = np.clip(samples, 0.0, 65535.0) / 65535.0  # (H, W)
        key = image.info.get("transparency")
        if isinstance(key, int):  # a PNG colour key (tRNS): that sample value is transparent, as in 8-bit files
            scaled = np.stack([scaled, (samples != key).astype(np.float32)], axis=-1)  # (H, W) -> (H, W, 2)
        return _from_array(scaled, background, name)
    if mode == "F":
        samples = np.asarray(image, dtype=np.float32)  # (H, W)
        lo, hi = (float(samples.min()), float(samples.max())) if np.isfinite(samples).all() else (0.0, 0.0)
        if lo < -0.01 or hi > 1.01:  # the array check's advice (divide by 255) is for arrays, not for a file
            raise InputError(
                f"{name} has 32-bit float samples in [{lo:.4g}, {hi:.4g}], not in [0, 1] as float images are read; "
                "save it with 8 or 16 bits per sample"
            )
        return _from_array(samples, background, name)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # Premultiplied grey (La) converts only to LA in Pillow, which then goes to RGBA
        straight = image.convert("LA") if mode == "La" else image
        rgba = np.asarray(straight.convert("RGBA"))  # (H, W, 4); handles palette / colour-key transparency too
        return PIL.Image.fromarray(_composite(rgba[..., :3], rgba[..., 3], background), mode="RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise InputError(f"{name} has colour mode {mode!r} that cannot be converted to RGB: {e}") from None


def load_image(
    source: str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor,
    background: tuple[int, int, int] = (255, 255, 255),
    transpose: bool = True,
) -> PIL.Image.Image:
    """Load a path, http(s) URL, PIL image, numpy array or torch tensor as an RGB PIL image.

    Files are fully decoded (truncation is an error, not a grey band), EXIF orientation is applied (transpose: PIL
    images too, unless off), transparency is composited on `background`, and 16-bit samples are scaled to 8 bits.
    Arrays: HxW or HxWx1/2/3/4 in uint8, uint16 or float [0, 1]; tensors: 3xHxW or HxWx3 in uint8 or float [0, 1].
    """
    bg = _check_background(background)
    # is_tensor keeps torch out of this module's imports, so the CLI can import InputError cheaply.
    if is_tensor(source):
        return _from_tensor(source, bg)
    if isinstance(source, np.ndarray):
        return _from_array(source, bg)
    if isinstance(source, PIL.Image.Image):
        image, name = source, "image"
    elif isinstance(source, (str, os.PathLike)):
        image, name = open_source(source)
    else:
        raise InputError(f"cannot load an image from {type(source).__name__}; give a path, URL, PIL image or array")
    if image.width == 0 or image.height == 0:
        raise InputError(f"{name} has zero size ({image.width}x{image.height})")
    if image.mode == "I" and _bits_per_sample(image) == 32:  # read before exif_transpose, whose copy drops the tags
        # 32-bit integer samples (scientific TIFFs) have no agreed display range: scaled as 16-bit ones, a file
        # holding 0..255 came out black; as 32-bit ones, any usual content would
        raise InputError(f"{name} has 32-bit integer samples; save it with 8 or 16 bits per sample")
    # Phones store portrait photos sideways plus an orientation tag; without this the video comes out rotated.
    try:
        if transpose or not isinstance(source, PIL.Image.Image):  # files always: nothing else reads their tag
            image = PIL.ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block (not TIFF data, bad offsets): the pixels are fine, keep them as stored
        pass
    return _to_rgb(image, bg, name)


def _check_target(width: int, height: int) -> None:
    for label, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InputError(f"{label} must be a positive integer, got {value!r}")


def _crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[float, float, float, float]:
    """The centred source box with the target's aspect ratio (fractional: PIL resamples it without a copy)."""
    src_aspect, dst_aspect = src_w / src_h, dst_w / dst_h
    if src_aspect > dst_aspect:  # too wide: trim left and right
        box_w = src_h * dst_aspect
        left = (src_w - box_w) / 2
        return (left, 0.0, left + box_w, float(src_h))
    box_h = src_w / dst_aspect  # too tall (or equal): trim top and bottom
    top = (src_h - box_h) / 2
    return (0.0, top, float(src_w), top + box_h)


def resize_image(
    image: PIL.Image.Image,
    width: int,
    height: int,
    mode: str = "stretch",
    background: tuple[int, int, int] = (255, 255, 255),
) -> PIL.Image.Image:
    """Size an image for the VAE branch.

    stretch: plain Lanczos resize to width x height (what diffusers does; distorts other aspect ratios).
    crop:    centre crop to the target aspect ratio, then resize (fills the frame, loses the edges).
    pad:     fit inside and letterbox with `background`, centred (keeps everything, adds bars).
    fit:     ignore the exact target shape, keep the image's aspect: `fit_size` picks multiples of 64 with about
             width * height pixels, then a (tiny) centre crop absorbs the rounding.
    """
    _check_target(width, height)
    if mode not in SIZE_MODES:
        raise InputError(f"unknown resize mode {mode!r}; choose one of {', '.join(SIZE_MODES)}")
    if image.mode != "RGB":
        image = load_image(image, background, transpose=False)  # to RGB only: a PIL image is taken as stored
    src_w, src_h = image.size
    if mode == "fit":
        width, height = fit_size(src_w, src_h, target_pixels=width * height)
        mode = "crop"
    if mode == "stretch" or (src_w, src_h) == (width, height):
        return image.resize((width, height), PIL.Image.LANCZOS)
    if mode == "crop":
        return image.resize((width, height), PIL.Image.LANCZOS, box=_crop_box(src_w, src_h, width, height))
    scale = min(width / src_w, height / src_h)
    inner_w = min(width, max(1, round(src_w * scale)))
    inner_h = min(height, max(1, round(src_h * scale)))
    canvas = PIL.Image.new("RGB", (width, height), _check_background(background))
    canvas.paste(image.resize((inner_w, inner_h), PIL.Image.LANCZOS), ((width - inner_w) // 2, (height - inner_h) // 2))
    return canvas


def frame_size(image: PIL.Image.Image, width: int, height: int, mode: str, multiple: int) -> tuple[int, int]:
    """The video's (width, height) for `image` asked at width x height in a SIZE_MODES `mode`: fit keeps the image's
    aspect at about width * height pixels (`fit_size`, possibly a long side for odd aspects); the other modes take
    width x height as given, which must then be multiples of `multiple` (the CLI's and the server's rule)."""
    if mode == "fit":
        return fit_size(image.width, image.height, width * height, multiple)
    check_size(width, height, multiple)
    return width, height


def video_input(image: PIL.Image.Image, width: int, height: int, mode: str) -> PIL.Image.Image:
    """The image as the pipeline is given it for a width x height video whose size `frame_size` chose. stretch: the
    original, so that CLIP sees it whole and the pipeline stretches it exactly as diffusers does; fit: cropped to
    that size (resize_image's own "fit" would choose again, in multiples of 64, often another aspect, which the
    pipeline would then stretch); crop and pad: resize_image."""
    if mode == "stretch":
        return image
    return resize_image(image, width, height, "crop" if mode == "fit" else mode)


def fit_size(width: int, height: int, target_pixels: int = 576 * 1024, multiple: int = 64) -> tuple[int, int]:
    """A (width, height) pair of multiples of `multiple` with about `target_pixels` pixels and the input's aspect.

    Each side is rounded down and up from the exact solution, and the other side is then chosen for the aspect
    (rounded down and up from side * aspect). Of those pairs the one that loses least wins: its aspect error (the
    share of the picture a crop cuts) plus a quarter of its pixel-count error (pixels are a budget of time and
    memory, not content; ties: the fewer pixels). So 1024x576 -> 1024x576, 576x1024 -> 576x1024, a square ->
    768x768, 1000x700 -> 896x640, and 1920x1080 at 512x288's pixels -> 576x320 (1.2% cropped, 1.25x the pixels;
    pairing only the roundings of both sides, a side already on a multiple left one choice for it: 512x320, 10%
    cropped, while 1921x1080 got 576x320).
    """
    _check_target(width, height)
    if target_pixels <= 0 or multiple <= 0:
        raise InputError(f"target_pixels and multiple must be positive, got {target_pixels} and {multiple}")
    aspect = width / height
    ideal_h = math.sqrt(target_pixels / aspect)
    ideal_w = ideal_h * aspect

    def around(x: float) -> set[int]:
        return {max(multiple, math.floor(x / multiple) * multiple), max(multiple, math.ceil(x / multiple) * multiple)}

    candidates = {(w, h) for h in around(ideal_h) for w in around(h * aspect)}
    candidates |= {(w, h) for w in around(ideal_w) for h in around(w / aspect)}

    def loss(wh: tuple[int, int]) -> tuple[float, int]:
        cut = abs(math.log(wh[0] / wh[1] / aspect))
        return round(cut + 0.25 * abs(math.log(wh[0] * wh[1] / target_pixels)), 9), wh[0] * wh[1]

    return min(sorted(candidates), key=loss)


def _nearest_multiples(value: int, multiple: int) -> str:
    below = (value // multiple) * multiple
    above = below + multiple
    return f"{above}" if below <= 0 else f"{below} or {above}"


def check_size(width: int, height: int, multiple: int = 64) -> None:
    """Raise InputError unless both sides are positive multiples of `multiple`.

    SVD's VAE divides by 8 and the UNet halves the latent three more times, so 64 keeps every skip connection the
    same size as its upsampled partner.
    """
    problems = []
    for label, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            problems.append(f"{label} must be an integer, got {value!r}")
        elif value <= 0:
            problems.append(f"{label} {value} must be positive; nearest valid: {multiple}")
        elif value % multiple:
            problems.append(
                f"{label} {value} is not a multiple of {multiple}; nearest valid: {_nearest_multiples(value, multiple)}"
            )
    if problems:
        raise InputError(". ".join(problems))
