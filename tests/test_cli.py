"""The `img2vid` command line, in-process through `main([...])` on tiny random models saved in every format we load
(our diffusers-layout folder, a folder saved by diffusers itself, a single file), plus one subprocess run of each
entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

from img2vid import Pipeline, __version__
from img2vid.cli import main
from img2vid.video import read_metadata, read_video

H, W, FRAMES, STEPS = 32, 48, 3, 2  # the tiny model needs multiples of 4 (2 VAE levels x 2 UNet levels)
# --device cpu: the frames are compared with CPU pipelines' (on a CUDA machine the CLI would pick cuda and float16)
SMALL = ["--device", "cpu", "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--steps", str(STEPS)]
SMALL += ["--quiet"]  # last: SMALL[:-1] shows the progress bars


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    pipe = Pipeline.from_config("tiny", seed=3)
    return {
        "folder": pipe.save_pretrained(root / "tiny"),
        "single_file": pipe.save_single_file(root / "tiny.safetensors"),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-images")
    paths = {"landscape": root / "landscape.png", "portrait": root / "portrait.png", "second": root / "second.png"}
    make_image(56, 40, seed=0).save(paths["landscape"])
    make_image(40, 56, seed=1).save(paths["portrait"])
    make_image(56, 40, seed=2).save(paths["second"])
    return paths


def generate(capsys, image, out, model, extra: str = "") -> tuple[int, str, str]:
    """Run `img2vid generate IMAGE... -o OUT --model MODEL <tiny sizes> EXTRA` in-process."""
    sources = [str(i) for i in (image if isinstance(image, list) else [image])]
    rc = main(["generate", *sources, "-o", str(out), "--model", str(model), *SMALL, *extra.split()])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- generate end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "single_file", "diffusers_folder"])
def test_generate_from_each_model_format(kind, models, tiny_model_dir, images, tmp_path, capsys):
    model = tiny_model_dir if kind == "diffusers_folder" else models[kind]
    out = tmp_path / "clip.mp4"
    rc, stdout, err = generate(capsys, images["landscape"], out, model, "--seed 42")
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out} ({FRAMES} frames, {W}x{H}, ") and stdout.rstrip().endswith(" s)")
    frames, fps = read_video(out)
    assert frames.shape == (FRAMES, H, W, 3)
    assert fps == pytest.approx(7.0)  # the model's default conditioning fps is also the export fps
    meta = read_metadata(out)
    assert meta["seed"] == 42 and meta["model"] == str(model) and meta["img2vid_version"] == __version__
    assert meta["num_frames"] == FRAMES and meta["num_inference_steps"] == STEPS
    assert (meta["height"], meta["width"], meta["fps"], meta["motion_bucket_id"]) == (H, W, 7, 127)
    assert meta["noise_aug_strength"] == 0.02 and meta["min_guidance_scale"] == 1.0
    assert meta["max_guidance_scale"] == 3.0 and meta["decode_chunk_size"] == FRAMES
    assert meta["dtype"] == "float32" and meta["resize"] == "stretch" and meta["guidance_reuse"] == 1


def test_cli_frames_equal_the_library_call_and_seed_repeats(models, images, tmp_path, capsys):
    """Lossless PNG output: the CLI's frames are exactly the pipeline's (rounded) for the same seed and parameters;
    the same seed repeats them, another seed does not."""
    args = "--format png --fps 9 --motion-bucket-id 30 --noise-aug-strength 0.1 --min-guidance 1.5 --max-guidance 2.5"
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / name
        rc, _, err = generate(
            capsys, images["landscape"], out, models["folder"], f"{args} --decode-chunk-size 2 --seed {seed}"
        )
        assert rc == 0, err
        runs.append(read_video(out)[0])
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    pipe = Pipeline.from_pretrained(models["folder"])
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, fps=9, motion_bucket_id=30)
    kw.update(noise_aug_strength=0.1, min_guidance_scale=1.5, max_guidance_scale=2.5, decode_chunk_size=2)
    ref = pipe(str(images["landscape"]), generator=torch.manual_seed(5), output_type="np", **kw).frames[0]
    assert np.array_equal(runs[0], (ref * 255).round().astype(np.uint8))
    meta = read_metadata(tmp_path / "a")
    assert (meta["fps"], meta["motion_bucket_id"], meta["noise_aug_strength"]) == (9, 30, 0.1)
    assert (meta["min_guidance_scale"], meta["max_guidance_scale"], meta["decode_chunk_size"]) == (1.5, 2.5, 2)


def test_several_images_load_the_model_once(models, images, tmp_path, capsys, monkeypatch):
    loads = []
    original = Pipeline.from_pretrained.__func__
    monkeypatch.setattr(
        Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k))
    )
    src = tmp_path / "in"
    src.mkdir()
    for name in ("landscape", "second"):
        shutil.copy(images[name], src / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    # a quoted glob (expanded by us), into a folder
    rc, stdout, err = generate(capsys, str(src / "*.png"), out, models["folder"], "--seed 1")
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*.mp4")) == ["landscape.mp4", "second.mp4"]
    assert stdout.count("wrote ") == 2 and len(loads) == 1
    # explicit paths into a {stem} pattern, as webm
    rc, stdout, err = generate(
        capsys, [src / "landscape.png", src / "second.png"], tmp_path / "v-{stem}.webm", models["folder"]
    )
    assert rc == 0, err
    for name in ("landscape", "second"):
        frames, _ = read_video(tmp_path / f"v-{name}.webm")
        assert frames.shape == (FRAMES, H, W, 3)
        assert read_metadata(tmp_path / f"v-{name}.webm")["image"] == str(src / f"{name}.png")
    assert len(loads) == 2


def test_videos_per_image_use_consecutive_seeds(models, images, tmp_path, capsys):
    """--videos N: N variations of each image, seeds --seed .. --seed+N-1, each the video that seed gives alone."""
    out = tmp_path / "out"
    out.mkdir()
    rc, stdout, err = generate(capsys, [images["landscape"], images["second"]], out, models["folder"], "-n 2 --seed 7")
    assert rc == 0, err
    names = ["landscape-7.mp4", "landscape-8.mp4", "second-7.mp4", "second-8.mp4"]
    assert sorted(p.name for p in out.glob("*.mp4")) == names and stdout.count("wrote ") == 4
    assert [read_metadata(out / n)["seed"] for n in names] == [7, 8, 7, 8]
    alone = tmp_path / "alone.mp4"
    assert generate(capsys, images["landscape"], alone, models["folder"], "--seed 8")[0] == 0
    assert np.array_equal(read_video(alone)[0], read_video(out / "landscape-8.mp4")[0])
    # a {seed} pattern names them too
    rc, _, err = generate(
        capsys, images["landscape"], tmp_path / "v{seed}.gif", models["folder"], "--videos 2 --seed 3"
    )
    assert rc == 0, err
    assert (tmp_path / "v3.gif").is_file() and (tmp_path / "v4.gif").is_file()


def test_guidance_device_gives_the_same_video(models, images, tmp_path, capsys):
    """--guidance-device: the unconditional half on a second device (here the CPU twice: the wiring, not the speed)."""
    outs = [tmp_path / "one.png", tmp_path / "two.png"]
    for out, extra in zip(outs, ["", "--guidance-device cpu --no-cuda-graphs"], strict=True):
        rc, _, err = generate(capsys, images["landscape"], out, models["folder"], f"--device cpu --seed 4 {extra}")
        assert rc == 0, err
    one, two = (read_video(o)[0].astype(int) for o in outs)
    assert one.shape == two.shape and np.abs(one - two).max() <= 1  # float32 rounding of a batch of 1 vs 2


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad", "fit"])
def test_resize_modes(mode, models, images, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    rc, stdout, err = generate(capsys, images["portrait"], out, models["folder"], f"--resize {mode} --seed 0")
    assert rc == 0, err
    frames, _ = read_video(out)
    meta = read_metadata(out)
    assert frames.shape == (FRAMES, meta["height"], meta["width"], 3) and meta["resize"] == mode
    if mode == "fit":  # a portrait image keeps its orientation, at about W*H pixels in multiples of 4
        assert meta["height"] > meta["width"] and meta["height"] % 4 == 0 and meta["width"] % 4 == 0
        assert abs(meta["height"] * meta["width"] - H * W) < 0.2 * H * W
        # the size asked for, with which --resize fit gives this video again (fitting its result again may not)
        assert (meta["fit_width"], meta["fit_height"]) == (W, H)
    else:
        assert (meta["height"], meta["width"]) == (H, W) and "fit_width" not in meta
    assert f"{meta['width']}x{meta['height']}, seed 0, " in stdout


def test_guidance_reuse_reaches_the_pipeline_and_is_recorded(models, images, tmp_path, capsys):
    """--guidance-reuse N is the pipeline's guidance_reuse=N (lossless PNG: the same frames) and is stored with the
    video, since it changes the frames."""
    out = tmp_path / "reuse"
    rc, _, err = generate(
        capsys, images["landscape"], out, models["folder"], "--format png --seed 4 --guidance-reuse 2"
    )
    assert rc == 0, err
    assert read_metadata(out)["guidance_reuse"] == 2
    pipe = Pipeline.from_pretrained(models["folder"])
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, output_type="np")
    ref = pipe(str(images["landscape"]), generator=torch.manual_seed(4), guidance_reuse=2, **kw).frames[0]
    assert np.array_equal(read_video(out)[0], (ref * 255).round().astype(np.uint8))
    exact = pipe(str(images["landscape"]), generator=torch.manual_seed(4), **kw).frames[0]
    assert not np.array_equal(ref, exact)  # the flag really changed the sampling


def test_segments_chain_a_longer_video(models, images, tmp_path, capsys):
    """--segments 3: 3*(F-1)+1 frames (lossless PNG: exactly img2vid.longer's chain of the same pipeline calls), the
    real count printed, segments stored, and progress bars labelled per segment."""
    from img2vid.longer import chain_segments

    out, n = tmp_path / "long", 3 * (FRAMES - 1) + 1
    argv = ["generate", str(images["landscape"]), "-o", str(out), "--model", str(models["folder"]), *SMALL[:-1]]
    rc = main([*argv, "--format", "png", "--seed", "8", "--segments", "3"])  # not --quiet: the bars show
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith(f"wrote {out} ({n} frames, {W}x{H}, ")
    for label in ("landscape 1/3 denoise", "landscape 2/3 decode", "landscape 3/3 denoise"):
        assert label in captured.err
    assert "landscape denoise" not in captured.err  # no unlabelled bar besides the segments' own
    meta = read_metadata(out)
    assert meta["segments"] == 3 and meta["num_frames"] == FRAMES and meta["seed"] == 8
    assert meta["video_frames"] == n  # what the file holds (num_frames is a segment's)
    pipe = Pipeline.from_pretrained(models["folder"])
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, output_type="pt")
    g = torch.manual_seed(8)
    ref = chain_segments(lambda im: pipe(im, generator=g, **kw).frames[0], str(images["landscape"]), 3)
    assert np.array_equal(read_video(out)[0], (ref.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    # --segments 1 is the plain video: its frames are the chain's first segment
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "one", models["folder"], "--format png --seed 8")
    assert rc == 0, err
    assert np.array_equal(read_video(tmp_path / "one")[0], read_video(out)[0][:FRAMES])
    assert read_metadata(tmp_path / "one")["segments"] == 1


def test_memory_modes_keep_the_frames(models, images, tmp_path, capsys):
    """Offload (degenerate on a CPU), forward chunking and --low-memory (which decodes 2 frames at a time) give the
    frames of a plain run that decodes 2 at a time."""
    runs = {
        "plain": "--decode-chunk-size 2",
        "model-offload": "--decode-chunk-size 2 --offload model --forward-chunking",
        "sequential": "--decode-chunk-size 2 --offload sequential",
        "low-memory": "--low-memory",
    }
    for name, extra in runs.items():
        rc, _, err = generate(
            capsys, images["landscape"], tmp_path / name, models["folder"], f"--format png --seed 3 {extra}"
        )
        assert rc == 0, err
    ref = read_video(tmp_path / "plain")[0]
    for name in list(runs)[1:]:
        # the same function; chunked matmuls may round differently in the last float bit: at most 1 level of 255
        diff = np.abs(read_video(tmp_path / name)[0].astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.01, (name, diff.max(), diff.mean())
    assert read_metadata(tmp_path / "low-memory")["decode_chunk_size"] == 2


def test_export_options_and_compile(models, images, tmp_path, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(Pipeline, "compile", lambda self, *a, **k: compiled.append(k) or self)
    out = tmp_path / "loop.mp4"
    extra = "--fps 6 --export-fps 12 --loop pingpong --crf 30 --compile"
    rc, stdout, err = generate(capsys, images["landscape"], out, models["folder"], extra)
    assert rc == 0, err
    frames, fps = read_video(out)
    assert frames.shape[0] == 2 * FRAMES - 2 and fps == pytest.approx(12.0)
    assert f"({2 * FRAMES - 2} frames" in stdout and len(compiled) == 1
    meta = read_metadata(out)
    assert (meta["fps"], meta["export_fps"], meta["loop"]) == (6, 12, "pingpong")
    assert meta["video_frames"] == 2 * FRAMES - 2 and meta["num_frames"] == FRAMES
    assert compiled[0].get("cache_dir") is None
    # --compile-cache implies --compile and names the folder the compiled graphs are kept in
    cache = tmp_path / "cc"
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "c.mp4", models["folder"], f"--compile-cache {cache}")
    assert rc == 0, err
    assert len(compiled) == 2 and compiled[1]["cache_dir"] == str(cache) and cache.is_dir()
    meta = read_metadata(tmp_path / "c.mp4")
    assert (meta["compiled"], meta["guidance_parallel"], meta["loop"]) == (True, False, "loop")


def test_our_warnings_are_one_line_notes(models, images, tmp_path, capsys, monkeypatch):
    import warnings

    def compile_with_a_stale_artifact(self, *a, **k):
        warnings.warn("img2vid: recompiling denoise_step-0123.aot (its guards reject these inputs)", stacklevel=2)
        warnings.warn("somebody else's note", DeprecationWarning, stacklevel=2)
        return self

    monkeypatch.setattr(Pipeline, "compile", compile_with_a_stale_artifact)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rc, _, err = generate(capsys, images["landscape"], tmp_path / "w.mp4", models["folder"], "--compile-cache c")
    assert rc == 0, err
    lines = err.splitlines()
    assert "img2vid: recompiling denoise_step-0123.aot (its guards reject these inputs)" in lines
    assert any("DeprecationWarning: somebody else's note" in line for line in lines)  # others keep their form
    assert warnings.showwarning.__module__ != "img2vid.cli"  # the CLI's printer is gone after the call


def test_random_seed_is_printed_and_stored(models, images, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = main(["generate", str(images["landscape"]), "-o", str(out), "--model", str(models["folder"]), *SMALL[:-1]])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    seed = read_metadata(out)["seed"]
    assert isinstance(seed, int) and f"seed {seed}" in captured.err


def test_hub_model_defaults_to_fp16_variant(models, images, tmp_path, capsys, monkeypatch):
    from img2vid.errors import InputError

    seen = {}

    def fake(cls, path, **kw):
        seen.update(kw, path=path)
        raise InputError("stop here")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(fake))
    for dtype, variant in (("float16", "fp16"), ("float32", None)):
        rc = main(["generate", str(images["landscape"]), "-o", str(tmp_path / "x.mp4"), "--dtype", dtype, "--offline"])
        assert rc == 2 and "stop here" in capsys.readouterr().err
        assert seen["path"] == "stabilityai/stable-video-diffusion-img2vid-xt" and seen["variant"] == variant
        assert seen["local_files_only"] is True and seen["revision"] is None
    rc = main(["generate", str(images["landscape"]), "-o", str(tmp_path / "x.mp4"), "--revision", "v1.1", "--offline"])
    assert rc == 2 and "stop here" in capsys.readouterr().err and seen["revision"] == "v1.1"
    rc = main(
        ["generate", str(images["landscape"]), "-o", str(tmp_path / "x.mp4"), "--model", str(models["folder"])]
        + ["--revision", "v1"]
    )
    assert rc == 2 and "--revision v1 picks a version of a hub model" in capsys.readouterr().err


# ---- other commands ------------------------------------------------------------------------------------------------
def test_selftest(capsys):
    assert main(["selftest"]) == 0
    captured = capsys.readouterr()
    assert "selftest passed" in captured.out and "noise" in captured.out
    assert "stabilityai/stable-video-diffusion-img2vid-xt" in captured.out
    assert "ok" in captured.err


def test_selftest_failure_is_one_line_and_exit_1(capsys, monkeypatch):
    import img2vid.video

    monkeypatch.setattr(img2vid.video, "read_video", lambda path: (np.zeros((1, 8, 8, 3), np.uint8), 7.0))
    assert main(["selftest", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "img2vid: selftest failed: exported an mp4 that reads back as (1, 8, 8, 3)"
    ]


def test_info_and_convert(models, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    pipe = Pipeline.from_pretrained(models["folder"])
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    assert main(["info", str(models["single_file"])]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == str(models["single_file"])
    assert "format: sgm" in lines and "config: tiny" in lines and "usable as a pipeline: yes" in lines
    unet_row = next(line.split() for line in lines if line.startswith("unet "))
    assert unet_row[2] == f"{unet_params:,}" and unet_row[3] == "float32"
    assert not any("missing" in line or "unexpected" in line for line in lines)

    # a damaged copy: one UNet tensor gone, one stray tensor added
    with safe_open(models["single_file"], "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    gone = next(k for k in sd if k.startswith("model.diffusion_model."))
    del sd[gone]
    sd["model.diffusion_model.stray.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "damaged.safetensors", metadata=meta)
    assert main(["info", str(tmp_path / "damaged.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "usable as a pipeline: no" in out and "missing (1): " in out and "stray" in out
    # an integer tensor where a float one belongs: named, not just "usable: no"
    wrong = next(k for k in sd if k.startswith("model.diffusion_model."))
    sd = {**sd, wrong: sd[wrong].to(torch.int32)}
    save_file(sd, tmp_path / "integer.safetensors", metadata=meta)
    assert main(["info", str(tmp_path / "integer.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "usable as a pipeline: no" in out and "unet wrong dtype (1): " in out, out

    converted = tmp_path / "converted"
    assert main(["convert", str(models["single_file"]), str(converted), "--dtype", "float16", "--variant", "fp16"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {converted} (")
    assert main(["info", str(converted)]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "format: diffusers-folder" in lines and "variants: fp16" in lines
    assert next(line for line in lines if line.startswith("unet ")).endswith("float16")
    converted_pipe = Pipeline.from_pretrained(converted, variant="fp16", torch_dtype=torch.float16)
    assert converted_pipe.dtype == torch.float16
    # --variant none: the plain weights, as generate --variant none loads (info described the fp16 ones)
    assert main(["info", str(converted), "--variant", "none"]) == 2
    assert "only the fp16 variant" in capsys.readouterr().err

    # --variant picks which of a folder's files are described; a single file has no variants to pick
    both = tmp_path / "both"
    shutil.copytree(models["folder"], both)
    for c in ("unet", "vae", "image_encoder"):
        shutil.copy(next((converted / c).glob("*.fp16.safetensors")), both / c)
    assert main(["info", str(both), "--variant", "fp16"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "variant: fp16" in lines and next(line for line in lines if line.startswith("unet ")).endswith("float16")
    assert main(["info", str(both)]) == 0
    assert next(line.strip() for line in capsys.readouterr().out.splitlines() if "unet " in line).endswith("float32")
    assert main(["info", str(models["single_file"]), "--variant", "fp16"]) == 2
    assert "--variant fp16 picks files of a model folder, not of one file" in capsys.readouterr().err


def test_folder_of_one_variant_needs_no_variant_flag(models, images, tmp_path, capsys):
    """A folder holding only fp16 files (what `convert --variant fp16` writes) loads without --variant: it has
    nothing else to load; the run records the variant it used."""
    half = tmp_path / "half"
    assert main(["convert", str(models["single_file"]), str(half), "--variant", "fp16"]) == 0
    capsys.readouterr()
    out = tmp_path / "clip.gif"
    rc, _, err = generate(capsys, images["portrait"], out, half, "--seed 0")
    assert rc == 0, err
    assert read_metadata(out)["variant"] == "fp16"


# ---- errors --------------------------------------------------------------------------------------------------------
BAD = {  # name: (arguments after IMAGE -o OUT --model MODEL SMALL, expected part of the message)
    "frames-zero": ("--frames 0", "--frames"),
    "frames-too-many": ("--frames 300", "out of range"),
    "frames-not-int": ("--frames abc", "expected an integer"),
    "segments-zero": ("--segments 0", "argument --segments: 0 is out of range 1..64"),
    "segments-too-many": ("--segments 65", "argument --segments: 65 is out of range 1..64"),
    "segments-of-one-frame": ("--segments 2 --frames 1", "2 segments need at least 2 frames per segment, got 1"),
    "steps-zero": ("--steps 0", "--steps"),
    "fps-zero": ("--fps 0", "--fps"),
    "fps-huge": ("--fps 1000", "--fps"),
    "export-fps-nan": ("--export-fps nan", "--export-fps"),
    "motion-bucket": ("--motion-bucket-id 1024", "--motion-bucket-id"),
    "noise-aug-negative": ("--noise-aug-strength -0.1", "--noise-aug-strength"),
    "noise-aug-huge": ("--noise-aug-strength 11", "--noise-aug-strength"),
    "guidance-negative": ("--min-guidance -1", "--min-guidance"),
    "guidance-order": ("--min-guidance 3 --max-guidance 2", "above --max-guidance"),
    "decode-chunk": ("--decode-chunk-size 0", "--decode-chunk-size"),
    "guidance-reuse-zero": ("--guidance-reuse 0", "--guidance-reuse"),
    "guidance-reuse-not-int": ("--guidance-reuse 1.5", "expected an integer"),
    "height-not-multiple": ("--height 34", "multiple of 4"),
    "width-zero": ("--width 0", "--width"),
    "width-huge": ("--width 100000", "argument --width: 100000 is out of range 1..16384"),  # not an OverflowError
    "seed-negative": ("--seed -1", "--seed"),
    "crf": ("--crf 99", "--crf"),
    "crf-over-x264": ("--crf 52", "crf for mp4 must be an integer in 0..51"),  # x264 would cap it silently
    "format-unknown": ("--format avi", "--format"),
    "format-mismatch": ("--format gif", "does not match"),
    "resize-unknown": ("--resize zoom", "--resize"),
    "dtype-unknown": ("--dtype int8", "--dtype"),
    "offload-unknown": ("--offload disk", "--offload"),
    "device-unknown": ("--device toaster", "unknown device"),
    "device-cuda-missing": ("--device cuda:7", "not available"),
    "device-meta": ("--device meta", "unknown device 'meta'"),  # not blamed on the model's safetensors files
    "device-cpu-index": ("--device cpu:1", "unknown device 'cpu:1'"),
    "guidance-device-unknown": ("--guidance-device toaster", "unknown device 'toaster' for --guidance-device"),
    "guidance-device-missing": (
        "--device cpu --guidance-device cuda:7",
        "guidance parallelism: device cuda:7 is not available",
    ),
    "guidance-device-meta": ("--device cpu --guidance-device meta", "guidance parallelism: unknown device 'meta'"),
    "guidance-device-cpu-index": (
        "--device cpu --guidance-device cpu:1",
        "guidance parallelism: unknown device 'cpu:1'",
    ),
    "guidance-device-low-memory": (
        "--device cpu --guidance-device cpu --low-memory",
        "cannot run with sequential (--low-memory) CPU offload",
    ),
    "compile-cache-low-memory": ("--low-memory --compile-cache cc", "--compile-cache cannot keep streamed weights"),
    "compile-cache-sequential": ("--offload sequential --compile-cache cc", "cannot keep streamed weights"),
    "guidance-device-cache": ("--guidance-device cpu --compile-cache cc", "--compile-cache does not keep"),
    "no-cuda-graphs-alone": ("--no-cuda-graphs", "--no-cuda-graphs is an option of --guidance-device"),
    "variant-path": ("--variant ../fp16", "argument --variant: '../fp16' is not a variant name"),
    "compile-cache-not-a-folder": ("--compile-cache /dev/null/cache", "as a compile cache"),
    "hub-model-size": ("--model stabilityai/stable-video-diffusion-img2vid-xt", "multiple of 64"),
    "model-missing-path": ("--model ./no/such/model.safetensors", "model not found"),
    "model-unknown-offline": (
        "--model nobody/no-such-svd-model --offline --height 64 --width 64",
        "nobody/no-such-svd-model",
    ),
}


@pytest.fixture
def bad_env(models, images, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return models, images, out_dir


def assert_one_line_error(rc: int, err: str, needle: str, out_dir: Path) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("img2vid: error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "a failed run must leave no output"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_values(case, bad_env, capsys):
    if case in ("device-cuda-missing", "guidance-device-missing") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    models, images, out_dir = bad_env
    extra, needle = BAD[case]
    rc, _, err = generate(capsys, images["landscape"], out_dir / "clip.mp4", models["folder"], extra)
    assert_one_line_error(rc, err, needle, out_dir)


def test_bad_inputs_and_outputs(bad_env, tmp_path, capsys):
    models, images, out_dir = bad_env
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    broken_model = tmp_path / "broken.safetensors"
    broken_model.write_bytes(b"\x00" * 64)
    good = images["landscape"]
    folder = models["folder"]
    cases = [  # (images, -o, --model, more arguments, expected part of the message)
        ([tmp_path / "missing.png"], out_dir / "a.mp4", folder, "", "image not found"),
        ([str(tmp_path / "*.jpeg")], out_dir / "a.mp4", folder, "", "no image matches"),
        ([not_image], out_dir / "a.mp4", folder, "", "not an image"),
        ([good], out_dir / "a.avi", folder, "", "unknown video format"),
        ([good], out_dir / "a.gif", folder, "--export-fps 240", "fps 240 is too fast for a GIF"),
        ([good], tmp_path / "no-such-dir" / "a.mp4", folder, "", "output folder"),
        ([good, images["second"]], out_dir / "a.mp4", folder, "", "{stem}"),
        ([good, good], out_dir, folder, "", "is given twice"),
        ([good, images["second"]], out_dir / "{seed}.mp4", folder, "", "would write the same file"),
        ([good], out_dir / "a.mp4", broken_model, "", "broken.safetensors"),
        ([good], out_dir / "a.mp4", folder, "--videos 2", "2 videos need -o to be a folder or a pattern"),
        ([good, images["second"]], out_dir / "{seed}.mp4", folder, "-n 2", "pattern with {stem} and {seed}"),
        ([good], out_dir / "a{seed}.mp4", folder, "-n 3 --seed 9223372036854775806", "past the largest seed"),
        # a pipe matched by a glob was read forever, named it was "not found"; ~nouser was an "unexpected" failure
        ([str(tmp_path / "fif[o].png")], out_dir / "a.mp4", folder, "", "is not a regular file"),
        ([tmp_path / "fifo.png"], out_dir / "a.mp4", folder, "", "is not a regular file (a pipe"),
        (["~no-such-user-img2vid/a.png"], out_dir / "a.mp4", folder, "", "names no user's home folder"),
        ([good], "~no-such-user-img2vid/a.mp4", folder, "", "names no user's home folder"),
        ([good], out_dir / "a.mp4", "~no-such-user-img2vid/m", "", "names no user's home folder"),
        ([good], "-", folder, "", "-o - (standard output) is not supported"),
        ([good], out_dir / ("v" * 251 + ".mp4"), folder, "", "is too long: at most 250 bytes"),
    ]
    os.mkfifo(tmp_path / "fifo.png")
    for sources, out, model, extra, needle in cases:
        rc, _, err = generate(capsys, sources, out, model, extra)
        assert_one_line_error(rc, err, needle, out_dir)


def test_outputs_refused_before_the_model_loads(models, images, tmp_path, capsys, monkeypatch):
    """What the export would refuse only after the whole generation is found first, and nothing is written."""

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(no_load))
    (tmp_path / "frames.png").write_text("a file where a PNG frame folder would go")
    (tmp_path / "clip.mp4.json").mkdir()  # the sidecar's name: the video was written, then the export failed
    tallest = tmp_path / "tall.png"
    make_image(2, 400).save(tallest)  # --resize fit: a 1:200 aspect at 4096^2 pixels is over webp's largest side
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ([images["landscape"]], tmp_path / "frames.png", "", "exists and is not a directory"),
        ([images["landscape"]], tmp_path / "clip.mp4", "", "clip.mp4.json is a directory"),
        ([images["landscape"]], tmp_path / "wide.webp", "--width 16384 --height 64", "too large for webp"),
        ([tallest], tmp_path / "tall.webp", "--resize fit --width 4096 --height 4096", "too large for webp"),
        ([tmp_path], tmp_path / "x.mp4", "", "is a directory, not an image file"),
        ([images["landscape"]], tmp_path / "c.mp4", f"--compile-cache {images['second']}", "is a file, not a folder"),
    ]
    for sources, out, extra, needle in cases:
        rc, _, err = generate(capsys, sources, out, models["folder"], extra)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("img2vid: error: "), err
        assert needle in lines[0], lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fit_passes_the_image_at_the_video_size(models, images, tmp_path, capsys, monkeypatch):
    """--resize fit crops the image to the size it chose (in the model's multiple): resize_image's own "fit" chose
    again in multiples of 64, another size, which the pipeline then stretched."""
    import img2vid.cli

    seen = []

    def spy(pipe, image, *args, **kwargs):
        seen.append(image.size)
        return sample_video(pipe, image, *args, **kwargs)

    sample_video = img2vid.cli.sample_video
    monkeypatch.setattr(img2vid.cli, "sample_video", spy)
    out = tmp_path / "clip.gif"
    rc, _, err = generate(capsys, images["portrait"], out, models["folder"], "--resize fit --seed 0")
    assert rc == 0, err
    meta = read_metadata(out)
    assert seen == [(meta["width"], meta["height"])]


def test_argparse_errors_exit_2(capsys):
    for argv in (["generate", "x.png"], ["frobnicate"], [], ["generate", "x.png", "-o", "y.mp4", "--bogus"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("img2vid: error: "), err


@pytest.mark.parametrize(
    "exc, rc, needles",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"),
            2,
            ["out of memory", "--low-memory", "--offload model", "--decode-chunk-size 2"],
        ),
        (KeyboardInterrupt(), 130, ["img2vid: interrupted"]),
        (MemoryError(), 2, ["out of memory in host RAM", "--width/--height"]),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
            2,
            ["out of memory in host RAM", "--decode-chunk-size 2"],
        ),
        (RuntimeError("kaboom"), 1, ["kaboom", "--debug"]),
    ],
)
def test_failures_during_generation(exc, rc, needles, models, images, tmp_path, capsys, monkeypatch):
    def fail(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(Pipeline, "__call__", fail)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = generate(capsys, images["landscape"], out_dir / "clip.mp4", models["folder"])
    assert code == rc
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert all(n in lines[0] for n in needles), lines[0]
    assert list(out_dir.iterdir()) == []
    if rc == 1:  # --debug shows the real exception
        argv = ["generate", str(images["landscape"]), "-o", str(out_dir / "c.mp4"), "--model", str(models["folder"])]
        argv += SMALL
        with pytest.raises(RuntimeError, match="kaboom"):
            main([*argv, "--debug"])  # after the subcommand ...
        with pytest.raises(RuntimeError, match="kaboom"):
            main(["--debug", *argv])  # ... and before it


def test_info_and_convert_errors(models, tmp_path, capsys):
    for argv in (
        ["info", str(tmp_path / "nothing.safetensors")],
        ["convert", str(tmp_path / "x"), str(tmp_path / "y")],
        # a variant is part of a file name: a path there wrote weights outside the folder's layout
        ["convert", str(models["single_file"]), str(tmp_path / "y"), "--variant", "../../elsewhere"],
    ):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("img2vid: error: ")
    assert not (tmp_path / "y").exists()


# ---- entry points --------------------------------------------------------------------------------------------------
def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"img2vid {__version__}"
    assert main(["generate", "--help"]) == 0
    assert "--motion-bucket-id" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0
    assert "--guidance-reuse" not in capsys.readouterr().out  # per request there: the guidance_reuse parameter


def test_python_dash_m_is_fast_and_torch_free():
    """`python -m img2vid --version` works, and -X importtime proves the CLI did not import torch to get there."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "img2vid", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == f"img2vid {__version__}"
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "img2vid.cli" in imported and "torch" not in imported


def test_console_script():
    script = shutil.which("img2vid")
    if script is None:
        pytest.skip("the img2vid console script is not on PATH (package not installed)")
    run = subprocess.run(
        [script, "generate", "--frames", "0", "x.png", "-o", "y.mp4"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "img2vid: error: argument --frames: 0 is out of range 1..256 (see `img2vid generate --help`)"
    ]


def test_png_frames_again_replace_the_earlier_frames(models, images, tmp_path, capsys):
    """-o naming an earlier PNG-frames video replaces it (it was taken for a folder to put a new video in: frames
    nested inside the old ones, or an mp4 among them)."""
    for out, extra in ((tmp_path / "framesdir", "--format png --seed 1"), (tmp_path / "frames.png", "--seed 1")):
        for _ in range(2):
            rc, stdout, err = generate(capsys, images["landscape"], out, models["folder"], extra)
            assert rc == 0, err
        names = sorted(p.name for p in out.iterdir())
        assert names and all(n.startswith("frame_") or n.endswith(".json") for n in names), names


def test_conflicting_and_ambiguous_requests_are_refused(models, images, tmp_path, capsys):
    extra = "--low-memory --offload model"
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "a.mp4", models["folder"], extra)
    assert rc == 2 and "--low-memory streams the weights itself; drop --offload model" in err
    twin = tmp_path / "elsewhere" / images["landscape"].name
    twin.parent.mkdir()
    twin.write_bytes(images["landscape"].read_bytes())
    rc, _, err = generate(capsys, [images["landscape"], twin], f"{tmp_path}/out/", models["folder"])
    assert rc == 2 and "images with the same name would write the same video" in err
    # one path given twice, as written or spelled otherwise: said so (it was "use a pattern with {stem}", which it had)
    same = images["landscape"]
    dotted = os.path.relpath(same)  # the same file, relative to the working folder
    for pair, needle in (([same, same], "is given twice;"), ([same, dotted], "is given twice (also as")):
        rc, _, err = generate(capsys, pair, f"{tmp_path}/out/{{stem}}.mp4", models["folder"])
        assert rc == 2 and needle in err and "--videos N makes several videos of one image" in err, err
    # two names of one file (a glob over a folder with a symlink in it): a video for each name, as named
    link = tmp_path / "link.png"
    link.symlink_to(same)
    (tmp_path / "linked").mkdir()
    rc, _, err = generate(capsys, [same, link], f"{tmp_path}/linked/{{stem}}.gif", models["folder"])
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "linked").glob("*.gif")) == sorted([f"{same.stem}.gif", "link.gif"])
    busy = tmp_path / "photos"
    busy.mkdir()
    (busy / "a.png").write_bytes(b"x")
    assert main(["convert", str(models["single_file"]), str(busy)]) == 2
    assert "holds other files" in capsys.readouterr().err and sorted(p.name for p in busy.iterdir()) == ["a.png"]


def test_patterns_may_name_folders(models, images, tmp_path, capsys):
    """{stem} / {seed} in folder names: each video in a folder of its own, created by the export."""
    two = [images["landscape"], images["second"]]
    (tmp_path / "out").mkdir()  # the folder above the first placeholder must exist: a typo creates no tree
    rc, _, err = generate(capsys, two, f"{tmp_path}/out/{{stem}}/", models["folder"])
    assert rc == 0, err
    assert (tmp_path / "out/landscape/landscape.mp4").is_file() and (tmp_path / "out/second/second.mp4").is_file()
    rc, _, err = generate(
        capsys, images["landscape"], f"{tmp_path}/out/{{seed}}/clip.gif", models["folder"], "-n 2 --seed 5"
    )
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["5", "6", "landscape", "second"]
    assert (tmp_path / "out/6/clip.gif").is_file()
    (tmp_path / "blocked").write_text("a file where a folder would go")
    rc, _, err = generate(capsys, two, f"{tmp_path}/blocked/{{stem}}.mp4", models["folder"])
    assert rc == 2 and "blocked is a file" in err, err
    (tmp_path / "out" / "portrait").write_text("a file where a folder would go")
    rc, _, err = generate(capsys, images["portrait"], f"{tmp_path}/out/{{stem}}/clip.mp4", models["folder"])
    assert rc == 2 and "portrait is a file, not a folder" in err, err
    rc, _, err = generate(capsys, two, f"{tmp_path}/no-such/{{stem}}/", models["folder"])
    assert rc == 2 and "no-such does not exist" in err, err
    # an image named "...png" has the stem "..": out/dd/{stem}/clip.mp4 wrote out/clip.mp4, outside out/dd
    dots = tmp_path / "...png"
    dots.write_bytes(images["landscape"].read_bytes())
    (tmp_path / "out" / "dd").mkdir()
    rc, _, err = generate(capsys, dots, f"{tmp_path}/out/dd/{{stem}}/clip.mp4", models["folder"])
    assert rc == 0 and (tmp_path / "out/dd/video/clip.mp4").is_file() and not (tmp_path / "out/clip.mp4").exists()
    # the longest name whose sidecar fits: written (its temporary files' names were too long, found after the run)
    long_name = tmp_path / ("v" * 246 + ".mp4")
    rc, _, err = generate(capsys, images["landscape"], long_name, models["folder"])
    assert rc == 0 and long_name.is_file() and Path(f"{long_name}.json").is_file(), err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p != dots] == []  # no temporary left


def test_empty_output_variant_of_a_single_file_and_late_write_failures(models, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = generate(capsys, images["landscape"], "", models["folder"])
    assert rc == 2 and "-o is empty" in err and list(tmp_path.iterdir()) == [], err
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "a.mp4", models["single_file"], "--variant fp16")
    assert rc == 2 and "--variant fp16 picks files of a model folder or hub repo" in err, err

    import img2vid.video

    def disk_full(frames, path, *args):  # the encoder fails half-way through the hidden temp file
        Path(path).write_bytes(b"half a video")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(img2vid.video, "_write_av", disk_full)
    out = tmp_path / "late" / "clip.mp4"
    out.parent.mkdir()
    rc, _, err = generate(capsys, images["landscape"], out, models["folder"])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and f"cannot write {out}: No space left on device" in lines[0], err
    assert ".tmp" not in err and list(out.parent.iterdir()) == []


def test_generate_with_a_unet_of_its_own(models, images, tmp_path, capsys):
    """--unet: a fine-tuned UNet (here another tiny model's, as a UNet-only file in sgm names) instead of the
    model's: the frames are those of the library call with unet=, not the model's own; the sidecar names it; a path
    that does not exist is a one-line error before anything loads."""
    other = Pipeline.from_config("tiny", seed=11)
    whole = other.save_single_file(tmp_path / "other.safetensors")
    from safetensors.torch import load_file, save_file

    unet_file = tmp_path / "finetuned_unet.safetensors"
    save_file({k: t for k, t in load_file(str(whole)).items() if k.startswith("model.diffusion_model.")}, unet_file)
    extra = f"--format png --seed 5 --unet {unet_file}"
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "ft", models["folder"], extra)
    assert rc == 0, err
    got = read_video(tmp_path / "ft")[0]
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, output_type="np")
    for unet, same in ((unet_file, True), (None, False)):
        pipe = Pipeline.from_pretrained(models["folder"], unet=unet)
        ref = pipe(str(images["landscape"]), generator=torch.manual_seed(5), **kw).frames[0]
        assert np.array_equal(got, (ref * 255).round().astype(np.uint8)) == same
    assert read_metadata(tmp_path / "ft")["unet"] == str(unet_file)
    rc, _, err = generate(capsys, images["landscape"], tmp_path / "x.mp4", models["folder"], "--unet nowhere/unet")
    assert rc == 2 and err.strip().endswith(
        "--unet nowhere/unet: no such folder or file (a hub model must be downloaded first)"
    )
    assert "Traceback" not in err and not (tmp_path / "x.mp4").exists()


def test_info_describes_one_component_alone(models, tmp_path, capsys):
    """A UNet alone (sgm names, as ComfyUI saves one; a diffusers unet folder or its file): `info` checks that
    component only and says whether it loads as --unet, instead of listing the absent VAE and encoder as missing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(models["single_file"], "pt") as f:
        unet = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
        meta = f.metadata()
    save_file(unet, tmp_path / "tiny_unet.safetensors", metadata=meta)  # our config in the metadata: tiny
    save_file(unet, tmp_path / "svd_xt_unet.safetensors")  # no config: svd-xt's, from the name; tiny does not fit
    cases = {
        tmp_path / "tiny_unet.safetensors": "usable as a component: yes, the unet: --unet PATH or unet=PATH",
        models["folder"] / "unet": "usable as a component: yes, the unet: --unet PATH or unet=PATH",
        models["folder"] / "vae": "usable as a component: yes, the vae: --vae PATH or vae=PATH",
        models["folder"]
        / "image_encoder": "usable as a component: yes, the image_encoder: image_encoder=PATH (Python)",
        tmp_path / "svd_xt_unet.safetensors": "usable as a component: no",
    }
    for path, verdict in cases.items():
        assert main(["info", str(path)]) == 0
        lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
        assert lines[-1] == verdict and "usable as a pipeline: no" in lines, (path, lines)
        assert not any(line.startswith(("vae missing", "image_encoder missing")) for line in lines), lines
    assert main(["info", str(tmp_path / "svd_xt_unet.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "config: svd-xt" in out and "unet wrong shape" in out
    pipe = Pipeline.from_pretrained(models["folder"], unet=tmp_path / "tiny_unet.safetensors")  # as info said
    assert torch.equal(pipe.unet.conv_in.weight, Pipeline.from_pretrained(models["folder"]).unet.conv_in.weight)


def test_cli_and_server_take_every_setting_in_exactly_the_same_range():
    """One table (run_params.LIMITS) bounds both front ends: each end of each range is taken by both, one step past
    it refused by both."""
    import argparse

    from img2vid.cli import build_parser
    from img2vid.run_params import LIMITS
    from img2vid.server_requests import PARAMS

    gen = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    options = {a.dest: a for a in gen._actions}
    assert set(PARAMS) == set(LIMITS)
    for name, (kind, lo, hi) in LIMITS.items():
        cli = options[name].type
        step = 1 if kind is int else 1e-3 * max(1.0, abs(hi or lo))
        for value, ok in ((lo, True), (hi, True), (lo - step, False), (hi + step, False)):
            text = str(kind(value))
            for parse in (cli, PARAMS[name]):
                if ok:
                    assert parse(text) == kind(value), (name, text)
                else:
                    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
                        parse(text)


def test_every_readme_command_line_parses():
    """Each `img2vid ...` line of README.md's shell examples (continuation lines joined, comments dropped) is
    accepted by the CLI's parser as written: a renamed or removed option would leave the README's examples wrong."""
    import shlex

    from img2vid.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = text.split("```bash")[1:]
    lines: list[str] = []
    for block in blocks:
        joined = block.split("```")[0].replace("\\\n", " ")
        for line in joined.splitlines():
            # `pip install -e . && img2vid generate ...`: the part after the last &&
            command = line.split("&&")[-1].strip()
            if command.startswith("img2vid "):
                lines.append(command)
    assert len(lines) >= 15, lines  # the README's command-line section, at least
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README's command line does not parse: {line}")
        assert args.command == argv[0], line


def test_a_run_on_the_cpu_by_default_says_so(monkeypatch, capsys):
    """Without a CUDA GPU and without --device, generate and serve run on the CPU: one note on stderr says so (a
    full-size model there takes very long); --device cpu (asked for) and --quiet leave it out."""
    from img2vid.cli import build_parser
    from img2vid.cli_setup import device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = build_parser()
    for argv, noted in [
        (["generate", "a.png", "-o", "a.mp4"], True),
        (["serve"], True),
        (["generate", "a.png", "-o", "a.mp4", "--device", "cpu"], False),
        (["generate", "a.png", "-o", "a.mp4", "--quiet"], False),
    ]:
        device, dtype = device_dtype(parser.parse_args(argv))
        assert (device.type, dtype) == ("cpu", torch.float32)
        err = capsys.readouterr().err
        assert ("no CUDA GPU found" in err) == noted, argv
        assert len(err.splitlines()) == (1 if noted else 0), err


def test_run_params_fill_in_only_the_settings_not_given() -> None:
    """run_params takes each setting given and the model's default only where none was: motion bucket 0 (the
    calmest, inside LIMITS) is a setting, not "not given"; a memory mode's decode chunk never exceeds the frames."""
    from types import SimpleNamespace

    from img2vid.configs import preset
    from img2vid.run_params import LIMITS, limited, random_seed, run_params

    pipe = SimpleNamespace(config=preset("svd"), default_decode_chunk_size=None)  # 14 frames, 7 fps, bucket 127
    given = dict(width=64, height=48, steps=3, min_guidance=1.0, max_guidance=2.5, noise_aug_strength=0.02)
    run = run_params(pipe, **given)  # type: ignore[arg-type]
    assert (run.num_frames, run.fps, run.motion_bucket_id, run.decode_chunk_size) == (14, 7, 127, 14)
    run = run_params(pipe, **given, frames=5, fps=12, motion_bucket_id=0)  # type: ignore[arg-type]
    assert (run.num_frames, run.fps, run.motion_bucket_id, run.decode_chunk_size) == (5, 12, 0, 5)
    assert limited("motion_bucket_id")("0") == 0 and LIMITS["motion_bucket_id"][1:] == (0, 1023)
    pipe.default_decode_chunk_size = 8  # a memory mode's chunk: capped by the frames, kept below them
    assert run_params(pipe, **given, frames=4).decode_chunk_size == 4  # type: ignore[arg-type]
    assert run_params(pipe, **given).decode_chunk_size == 8  # type: ignore[arg-type]
    assert run_params(pipe, **given, decode_chunk_size=3).decode_chunk_size == 3  # type: ignore[arg-type]
    # a drawn seed is one --seed takes back (printed so the run can be made again)
    seeds = [random_seed() for _ in range(64)]
    assert all(limited("seed")(str(s)) == s for s in seeds) and len(set(seeds)) > 1
