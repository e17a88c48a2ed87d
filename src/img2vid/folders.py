"""Where a diffusers folder keeps each component's weights: one file, a sharded index, pickles, per variant
(model.fp16.safetensors), and which variant each component loads in (as diffusers picks them). File names only:
reading and writing the tensors is img2vid.checkpoint_io."""

from __future__ import annotations

import re
from pathlib import Path

from img2vid.checkpoint_io import WEIGHTS_NAME, refuse_pickle
from img2vid.errors import CheckpointError
from img2vid.sgm_keys import COMPONENTS


def check_variant(variant: str | None) -> None:
    """A variant is part of a file name (model.fp16.safetensors): a path there would read or write elsewhere."""
    if variant is not None and not (variant and all(ch.isalnum() or ch in "_-" for ch in variant)):
        raise CheckpointError(f"{variant!r} is not a variant name (letters, digits, _ and -, e.g. fp16)")


_SHARD = re.compile(r"-\d+-of-\d+")


def weight_variants(
    folder: Path, component: str, pickles: bool = True, sub: str | None = None
) -> tuple[bool, list[str]]:
    """(whether the plain weights are there, the sorted variants there) of one component of a diffusers folder (in
    its subfolder `sub`, by default the component's name). Plain: stem.safetensors, its shards
    (stem-00001-of-00002.safetensors) or index; a variant v: stem.v.safetensors, its shards
    (stem.v-00001-of-00002.safetensors) or either index name (component_file); .bin pickles count too unless
    `pickles` is False (weights that will not be loaded)."""
    stem, plain, variants = WEIGHTS_NAME[component], False, set()
    suffixes = (
        (".safetensors", ".bin", ".safetensors.index.json") if pickles else (".safetensors", ".safetensors.index.json")
    )
    for p in (Path(folder) / (sub or component)).glob(f"{stem}*"):
        rest = p.name[len(stem) :]
        for suffix in suffixes:
            if rest.endswith(suffix):
                rest = rest.removesuffix(suffix)
                break
        else:
            if m := re.fullmatch(r"\.safetensors\.index\.([^.]+)\.json", rest):  # diffusers' variant index
                variants.add(m[1])
            continue
        if not rest or _SHARD.fullmatch(rest):
            plain = True
        elif m := re.fullmatch(r"\.([^.]+?)(-\d+-of-\d+)?", rest):
            variants.add(m[1])
    return plain, sorted(variants)


def only_variant(folder: Path, allow_pickle: bool = False) -> str | None:
    """The variant of a folder whose UNet weights exist in that variant alone (unet/*.fp16.safetensors, no plain
    file), else None: such a folder has nothing else to load (plain .bin pickles count only when they may load)."""
    plain, variants = weight_variants(folder, "unet", pickles=allow_pickle)
    return variants[0] if len(variants) == 1 and not plain else None


def folder_variant(folder: Path, variant: str | None, allow_pickle: bool = False) -> str | None:
    """The variant a folder is read in, as `generate` and `info` read it: the one named; without one, the folder's
    only variant when it holds no plain weights (`only_variant`); "none": the plain weights, never a variant."""
    if variant is None:
        return only_variant(folder, allow_pickle)
    return None if variant == "none" else variant


def component_variants(folder: Path, variant: str | None) -> dict[str, str | None]:
    """The variant each component loads. As diffusers: a component that lacks the requested variant loads its plain
    weights (a folder whose UNet alone is fp16), unless no component has that variant at all (a mistyped variant,
    or a folder without one: component_file's error says so)."""
    check_variant(variant)
    if variant is None:
        return dict.fromkeys(COMPONENTS)
    has = {c: variant in weight_variants(folder, c)[1] for c in COMPONENTS}
    if not any(has.values()):
        return dict.fromkeys(COMPONENTS, variant)
    return {c: variant if has[c] else None for c in COMPONENTS}


def shard_files(folder: Path, component: str, variant: str | None = None) -> list[Path]:
    """One component's sharded weights in one variant: the index (either name) and the shards it would name."""
    sub, stem, v = Path(folder) / component, WEIGHTS_NAME[component], f".{variant}" if variant else ""
    indexes = dict.fromkeys([sub / f"{stem}.safetensors.index{v}.json", sub / f"{stem}{v}.safetensors.index.json"])
    shards = [
        p
        for p in sub.glob(f"{stem}{v}-*-of-*.safetensors")
        if _SHARD.fullmatch(p.name.removeprefix(stem + v).removesuffix(".safetensors"))
    ]
    return [p for p in indexes if p.is_file()] + sorted(shards)


def component_file(
    folder: Path, component: str, variant: str | None = None, allow_pickle: bool = False, sub: str | None = None
) -> Path:
    """The weights file of one component of a diffusers folder, in its subfolder `sub` (by default the component's
    name; a component folder saved on its own is read as `sub` of its parent)."""
    check_variant(variant)
    sub_name = sub or component
    sub_dir, stem, v = Path(folder) / sub_name, WEIGHTS_NAME[component], f".{variant}" if variant else ""
    # An index first, as diffusers: saving sharded weights over a folder leaves its old single file behind.
    # diffusers names a sharded variant's index stem.safetensors.index.fp16.json, transformers stem.fp16.safetensors...
    for name in (f"{stem}.safetensors.index{v}.json", f"{stem}{v}.safetensors.index.json", f"{stem}{v}.safetensors"):
        if (sub_dir / name).is_file():
            return sub_dir / name
    if (sub_dir / f"{stem}{v}.bin").is_file():
        if allow_pickle:
            return sub_dir / f"{stem}{v}.bin"
        raise refuse_pickle(sub_dir / f"{stem}{v}.bin")
    wanted = sub_dir / f"{stem}{v}.safetensors"
    if variant and (sub_dir / f"{stem}.safetensors").is_file():
        raise CheckpointError(f"{wanted} not found: this folder has no {variant!r} variant (drop the variant)")
    others = weight_variants(folder, component, sub=sub_name)[1]
    if not variant and others:  # e.g. a hub download of the fp16 files only
        raise CheckpointError(f"{wanted} not found: this folder has only the {' / '.join(others)} variant (pass it)")
    raise CheckpointError(f"{wanted} not found")
