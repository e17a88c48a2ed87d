"""Model configurations: frozen dataclasses, named presets, and the one place diffusers' config.json maps onto them.

Everything that builds a module takes one of these. Per-block settings are stored as tuples (one entry per down block,
in down order); up blocks read them reversed, exactly as diffusers and sgm do.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")  # a config dataclass

# float16's largest value: the bound of the call's real-valued knobs (inputs.check_conditioning, the CLI's and the
# server's guidance scales), which a float16 model could not hold beyond it
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class UNetConfig:
    """The spatio-temporal UNet (diffusers `UNetSpatioTemporalConditionModel`, sgm `VideoUNet`)."""

    in_channels: int = 8  # 4 noisy latents + 4 conditioning-image latents
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # True where a down block has transformers (CrossAttnDownBlockSpatioTemporal), False for DownBlockSpatioTemporal.
    down_cross_attention: tuple[bool, ...] = (True, True, True, False)
    # In up order (first entry = deepest block): False for UpBlockSpatioTemporal.
    up_cross_attention: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: tuple[int, ...] = (1024, 1024, 1024, 1024)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768  # 3 added time ids x addition_time_embed_dim
    num_frames: int = 25
    sample_size: int = 96
    norm_num_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


@dataclass(frozen=True)
class VAEConfig:
    """The VAE: 2D encoder plus either the temporal decoder (`AutoencoderKLTemporalDecoder`) or, for the
    `*_image_decoder` checkpoints, a per-frame 2D decoder with quant convs (`AutoencoderKL`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    temporal_decoder: bool = True
    sample_size: int = 768


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP ViT image tower with its projection (transformers `CLIPVisionModelWithProjection`)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    hidden_act: str = "gelu"  # "gelu" (exact erf) or "quick_gelu"
    layer_norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SchedulerConfig:
    """The EDM/Karras sampling schedule of SVD (diffusers `EulerDiscreteScheduler` as configured on the hub)."""

    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    # Only needed when sigma_min/max are absent from a scheduler config: the training sigmas then give the range.
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "svd-xt"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_encoder: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Defaults a user of the reference expects for this model (SVD.md, "Models and their published sizes").
    default_fps: int = 7
    default_motion_bucket_id: int = 127

    @property
    def num_frames(self) -> int:
        return self.unet.num_frames

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SVD's four-level VAE)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """The VAE's factor times the UNet's downsamplings (64 for SVD): the CLI's and the server's size rule, at
        which every skip connection meets an exact 2x upsampling. The pipeline takes any multiple of the VAE's
        factor, as diffusers does (the UNet then upsamples to each skip's own size)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.block_out_channels) - 1)


# One component's config: what `component_from_config` returns and what each model class is built from.
ComponentConfig = UNetConfig | VAEConfig | CLIPVisionConfig

TINY_UNET = UNetConfig(
    block_out_channels=(32, 64),
    down_cross_attention=(True, False),
    up_cross_attention=(False, True),
    layers_per_block=(2, 2),
    transformer_layers_per_block=(1, 1),
    num_attention_heads=(2, 4),
    cross_attention_dim=(32, 32),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    num_frames=4,
    sample_size=8,
)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=32)
TINY_CLIP = CLIPVisionConfig(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=14, projection_dim=32
)

PRESETS: dict[str, PipelineConfig] = {
    "svd": PipelineConfig(name="svd", unet=UNetConfig(num_frames=14)),
    "svd-xt": PipelineConfig(name="svd-xt"),
    "svd-xt-1.1": PipelineConfig(name="svd-xt-1.1", default_fps=6),
    "tiny": PipelineConfig(name="tiny", unet=TINY_UNET, vae=TINY_VAE, image_encoder=TINY_CLIP),
}


def preset(name: str) -> PipelineConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# diffusers / transformers config.json <-> our dataclasses. The only place that knows their field names.


def _per_block(value: Any, n: int) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-block values, got {len(value)}: {value}")
        return tuple(value)
    return (value,) * n


_CROSS_DOWN = {"CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False}
_CROSS_UP = {"CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False}


def unet_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    d = UNetConfig()
    down_types = cfg.get("down_block_types", ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"])
    up_types = cfg.get("up_block_types", ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3)
    for t in list(down_types) + list(up_types):
        if t not in _CROSS_DOWN and t not in _CROSS_UP:
            raise ValueError(f"unsupported UNet block type {t!r}")
    n = len(down_types)
    if len(up_types) != n:
        raise ValueError("down_block_types and up_block_types must have the same length")
    transformer_layers = cfg.get("transformer_layers_per_block", 1)
    if isinstance(transformer_layers, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in transformer_layers):
        raise ValueError("nested transformer_layers_per_block is not supported")
    return UNetConfig(
        in_channels=cfg.get("in_channels", d.in_channels),
        out_channels=cfg.get("out_channels", d.out_channels),
        block_out_channels=tuple(cfg.get("block_out_channels", d.block_out_channels)),
        down_cross_attention=tuple(_CROSS_DOWN[t] for t in down_types),
        up_cross_attention=tuple(_CROSS_UP[t] for t in up_types),
        layers_per_block=_per_block(cfg.get("layers_per_block", 2), n),
        transformer_layers_per_block=_per_block(transformer_layers, n),
        num_attention_heads=_per_block(cfg.get("num_attention_heads", d.num_attention_heads), n),
        cross_attention_dim=_per_block(cfg.get("cross_attention_dim", 1024), n),
        addition_time_embed_dim=cfg.get("addition_time_embed_dim", d.addition_time_embed_dim),
        projection_class_embeddings_input_dim=cfg.get(
            "projection_class_embeddings_input_dim", d.projection_class_embeddings_input_dim
        ),
        num_frames=cfg.get("num_frames", d.num_frames),
        sample_size=cfg.get("sample_size") or d.sample_size,
    )


def unet_to_diffusers(c: UNetConfig) -> dict[str, Any]:
    return {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": [
            "CrossAttnDownBlockSpatioTemporal" if x else "DownBlockSpatioTemporal" for x in c.down_cross_attention
        ],
        "up_block_types": [
            "CrossAttnUpBlockSpatioTemporal" if x else "UpBlockSpatioTemporal" for x in c.up_cross_attention
        ],
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": list(c.layers_per_block),
        "transformer_layers_per_block": list(c.transformer_layers_per_block),
        "num_attention_heads": list(c.num_attention_heads),
        "cross_attention_dim": list(c.cross_attention_dim),
        "addition_time_embed_dim": c.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": c.projection_class_embeddings_input_dim,
        "num_frames": c.num_frames,
        "sample_size": c.sample_size,
    }


def vae_from_diffusers(cfg: dict[str, Any]) -> VAEConfig:
    """Accepts `AutoencoderKLTemporalDecoder` configs and, for the image-decoder variant, `AutoencoderKL` ones.
    diffusers' class defaults differ from SVD's values: a missing key takes the diffusers class default."""
    if "_class_name" in cfg:
        temporal = cfg["_class_name"] != "AutoencoderKL"
    else:  # an in-memory config (model.config) has no class name: only AutoencoderKL has these keys
        temporal = not any(k in cfg for k in ("up_block_types", "use_post_quant_conv", "use_quant_conv"))
    for t in cfg.get("down_block_types", []):
        if t != "DownEncoderBlock2D":
            raise ValueError(f"unsupported VAE block type {t!r}")
    for t in cfg.get("up_block_types", []):
        if t != "UpDecoderBlock2D":
            raise ValueError(f"unsupported VAE block type {t!r}")
    if not temporal:
        if cfg.get("act_fn", "silu") != "silu" or not cfg.get("mid_block_add_attention", True):
            raise ValueError("unsupported AutoencoderKL options (act_fn / mid_block_add_attention)")
        if not cfg.get("use_quant_conv", True) or not cfg.get("use_post_quant_conv", True):
            raise ValueError("unsupported AutoencoderKL options (quant convs disabled)")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        latent_channels=cfg.get("latent_channels", 4),
        # AutoencoderKLTemporalDecoder takes no norm_num_groups (diffusers ignores the key, and its norms have 32)
        norm_num_groups=32 if temporal else cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        force_upcast=cfg.get("force_upcast", True),  # not bool(): "false" must fail the type check, not load as True
        temporal_decoder=temporal,
        sample_size=cfg.get("sample_size", 32),
    )


def vae_to_diffusers(c: VAEConfig) -> dict[str, Any]:
    n = len(c.block_out_channels)
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKLTemporalDecoder" if c.temporal_decoder else "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "latent_channels": c.latent_channels,
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "force_upcast": c.force_upcast,
    }
    if not c.temporal_decoder:
        out.update(up_block_types=["UpDecoderBlock2D"] * n, act_fn="silu", norm_num_groups=c.norm_num_groups)
    return out


def clip_from_transformers(cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPVisionConfig:
    if "vision_config" in cfg:  # a full CLIPConfig: take its vision tower
        cfg = {**cfg["vision_config"], "projection_dim": cfg.get("projection_dim", 512)}
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"unsupported CLIP activation {act!r}")
    extra: dict[str, Any] = {}
    if preprocessor:
        for key in ("image_mean", "image_std"):
            if key in preprocessor:
                value = preprocessor[key]
                # a list as it comes (the type check names a bad one); a bare number is not one, and tuple() would fail
                extra[key] = tuple(value) if isinstance(value, list | tuple) else value
    return CLIPVisionConfig(
        hidden_size=cfg.get("hidden_size", 768),
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 12),
        num_channels=cfg.get("num_channels", 3),
        patch_size=cfg.get("patch_size", 32),
        image_size=cfg.get("image_size", 224),
        projection_dim=cfg.get("projection_dim", 512),
        hidden_act=act,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        **extra,
    )


def clip_to_transformers(c: CLIPVisionConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_channels": c.num_channels,
        "patch_size": c.patch_size,
        "image_size": c.image_size,
        "projection_dim": c.projection_dim,
        "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


def component_from_config(
    component: str, cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None
) -> ComponentConfig:
    """A component folder's config.json -> its config: the one place a component's name picks its mapping."""
    if component == "unet":
        return unet_from_diffusers(cfg)
    if component == "vae":
        return vae_from_diffusers(cfg)
    if component == "image_encoder":
        return clip_from_transformers(cfg, preprocessor)
    raise ValueError(f"unknown component {component!r}: expected unet, vae or image_encoder")


def scheduler_from_diffusers(cfg: dict[str, Any]) -> SchedulerConfig:
    """SVD's Euler schedule from a scheduler_config.json. Settings that give diffusers another schedule, which
    img2vid does not implement, are refused by name (a folder of tuned settings made a different video silently);
    missing keys are SVD's, as in every SVD folder diffusers writes."""
    if cfg.get("prediction_type", "v_prediction") != "v_prediction":
        raise ValueError("only v-prediction SVD schedulers are supported")
    if "use_karras_sigmas" in cfg and not cfg["use_karras_sigmas"]:
        raise ValueError("scheduler use_karras_sigmas false is not supported: SVD's Euler schedule is Karras'")
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        if cfg.get(key):
            raise ValueError(f"scheduler {key} true is not supported: SVD's Euler schedule is Karras'")
    for key, svd in (("final_sigmas_type", "zero"), ("timestep_type", "continuous")):
        if cfg.get(key, svd) != svd:
            raise ValueError(f"scheduler {key} {cfg[key]!r} is not supported (SVD's: {svd!r})")
    d = SchedulerConfig()
    return SchedulerConfig(
        sigma_min=cfg.get("sigma_min") if cfg.get("sigma_min") is not None else d.sigma_min,
        sigma_max=cfg.get("sigma_max") if cfg.get("sigma_max") is not None else d.sigma_max,
        beta_start=cfg.get("beta_start", d.beta_start),
        beta_end=cfg.get("beta_end", d.beta_end),
        num_train_timesteps=cfg.get("num_train_timesteps", d.num_train_timesteps),
    )


def scheduler_to_diffusers(c: SchedulerConfig) -> dict[str, Any]:
    return {
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": c.beta_start,
        "beta_end": c.beta_end,
        "num_train_timesteps": c.num_train_timesteps,
        "prediction_type": "v_prediction",
        "interpolation_type": "linear",
        "sigma_max": c.sigma_max,
        "sigma_min": c.sigma_min,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "timestep_type": "continuous",
        "trained_betas": None,
        "use_karras_sigmas": True,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
    }


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def replace(config: C, **changes: object) -> C:
    """dataclasses.replace, typed: the config's own class comes back."""
    return dataclasses.replace(config, **changes)
