"""Parity of the CLIP image tower and its preprocessing against transformers / diffusers (oracles, test-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from PIL import Image

from img2vid.configs import CLIPVisionConfig, clip_from_transformers, clip_to_transformers
from img2vid.image_encoder import ImageEncoder, preprocess, resize_with_antialiasing
from img2vid.sgm_keys import POSITION_IDS

TINY_CONFIGS = [
    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=14,
        image_size=224,
        projection_dim=24,
        hidden_act="gelu",
    ),
    CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=3,
        patch_size=32,
        image_size=64,
        projection_dim=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-6,
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
    ),
]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def reference_model(config: CLIPVisionConfig, seed: int) -> transformers.CLIPVisionModelWithProjection:
    """A transformers model with every parameter randomly perturbed (so LayerNorm scales/biases are not 1/0)."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**clip_to_transformers(config)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def load_ours(config: CLIPVisionConfig, state_dict: dict[str, torch.Tensor]) -> ImageEncoder:
    with torch.device("meta"):
        ours = ImageEncoder(config)
    sd = {k: v for k, v in state_dict.items() if k != POSITION_IDS}
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


def reference_preprocess(images: torch.Tensor, config: CLIPVisionConfig) -> torch.Tensor:
    """diffusers' SVD `_encode_image` path for a non-tensor image, resized to the config's size."""
    x = images * 2.0 - 1.0
    x = _resize_with_antialiasing(x, (config.image_size, config.image_size))
    x = (x + 1.0) / 2.0
    processor = transformers.CLIPImageProcessor(image_mean=list(config.image_mean), image_std=list(config.image_std))
    return processor(
        images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    ).pixel_values


@pytest.mark.parametrize("index", [0, 1])
def test_embeds_match_transformers(index: int) -> None:
    config = TINY_CONFIGS[index]
    ref = reference_model(config, seed=index)
    ours = load_ours(config, ref.state_dict())
    assert not list(ours.buffers())
    torch.manual_seed(100 + index)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        expected = ref(pixel_values=pixels).image_embeds
        got = ours(pixels)
    assert got.shape == (2, config.projection_dim)
    assert rel_err(got, expected) < 1e-4


def test_old_checkpoint_with_position_ids_loads() -> None:
    config = TINY_CONFIGS[1]
    ref = reference_model(config, seed=3)
    num_positions = (config.image_size // config.patch_size) ** 2 + 1
    sd = dict(ref.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(num_positions)[None]  # as older saves store it
    ours = load_ours(config, sd)
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        assert rel_err(ours(pixels), ref(pixel_values=pixels).image_embeds) < 1e-4


def test_strict_load_rejects_missing_and_unexpected_keys() -> None:
    config = TINY_CONFIGS[0]
    sd = reference_model(config, seed=0).state_dict()
    missing = {k: v for k, v in sd.items() if k != "visual_projection.weight"}
    with pytest.raises(RuntimeError, match="visual_projection.weight"):
        ImageEncoder(config).load_state_dict(missing, strict=True)
    unexpected = {**sd, "vision_model.encoder.layers.9.mlp.fc1.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="layers.9.mlp.fc1.weight"):
        ImageEncoder(config).load_state_dict(unexpected, strict=True)


def test_wrong_image_size_raises() -> None:
    config = TINY_CONFIGS[1]
    with pytest.raises(ValueError, match="64x64"):
        ImageEncoder(config)(torch.zeros(1, 3, 32, 64))


@pytest.mark.parametrize("index", [0, 1])
def test_config_round_trip_through_transformers(index: int) -> None:
    config = TINY_CONFIGS[index]
    model = reference_model(config, seed=index)
    preprocessor = {"image_mean": list(config.image_mean), "image_std": list(config.image_std)}
    assert clip_from_transformers(model.config.to_dict(), preprocessor) == config


def test_full_vit_h_matches_transformers_on_meta() -> None:
    config = CLIPVisionConfig()  # SVD's ViT-H/14
    with torch.device("meta"):
        ours = ImageEncoder(config)
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**clip_to_transformers(config)))
    assert sum(p.numel() for p in ours.parameters()) == 632_076_800  # SVD.md
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != POSITION_IDS}
    assert ours_shapes == ref_shapes


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((2, 3, 70, 130), (224, 224)),  # upsampling: the blur is an identity
        ((1, 3, 300, 520), (224, 224)),  # mild downsampling: 3-tap kernels on both axes
        ((1, 2, 96, 200), (24, 40)),  # even tap counts (6, 8) forced odd (7, 9)
        ((1, 3, 230, 50), (64, 64)),  # H down (5 taps), W up (identity blur, skipped)
    ],
)
def test_resize_with_antialiasing_matches_diffusers(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    torch.manual_seed(sum(shape))
    x = torch.rand(shape) * 2 - 1
    got = resize_with_antialiasing(x, size)
    expected = _resize_with_antialiasing(x, size)
    assert got.shape == expected.shape == (*shape[:2], *size)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("index", [0, 1])
def test_preprocess_random_tensor_matches_diffusers(index: int) -> None:
    config = TINY_CONFIGS[index]
    torch.manual_seed(7)
    images = torch.rand(2, 3, 70, 130)
    got = preprocess(images, config)
    expected = reference_preprocess(images, config)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape == (2, 3, config.image_size, config.image_size)
    assert (got - expected).abs().max().item() < 1e-5
    assert rel_err(got, expected) < 1e-6


def test_preprocess_pil_image_matches_diffusers() -> None:
    config = CLIPVisionConfig()  # the real 224x224 ViT-H preprocessing
    # A smooth gradient plus noise, wide like SVD's 1024x576 inputs but small: both axes are downsampled.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:420]
    base = np.stack([xx / 420 * 255, yy / 240 * 255, (xx + yy) % 256], axis=-1)
    array = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, mode="RGB")
    ours_in = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0  # (H, W, 3) -> (1, 3, H, W)
    got = preprocess(ours_in, config)
    ref_in = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(image))  # diffusers' own conversion
    expected = reference_preprocess(ref_in, config)
    assert got.shape == expected.shape == (1, 3, 224, 224)
    assert (got - expected).abs().max().item() < 1e-5


def test_preprocess_half_input_is_computed_in_float32() -> None:
    config = TINY_CONFIGS[1]
    images = torch.rand(1, 3, 100, 90)
    got = preprocess(images.half(), config)
    assert got.dtype == torch.float32
    assert (got - preprocess(images.half().float(), config)).abs().max().item() == 0.0


def test_blur_taps_is_the_conv() -> None:
    """Off the CPU the blur runs as a sum of shifted copies (no TF32 convolution): the same numbers as the conv."""
    from img2vid.image_encoder import _blur_taps, _gaussian_kernel

    torch.manual_seed(3)
    x = torch.rand(3, 1, 40, 57) * 2 - 1
    for taps, axis in ((3, 2), (7, 3), (9, 2)):
        kernel = _gaussian_kernel(taps, taps / 4, torch.float32, torch.device("cpu"))
        weight = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
        torch.testing.assert_close(_blur_taps(x, kernel, axis), F.conv2d(x, weight), rtol=1e-6, atol=1e-6)
