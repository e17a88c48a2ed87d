"""Conversion and inspection of checkpoints (`img2vid convert`, `img2vid info`): any layout `img2vid.checkpoint`
loads, written as a diffusers folder or a single file, and a description of a file or folder read from its headers
alone, checked against the config it implies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from img2vid.checkpoint import (
    drop_buffers,
    expected_shapes,
    load_folder,
    load_single_file,
    mismatch,
    read_pipeline_config,
    save_folder,
    save_single_file,
    single_file_config,
)
from img2vid.checkpoint_io import (
    PICKLE_SUFFIXES,
    StateDict,
    component_file,
    component_variants,
    read_header,
    weight_variants,
)
from img2vid.sgm_keys import COMPONENTS, CheckpointError, detect_format, detect_sgm_variant, split_sgm

__all__ = ["convert", "checkpoint_info"]


def convert(
    src: Path, dst: Path, dtype: torch.dtype | None = None, variant: str | None = None, allow_pickle: bool = False
) -> Path:
    """Folder <-> single file (also folder -> folder and file -> file, e.g. to change the dtype). A `dst` ending in
    .safetensors is a single file, anything else a folder. `variant` names the folder side's files: read from a
    source folder (without it, a folder holding one variant alone is read in it, as loading does) and written to a
    destination folder. An existing model folder at `dst` is replaced whole, atomically (a mix of two models' files
    would load the wrong one), except when it is `src` itself: the new variant's files then go beside the others."""
    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    to_file = suffix == ".safetensors"
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{dst}: we write .safetensors files or folders only")
    if variant is not None and to_file and not src.is_dir():
        raise CheckpointError(f"--variant {variant} names a folder's files; {src} and {dst} are single files")
    _check_parents(dst)
    if not to_file and dst.is_dir() and not _model_folder(dst):
        raise CheckpointError(f"{dst} is a folder that holds other files: pick a new or empty folder (or a model's)")
    if dst.is_dir() if to_file else dst.is_file():  # before the (long) read, not an OSError after it
        kind = "folder (a .safetensors path is written as one file)" if to_file else "file (a folder goes there)"
        raise CheckpointError(f"{dst} already exists as a {kind}: pick another path")
    if src.is_dir():
        # to a file, the variant to read (it must be there); to a folder, the one to write, read where the source has
        # it; without one, a source of one variant alone is read in it
        plain, variants = weight_variants(src, "unet", pickles=allow_pickle)
        read = variant if to_file or variant in variants else None
        read = variants[0] if read is None and not plain and len(variants) == 1 else read
        config, comps = load_folder(src, read, "cpu", dtype, allow_pickle)
    else:
        config, comps = load_single_file(src, "cpu", dtype, allow_pickle=allow_pickle)
    if to_file:
        return save_single_file(dst, config, comps)
    # dtype, when given, wins over the variant's usual dtype (the weights were cast to it while read)
    if not dst.exists() or (src.is_dir() and dst.resolve() == src.resolve()):
        return save_folder(dst, config, comps, dtype=dtype, variant=variant)
    staged = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_folder(staged, config, comps, dtype=dtype, variant=variant)
        old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
        os.replace(dst, old)  # a moment without dst; never a folder of two models
        os.replace(staged, dst)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return dst


_MODEL_FOLDER_ENTRIES = {*COMPONENTS, "scheduler", "feature_extractor", "model_index.json"}


def _model_folder(folder: Path) -> bool:
    """A model folder, or what an interrupted save over one left (no model_index.json yet): safe to replace."""
    return (folder / "model_index.json").is_file() or all(
        p.name in _MODEL_FOLDER_ENTRIES or p.name.startswith(".") for p in folder.iterdir()
    )


def _check_parents(dst: Path) -> None:
    """A file where a folder above `dst` must be: named now, not as "[Errno 17] File exists" after the read."""
    for parent in dst.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"cannot write {dst}: {parent} is a file, not a folder")
            return


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
    weights, as loading picks; "none": the plain weights, as `generate --variant none` loads."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        config = read_pipeline_config(path)
        found = {c: weight_variants(path, c) for c in COMPONENTS}  # (plain weights?, variants) per component
        plain, unet_variants = found["unet"]
        variants = sorted({v for _, names in found.values() for v in names})
        if variant is None and not plain and unet_variants:
            variant = unet_variants[0]  # a folder holding only a variant (e.g. fp16)
        variant = None if variant == "none" else variant
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
            kind = {"diffusers-unet": "unet", "diffusers-vae": "vae", "transformers-clip": "image_encoder"}
            c = kind.get(info["format"])
            info["components"] = {c or "unknown": _summary(header, None)}
            info["ok"] = False  # not a whole pipeline
            return info
        sgm_variant = detect_sgm_variant(header)
        config, source = single_file_config(path, metadata, None, sgm_variant)
        comps, unknown, skipped = split_sgm(header, config)
        info.update(variant=sgm_variant, config=config.name, config_source=source)
        info.update(skipped_unused=skipped, unknown=unknown)
    info["components"] = {c: _summary(comps[c], expected_shapes(c, config, f"{path}: ")) for c in COMPONENTS}
    keys = ("missing", "unexpected", "wrong_shape", "wrong_dtype")
    problems = [s[k] for s in info["components"].values() for k in keys]
    info["ok"] = not any(problems) and not info.get("unknown")
    return info
