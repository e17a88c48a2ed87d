"""diffusers' SVD user guide, run on img2vid with only the import lines changed (plus, on these offline CPU
machines, a local tiny model folder instead of the hub id, "cpu" instead of "cuda", and fewer steps).

The tiny model keeps the guide's default 576x1024 size affordable on a CPU: a 4-level VAE (latents 72x128, as for
the real model) and a 2-level UNet with attention only at its lower level. One more CPU substitution: the guide's
`torch_dtype=DTYPE` becomes float32 (the fp16 weights are still what is loaded, through variant="fp16"),
because PyTorch's half-precision convolutions on a CPU are unoptimised reference loops that would take many minutes
at 576x1024; half-precision runs are covered at smaller sizes in test_pipeline / test_cli.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

# ---- the guide's programs, import lines changed --------------------------------------------------------------------
from img2vid import Pipeline as StableVideoDiffusionPipeline  # was: from diffusers import StableVideoDiffusionPipeline
from img2vid.configs import TINY_CLIP, PipelineConfig, UNetConfig, VAEConfig
from img2vid.utils import export_to_video, load_image  # was: from diffusers.utils import load_image, export_to_video
from img2vid.video import read_video

STEPS = 2  # the guide uses the default 25
DTYPE = torch.float32  # the guide: torch.float16 (on a GPU)


def guide_offload(model: str, image_url: str, out: str) -> list:
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=DTYPE, variant="fp16")
    pipe.enable_model_cpu_offload()
    image = load_image(image_url)
    image = image.resize((1024, 576))
    generator = torch.manual_seed(42)
    frames = pipe(image, decode_chunk_size=8, generator=generator, num_inference_steps=STEPS).frames[0]
    export_to_video(frames, out, fps=7)
    return frames


def guide_compile(model: str, image_url: str, out: str) -> list:
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=DTYPE, variant="fp16")
    pipe.to("cpu")  # the guide: pipe.to("cuda")
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    image = load_image(image_url)
    image = image.resize((1024, 576))
    generator = torch.manual_seed(42)
    frames = pipe(image, decode_chunk_size=8, generator=generator, num_inference_steps=STEPS).frames[0]
    export_to_video(frames, out, fps=7)
    return frames


def guide_chunking(model: str, image_url: str, out: str) -> list:
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=DTYPE, variant="fp16")
    pipe.enable_model_cpu_offload()
    pipe.unet.enable_forward_chunking()
    image = load_image(image_url)
    image = image.resize((1024, 576))
    generator = torch.manual_seed(42)
    frames = pipe(image, decode_chunk_size=2, generator=generator, num_frames=25, num_inference_steps=STEPS).frames[0]
    export_to_video(frames, out, fps=7)
    return frames


def guide_micro_conditioning(model: str, image_url: str, out: str) -> list:
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=DTYPE, variant="fp16")
    pipe.enable_model_cpu_offload()
    image = load_image(image_url)
    image = image.resize((1024, 576))
    generator = torch.manual_seed(42)
    frames = pipe(
        image,
        decode_chunk_size=8,
        generator=generator,
        motion_bucket_id=180,
        noise_aug_strength=0.1,
        num_inference_steps=STEPS,
    ).frames[0]
    export_to_video(frames, out, fps=7)
    return frames


# ---- fixtures ------------------------------------------------------------------------------------------------------
GUIDE_CONFIG = PipelineConfig(
    name="guide-tiny",
    unet=UNetConfig(
        block_out_channels=(32, 64),
        down_cross_attention=(False, True),
        up_cross_attention=(True, False),
        layers_per_block=(1, 1),
        transformer_layers_per_block=(1, 1),
        num_attention_heads=(2, 2),
        cross_attention_dim=(32, 32),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        num_frames=3,
    ),
    vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
    image_encoder=TINY_CLIP,
)


@pytest.fixture(scope="module")
def guide_model(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("guide")
    Pipeline = StableVideoDiffusionPipeline
    Pipeline.from_config(GUIDE_CONFIG, seed=0).save_pretrained(root / "model", variant="fp16")
    image = root / "rocket.png"
    make_image(300, 200).save(image)
    return str(root / "model"), str(image)


def frames_of(path: str) -> np.ndarray:
    frames, fps = read_video(path)
    assert fps == pytest.approx(7)
    return frames


def as_array(frames: list) -> np.ndarray:
    return np.stack([np.asarray(f) for f in frames])


def test_guide_offload_program(guide_model, tmp_path):
    model, image = guide_model
    out = str(tmp_path / "generated.mp4")
    frames = guide_offload(model, image, out)
    assert len(frames) == 3 and frames[0].size == (1024, 576)
    video = frames_of(out)
    assert video.shape == (3, 576, 1024, 3)
    # Offload changes nothing: the same program without it gives the same frames.
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=DTYPE, variant="fp16")
    # Offload computes on the accelerator where there is one: the plain run must compute there too (a GPU's float32
    # convolutions round differently from a CPU's).
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    image_pil = load_image(image).resize((1024, 576))
    plain = pipe(image_pil, decode_chunk_size=8, generator=torch.manual_seed(42), num_inference_steps=STEPS).frames[0]
    np.testing.assert_array_equal(as_array(frames), as_array(plain))


def test_guide_compile_program(guide_model, tmp_path):
    # Start from a clean dynamo state: if another test compiled the same UNet code at another size, dynamo would
    # switch this compile to dynamic shapes, which PyTorch's CPU inductor fails to lower for this model.
    torch._dynamo.reset()
    model, image = guide_model
    out = str(tmp_path / "generated.mp4")
    frames = guide_compile(model, image, out)
    assert frames_of(out).shape[0] == 3
    eager = guide_offload(model, image, str(tmp_path / "eager.mp4"))
    # Compiled kernels may round differently; the frames agree to a level or two out of 255.
    assert np.abs(as_array(frames).astype(int) - as_array(eager).astype(int)).max() <= 2


def test_guide_forward_chunking_program(guide_model, tmp_path):
    model, image = guide_model
    out = str(tmp_path / "generated.mp4")
    frames = guide_chunking(model, image, out)
    assert len(frames) == 25 and frames_of(out).shape[0] == 25
    # That forward chunking changes nothing beyond float rounding is proven on the same kind of model, more cheaply,
    # in test_pipeline.test_offload_and_chunking_leave_frames_unchanged and test_unet.


def test_guide_micro_conditioning_program(guide_model, tmp_path):
    model, image = guide_model
    out = str(tmp_path / "generated.mp4")
    frames = guide_micro_conditioning(model, image, out)
    assert frames_of(out).shape == (3, 576, 1024, 3)
    default = guide_offload(model, image, str(tmp_path / "default.mp4"))
    assert not np.array_equal(as_array(frames), as_array(default))  # the conditioning reaches the model


def test_import_pulls_no_oracles():
    import subprocess
    import sys

    code = (
        "import sys, img2vid; from img2vid import Pipeline; import img2vid.cli, img2vid.utils; "
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_install_requires_no_oracles():
    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if d.split(">")[0].split("=")[0].strip() in ("diffusers", "transformers")]
