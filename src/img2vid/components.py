"""One component from somewhere other than the pipeline's own checkpoint: a fine-tuned UNet (or VAE, or image
encoder) given to `Pipeline.from_pretrained(..., unet=...)` or `img2vid generate --unet ...`, as

- a module already built (img2vid's UNet / VAE / ImageEncoder, e.g. another pipeline's), or diffusers' /
  transformers' model object of that kind (a UNetSpatioTemporalConditionModel fine-tuned in memory, say): its config
  and weights are read into img2vid's class (told by its class name: img2vid never imports those libraries),
- a diffusers component folder (`unet.save_pretrained(dir)`: config.json beside the weights) or a pipeline folder
  (its component's subfolder),
- a single file: diffusers' / transformers' names (`diffusion_pytorch_model.safetensors`, or a sharded index), or
  the sgm layout (Stability's whole files, or the UNet alone as ComfyUI and trainers save it,
  `model.diffusion_model.*`).

The pipeline's other components load from its own checkpoint; this one's tensors go through the same strict name and
shape checks, against its own config (a folder's config.json) or, for a file without one, the pipeline's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from img2vid import config_checks, configs
from img2vid.checkpoint import (
    build,
    check_state_dict,
    drop_buffers,
    expected_shapes,
    model_class,
    read_pipeline_config,
)
from img2vid.checkpoint_io import (
    Device,
    StateDict,
    read_header,
    read_keys,
    read_state_dict,
    stored_config,
)
from img2vid.configs import ComponentConfig, PipelineConfig
from img2vid.errors import CheckpointError, InputError, user_path
from img2vid.folders import check_variant, component_file, weight_variants
from img2vid.sgm_convert import cond_encoder_keys, detect_format, detect_sgm_variant, split_sgm
from img2vid.sgm_keys import COMPONENTS, SGM_PREFIX

Source = nn.Module | str | os.PathLike
# The single-file kinds (sgm_convert.detect_format) that hold one component in diffusers' / transformers' names
FILE_KIND = {"unet": "diffusers-unet", "vae": "diffusers-vae", "image_encoder": "transformers-clip"}
FILE_COMPONENT = {kind: c for c, kind in FILE_KIND.items()}
CLASS_NAME = {"unet": "UNet", "vae": "VAE", "image_encoder": "ImageEncoder"}
# diffusers' and transformers' classes of each component, whose objects are read as their saved folders would be
FOREIGN_CLASSES = {
    "unet": ("UNetSpatioTemporalConditionModel",),
    "vae": ("AutoencoderKLTemporalDecoder", "AutoencoderKL"),
    "image_encoder": ("CLIPVisionModelWithProjection",),
}


def check_sources(sources: dict[str, Source | None]) -> dict[str, Source]:
    """The components given (not None), each of a type this module takes, before anything is read."""
    # a torch.compile wrapper (pipe.unet = torch.compile(pipe.unet)) gives the module it wraps
    given = {c: getattr(s, "_orig_mod", s) for c, s in sources.items() if s is not None}
    for c, s in given.items():
        cls = model_class(c)
        if isinstance(s, nn.Module) and not isinstance(s, cls) and type(s).__name__ not in FOREIGN_CLASSES[c]:
            raise InputError(
                f"{c}= takes img2vid's {CLASS_NAME[c]}, diffusers' / transformers' {' or '.join(FOREIGN_CLASSES[c])}"
                f" or the path of its weights, not a {type(s).__name__} module"
            )
        if not isinstance(s, nn.Module | str | os.PathLike):
            raise InputError(f"{c}= takes img2vid's {CLASS_NAME[c]} or a path, not {type(s).__name__}")
    return given


def with_component(config: PipelineConfig, component: str, part: ComponentConfig, check: bool = True) -> PipelineConfig:
    """The pipeline config with one component's config replaced, checked as a whole (a UNet whose cross-attention
    width is not the image encoder's would fail at the first step). An image encoder keeps the pipeline's
    preprocessing (mean and std are the feature extractor's, which stays)."""
    if component == "image_encoder":
        part = configs.replace(
            part, image_mean=config.image_encoder.image_mean, image_std=config.image_encoder.image_std
        )
    new = configs.replace(config, **{component: part})
    try:
        if check:
            config_checks.check_pipeline(new)
    except ValueError as e:
        raise CheckpointError(f"the {component} given does not fit this pipeline: {e}") from None
    return new


def folder_config(folder: Path, component: str) -> ComponentConfig:
    """A component folder's config.json, as the pipeline folder's loader reads it."""
    try:
        data = configs.read_json(folder / "config.json")
    except ValueError as e:  # its message names the file
        raise CheckpointError(str(e)) from None
    return _component_config(component, data, f"{folder / 'config.json'}: ")


def _component_config(component: str, data: dict[str, Any], where: str) -> ComponentConfig:
    """A config.json's mapping (or a model object's config) -> the component's checked config; a bad value is a
    one-line CheckpointError that starts with `where`."""
    try:
        part = configs.component_from_config(component, data)
        config_checks.check(part)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}{e}") from None
    return part


def component_folder_file(folder: Path, component: str, variant: str | None, allow_pickle: bool) -> Path:
    """The weights file of a component folder (`unet.save_pretrained(folder)`), in the variant asked if it has it."""
    folder = folder.resolve()  # "." has no name to read it by
    check_variant(variant)
    if variant is not None and variant not in weight_variants(folder.parent, component, sub=folder.name)[1]:
        variant = None  # as a pipeline folder's component without the variant: its plain weights
    return component_file(folder.parent, component, variant, allow_pickle, sub=folder.name)


def _from_sgm_file(
    path: Path, component: str, config: PipelineConfig, device: Device, dtype: torch.dtype, allow_pickle: bool
) -> tuple[ComponentConfig, StateDict]:
    """One component of an sgm-layout file (a whole pipeline's or the component's alone)."""
    header, metadata = read_header(path, allow_pickle)
    stored = stored_config(path, metadata)  # our own single files carry their config
    base = stored if stored is not None else config
    if component == "vae":  # the decoder kind is the file's (svd_xt vs svd_xt_image_decoder)
        temporal = detect_sgm_variant(header) == "temporal"
        base = configs.replace(base, vae=configs.replace(base.vae, temporal_decoder=temporal))
    prefix = SGM_PREFIX[component]
    keys = [k for k in header if k.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"{path} holds no {component} tensors (sgm names starting {prefix})")
    if component == "vae":
        keys += cond_encoder_keys(header)
    part, unknown, _ = split_sgm({k: header[k] for k in keys}, base)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unknown {component} tensor(s) for the sgm layout: {unknown[:3]}")
    where = f"{path.name}: "
    check_state_dict(part[component], expected_shapes(component, base, where), component, where, base)
    sd = read_keys(path, keys, device, dtype, allow_pickle)
    return getattr(base, component), split_sgm(sd, base)[0][component]


def load_source(
    source: str | os.PathLike,
    component: str,
    config: PipelineConfig,
    device: Device,
    dtype: torch.dtype,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[ComponentConfig, StateDict]:
    """(the component's config, its state dict on `device` in `dtype`) from a folder or file; `config` is the
    pipeline's, whose component config a file without its own is read against."""
    path = user_path(source)
    if path.is_dir():
        if (path / "model_index.json").is_file():  # a whole pipeline folder: its component
            part = getattr(read_pipeline_config(path), component)
            file = component_folder_file(path / component, component, variant, allow_pickle)
        elif (path / "config.json").is_file():
            part = folder_config(path, component)
            file = component_folder_file(path, component, variant, allow_pickle)
        else:
            raise CheckpointError(f"{path} has neither model_index.json nor config.json: not a diffusers folder")
        sd = drop_buffers(read_state_dict(file, device, dtype, allow_pickle), component)
        where = f"{file}: "
    elif path.is_file():
        if variant is not None:
            raise InputError(f"a variant ({variant}) picks files of a folder, not of one file ({path})")
        kind = detect_format(read_header(path, allow_pickle)[0])
        if kind == "sgm":
            return _from_sgm_file(path, component, config, device, dtype, allow_pickle)
        if kind != FILE_KIND[component]:
            raise CheckpointError(
                f"{path} is a checkpoint of the {kind} kind, not a {component} ({FILE_KIND[component]})"
            )
        # a file inside a component folder takes that folder's config; a bare file, the pipeline's
        part = folder_config(path.parent, component) if (path.parent / "config.json").is_file() else None
        part = part if part is not None else getattr(config, component)
        sd = drop_buffers(read_state_dict(path, device, dtype, allow_pickle), component)
        where = f"{path.name}: "
    else:
        raise CheckpointError(
            f"{component} not found: {source} (want a diffusers folder or a weights file; download a hub model first)"
        )
    _check_against(sd, component, part, config, where)
    return part, sd


def foreign_module(
    module: nn.Module, component: str, config: PipelineConfig, device: Device, dtype: torch.dtype
) -> tuple[ComponentConfig, StateDict]:
    """(config, state dict on `device` in `dtype`) of a diffusers / transformers model object (FOREIGN_CLASSES), read
    as its save_pretrained folder would be: its config through the config.json mapping, its tensors through the
    same strict name and shape check. The tensors are copies where the device or dtype differ, else shared."""
    raw = module.config
    data = dict(raw) if isinstance(raw, dict) else raw.to_dict()  # diffusers' FrozenDict, transformers' config
    data["_class_name"] = type(module).__name__  # what a saved config.json names (the VAE mapping reads it)
    where = f"{component}= ({type(module).__name__}): "
    part = _component_config(component, data, where)
    sd = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in module.state_dict().items()}
    sd = drop_buffers(sd, component)
    _check_against(sd, component, part, config, where)
    return part, sd


def _check_against(sd: StateDict, component: str, part: ComponentConfig, config: PipelineConfig, where: str) -> None:
    """The strict name and shape check of a given component's tensors against its own config `part`."""
    expected = expected_shapes(component, configs.replace(config, **{component: part}), where)
    check_state_dict(sd, expected, component, where)


def resolve(
    sources: dict[str, Source],
    config: PipelineConfig,
    device: torch.device,
    dtype: torch.dtype,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[PipelineConfig, dict[str, nn.Module]]:
    """(the pipeline config with the given components' configs, {component: module}): modules moved to `device` and
    cast to `dtype` (as pipe.to would; the module itself changes), paths read and built on the meta device."""
    modules: dict[str, nn.Module] = {}
    for c in COMPONENTS:
        if c not in sources:
            continue
        s = sources[c]
        if isinstance(s, nn.Module) and type(s).__name__ in FOREIGN_CLASSES[c]:
            part, sd = foreign_module(s, c, config, device, dtype)
            config = with_component(config, c, part)
            modules[c] = build(model_class(c), part, sd, c)
        elif isinstance(s, nn.Module):
            config = with_component(config, c, s.config)
            modules[c] = s.to(device=device, dtype=dtype)
        else:
            part, sd = load_source(s, c, config, device, dtype, variant, allow_pickle)
            config = with_component(config, c, part)
            modules[c] = build(model_class(c), part, sd, c)
    return config, modules
