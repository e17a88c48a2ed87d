"""Whether a config is usable before anything is built from it: each field of the type it declares (configs read
from JSON are otherwise taken as they come), and the components' configs fitting together."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from img2vid.configs import PipelineConfig, SchedulerConfig


def _fits(value: Any, kind: Any, least: int = 1) -> bool:
    """Whether a JSON-born value is what a config field of type `kind` holds (ints >= least, finite numbers)."""
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if kind is int:  # bool is an int to Python, not to a config
        return isinstance(value, int) and not isinstance(value, bool) and value >= least
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    args = typing.get_args(kind)  # tuple[int, ...] (non-empty) or tuple[float, float, float]
    if not isinstance(value, tuple) or not value:
        return False
    if args[-1] is Ellipsis:
        return all(_fits(v, args[0]) for v in value)
    return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))


_KIND_NAMES = {int: ("an int", "ints"), float: ("a finite number", "finite numbers"), bool: ("a bool", "bools")}
_KIND_NAMES[str] = ("a string", "strings")


def _describe(kind: Any, least: int = 1) -> str:
    if kind in _KIND_NAMES:
        return _KIND_NAMES[kind][0] + (f" >= {least}" if kind is int else "")
    args = typing.get_args(kind)
    of = _KIND_NAMES[args[0]][1] + (" >= 1" if args[0] is int else "")
    return f"a list of {of}" if args[-1] is Ellipsis else f"a list of {len(args)} {of}"


def check(config: Any, where: str = "") -> None:
    """ValueError naming the first field of a config (and its sub-configs) whose value is not of its declared type.
    Configs read from JSON (a diffusers folder's files, our single files' metadata) are otherwise taken as they
    come: "2" for an int fails deep inside a model's constructor, and "0.18" as the VAE's scaling_factor or
    [0.5, 0.5] as the CLIP image_mean loads fine and fails at the first generation. Every int is a size or a count
    (>= 1), except the motion bucket (0 is a still video)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind, least = getattr(config, f.name), hints[f.name], int(f.name != "default_motion_bucket_id")
        if dataclasses.is_dataclass(kind):
            check(value, f"{where}{f.name}.")
        elif not _fits(value, kind, least):
            raise ValueError(f"{where}{f.name} must be {_describe(kind, least)}, not {value!r}")
    positive = {"scaling_factor": getattr(config, "scaling_factor", 1.0), "image_std": getattr(config, "image_std", ())}
    for name, value in positive.items():  # 0 divides the latents or the pixels: NaN frames, no error
        if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"{where}{name} must be positive, not {value!r}")
    if isinstance(config, SchedulerConfig) and not 0 < config.sigma_min < config.sigma_max:
        # a zero, negative or inverted range loads and samples NaN frames without an error
        raise ValueError(
            f"{where}sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, not "
            f"{config.sigma_min!r} and {config.sigma_max!r}"
        )


def check_pipeline(config: PipelineConfig) -> None:
    """ValueError naming the first pair of components that cannot work together (each may be fine alone): what
    would otherwise fail at the first step with a matrix-product shape error. The UNet takes the noisy latents and
    the image's latents side by side and predicts latents; its cross-attention reads the image embedding."""
    u, v, e = config.unet, config.vae, config.image_encoder
    if u.in_channels != 2 * v.latent_channels or u.out_channels != v.latent_channels:
        raise ValueError(
            f"the UNet takes {u.in_channels} channels in and gives {u.out_channels}, the VAE's latents have "
            f"{v.latent_channels} (the UNet needs twice that in, as many out)"
        )
    if any(d != e.projection_dim for d in u.cross_attention_dim):
        raise ValueError(
            f"the UNet's cross-attention reads {u.cross_attention_dim[0]}-wide embeddings, the image encoder gives "
            f"{e.projection_dim}"
        )
    if u.projection_class_embeddings_input_dim != 3 * u.addition_time_embed_dim:
        raise ValueError(
            f"the UNet's added time embedding takes {u.projection_class_embeddings_input_dim} inputs, not 3 x "
            f"{u.addition_time_embed_dim} (fps, motion bucket, noise augmentation)"
        )
