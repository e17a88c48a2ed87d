"""Shared fixtures: tiny random SVD pipelines built with the reference classes (diffusers + transformers, test-only)
and saved with their own save_pretrained, so loading them exercises our real folder loader."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

from img2vid.configs import (
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    CLIPVisionConfig,
    SchedulerConfig,
    UNetConfig,
    VAEConfig,
    clip_to_transformers,
    scheduler_to_diffusers,
    unet_to_diffusers,
    vae_to_diffusers,
)


def _triton_interpreter_works() -> bool:
    """Whether Triton's CPU interpreter can run the kernel tests here: Triton 3.9 or later (older interpreters fail
    on numpy 2; a CUDA build of torch pins its own, older Triton, so a GPU machine may have one)."""
    if importlib.util.find_spec("triton") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    return (major, minor) >= (3, 9)


# The kernels' tests under Triton's CPU interpreter (`pip install "triton>=3.9"`, as CI does)
needs_triton = pytest.mark.skipif(
    not _triton_interpreter_works(), reason='needs Triton 3.9+ for its CPU interpreter (pip install "triton>=3.9")'
)


# A second, differently shaped tiny model: three UNet levels with per-block heads/layers, a deeper VAE, another CLIP.
SHAPE_B_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    down_cross_attention=(True, True, False),
    up_cross_attention=(False, True, True),
    layers_per_block=(1, 2, 1),
    transformer_layers_per_block=(1, 2, 1),
    num_attention_heads=(2, 2, 4),
    cross_attention_dim=(48, 48, 48),
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=48,
    num_frames=3,
    sample_size=8,
)
SHAPE_B_VAE = VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32)
SHAPE_B_CLIP = CLIPVisionConfig(
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=3,
    patch_size=32,
    image_size=224,
    projection_dim=48,
    hidden_act="quick_gelu",
)
SHAPES = {"a": (TINY_UNET, TINY_VAE, TINY_CLIP), "b": (SHAPE_B_UNET, SHAPE_B_VAE, SHAPE_B_CLIP)}


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random offsets on every parameter: the reference zero-inits some layers, which would hide mapping bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def reference_scheduler():
    """diffusers' EulerDiscreteScheduler configured like the hub's SVD scheduler_config.json (from_config ignores
    the keys that file carries for other schedulers)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler_to_diffusers(SchedulerConfig()))


def reference_pipeline(shape: str = "a", seed: int = 0):
    """A diffusers StableVideoDiffusionPipeline with tiny random weights."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    from transformers import CLIPVisionConfig as HFCLIPVisionConfig

    unet_cfg, vae_cfg, clip_cfg = SHAPES[shape]
    torch.manual_seed(seed)

    def kwargs(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    unet = UNetSpatioTemporalConditionModel(**kwargs(unet_to_diffusers(unet_cfg)))
    vae = AutoencoderKLTemporalDecoder(**kwargs(vae_to_diffusers(vae_cfg)))
    hf_clip = clip_to_transformers(clip_cfg)
    enc = CLIPVisionModelWithProjection(
        HFCLIPVisionConfig(**{k: v for k, v in hf_clip.items() if k != "architectures"})
    )
    for i, m in enumerate((unet, vae, enc)):
        perturb_(m, seed * 10 + i)
    fe = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224},
        size={"shortest_edge": 224},
        image_mean=list(clip_cfg.image_mean),
        image_std=list(clip_cfg.image_std),
        do_center_crop=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        resample=3,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=enc, unet=unet, scheduler=reference_scheduler(), feature_extractor=fe
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_pipelines():
    return {s: reference_pipeline(s, seed=i + 1) for i, s in enumerate(SHAPES)}


@pytest.fixture(scope="session")
def tiny_model_dirs(reference_pipelines, tmp_path_factory) -> dict[str, Path]:
    """The reference pipelines saved in diffusers' folder layout (float32, and an fp16 variant of shape "a")."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for s, pipe in reference_pipelines.items():
        dirs[s] = root / f"tiny-{s}"
        pipe.save_pretrained(dirs[s])
    pipe16 = reference_pipeline("a", seed=1).to(torch.float16)
    pipe16.save_pretrained(dirs["a"], variant="fp16")
    return dirs


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["a"]


def make_image(width: int = 56, height: int = 40, seed: int = 0):
    """A smooth, non-square RGB test image (smooth so resizes and codecs behave)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1)
    img = (base * 200 + rng.uniform(0, 55, size=3)).clip(0, 255).astype("uint8")
    return PIL.Image.fromarray(img)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
