"""Conversion and inspection of checkpoints (`img2vid convert`, `img2vid info`): any layout `img2vid.checkpoint`
loads, written as a diffusers folder or a single file, and a description of a file or folder read from its headers
alone, checked against the config it implies."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from img2vid import configs
from img2vid.checkpoint import (
    drop_buffers,
    expected_shapes,
    load_folder,
    load_single_file,
    mismatch,
    preset_from_name,
    read_pipeline_config,
    save_folder,
    save_single_file,
    single_file_config,
)
from img2vid.checkpoint_io import (
    PICKLE_SUFFIXES,
    StateDict,
    read_header,
)
from img2vid.components import FILE_COMPONENT, component_folder_file, folder_config, with_component
from img2vid.errors import CheckpointError
from img2vid.folders import (
    component_file,
    component_variants,
    folder_variant,
    only_variant,
    shard_files,
    weight_variants,
)
from img2vid.sgm_convert import detect_format, detect_sgm_variant, split_sgm
from img2vid.sgm_keys import COMPONENTS
from img2vid.video_checks import file_in_the_way

__all__ = ["convert", "checkpoint_info"]


def convert(
    src: Path, dst: Path, dtype: torch.dtype | None = None, variant: str | None = None, allow_pickle: bool = False
) -> Path:
    """Folder <-> single file (also folder -> folder and file -> file, e.g. to change the dtype). A `dst` ending in
    .safetensors is a single file, anything else a folder. `variant` names the folder side's files: read from a
    source folder (without it, a folder holding one variant alone is read in it, as loading does; "none": the plain
    files only) and written to a destination folder.

    Writing over a model folder never leaves it holding two models, nor half of one: the new model is written in a
    staged folder beside it, then moved in. Over another model its model entries (component folders, configs) are
    replaced whole, and other files (a README, the source file itself, .git) stay; over its own source folder only
    the files written are replaced, so the new variant joins the others."""
    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    to_file = suffix == ".safetensors"
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{dst}: we write .safetensors files or folders only")
    plain_only = variant == "none"  # as generate's --variant none: no variant, and no fall-back to one
    variant = None if plain_only else variant
    if variant is not None and to_file and not src.is_dir():
        raise CheckpointError(f"--variant {variant} names a folder's files; {src} and {dst} are single files")
    if (blocker := file_in_the_way(dst)) is not None:  # named now, not as "[Errno 17] File exists" after the read
        raise CheckpointError(f"cannot write {dst}: {blocker} is a file, not a folder")
    if not to_file:
        dst = dst.resolve()  # ".", "..", a symlink to a model folder: the folder itself, named
        if dst.is_dir() and not _model_folder(dst):
            raise CheckpointError(
                f"{dst} is a folder that holds other files: pick a new or empty folder (or a model's)"
            )
        if any(src.resolve().is_relative_to(dst / name) for name in _MODEL_ENTRIES):
            raise CheckpointError(f"{src} lies inside {dst}'s model files, which converting there replaces")
    if dst.is_dir() if to_file else dst.is_file():  # before the (long) read, not an OSError after it
        kind = "folder (a .safetensors path is written as one file)" if to_file else "file (a folder goes there)"
        raise CheckpointError(f"{dst} already exists as a {kind}: pick another path")
    if src.is_dir():
        # to a file, the variant to read (it must be there); to a folder, the one to write, read where the source has
        # it; without one, a source of one variant alone is read in it
        read = variant if to_file or variant in weight_variants(src, "unet", pickles=allow_pickle)[1] else None
        read = only_variant(src, allow_pickle) if read is None and not plain_only else read
        config, comps = load_folder(src, read, "cpu", dtype, allow_pickle)
    else:
        config, comps = load_single_file(src, "cpu", dtype, allow_pickle=allow_pickle)
    if to_file:
        return save_single_file(dst, config, comps)
    if not dst.exists():
        # dtype, when given, wins over the variant's usual dtype (the weights were cast to it while read)
        return save_folder(dst, config, comps, dtype=dtype, variant=variant)
    staged = Path(tempfile.mkdtemp(prefix=f".{dst.name}.new-", dir=dst.parent))  # unique: never a killed run's
    try:
        save_folder(staged, config, comps, dtype=dtype, variant=variant)
        _move_in(staged, dst, whole=not (src.is_dir() and src.resolve() == dst))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return dst


# What a diffusers folder of ours holds; anything else in a model folder (README.md, .git) is left alone
_MODEL_ENTRIES = (*COMPONENTS, "scheduler", "feature_extractor", "model_index.json")


def _model_folder(folder: Path) -> bool:
    """A model folder (its model_index.json or a component folder: what an interrupted save over one leaves), or an
    empty one: safe to write over, since only the model's entries are replaced."""
    entries = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    return not entries or any(name in _MODEL_ENTRIES for name in entries)


def _move_in(staged: Path, dst: Path, whole: bool) -> None:
    """Move a saved model folder's entries into `dst`, model_index.json last (gone first: a folder half moved is not
    taken for a complete one). whole: each model entry of dst is replaced (another model's files go); else file by
    file (the same model: its other variants stay; the written variant's old shards go, loaders prefer them)."""
    (dst / "model_index.json").unlink(missing_ok=True)
    old = Path(tempfile.mkdtemp(prefix=".old-", dir=dst))
    try:
        for name in _MODEL_ENTRIES[:-1]:
            if whole and (dst / name).exists():
                os.replace(dst / name, old / name)
            if not (staged / name).is_dir():
                continue
            if not (dst / name).is_dir():
                os.replace(staged / name, dst / name)
                continue
            for new in sorted((staged / name).iterdir()):  # the same model's folder: the written files only
                weights = new.name.endswith(".safetensors")
                for stale in shard_files(dst, name, _variant_of(new.name)) if weights and name in COMPONENTS else []:
                    stale.unlink()
                os.replace(new, dst / name / new.name)
        os.replace(staged / "model_index.json", dst / "model_index.json")
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _variant_of(weights_name: str) -> str | None:
    """ "diffusion_pytorch_model.fp16.safetensors" -> "fp16"; a plain name -> None."""
    parts = weights_name.removesuffix(".safetensors").split(".")
    return parts[-1] if len(parts) > 1 else None


def _summary(sd: StateDict, expected: dict[str, torch.Size] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tensors": len(sd),
        "params": sum(t.numel() for t in sd.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}),
    }
    if expected is not None:
        out["missing"], out["unexpected"], out["wrong_shape"], out["wrong_dtype"] = mismatch(sd, expected)
    return out


def checkpoint_info(path: Path, variant: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """What a checkpoint is (used by `img2vid info`): format, sgm variant, config, and per component the tensor and
    parameter counts, dtypes and missing / unexpected / wrong-shape names against the config. Reads headers only
    (pickles are loaded, so they need allow_pickle). variant None: a folder's only variant if it has no plain
    weights, as loading picks; "none": the plain weights, as `generate --variant none` loads (`folder_variant`)."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir() and not (path / "model_index.json").is_file() and (path / "config.json").is_file():
        return _component_folder_info(path, info, variant, allow_pickle)
    if path.is_dir():
        config = read_pipeline_config(path)
        found = {c: weight_variants(path, c) for c in COMPONENTS}  # (plain weights?, variants) per component
        variants = sorted({v for _, names in found.values() for v in names})
        variant = folder_variant(path, variant, allow_pickle)  # as loading picks it
        chosen = component_variants(path, variant)  # as loading picks them: plain where a component lacks it
        comps = {
            c: drop_buffers(read_header(component_file(path, c, chosen[c], allow_pickle), allow_pickle)[0], c)
            for c in COMPONENTS
        }
        info.update(format="diffusers-folder", variant=variant, variants=variants, config=config.name)
    else:
        header, metadata = read_header(path, allow_pickle)
        info["format"] = detect_format(header)
        if info["format"] != "sgm":
            return _component_file_info(path, header, info)
        sgm_variant = detect_sgm_variant(header)
        config, source = single_file_config(path, metadata, None, sgm_variant)
        comps, unknown, skipped = split_sgm(header, config)
        present = [c for c in COMPONENTS if comps[c]]
        if len(present) == 1:  # one component alone (a UNet as ComfyUI and trainers save it): only it is checked
            c = present[0]
            info.update(config=config.name, config_source=source, skipped_unused=skipped, unknown=unknown)
            info["components"] = {c: _summary(comps[c], expected_shapes(c, config, f"{path}: "))}
            info["ok"] = False
            info["usable_as"] = c if not _problems(info) else None
            return info
        info.update(variant=sgm_variant, config=config.name, config_source=source)
        info.update(skipped_unused=skipped, unknown=unknown)
    info["components"] = {c: _summary(comps[c], expected_shapes(c, config, f"{path}: ")) for c in COMPONENTS}
    info["ok"] = not _problems(info)
    return info


def _problems(info: dict[str, Any]) -> bool:
    keys = ("missing", "unexpected", "wrong_shape", "wrong_dtype")
    return any(s.get(k) for s in info["components"].values() for k in keys) or bool(info.get("unknown"))


def _component_file_info(path: Path, header: StateDict, info: dict[str, Any]) -> dict[str, Any]:
    """One component's file in diffusers' / transformers' names, checked against the config.json beside it (a
    component folder's file) or else the preset its name suggests (svd-xt by default), as --unet reads it."""
    c = FILE_COMPONENT.get(info["format"])
    if c is None:
        info["components"], info["ok"] = {"unknown": _summary(header, None)}, False
        return info
    config, source = configs.preset(preset_from_name(path.stem) or "svd-xt"), "file name"
    if (path.parent / "config.json").is_file():
        config, source = with_component(config, c, folder_config(path.parent, c), check=False), "folder"
    elif c == "vae":  # the decoder kind from the tensors: the temporal decoder's have time mixers
        temporal = any(".time_mixer." in k for k in header)
        config = configs.replace(config, vae=configs.replace(config.vae, temporal_decoder=temporal))
    if source == "file name":
        info.update(config=config.name, config_source=source)
    else:
        info.update(config_source=str(path.parent / "config.json"))
    info["components"] = {c: _summary(drop_buffers(header, c), expected_shapes(c, config, f"{path}: "))}
    info["ok"] = False  # not a whole pipeline
    info["usable_as"] = c if not _problems(info) else None
    return info


def _component_folder_info(path: Path, info: dict[str, Any], variant: str | None, allow_pickle: bool) -> dict[str, Any]:
    """A component folder (`unet.save_pretrained(dir)`): its weights file, described as `_component_file_info`."""
    file = None
    for c in COMPONENTS:  # which component: the weights file's name (model.* is the image encoder's)
        try:
            file = component_folder_file(path, c, variant if variant != "none" else None, allow_pickle)
            break
        except CheckpointError:
            continue
    if file is None:
        raise CheckpointError(f"{path}: a config.json but no weights file of a diffusers component")
    header = read_header(file, allow_pickle)[0]
    info.update(format=detect_format(header), weights=str(file))
    return _component_file_info(file, header, info)
