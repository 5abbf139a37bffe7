"""File I/O for adapters: atomic writes, and finding an adapter file in a directory or on the Hub."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """
    Produce `path` by calling `write(tmp_path)` on a temporary file next to it, then renaming it into place.

    A crash or kill at any moment leaves either the old file or the complete new one, never a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def check_adapter_name(name: str) -> str:
    """Adapter names become sub-directories: refuse anything that could escape the save directory."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise ValueError(
            f"Invalid adapter name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit "
            "(no path separators, no '..')."
        )
    return name


def resolve_adapter_file(
    name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str:
    """Path of `filename` in a local adapter directory, or downloaded (or read from the cache) from a Hub repo."""
    name_or_path = os.fspath(name_or_path)
    local_dir = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(local_dir):
        path = os.path.join(local_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {filename} in {local_dir}. Is it a directory written by `IAVModel.save_pretrained`?"
            )
        return path
    if os.path.exists(name_or_path) or not _REPO_ID.fullmatch(name_or_path):
        raise ValueError(
            f"{name_or_path!r} is neither an adapter directory nor a valid Hub repo id ('owner/name'). Pass the "
            "directory written by `save_pretrained` or a repo id."
        )
    try:
        return hf_hub_download(name_or_path, filename, subfolder=subfolder, **hub_kwargs)
    except (EntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(f"No {filename} in the Hub repo {name_or_path!r} ({err}).") from err
