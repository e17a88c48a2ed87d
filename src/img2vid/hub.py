"""Where a model comes from when it is not a local path: a hub id ("owner/name") resolved to a folder in
huggingface_hub's cache, downloading only the files the pipeline reads."""

from __future__ import annotations

import re
from pathlib import Path

from img2vid.checkpoint_io import PICKLE_SUFFIXES, WEIGHTS_NAME
from img2vid.sgm_keys import COMPONENTS, CheckpointError


def hub_patterns(variant: str | None = None) -> list[str]:
    """What the pipeline needs from a hub repo: configs and one variant's safetensors (repos also hold .bin files,
    other variants and the original single files)."""
    v = f".{variant}" if variant else ""
    weights = [
        pattern
        for c in COMPONENTS
        for pattern in (  # one file, or an index (either name, see component_file) and its shards
            f"{c}/{WEIGHTS_NAME[c]}{v}.safetensors",
            f"{c}/{WEIGHTS_NAME[c]}.safetensors.index{v}.json",
            f"{c}/{WEIGHTS_NAME[c]}{v}.safetensors.index.json",
            f"{c}/{WEIGHTS_NAME[c]}{v}-*-of-*.safetensors",
        )
    ]
    config_files = [f"{c}/config.json" for c in COMPONENTS]
    return ["model_index.json", *config_files, *weights, "scheduler/*.json", "feature_extractor/*.json"]


REPO_ID = re.compile(r"^[\w][\w.-]*/[\w.-]+$")


def resolve_pretrained(path_or_id: str, variant: str | None = None, local_files_only: bool = False) -> Path:
    """A local diffusers folder as it is; otherwise a hub id ("owner/name") through huggingface_hub's cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a diffusers folder: load it as a single file")
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):  # a mistyped file path, not a hub lookup gone wrong
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not REPO_ID.match(path_or_id):
        raise CheckpointError(f"{path_or_id}: no such folder, and not a hub id like stabilityai/<model>")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        patterns = hub_patterns(variant)
        return Path(snapshot_download(path_or_id, allow_patterns=patterns, local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{path_or_id} is not in the local Hugging Face cache and the hub can't be reached (offline, or "
            "local_files_only); download it once while online, or pass a local diffusers folder or a single "
            ".safetensors file"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{path_or_id}: no such model on the Hugging Face hub (gated or private models need `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{path_or_id}: download failed ({str(e).splitlines()[0]})") from None
    except HFValidationError as e:  # "a--b/c", "a/b.git", ...: the hub's own rules, past our pattern
        raise CheckpointError(f"{path_or_id}: no such folder, and not a valid hub id ({e})") from None
