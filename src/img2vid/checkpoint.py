"""Checkpoints in every layout users have: diffusers folders (local or a hub id), Stability's original single files
(sgm layout, svd*.safetensors), our own single files (sgm layout + our config in the metadata), and pickles only when
asked. Tensors are read straight to the target device and dtype, one at a time, and loading is strict: a tensor too
many, too few or of the wrong shape is a one-line CheckpointError. sgm names are translated in img2vid.sgm_convert,
file reading and writing is img2vid.checkpoint_io (its public names are importable from here too), which file of a
folder holds which component in which variant img2vid.folders, hub ids img2vid.hub, conversion and inspection
(`img2vid convert` / `info`) img2vid.checkpoint_tools, a component from elsewhere (`unet=`) img2vid.components.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from img2vid import config_checks, configs
from img2vid.checkpoint_io import (
    CONFIG_KEY,
    WEIGHTS_NAME,
    Device,
    StateDict,
    config_from_dict,
    config_to_dict,
    folder_json_files,
    read_header,
    read_keys,
    read_state_dict,
    stored_config,
    write_json,
    write_safetensors,
)
from img2vid.configs import ComponentConfig, PipelineConfig
from img2vid.errors import CheckpointError, first_line
from img2vid.folders import check_variant, component_file, component_variants, shard_files
from img2vid.hub import resolve_pretrained
from img2vid.sgm_convert import (
    components_to_sgm,
    cond_encoder_keys,
    detect_format,
    detect_sgm_variant,
    sgm_names,
    sgm_to_components,
    split_sgm,
)
from img2vid.sgm_keys import COMPONENTS, POSITION_IDS, SGM_PREFIX, few, is_unused_sgm_key

__all__ = [
    "CheckpointError",
    "build",
    "components_to_sgm",
    "config_from_dict",
    "config_to_dict",
    "detect_config",
    "detect_format",
    "detect_sgm_variant",
    "load_component",
    "load_folder",
    "load_into",
    "load_single_file",
    "peek_config",
    "read_pipeline_config",
    "read_state_dict",
    "resolve_pretrained",
    "save_folder",
    "save_single_file",
    "sgm_to_components",
]

VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def drop_buffers(sd: StateDict, component: str) -> StateDict:
    return {k: t for k, t in sd.items() if k != POSITION_IDS} if component == "image_encoder" else sd


# ---- strict loading into modules built on the meta device -----------------------------------------------------------
def model_class(component: str) -> type[nn.Module]:
    """The module class of a component (imported on first use: `img2vid info` needs none of them)."""
    if component == "unet":
        from img2vid.unet import UNet

        return UNet
    if component == "vae":
        from img2vid.vae import VAE

        return VAE
    if component == "image_encoder":
        from img2vid.image_encoder import ImageEncoder

        return ImageEncoder
    raise ValueError(f"unknown component {component!r}: expected unet, vae or image_encoder")


def expected_shapes(component: str, config: PipelineConfig, where: str = "") -> dict[str, torch.Size]:
    """Our model's state-dict names and shapes for this config (built on the meta device: no memory, ~1 s full size;
    cached because a load asks twice). Do not modify the returned dict. A config that builds no model (heads that do
    not divide the channels, ...) is a CheckpointError that starts with `where` (the file or folder)."""
    try:
        return _expected_shapes(component, config)
    except (ValueError, RuntimeError) as e:
        why = first_line(e)
        raise CheckpointError(f"{where}the {component} cannot be built from its config: {why}") from None


@functools.lru_cache(maxsize=12)
def _expected_shapes(component: str, config: PipelineConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = model_class(component)(getattr(config, component))
    return {k: t.shape for k, t in module.state_dict().items()}


def mismatch(sd: StateDict, expected: dict[str, torch.Size]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape, not floating-point) names of `sd` against the expected names and shapes.
    Every tensor of our models is a float: an integer or bool one (which no dtype cast touches) would otherwise
    reach torch's load_state_dict, whose error is a multi-line RuntimeError."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    not_float = [k for k in expected if k in sd and not sd[k].is_floating_point()]
    return missing, unexpected, wrong, not_float


def check_state_dict(
    sd: StateDict,
    expected: dict[str, torch.Size],
    component: str,
    where: str = "",
    sgm: PipelineConfig | None = None,
) -> None:
    """One-line CheckpointError naming the first few missing / unexpected / wrong-shape / integer tensors and their
    counts. With `sgm` (the config of an sgm file), names are given as that file stores them."""
    missing, unexpected, wrong, not_float = mismatch(sd, expected)
    if not (missing or unexpected or wrong or not_float):
        return

    def names(keys: list[str]) -> list[str]:
        return sgm_names(sgm, component, keys) if sgm is not None else keys

    parts = [f"{len(missing)} missing ({few(names(missing))})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({few(names(unexpected))})"] if unexpected else []
    if wrong:
        shapes = [f"{n} {tuple(sd[k].shape)} vs {tuple(expected[k])}" for n, k in zip(names(wrong), wrong, strict=True)]
        parts.append(f"{len(wrong)} wrong shape (file vs model: {few(shapes)})")
    if not_float:
        dtypes = [f"{n} {sd[k].dtype}" for n, k in zip(names(not_float), not_float, strict=True)]
        parts.append(f"{len(not_float)} not floating-point ({few(dtypes)})")
    raise CheckpointError(f"{where}{component} weights do not match the model config: {'; '.join(parts)}")


def load_into(module: nn.Module, state_dict: StateDict, component: str) -> None:
    """Strict load into a module (typically built on the meta device): the tensors become its parameters."""
    sd = drop_buffers(state_dict, component)
    check_state_dict(sd, {k: t.shape for k, t in module.state_dict().items()}, component)
    module.load_state_dict(sd, strict=True, assign=True)


def build(cls: type[nn.Module], config: ComponentConfig, state_dict: StateDict, component: str) -> nn.Module:
    """`cls(config)` on the meta device, filled with `state_dict` (no random init, no second copy)."""
    try:
        with torch.device("meta"):
            module = cls(config)
    except (ValueError, RuntimeError) as e:  # well-typed but impossible sizes: channels that no norm group divides
        raise CheckpointError(f"the {component} cannot be built from its config: {first_line(e)}") from None
    load_into(module, state_dict, component)
    return module.eval()


def check_components(
    components: dict[str, StateDict], config: PipelineConfig, where: str = "", which: Collection[str] = COMPONENTS
) -> None:
    for c in which:
        check_state_dict(drop_buffers(components.get(c, {}), c), expected_shapes(c, config, where), c, where)


# ---- diffusers folders ----------------------------------------------------------------------------------------------
def preset_from_name(text: str) -> str | None:
    """svd_xt_1_1 -> "svd-xt-1.1", svd_xt -> "svd-xt", svd -> "svd" (also the hub's stable-video-diffusion-img2vid*)."""
    s = re.sub(r"[-. ]", "_", text.lower())
    if re.search(r"(svd|img2vid)_xt_1_1", s):
        return "svd-xt-1.1"
    if re.search(r"(svd|img2vid)_xt", s):
        return "svd-xt"
    return "svd" if re.search(r"svd|img2vid", s) else None


def read_pipeline_config(folder: Path) -> PipelineConfig:
    """The PipelineConfig of a diffusers folder, from its component configs (and model_index.json's "_img2vid")."""
    folder = Path(folder).resolve()

    def js(rel: str, required: bool = True) -> dict[str, Any]:
        if not (folder / rel).is_file():
            if required:
                raise CheckpointError(f"{folder / rel} is missing: not a diffusers Stable Video Diffusion folder")
            return {}
        return configs.read_json(folder / rel)

    try:
        pre = js("feature_extractor/preprocessor_config.json", required=False)
        parts = dict(
            unet=configs.component_from_config("unet", js("unet/config.json")),
            vae=configs.component_from_config("vae", js("vae/config.json")),
            image_encoder=configs.component_from_config("image_encoder", js("image_encoder/config.json"), pre or None),
            scheduler=configs.scheduler_from_diffusers(js("scheduler/scheduler_config.json", required=False)),
        )
        ours = js("model_index.json").get("_img2vid", {})
        if not isinstance(ours, dict):
            raise ValueError(f"model_index.json: _img2vid is not an object: {ours!r}")
        # The model's name and call defaults (fps) are not in diffusers' configs: ours, else guess from the folder.
        name = preset_from_name(" ".join(folder.parts[-3:]))
        base = configs.preset(name or "svd-xt")
        config = PipelineConfig(
            name=ours.get("name", name or folder.name),
            default_fps=ours.get("default_fps", base.default_fps),
            default_motion_bucket_id=ours.get("default_motion_bucket_id", base.default_motion_bucket_id),
            **parts,
        )
        config_checks.check(config)  # a value of the wrong type would fail far from here, or not at all
        config_checks.check_pipeline(config)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # TypeError: e.g. a number where the config wants a list
        raise CheckpointError(f"{folder}: {e}") from None
    return config


def load_component(
    folder: Path,
    component: str,
    variant: str | None = None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> StateDict:
    """One component's state dict from a diffusers folder, on `device`, floats cast to `dtype` while reading."""
    path = component_file(Path(folder), component, variant, allow_pickle)
    return drop_buffers(read_state_dict(path, device, dtype, allow_pickle), component)


def load_folder(
    folder: Path,
    variant: str | None = None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    skip: Collection[str] = (),
) -> tuple[PipelineConfig, dict[str, StateDict]]:
    """A diffusers folder -> (config, {component: state dict}), checked against the config with errors that name
    the folder; the components in `skip` (given from elsewhere: img2vid.components) are not read. On a GPU the
    files are read at once (bound by page-cache copies, not by the device)."""
    config = read_pipeline_config(folder)
    variants = component_variants(folder, variant)
    wanted = [c for c in COMPONENTS if c not in skip]

    def load(c: str) -> StateDict:
        return load_component(folder, c, variants[c], device, dtype, allow_pickle)

    with ThreadPoolExecutor(len(wanted) if torch.device(device).type == "cuda" and wanted else 1) as pool:
        sds = dict(zip(wanted, pool.map(load, wanted), strict=True))
    check_components(sds, config, f"{folder}: ", wanted)
    return config, sds


# ---- single files (sgm layout) -------------------------------------------------------------------------------------
def single_file_config(
    path: Path, metadata: dict[str, str], config: PipelineConfig | None, variant: str | None
) -> tuple[PipelineConfig, str]:
    """The explicit config, else ours from the metadata, else a preset picked from the file name. The kind of VAE
    decoder is the file's (svd_xt vs svd_xt_image_decoder share everything else), except that ours must agree;
    variant None (no VAE in the file) leaves the config's."""
    temporal = variant == "temporal"
    stored = stored_config(path, metadata) if config is None else None
    if stored is not None:
        config = stored
        if variant is not None and config.vae.temporal_decoder != temporal:
            raise CheckpointError(f"{path}: its stored config and its VAE decoder tensors disagree (temporal or not)")
        return config, "metadata"
    source = "given" if config is not None else "file name"
    config = config or configs.preset(preset_from_name(path.stem) or "svd-xt")
    if variant is None:
        return config, source
    return configs.replace(config, vae=configs.replace(config.vae, temporal_decoder=temporal)), source


def load_single_file(
    path: Path,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    config: PipelineConfig | None = None,
    allow_pickle: bool = False,
    skip: Collection[str] = (),
) -> tuple[PipelineConfig, dict[str, StateDict]]:
    """An sgm-layout single file (Stability's svd*.safetensors or ours) -> (config, {component: state dict}).
    Names and shapes are checked from the header before any tensor data is read; the components in `skip` (given
    from elsewhere: img2vid.components) are neither checked nor read."""
    path = Path(path)
    header, metadata = read_header(path, allow_pickle)
    fmt = detect_format(header)
    if fmt != "sgm":
        raise CheckpointError(
            f"{path} is a checkpoint of the {fmt} kind, not a whole-pipeline single file (sgm layout)"
        )
    unet_keys = [k for k in header if k.startswith("model.diffusion_model.")]
    if unet_keys and not any(".time_stack." in k for k in unet_keys):
        raise CheckpointError(f"{path} is not a Stable Video Diffusion checkpoint (its UNet has no temporal layers)")
    variant = detect_sgm_variant(header)
    config, _ = single_file_config(path, metadata, config, variant)
    comps, unknown, _ = split_sgm(header, config)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unknown tensor(s) for the sgm layout: {few(unknown)}")
    for c, sd in comps.items():
        if c not in skip:
            check_state_dict(sd, expected_shapes(c, config, f"{path.name}: "), c, f"{path.name}: ", config)
    skipped = tuple(SGM_PREFIX[c] for c in skip)
    keys = [k for k in header if not is_unused_sgm_key(k) and not k.startswith(skipped)] + (
        cond_encoder_keys(header) if variant == "temporal" and "vae" not in skip else []
    )
    sd = read_keys(path, keys, device, dtype, allow_pickle)
    return config, sgm_to_components(sd, config)


def detect_config(path: Path, allow_pickle: bool = False) -> PipelineConfig:
    """The PipelineConfig a folder or single file would load with, from configs / headers only (no tensor data)."""
    path = Path(path)
    if path.is_dir():
        return read_pipeline_config(path)
    header, metadata = read_header(path, allow_pickle)
    if detect_format(header) != "sgm":
        raise CheckpointError(
            f"{path} is a checkpoint of the {detect_format(header)} kind, not a whole-pipeline single file"
        )
    return single_file_config(path, metadata, None, detect_sgm_variant(header))[0]


def peek_config(path: Path) -> PipelineConfig | None:
    """The config one of our single files stores in its safetensors metadata (header only, no tensor data), or None
    for anything else (Stability's files, pickles, folders)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    return stored_config(path, read_header(path)[1])


def save_single_file(
    path: Path, config: PipelineConfig, components: dict[str, StateDict], dtype: torch.dtype | None = None
) -> Path:
    """sgm layout (loads in ComfyUI and the like), with our config as JSON in the metadata so it reloads exactly."""
    sd = components_to_sgm(components, config)
    write_safetensors(Path(path), sd, {CONFIG_KEY: json.dumps(config_to_dict(config))}, dtype)
    return Path(path)


def save_folder(
    path: Path,
    config: PipelineConfig,
    components: dict[str, StateDict],
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> Path:
    """diffusers' layout (loads with StableVideoDiffusionPipeline.from_pretrained). variant="fp16" names the weight
    files *.fp16.safetensors and, unless `dtype` says otherwise, stores float16. model_index.json is written last,
    so an interrupted save does not look like a complete folder (the loader requires it); an older one goes first,
    so that saving over a folder is not taken for complete while it holds the weights of two models."""
    path = Path(path)
    check_variant(variant)
    (path / "model_index.json").unlink(missing_ok=True)
    dtype = dtype or VARIANT_DTYPES.get(variant or "")
    v = f".{variant}" if variant else ""
    for c in COMPONENTS:
        # an older save's shards and index go: loaders prefer an index to the single file written here
        for stale in shard_files(path, c, variant):
            stale.unlink()
        write_safetensors(path / c / f"{WEIGHTS_NAME[c]}{v}.safetensors", drop_buffers(components[c], c), {}, dtype)
    for rel, data in folder_json_files(config).items():  # model_index.json comes last
        write_json(path / rel, data)
    return path
