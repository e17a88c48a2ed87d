"""Images in: every input kind, every sizing mode, every user-facing error."""

from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from img2vid.errors import InputError
from img2vid.images import check_size, fit_size, load_image, resize_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> PIL.Image.Image:
    return PIL.Image.new(mode, size, colour)


def _one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- sizing


def test_stretch_is_plain_lanczos_resize() -> None:
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))
    out = resize_image(image, 64, 128)  # default mode: stretch, even to a portrait shape
    assert out.size == (64, 128) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((64, 128), PIL.Image.LANCZOS)))


def _three_bands(width: int, height: int, vertical: bool = False) -> PIL.Image.Image:
    """Red | green | blue bands, the green one a centred square."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    if vertical:
        side = width
        top = (height - side) // 2
        array[:top], array[top : top + side], array[top + side :] = RED, GREEN, BLUE
    else:
        side = height
        left = (width - side) // 2
        array[:, :left], array[:, left : left + side], array[:, left + side :] = RED, GREEN, BLUE
    return PIL.Image.fromarray(array)


def test_crop_keeps_the_centre() -> None:
    out = np.asarray(resize_image(_three_bands(200, 100), 64, 64, mode="crop")).astype(int)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[4:-4, 4:-4] - GREEN).max() <= 2  # only the green centre survives
    assert (out[..., 1] > 180).all() and (out[..., 0] < 80).all() and (out[..., 2] < 80).all()


def test_crop_portrait_target_from_tall_image() -> None:
    out = np.asarray(resize_image(_three_bands(100, 300, vertical=True), 64, 128, mode="crop")).astype(int)
    assert out.shape == (128, 64, 3)
    # The target (1:2) is wider than the green square's band ratio allows: the crop keeps green in the middle
    # and some red/blue at the top/bottom, symmetrically.
    assert np.abs(out[64, 32] - GREEN).max() <= 2
    assert np.abs(out[0, 32] - RED).max() <= 2 and np.abs(out[-1, 32] - BLUE).max() <= 2


def test_pad_letterboxes_with_background() -> None:
    bg = (10, 20, 30)
    out = np.asarray(resize_image(_solid((200, 100), RED), 64, 64, mode="pad", background=bg)).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[:16] == bg).all() and (out[48:] == bg).all()  # 64x32 content centred: 16-row bars
    assert np.abs(out[17:47] - RED).max() <= 2


def test_pad_portrait_bars_left_and_right() -> None:
    out = np.asarray(resize_image(_solid((100, 100), GREEN), 128, 64, mode="pad")).astype(int)
    assert out.shape == (64, 128, 3)
    assert (out[:, :32] == 255).all() and (out[:, 96:] == 255).all()  # default background is white
    assert np.abs(out[:, 33:95] - GREEN).max() <= 2


def test_fit_keeps_aspect_with_multiples_of_64() -> None:
    out = resize_image(_solid((300, 200), BLUE), 192, 128, mode="fit")
    assert out.size == (192, 128)
    out = resize_image(_three_bands(1000, 700), 1024, 576, mode="fit")
    assert out.size == fit_size(1000, 700) == (896, 640)
    assert np.abs(np.asarray(out)[320, 448].astype(int) - GREEN).max() <= 2


@pytest.mark.parametrize(
    ("size", "expected"), [((1024, 576), (1024, 576)), ((576, 1024), (576, 1024)), ((512, 512), (768, 768))]
)
def test_fit_size_known_shapes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_size(*size) == expected


def test_fit_size_tries_the_neighbours_of_a_side_already_on_a_multiple() -> None:
    """512x288's pixels for a 16:9 photo: the ideal width is 512 exactly, so only 512 was tried (512x320: 10% of the
    picture cropped) while one more pixel of width gave 576x320 (1.2%); wide panoramas lost 18% of their height."""
    assert fit_size(1920, 1080, 512 * 288) == fit_size(1921, 1080, 512 * 288) == (576, 320)
    assert fit_size(1920, 1080, 640 * 360) == (576, 320)  # was 640x384: 6.2% cropped
    assert fit_size(3000, 1000, 512 * 512) == (960, 320)  # exactly 3:1
    w, h = fit_size(2389, 100)  # 23.9:1
    assert abs(np.log(w / h / 23.89)) < 0.01 and (w, h) == (3072, 128)


def test_resize_takes_every_mode_of_pil_image_as_stored() -> None:
    """An EXIF-tagged RGBA or L image was turned upright by resize_image's conversion to RGB, an RGB one was not."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways
    sizes = set()
    for mode in ("RGB", "RGBA", "L"):
        image = _solid((60, 40), BLUE).convert(mode)
        image.info["exif"] = exif.tobytes()
        image.getexif()[0x0112] = 6
        sizes.add(resize_image(image, 64, 64, mode="pad", background=(0, 0, 0)).getbbox())  # black bars
    assert len(sizes) == 1  # the same bars, hence the same orientation, in every mode


@pytest.mark.parametrize("aspect", [0.3, 0.5, 0.75, 1.0, 4 / 3, 16 / 9, 2.5])
def test_fit_size_properties(aspect: float) -> None:
    width, height = fit_size(round(1000 * aspect), 1000)
    assert width % 64 == 0 and height % 64 == 0
    assert 0.8 < width * height / (576 * 1024) < 1.2
    assert abs(np.log(width / height / aspect)) < 0.1


def test_bad_mode_and_target() -> None:
    with pytest.raises(InputError) as e:
        resize_image(_solid((8, 8), RED), 64, 64, mode="zoom")
    _one_line_error(e, "zoom", "stretch, crop, pad, fit")
    with pytest.raises(InputError):
        resize_image(_solid((8, 8), RED), 0, 64)


def test_check_size() -> None:
    check_size(1024, 576)
    check_size(576, 1024)
    with pytest.raises(InputError) as e:
        check_size(1000, 576)
    assert str(e.value) == "width 1000 is not a multiple of 64; nearest valid: 960 or 1024"
    with pytest.raises(InputError) as e:
        check_size(1024, 30)
    assert str(e.value) == "height 30 is not a multiple of 64; nearest valid: 64"
    with pytest.raises(InputError) as e:
        check_size(0, 570)
    _one_line_error(e, "width 0 must be positive", "height 570 is not a multiple of 64; nearest valid: 512 or 576")
    with pytest.raises(InputError):
        check_size(64.0, 64)  # type: ignore[arg-type]


# ---------------------------------------------------------------- input kinds


def _save(image: PIL.Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgba_composited_on_background(tmp_path: Path) -> None:
    image = _solid((4, 4), (255, 0, 0, 128), "RGBA")
    expected = [128, 0, 127]  # 255 * 128/255 over blue: 255 * (1 - 128/255)
    for source in (image, _save(image, tmp_path / "a.png"), np.asarray(image)):
        out = load_image(source, background=(0, 0, 255))
        assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == expected


def test_la_and_palette_transparency(tmp_path: Path) -> None:
    la = _solid((4, 4), (100, 0), "LA")
    assert np.asarray(load_image(la, background=(1, 2, 3)))[0, 0].tolist() == [1, 2, 3]
    # premultiplied grey (La, as RGBa): composited as its straight LA twin (it was a bare ValueError)
    premultiplied = _solid((4, 4), (100, 128), "La")
    straight = premultiplied.convert("LA")
    assert np.array_equal(np.asarray(load_image(premultiplied)), np.asarray(load_image(straight)))
    assert np.array_equal(
        np.asarray(load_image(_solid((4, 4), (100, 50, 20, 128), "RGBa"))),
        np.asarray(load_image(_solid((4, 4), (100, 50, 20, 128), "RGBa").convert("RGBA"))),
    )
    palette = PIL.Image.new("P", (4, 4), 0)
    palette.putpalette([200, 10, 20, 30, 40, 50] + [0] * 762)
    palette.putpixel((0, 0), 1)
    path = _save(palette, tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(path, background=(7, 8, 9)))
    assert out[0, 0].tolist() == [30, 40, 50] and out[1, 1].tolist() == [7, 8, 9]
    opaque = np.asarray(load_image(_save(palette, tmp_path / "q.png")))
    assert opaque[1, 1].tolist() == [200, 10, 20]


def test_grayscale_cmyk_and_bilevel() -> None:
    assert np.asarray(load_image(_solid((3, 3), 77, "L")))[1, 1].tolist() == [77, 77, 77]
    assert np.asarray(load_image(_solid((3, 3), (0, 0, 0, 0), "CMYK")))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(_solid((3, 3), 1, "1")))[0, 0].tolist() == [255, 255, 255]


def test_16bit_scaled_not_clipped(tmp_path: Path) -> None:
    samples = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)  # 32896 = 128 * 257
    expected = [0, 128, 255, 4]
    path = _save(PIL.Image.fromarray(samples), tmp_path / "g16.png")
    with PIL.Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # really a 16-bit image on disk
    for source in (path, samples, PIL.Image.fromarray(samples.astype(np.int32), mode="I")):
        out = np.asarray(load_image(source))
        assert out[0, :, 0].tolist() == expected and (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20], array[:, 20:] = RED, BLUE  # stored sideways: red left, blue right
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(PIL.Image.fromarray(array), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (40, 20, 3)  # portrait after rotation
    assert np.abs(out[5, 10] - RED).max() < 20 and np.abs(out[35, 10] - BLUE).max() < 20  # left went to the top


def test_numpy_inputs() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.asarray(load_image(gray))[..., 1].tolist() == gray.tolist()
    assert np.array_equal(np.asarray(load_image(gray[..., None])), np.asarray(load_image(gray)))
    rng = np.random.default_rng(1)
    rgb = rng.random((5, 6, 3), dtype=np.float32)
    assert np.array_equal(np.asarray(load_image(rgb)), np.rint(rgb * 255).astype(np.uint8))
    rgb16 = (rng.random((5, 6, 3)) * 65535).astype(np.uint16)
    assert np.array_equal(np.asarray(load_image(rgb16)), np.rint(rgb16 / 257).astype(np.uint8))


def test_tensor_inputs() -> None:
    rng = np.random.default_rng(2)
    hwc = rng.random((10, 20, 3), dtype=np.float32)
    expected = np.rint(hwc * 255).astype(np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    for source in (chw, chw[None], torch.from_numpy(hwc)):
        out = load_image(source)
        assert out.size == (20, 10) and np.array_equal(np.asarray(out), expected)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(expected))), expected)
    assert np.abs(np.asarray(load_image(chw.to(torch.bfloat16))).astype(int) - expected).max() <= 2


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((4, 4, 5), np.uint8), "unsupported shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "unsupported shape"),
        (np.zeros((4, 4, 3), np.int64), "unsupported dtype"),
        (np.full((4, 4, 3), -1.0, np.float32), "must be in [0, 1]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(InputError) as e:
        load_image(array)
    _one_line_error(e, fragment)


def test_bad_tensor_dtype() -> None:
    with pytest.raises(InputError) as e:
        load_image(torch.zeros(3, 4, 4, dtype=torch.int32))
    _one_line_error(e, "image tensor", "int32")


# ---------------------------------------------------------------- file errors


def _png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    rng = np.random.default_rng(4)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError) as e:
        load_image(missing)
    _one_line_error(e, "not found", str(missing))
    with pytest.raises(InputError) as e:
        load_image(tmp_path)
    _one_line_error(e, "is a directory", str(tmp_path))
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture")
    with pytest.raises(InputError) as e:
        load_image(str(text))
    _one_line_error(e, "not an image", str(text))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_image(empty)
    _one_line_error(e, "empty", str(empty))


def test_pipes_devices_unknown_users_and_endless_sources_are_one_line_errors(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipe was read forever (waiting for a writer), /dev/zero until memory ran out, ~nouser/x.png was a
    RuntimeError, and a download had no size bound."""
    import img2vid.image_sources as images

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as e:
        load_image(fifo)  # returns at once: the file is never opened
    _one_line_error(e, "not a regular file", str(fifo))
    with pytest.raises(InputError) as e:
        load_image("/dev/zero")
    _one_line_error(e, "not a regular file")
    with pytest.raises(InputError) as e:
        load_image("~no-such-user-img2vid/x.png")
    _one_line_error(e, "~no-such-user-img2vid names no user's home folder")
    root, base = http_root
    (root / "img.png").write_bytes(_png_bytes((8, 6)))
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(InputError) as e:
        load_image(f"{base}/img.png")
    _one_line_error(e, "too large for an image")
    with pytest.raises(InputError) as e:
        load_image(root / "img.png")
    _one_line_error(e, "too large for an image file")


def test_32_bit_integer_and_out_of_range_float_files_are_refused(tmp_path: Path) -> None:
    """A 32-bit integer TIFF holding 0..255 came out black (scaled as 16-bit samples); a float TIFF of 0..255 was
    told to "divide by 255", advice for arrays, not files. 16-bit files still load, scaled."""
    ramp = np.arange(48, dtype=np.int32).reshape(6, 8) * 5  # 0..235
    PIL.Image.fromarray(ramp).save(tmp_path / "int32.tif")
    with pytest.raises(InputError) as e:
        load_image(tmp_path / "int32.tif")
    _one_line_error(e, "32-bit integer samples", "8 or 16 bits")
    PIL.Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(InputError) as e:
        load_image(tmp_path / "float.tif")
    _one_line_error(e, "32-bit float samples in [0, 235]", "8 or 16 bits per sample")
    PIL.Image.fromarray(ramp.astype(np.float32) / 235).save(tmp_path / "unit.tif")
    assert np.asarray(load_image(tmp_path / "unit.tif"))[-1, -1, 0] == 255
    PIL.Image.fromarray((ramp * 256).astype(np.uint16)).save(tmp_path / "int16.tif")
    assert np.asarray(load_image(tmp_path / "int16.tif"))[-1, -1, 0] == round(235 * 256 / 257)


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_files(tmp_path: Path, kind: str) -> None:
    data = _png_bytes() if kind == "png" else _jpeg_bytes()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        load_image(path)
    _one_line_error(e, "truncated or corrupt", str(path))


def test_zero_size_image() -> None:
    with pytest.raises(InputError) as e:
        load_image(PIL.Image.new("RGB", (0, 5)))
    _one_line_error(e, "zero size")


def test_bad_source_type_and_background() -> None:
    with pytest.raises(InputError):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        load_image(_solid((2, 2), RED), background=(0, 0, 300))


# ---------------------------------------------------------------- URLs (a local server: no network needed)


@pytest.fixture()
def http_root(tmp_path: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_loading_and_errors(http_root: tuple[Path, str]) -> None:
    root, base = http_root
    (root / "img.png").write_bytes(_png_bytes((8, 6)))
    assert load_image(f"{base}/img.png").size == (8, 6)
    with pytest.raises(InputError) as e:
        load_image(f"{base}/missing.png")
    _one_line_error(e, "could not download", "404")
    (root / "cut.png").write_bytes(_png_bytes()[:300])
    with pytest.raises(InputError) as e:
        load_image(f"{base}/cut.png")
    _one_line_error(e, f"{base}/cut.png")


def test_url_with_spaces_and_bad_urls(http_root: tuple[Path, str]) -> None:
    """A space in a URL is escaped (as requests does for diffusers); a malformed one is a one-line InputError."""
    root, base = http_root
    (root / "my photo.png").write_bytes(_png_bytes((8, 6)))
    assert load_image(f"{base}/my photo.png").size == (8, 6)
    with pytest.raises(InputError) as e:
        load_image("http://[::1/x.png")
    _one_line_error(e, "could not download http://[::1/x.png")


def test_16bit_grey_with_a_colour_key_is_composited(tmp_path: Path) -> None:
    grey = np.array([[0, 65535], [30000, 0]], dtype=np.uint16)
    path = tmp_path / "key16.png"
    PIL.Image.fromarray(grey).save(path, transparency=0)
    assert PIL.Image.open(path).info.get("transparency") == 0  # the key survives Pillow's round trip
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 255, 255]  # keyed: background
    assert out[0, 1].tolist() == [255, 255, 255] and out[1, 0].tolist() == [117, 117, 117]  # opaque samples, scaled


def test_a_malformed_exif_block_is_ignored(tmp_path: Path) -> None:
    """EXIF that is not TIFF data: the pixels load, unrotated, and the loaded image loads again (the CLI and the
    pipeline each load it; exif_transpose raised SyntaxError on the second)."""
    path = tmp_path / "badexif.jpg"
    PIL.Image.new("RGB", (40, 30), (200, 30, 40)).save(path, exif=b"Exif\x00\x00garbage-garbage-garbage")
    once = load_image(path)
    assert once.size == (40, 30) and load_image(once).size == (40, 30)
    assert load_image(PIL.Image.open(path)).size == (40, 30)


def test_url_connection_refused() -> None:
    with pytest.raises(InputError) as e:
        load_image("http://127.0.0.1:9/x.png")  # discard port: nothing listens
    _one_line_error(e, "could not download http://127.0.0.1:9/x.png")


# ---------------------------------------------------------------- diffusers-compatible load_image


def test_utils_load_image_matches_diffusers(tmp_path: Path) -> None:
    from diffusers.utils import load_image as diffusers_load_image

    from img2vid.utils import load_image as compat_load_image

    array = np.random.default_rng(5).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    exif = PIL.Image.Exif()
    exif[0x0112] = 8
    rgba = _save(PIL.Image.fromarray(array), tmp_path / "a.png", exif=exif.tobytes())
    for source in (str(rgba), PIL.Image.open(rgba)):
        ours, theirs = compat_load_image(source), diffusers_load_image(source)
        assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size == (20, 30)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    gray = compat_load_image(str(rgba), convert_method=lambda im: im.convert("L"))
    assert gray.mode == "L"
    with pytest.raises(ValueError, match="Incorrect path or URL"):
        compat_load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="Incorrect format"):
        compat_load_image(np.zeros((2, 2, 3)))  # type: ignore[arg-type]


def test_io_modules_import_neither_torch_nor_diffusers() -> None:
    """The CLI imports InputError and the writers up front: that must stay cheap and oracle-free."""
    code = (
        "import sys, img2vid.images, img2vid.video, img2vid.utils; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_url_scheme_in_any_case_escaped_urls_and_empty_responses(http_root: tuple[Path, str]) -> None:
    """HTTP:// is a URL as http:// is (it was read as a file path); a URL already escaped (%20) is not escaped twice;
    an empty download is named as such, not as "not an image"."""
    from img2vid.image_sources import is_url

    assert is_url("HTTP://example.com/x.png") and is_url("Https://example.com/x.png") and not is_url("http.png")
    root, base = http_root
    (root / "my photo.png").write_bytes(_png_bytes((8, 6)))
    assert load_image(base.replace("http://", "HTTP://") + "/my photo.png").size == (8, 6)
    assert load_image(f"{base}/my%20photo.png").size == (8, 6)
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_image(f"{base}/empty.png")
    _one_line_error(e, "returned an empty response", f"{base}/empty.png")
