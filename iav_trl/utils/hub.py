"""Where an adapter's files come from: a local directory or a Hub repo, and the names that may lead there (adapter
names, subfolders, repo ids), checked before they touch the file system."""

from __future__ import annotations

import os
import re
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def check_adapter_name(name: str) -> str:
    """Adapter names become sub-directories and `nn.ModuleDict` keys: refuse anything that could escape the save
    directory, and the '.' that torch reserves for submodule paths (`alignment_heads.<name>.read.weight`)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use letters, digits, '_' and '-', starting with a letter or digit (no "
            "'.', which torch reserves for submodule paths, and no path separators), e.g. 'v1_2' for 'v1.2'."
        )
    return name


def check_subfolder(subfolder: str | None) -> str | None:
    """A `subfolder` is a relative path inside the adapter directory or repo: refuse absolute paths and '..'."""
    if subfolder is None:
        return None
    parts = re.split(r"[/\\]", subfolder) if isinstance(subfolder, str) else []
    if not parts or os.path.isabs(subfolder) or any(part in ("", ".", "..") for part in parts) or "\0" in subfolder:
        raise ValueError(
            f"Invalid subfolder {subfolder!r}: pass a relative path inside the adapter directory or repo, such as "
            "'my_adapter' (no leading '/', no '.' or '..' components, no empty components)."
        )
    return subfolder


def is_repo_id(name: str) -> bool:
    """Whether `name` is a Hugging Face Hub repo id ('name' or 'owner/name'): no path can pass for one."""
    if not _REPO_ID.fullmatch(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_adapter_file(
    name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Path of `filename` in a local adapter directory, or downloaded (or read from the cache) from a Hub repo."""
    name_or_path = os.fspath(name_or_path)
    check_subfolder(subfolder)
    local_dir = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {filename} in {local_dir}. Is it a directory written by `IAVModel.save_pretrained`?"
            )
        return path
    if os.path.exists(name_or_path) or not is_repo_id(name_or_path):
        raise ValueError(
            f"{name_or_path!r} is neither an adapter directory nor a valid Hub repo id ('owner/name'). Pass the "
            "directory written by `save_pretrained` or a repo id."
        )
    try:
        return hf_hub_download(name_or_path, filename, subfolder=subfolder, **hub_kwargs)
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as err:
        # Caught before EntryNotFoundError, its parent class. 'outputs/my-head' is both a relative path and a valid
        # repo id: say what was looked for, the local directory first.
        raise FileNotFoundError(
            f"No adapter at {name_or_path!r}: there is no directory of that name (relative to {os.getcwd()}), and "
            f"the Hub repo {name_or_path!r} could not be read ({type(err).__name__}: offline, not in the local Hub "
            "cache, or no such repo). If it is the output_dir of `iav-trl train`, run train first (or pass the "
            "directory it wrote); for a Hub adapter, check the repo id and the network."
        ) from err
    except (EntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(f"No {filename} in the Hub repo {name_or_path!r} ({err}).") from err
