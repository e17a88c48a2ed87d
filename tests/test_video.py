"""Videos out: each format written and decoded back, metadata round trips, loops, atomic writes, diffusers compat."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import torch

from img2vid.errors import InputError
from img2vid.utils import export_to_gif, export_to_video
from img2vid.video import FORMATS, apply_loop, export_video, read_metadata, read_video, to_uint8_frames
from img2vid.video_checks import check_crf, check_fps, check_frame_size, holds_frames, infer_format

F, H, W = 8, 64, 96
# Mean absolute error allowed after a decode, per format (0-255 scale): lossy codecs on smooth frames.
TOLERANCE = {"mp4": 3.0, "webm": 3.0, "gif": 6.0, "webp": 4.0, "png": 0.0, "mkv": 3.0, "mov": 3.0}
META = {"seed": 42, "model": "stabilityai/stable-video-diffusion-img2vid-xt", "steps": 25, "fps": 7, "note": "é→✓"}


def _frames(count: int = F, height: int = H, width: int = W) -> np.ndarray:
    """Smooth moving gradients: (count, height, width, 3) uint8, every frame different."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = [
        np.stack([(xx * 2 + t * 8) % 256, (yy * 3 + t * 5) % 256, np.full_like(xx, 200 - t * 10)], axis=-1)
        for t in range(count)
    ]
    return np.stack(out).astype(np.uint8)


def _target(tmp_path: Path, fmt: str, stem: str = "clip") -> Path:
    return tmp_path / (f"{stem}_frames" if fmt == "png" else f"{stem}.{fmt}")


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- frames in


def test_to_uint8_frames_inputs() -> None:
    frames = _frames()
    as_float = frames.astype(np.float32) / 255
    assert np.array_equal(to_uint8_frames(frames), frames)
    assert np.array_equal(to_uint8_frames(as_float), frames)  # rounding, so uint8 -> float -> uint8 is exact
    assert np.array_equal(to_uint8_frames([PIL.Image.fromarray(f) for f in frames]), frames)
    assert np.array_equal(to_uint8_frames(list(as_float)), frames)
    tensor = torch.from_numpy(as_float)
    assert np.array_equal(to_uint8_frames(tensor), frames)  # (F, H, W, 3)
    assert np.array_equal(to_uint8_frames(tensor.permute(0, 3, 1, 2)), frames)  # (F, 3, H, W)
    assert np.array_equal(to_uint8_frames(tensor.permute(0, 3, 1, 2)[None]), frames)  # (1, F, 3, H, W)
    assert np.array_equal(to_uint8_frames(list(tensor.permute(0, 3, 1, 2))), frames)  # F x (3, H, W)
    assert np.abs(to_uint8_frames(tensor.to(torch.bfloat16)).astype(int) - frames).max() <= 2


def test_float_tensors_round_like_numpy() -> None:
    # Tensors are rounded on their own device (torch), arrays by numpy: the same bytes, halves included (both round
    # half to even) and the decoder's slight overshoot clipped.
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.005, 1.005, (3, 8, 8, 3)).astype(np.float32)
    values[0, 0, :4, 0] = np.array([0.5, 1.5, 2.5, 254.5], np.float32) / 255  # near the rounding ties
    for dtype in (torch.float32, torch.float16, torch.float64):
        tensor = torch.from_numpy(values).to(dtype)
        expected = to_uint8_frames(tensor.float().numpy())
        assert np.array_equal(to_uint8_frames(tensor), expected), dtype
        assert np.array_equal(to_uint8_frames(tensor.permute(0, 3, 1, 2)), expected), dtype


@pytest.mark.parametrize(
    "bad",
    [
        [],
        np.zeros((4, 8, 8, 5), np.uint8),
        np.full((2, 8, 8, 3), 2.0),
        [np.zeros((8, 8, 3)), np.zeros((8, 9, 3))],
        torch.full((2, 3, 8, 8), 2.0),  # tensors: range and NaN checked where they are, as arrays are
        torch.full((2, 3, 8, 8), float("nan")),
        torch.zeros((2, 3, 0, 8)),
    ],
)
def test_to_uint8_frames_errors(bad: object) -> None:
    with pytest.raises(InputError):
        to_uint8_frames(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_loop_modes_set_whether_gif_and_webp_play_once_or_forever(tmp_path: Path, fmt: str) -> None:
    """loop (the default) and pingpong play forever (loop count 0), none once (a GIF without its looping block, a
    WebP with a count of 1): none and loop gave the same file."""
    counts = {}
    for loop in ("none", "loop", "pingpong", None):
        kw = {} if loop is None else {"loop": loop}
        with PIL.Image.open(export_video(_frames(), tmp_path / f"{loop}.{fmt}", fps=7, **kw)) as im:
            counts[loop] = (im.info.get("loop"), im.n_frames)
    once = None if fmt == "gif" else 1
    assert counts == {"none": (once, F), "loop": (0, F), "pingpong": (0, 2 * F - 2), None: (0, F)}


def test_one_frame_webp_reads_back_its_stored_frame_rate(tmp_path: Path) -> None:
    """Pillow writes a one-frame WebP as a still image, without a duration: the fps came back 0. The metadata's
    export_fps (the CLI's playback rate), else fps, is read instead; without metadata there is none to give."""
    one = _frames(count=1)
    assert read_video(export_video(one, tmp_path / "a.webp", fps=7, metadata={"fps": 7}))[1] == 7.0
    both = {"fps": 6, "export_fps": 12}
    assert read_video(export_video(one, tmp_path / "b.webp", fps=12, metadata=both))[1] == 12.0
    (tmp_path / "b.webp.json").unlink()  # the copy inside the file (EXIF) too
    assert read_video(tmp_path / "b.webp")[1] == 12.0
    assert read_video(export_video(one, tmp_path / "c.webp", fps=7))[1] == 0.0


def test_apply_loop_orders() -> None:
    frames = np.arange(5)[:, None, None, None]
    assert apply_loop(frames, "none") is frames and apply_loop(frames, "loop") is frames
    assert apply_loop(frames, "pingpong")[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]
    assert apply_loop(frames[:2], "pingpong")[:, 0, 0, 0].tolist() == [0, 1]
    assert apply_loop(frames[:1], "pingpong")[:, 0, 0, 0].tolist() == [0]
    with pytest.raises(InputError):
        apply_loop(frames, "bounce")


# ---------------------------------------------------------------- each format round trip


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    frames = _frames()
    path = export_video(frames, _target(tmp_path, fmt), fps=7, format=fmt if fmt == "png" else None, metadata=META)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(np.float32) - frames).mean()
    assert error <= TOLERANCE[fmt], error
    # GIF stores whole centiseconds: 100/14 cs; the others keep 7 (webp: 143 ms a frame).
    assert fps == pytest.approx(7.0, rel=0.03)
    assert read_metadata(path) == META


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_inside_the_file(tmp_path: Path, fmt: str) -> None:
    path = export_video(_frames(), _target(tmp_path, fmt), fps=8, format=fmt, metadata=META)
    sidecar = path / "metadata.json" if fmt == "png" else path.with_name(path.name + ".json")
    assert json.loads(sidecar.read_text(encoding="utf-8")) == META
    sidecar.unlink()  # what survives a copy of the file alone
    assert read_metadata(path) == META


def test_metadata_values_made_json_safe(tmp_path: Path) -> None:
    meta = {"seed": np.int64(7), "scale": np.float32(0.5), "path": Path("/x/y"), "fps": Fraction(30000, 1001)}
    path = export_video(_frames(), tmp_path / "a.mp4", fps=7, metadata=meta)
    assert read_metadata(path) == {"seed": 7, "scale": 0.5, "path": "/x/y", "fps": "30000/1001"}


def test_without_metadata_stale_sidecar_removed(tmp_path: Path) -> None:
    path = export_video(_frames(), tmp_path / "a.mp4", fps=7, metadata={"seed": 1})
    export_video(_frames(), path, fps=7)
    assert not path.with_name("a.mp4.json").exists() and read_metadata(path) == {}


def test_pingpong_export(tmp_path: Path) -> None:
    frames = _frames()
    path = export_video(frames, tmp_path / "pp", fps=7, format="png", loop="pingpong")
    decoded, _ = read_video(path)
    order = list(range(F)) + list(range(F - 2, 0, -1))
    assert np.array_equal(decoded, frames[order])


# ---------------------------------------------------------------- codec specifics


def _top_level_boxes(path: Path) -> list[str]:
    data, boxes, offset = path.read_bytes(), [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # 64-bit size follows
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        offset += size if size else len(data)
    return boxes


def test_mp4_is_browser_friendly(tmp_path: Path) -> None:
    path = export_video(_frames(), tmp_path / "a.mp4", fps=7)
    with av.open(str(path)) as container:
        ctx = container.streams.video[0].codec_context
        assert ctx.name == "h264" and ctx.pix_fmt == "yuv420p"
        assert ctx.colorspace == 1 and ctx.color_range == 1  # BT.709, limited range, tagged
    boxes = _top_level_boxes(path)
    assert "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat")  # +faststart


def test_webm_is_vp9(tmp_path: Path) -> None:
    path = export_video(_frames(), tmp_path / "a.webm", fps=7)
    with av.open(str(path)) as container:
        assert container.format.name.startswith("matroska") and container.streams.video[0].codec_context.name == "vp9"


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_saturated_colours_survive(tmp_path: Path, fmt: str) -> None:
    """A BT.601/709 mix-up shifts pure colours by ~20 levels; flat blocks keep chroma subsampling out of it."""
    frames = np.zeros((4, 64, 96, 3), dtype=np.uint8)
    frames[:, :, :32], frames[:, :, 32:64], frames[:, :, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    decoded, _ = read_video(export_video(frames, tmp_path / f"c.{fmt}", fps=7))
    for x in (16, 48, 80):
        assert np.abs(decoded[:, 8:-8, x - 8 : x + 8].astype(int) - frames[:, 8:-8, x - 8 : x + 8]).max() <= 6


def test_fractional_fps(tmp_path: Path) -> None:
    ntsc = Fraction(30000, 1001)
    _, fps = read_video(export_video(_frames(), tmp_path / "a.mp4", fps=ntsc))
    assert fps == pytest.approx(float(ntsc))
    _, fps = read_video(export_video(_frames(), tmp_path / "b.mp4", fps=30000 / 1001))
    assert fps == pytest.approx(float(ntsc))
    _, fps = read_video(export_video(_frames(), tmp_path / "c.webm", fps=12.5))
    assert fps == pytest.approx(12.5)


def test_odd_size_padded_for_yuv420(tmp_path: Path) -> None:
    frames = _frames(height=63, width=95)
    decoded, _ = read_video(export_video(frames, tmp_path / "odd.mp4", fps=7))
    assert decoded.shape == (F, 64, 96, 3)
    assert np.abs(decoded[:, :63, :95].astype(np.float32) - frames).mean() <= TOLERANCE["mp4"]


def test_crf_controls_quality(tmp_path: Path) -> None:
    frames = _frames()
    errors = []
    for crf in (0, 40):
        decoded, _ = read_video(export_video(frames, tmp_path / f"q{crf}.mp4", fps=7, crf=crf))
        errors.append(np.abs(decoded.astype(np.float32) - frames).mean())
    assert errors[0] < errors[1]


def test_vp9_takes_crf_up_to_63(tmp_path: Path) -> None:
    frames = _frames()
    decoded, _ = read_video(export_video(frames, tmp_path / "q63.webm", fps=7, crf=63))
    assert decoded.shape == frames.shape


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown video format"):
        export_video(_frames(), tmp_path / "a.avi", fps=7)
    with pytest.raises(InputError, match="unknown video format"):
        export_video(_frames(), tmp_path / "noext", fps=7)
    with pytest.raises(InputError, match="fps must be positive"):
        export_video(_frames(), tmp_path / "a.mp4", fps=0)
    with pytest.raises(InputError, match="crf"):
        export_video(_frames(), tmp_path / "a.mp4", fps=7, crf=99)
    with pytest.raises(InputError, match=r"crf for mp4 must be an integer in 0\.\.51, got 52"):
        export_video(_frames(), tmp_path / "a.mp4", fps=7, crf=52)  # 8-bit x264 would cap it at 51 silently
    with pytest.raises(InputError, match="crf for webm"):
        export_video(_frames(), tmp_path / "a.webm", fps=7, crf=True)
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        export_video(_frames(), tmp_path / "d.mp4", fps=7)
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="refusing to replace"):
        export_video(_frames(), user_folder, fps=7, format="png")
    assert (user_folder / "thesis.tex").read_text() == "precious"
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "missing.mp4")


def test_output_checks_load_no_encoder_or_image_library() -> None:
    """The path and format checks (and the checkpoint tools, which check where they write) stay free of PyAV and
    Pillow: refusing a path must not cost the import of an encoder."""
    code = (
        "import sys, img2vid.video_checks, img2vid.checkpoint_tools; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'av', 'PIL'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = (
        "import sys, img2vid.video_checks; print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    check_crf(np.int64(20), "mp4")  # numpy's integers pass without numpy imported there
    with pytest.raises(InputError, match="crf for mp4"):
        check_crf(np.float64(20), "mp4")


def test_sidecar_path_taken_by_a_folder_writes_nothing(tmp_path: Path) -> None:
    """The sidecar's name held by a folder is found before anything is written: no video without its metadata."""
    (tmp_path / "a.mp4.json").mkdir()
    with pytest.raises(InputError, match=r"metadata file .*a\.mp4\.json is a directory"):
        export_video(_frames(2), tmp_path / "a.mp4", fps=7, metadata={"seed": 1})
    assert _listing(tmp_path) == {"a.mp4.json"}


@pytest.mark.parametrize("fmt, width", [("webp", 16384), ("mp4", 16386)])
def test_frames_too_large_for_the_format(tmp_path: Path, fmt: str, width: int) -> None:
    """Past the encoder's largest side: one-line InputError, not libwebp's / x264's own exception after encoding."""
    frames = np.zeros((2, 2, width, 3), np.uint8)
    with pytest.raises(InputError, match=f"too large for {fmt}"):
        export_video(frames, tmp_path / f"wide.{fmt}", fps=7)
    assert _listing(tmp_path) == set()


@pytest.mark.parametrize("fmt, fps", [("webp", 1e-4), ("gif", 1e-3)])
def test_fps_too_small_for_the_format(tmp_path: Path, fmt: str, fps: float) -> None:
    """fps that rounds to 0 (ZeroDivisionError before) or a GIF delay past 16 bits (OverflowError before)."""
    with pytest.raises(InputError, match="fps"):
        export_video(_frames(2), tmp_path / f"slow.{fmt}", fps=fps)
    assert _listing(tmp_path) == set()


def test_gif_refuses_rates_it_cannot_play(tmp_path: Path) -> None:
    """A GIF frame lasts 2 centiseconds at least (browsers slow shorter delays down): 240 fps was written at 50 while
    the sidecar said 240. At most 50 fps, in a line that names the formats that play faster; 50 itself plays."""
    with pytest.raises(InputError, match="fps 240 is too fast for a GIF \\(at most 50 fps\\)"):
        export_video(_frames(2), tmp_path / "fast.gif", fps=240)
    assert _listing(tmp_path) == set()
    assert read_video(export_video(_frames(2), tmp_path / "ok.gif", fps=50))[1] == 50.0


@pytest.mark.parametrize("name", ["x.gif", "x.webp", "folder"])
def test_reading_back_a_damaged_file_is_an_input_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
        path = path / "frame_00000.png"
    path.write_text("not an image")
    for read in (read_video, read_metadata):
        with pytest.raises(InputError, match="cannot decode"):
            read(tmp_path / name)


def test_png_folder_replaced_whole(tmp_path: Path) -> None:
    path = export_video(_frames(10), tmp_path / "f", fps=7, format="png", metadata={"seed": 1})
    export_video(_frames(3), path, fps=5, format="png")
    decoded, fps = read_video(path)
    assert decoded.shape[0] == 3 and fps == 5 and _listing(path) == {f"frame_{i:05d}.png" for i in range(3)}
    assert _listing(tmp_path) == {"f"}


# ---------------------------------------------------------------- atomic writes


class _Boom(KeyboardInterrupt):
    """A Ctrl-C lookalike: must not be swallowed, must still clean up."""


def _partial_output(folder: Path) -> bool:
    """Whether a hidden temp next to the target already holds encoded data (so the failure really is midway)."""
    for entry in folder.glob(".*"):
        if (entry.is_file() and entry.stat().st_size > 0) or (entry.is_dir() and len(list(entry.iterdir())) >= 3):
            return True
    return False


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_write_leaves_old_file(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _target(tmp_path, fmt)
    export_video(_frames(), target, fps=7, format=fmt, metadata={"version": "old"})
    old_frames, _ = read_video(target)
    before = _listing(tmp_path)
    # More frames than x264's / VP9's lookahead, and noise (big packets) to get past the muxer's IO buffer:
    # encoded data reaches the disk before the failure.
    many = np.random.default_rng(0).integers(0, 256, (64, H, W, 3), dtype=np.uint8)

    if fmt in ("mp4", "webm", "mkv", "mov"):
        real = av.VideoFrame.from_ndarray

        calls = {"n": 0}

        def failing(*args: object, **kwargs: object) -> av.VideoFrame:
            calls["n"] += 1
            # mp4: the muxer has written a header and some packets; webm keeps its one cluster in memory until
            # the end, so there it is "late, with most packets muxed".
            if _partial_output(tmp_path) or calls["n"] == 60:
                raise _Boom
            return real(*args, **kwargs)

        monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    else:
        real_save = PIL.Image.Image.save

        def failing_save(self: PIL.Image.Image, fp: object, *args: object, **kwargs: object) -> None:
            if fmt != "png":
                Path(fp).write_bytes(b"GIF89a partial")  # type: ignore[arg-type]
            if _partial_output(tmp_path):
                raise _Boom
            real_save(self, fp, *args, **kwargs)

        monkeypatch.setattr(PIL.Image.Image, "save", failing_save)

    with pytest.raises(_Boom):
        export_video(many[::-1], target, fps=9, format=fmt, metadata={"version": "new"})
    # And with no older file: nothing at all under the final name.
    fresh = _target(tmp_path, fmt, stem="fresh")
    if fmt in ("mp4", "webm", "mkv", "mov"):
        calls["n"] = 0
    with pytest.raises(_Boom):
        export_video(many, fresh, fps=7, format=fmt, metadata={"v": 1})
    monkeypatch.undo()

    assert not fresh.exists() and _listing(tmp_path) == before  # no temp left behind, nothing new
    decoded, fps = read_video(target)
    assert np.array_equal(decoded, old_frames) and fps == pytest.approx(7, rel=0.03)
    assert read_metadata(target) == {"version": "old"}


def test_written_file_has_normal_permissions(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    path = export_video(_frames(), tmp_path / "a.gif", fps=7)
    assert os.stat(path).st_mode & 0o777 == os.stat(probe).st_mode & 0o777  # umask-governed, not mkstemp's 0600


# ---------------------------------------------------------------- diffusers-compatible export_to_video


def test_export_to_video_float_frames(tmp_path: Path) -> None:
    frames = _frames().astype(np.float32) / 255
    path = export_to_video(list(frames), str(tmp_path / "d.mp4"), fps=7)
    assert path == str(tmp_path / "d.mp4")
    decoded, fps = read_video(path)
    assert decoded.shape == (F, H, W, 3) and fps == 7
    # diffusers truncates (x * 255).astype(uint8); quality 5 is x264 crf 25.
    assert np.abs(decoded.astype(np.float32) - (frames * 255).astype(np.uint8)).mean() <= 4
    with av.open(path) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_export_to_video_takes_tensors_and_arrays(tmp_path: Path) -> None:
    """Beyond diffusers' lists: (F, 3, H, W) tensors as output_type="pt" and img2vid.longer return them (rounded to
    bytes like the pipeline's PIL frames), lists of (3, H, W) tensors, and a (F, H, W, 3) array; anything else is
    a one-line InputError."""
    frames = _frames()  # (F, H, W, 3) uint8
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W) in [0, 1]
    crf0 = dict(quality=10.0)  # crf 0 (lossless x264; yuv420p still rounds colours a little)
    for name, given in {"t": video, "list": list(video), "array": frames.astype(np.float32) / 255}.items():
        decoded, _ = read_video(export_to_video(given, str(tmp_path / f"{name}.mp4"), fps=7, **crf0))
        assert decoded.shape == (F, H, W, 3), name
        assert np.abs(decoded.astype(np.float32) - frames).mean() <= 4, name
    for bad, needle in [
        ("frames.png", "list of frames"),
        ([1, 2], "numpy arrays, PIL images or tensors"),
        ([], "no frames"),
    ]:
        with pytest.raises(InputError, match=needle):
            export_to_video(bad, str(tmp_path / "bad.mp4"))
    assert not (tmp_path / "bad.mp4").exists()


def test_export_to_gif_writes_what_diffusers_writes(tmp_path: Path) -> None:
    """diffusers' export_to_gif on PIL frames (AnimateDiff's examples call it): the same frames, frame delays and
    looping as its file; a temporary .gif without a path; bad frames are a one-line error and write nothing."""
    from diffusers.utils import export_to_gif as reference

    images = [PIL.Image.fromarray(f) for f in _frames()]
    ours, theirs = tmp_path / "ours.gif", tmp_path / "theirs.gif"
    assert export_to_gif(images, str(ours), fps=7) == str(ours)
    reference(images, str(theirs), fps=7)
    with PIL.Image.open(ours) as a, PIL.Image.open(theirs) as b:
        assert a.n_frames == b.n_frames == F
        assert a.info["loop"] == b.info["loop"] == 0
        for i in range(F):
            a.seek(i)
            b.seek(i)
            assert a.info["duration"] == b.info["duration"] == 140, i
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))), i
    temp = export_to_gif(images)
    try:
        assert temp.endswith(".gif") and PIL.Image.open(temp).n_frames == F
    finally:
        os.unlink(temp)
    with pytest.raises(InputError, match="export_to_gif got no frames"):
        export_to_gif([], str(tmp_path / "bad.gif"))
    assert not (tmp_path / "bad.gif").exists()


def test_export_to_video_takes_what_imageio_writes(tmp_path: Path) -> None:
    """Grey (H, W) and (H, W, 1) frames and RGBA ones (the alpha dropped, as a yuv420p video does) as imageio writes
    them (they were refused); .mkv and .mov are those containers with H.264, as ffmpeg picks from the extension (an
    mp4 was written under the name); an extension it cannot write is an error, not an mp4 under another name."""
    rgb = _frames()  # (F, H, W, 3) uint8
    grey = rgb[..., 0]  # (F, H, W)
    crf0 = dict(quality=10.0)
    for name, given, expected in [
        ("grey", list(grey), np.repeat(grey[..., None], 3, axis=3)),
        ("grey1", list(grey[..., None]), np.repeat(grey[..., None], 3, axis=3)),
        ("rgba", list(np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=3)), rgb),
    ]:
        decoded, _ = read_video(export_to_video(given, str(tmp_path / f"{name}.mp4"), **crf0))
        assert np.abs(decoded.astype(np.float32) - expected).mean() <= 4, name
    decoded, _ = read_video(export_to_video(grey, str(tmp_path / "stack.mp4"), **crf0))  # (F, H, W): F grey frames
    assert np.abs(decoded.astype(np.float32) - np.repeat(grey[..., None], 3, axis=3)).mean() <= 4
    for ext, container in (("mkv", "matroska"), ("mov", "mov")):
        path = export_to_video(list(rgb), str(tmp_path / f"c.{ext}"), fps=7)
        with av.open(path) as c:
            assert container in c.format.name and c.streams.video[0].codec_context.name == "h264"
        assert read_video(path)[0].shape == rgb.shape
    for bad, needle in [
        (str(tmp_path / "c.avi"), "writes .mp4, .mkv, .mov, .webm, .gif or .webp files, not"),
        (str(tmp_path / "noext"), "writes .mp4"),
    ]:
        with pytest.raises(InputError, match=needle):
            export_to_video(list(rgb), bad)
        assert not Path(bad).exists()
    with pytest.raises(InputError, match="a frame must be .* got shape \\(8, 8, 2\\)"):
        export_to_video([np.zeros((8, 8, 2), np.uint8)], str(tmp_path / "two.mp4"))


def test_export_to_video_defaults_and_macro_blocks(tmp_path: Path) -> None:
    images = [PIL.Image.fromarray(f) for f in _frames(height=64, width=90)]
    with pytest.warns(UserWarning, match="macro_block_size=16"):
        path = export_to_video(images)
    try:
        assert path.endswith(".mp4") and os.path.getsize(path) > 0
        decoded, fps = read_video(path)
        assert decoded.shape == (F, 64, 96, 3) and fps == 10  # scaled up to 96 as imageio does; diffusers' fps 10
    finally:
        os.remove(path)
    decoded, _ = read_video(export_to_video(images, str(tmp_path / "n.mp4"), macro_block_size=None))
    assert decoded.shape == (F, 64, 90, 3)
    with pytest.raises(ValueError, match="quality"):
        export_to_video(images, str(tmp_path / "q.mp4"), quality=11)


def test_export_to_video_quality_and_bitrate(tmp_path: Path) -> None:
    frames = list(_frames().astype(np.float32) / 255)
    sizes = {}
    for name, kwargs in {"q9": {"quality": 9.0}, "q1": {"quality": 1.0}, "br": {"bitrate": 20_000}}.items():
        path = export_to_video(frames, str(tmp_path / f"{name}.mp4"), **kwargs)
        sizes[name] = os.path.getsize(path)
    assert sizes["q9"] > sizes["q1"] and sizes["q9"] > sizes["br"]


def test_output_limits_take_their_ends_and_formats_any_case(tmp_path: Path) -> None:
    """Each encoder's largest side and a GIF's slowest delay (65535 cs) are taken, one past refused; an extension or
    --format in capitals names the same format; only a non-empty folder of our frames holds a frames video."""
    check_frame_size(16384, 8, "mp4")
    check_frame_size(8, 16383, "webp")
    with pytest.raises(InputError, match="at most 16384 pixels a side"):
        check_frame_size(16385, 8, "mp4")
    check_fps(Fraction(100, 65535), "gif")  # 655.35 s a frame: the longest 16-bit delay
    with pytest.raises(InputError, match="too slow for a GIF"):
        check_fps(Fraction(100, 65536), "gif")
    assert infer_format(tmp_path / "clip.MP4", None) == "mp4" and infer_format(tmp_path / "x", "WebM") == "webm"
    folder = tmp_path / "frames"
    folder.mkdir()
    assert not holds_frames(folder)  # empty: a place for videos, not an earlier video
    (folder / "frame_0000.png").write_bytes(b"")
    (folder / "metadata.json").write_text("{}")
    assert holds_frames(folder)
    (folder / "notes.txt").write_text("mine")
    assert not holds_frames(folder)


def test_export_to_video_passes_imageio_s_crf_and_diffusers_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the diffusers stand-ins hand the encoder: quality q is crf int((1 - q/10) * 51) as imageio-ffmpeg truncates
    it (5 -> 25, 3 -> 35, 0 -> 51), None is x264's own 23, a bitrate replaces crf; export_to_gif's default is 10 fps;
    a tuple of frames is a sequence too; a .png path (a frames folder) is refused."""
    import img2vid.utils as utils

    calls: list[dict] = []
    monkeypatch.setattr(utils, "export_video", lambda frames, path, **kw: calls.append(kw | {"n": len(frames)}))
    frames = list(_frames(height=16, width=16))  # a multiple of 16: no macro-block resize
    target = str(tmp_path / "a.mp4")
    for kwargs, crf in [({}, 25), ({"quality": 3.0}, 35), ({"quality": 0}, 51), ({"quality": None}, 23)]:
        export_to_video(frames, target, **kwargs)
        assert (calls[-1]["crf"], calls[-1]["bitrate"], calls[-1]["fps"]) == (crf, None, 10), kwargs
    export_to_video(tuple(frames), target, bitrate=20_000)
    assert (calls[-1]["crf"], calls[-1]["bitrate"], calls[-1]["n"]) == (None, 20_000, F)
    export_to_gif(frames, str(tmp_path / "a.gif"))
    assert (calls[-1]["fps"], calls[-1]["format"]) == (10, "gif")
    with pytest.raises(InputError, match="writes .mp4"):
        export_to_video(frames, str(tmp_path / "frames.png"))
