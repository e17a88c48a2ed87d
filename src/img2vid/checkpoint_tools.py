"""Conversion and inspection of checkpoints (`img2vid convert`, `img2vid info`): any layout `img2vid.checkpoint`
loads, written as a diffusers folder or a single file, and a description of a file or folder read from its headers
alone, checked against the config it implies."""

from __future__ import annotations

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
    source folder when writing a single file, written to a destination folder otherwise."""
    src, dst = Path(src), Path(dst)
    to_file = dst.suffix == ".safetensors"
    if dst.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{dst}: we write .safetensors files or folders only")
    if not to_file and dst.is_dir() and any(dst.iterdir()) and not (dst / "model_index.json").is_file():
        raise CheckpointError(f"{dst} is a folder that holds other files: pick a new or empty folder (or a model's)")
    if dst.is_dir() if to_file else dst.is_file():  # before the (long) read, not an OSError after it
        kind = "folder (a .safetensors path is written as one file)" if to_file else "file (a folder goes there)"
        raise CheckpointError(f"{dst} already exists as a {kind}: pick another path")
    if src.is_dir():
        config, comps = load_folder(src, variant if to_file else None, "cpu", dtype, allow_pickle)
    else:
        config, comps = load_single_file(src, "cpu", dtype, allow_pickle=allow_pickle)
    if to_file:
        return save_single_file(dst, config, comps)
    # dtype, when given, wins over the variant's usual dtype (the weights were cast to it while read)
    return save_folder(dst, config, comps, dtype=dtype, variant=variant)


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
    (pickles are loaded, so they need allow_pickle)."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        config = read_pipeline_config(path)
        found = {c: weight_variants(path, c) for c in COMPONENTS}  # (plain weights?, variants) per component
        plain, unet_variants = found["unet"]
        variants = sorted({v for _, names in found.values() for v in names})
        if variant is None and not plain and unet_variants:
            variant = unet_variants[0]  # a folder holding only a variant (e.g. fp16)
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
    info["components"] = {c: _summary(comps[c], expected_shapes(c, config)) for c in COMPONENTS}
    keys = ("missing", "unexpected", "wrong_shape", "wrong_dtype")
    problems = [s[k] for s in info["components"].values() for k in keys]
    info["ok"] = not any(problems) and not info.get("unknown")
    return info
