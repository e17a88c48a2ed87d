"""Where a model comes from when it is not a local path: a hub id ("owner/name") resolved to a folder in
huggingface_hub's cache, downloading only the files the pipeline reads."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from img2vid.checkpoint_io import WEIGHTS_NAME
from img2vid.errors import CheckpointError, first_line, user_path
from img2vid.names import REPO_ID, WEIGHT_SUFFIXES
from img2vid.sgm_keys import COMPONENTS

if TYPE_CHECKING:  # huggingface_hub is imported where it is used
    from huggingface_hub import CommitInfo


def _weight_patterns(component: str, variant: str | None) -> tuple[str, ...]:
    """A component's weights in one variant: one file, or an index (either name, see component_file) and shards."""
    name, v = WEIGHTS_NAME[component], f".{variant}" if variant else ""
    return (
        f"{component}/{name}{v}.safetensors",
        f"{component}/{name}.safetensors.index{v}.json",
        f"{component}/{name}{v}.safetensors.index.json",
        f"{component}/{name}{v}-*-of-*.safetensors",
    )


def hub_patterns(variant: str | None = None, files: list[str] | None = None, skip: Collection[str] = ()) -> list[str]:
    """What the pipeline needs from a hub repo: configs and one variant's safetensors (repos also hold .bin files,
    other variants and the original single files). Given the repo's file list, a component that lacks the variant
    takes its plain weights, as loading does (checkpoint_io.component_variants) and diffusers does; if none has it
    (a mistyped variant), no weights match and loading then names what is missing, with nothing large downloaded.
    skip: components given from elsewhere (`from_pretrained(unet=...)`), whose weights are not downloaded (their
    config is: the pipeline's config is read whole), as diffusers skips a passed component's folder."""
    has = {
        c: files is None or any(fnmatch.fnmatchcase(f, p) for p in _weight_patterns(c, variant) for f in files)
        for c in COMPONENTS
    }
    if not any(has.values()):
        has = dict.fromkeys(COMPONENTS, True)
    weights = [p for c in COMPONENTS if c not in skip for p in _weight_patterns(c, variant if has[c] else None)]
    config_files = [f"{c}/config.json" for c in COMPONENTS]
    return ["model_index.json", *config_files, *weights, "scheduler/*.json", "feature_extractor/*.json"]


def _repo_files(repo_id: str, revision: str | None, token: str | bool | None) -> list[str] | None:
    """The repo's file names, or None where the hub cannot say; snapshot_download then reports why (or falls back
    to the cache), with its own handling of every network, offline and access failure."""
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # whatever the transport raises: this list only refines the patterns
        return None


def resolve_pretrained(
    path_or_id: str,
    variant: str | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    skip: Collection[str] = (),
) -> Path:
    """A local diffusers folder as it is; otherwise a hub id ("owner/name") through huggingface_hub's cache.
    revision (a branch, tag or commit), cache_dir, token and force_download mean what they mean to diffusers and
    huggingface_hub (token None: the saved login or HF_TOKEN; SVD's repos are gated); skip: see hub_patterns."""
    path = user_path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a diffusers folder: load it as a single file")
    if path.suffix in WEIGHT_SUFFIXES:  # a mistyped file path, not a hub lookup gone wrong
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not REPO_ID.match(path_or_id):
        raise CheckpointError(f"{path_or_id}: no such folder, and not a hub id like stabilityai/<model>")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # a variant: which components have it (one listing call); without, every component is plain
        files = _repo_files(path_or_id, revision, token) if variant and not local_files_only else None
        patterns = hub_patterns(variant, files, skip)
        where = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        where.update(force_download=force_download)
        return Path(snapshot_download(path_or_id, allow_patterns=patterns, **where))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{path_or_id} is not in the local Hugging Face cache and the hub can't be reached (offline, or "
            "local_files_only); download it once while online, or pass a local diffusers folder or a single "
            ".safetensors file"
        ) from None
    except RevisionNotFoundError:  # before HfHubHTTPError, its base
        raise CheckpointError(f"{path_or_id}: no revision {revision!r} (a branch, tag or commit) on the hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{path_or_id}: no such model on the Hugging Face hub (gated or private models need `hf auth login` "
            "or a token)"
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{path_or_id}: download failed ({first_line(e)})") from None
    except HFValidationError as e:  # "a--b/c", "a/b.git", ...: the hub's own rules, past our pattern
        raise CheckpointError(f"{path_or_id}: no such folder, and not a valid hub id ({e})") from None


def push_folder(
    folder: Path,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a saved pipeline folder to a hub model repo, created if missing (`Pipeline.push_to_hub`); returns
    huggingface_hub's CommitInfo, as diffusers does. Hub failures are one-line CheckpointErrors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if not REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub repo id like you/my-svd")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload pipeline (img2vid)",
            create_pr=create_pr,
        )
    except (HfHubHTTPError, HFValidationError) as e:
        raise CheckpointError(f"{repo_id}: upload failed ({first_line(e)})") from None
