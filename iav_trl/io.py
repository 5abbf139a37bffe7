"""File I/O for adapters and checkpoints: atomic writes, digests of saved tensors, adapter files in a directory or
on the Hub, and whether a Trainer checkpoint is complete."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# What `transformers.Trainer._save_checkpoint` writes besides the model, in the order it writes them: the optimizer
# and scheduler, the RNG states, then `trainer_state.json` last.
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
RNG_STATE_PATTERN = "rng_state*.pth"


def cache_dir(kind: str) -> str:
    """iav-trl's cache of `kind` (`gguf`, `features`): `$IAV_TRL_CACHE/<kind>`, by default `~/.cache/iav_trl/...`."""
    root = os.environ.get("IAV_TRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "iav_trl")
    return os.path.join(root, kind)


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


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """
    SHA-256 (hex) of a state dict: each tensor's name, dtype, shape and bytes, in name order.

    Two state dicts have the same digest exactly when they hold the same tensors, whatever file format carried them.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def checkpoint_problem(checkpoint: str | os.PathLike, optimizer_state: bool = True) -> str | None:
    """
    Why a `Trainer` checkpoint directory cannot be resumed from, or `None` if it is complete.

    `Trainer` writes `trainer_state.json` last, so a checkpoint whose run was killed while saving lacks it (or holds
    a truncated one); with `optimizer_state`, the optimizer, scheduler and RNG states must be there too, or the run
    would silently restart them. The heads are checked when they are loaded (their digests, see `IAVModel`).
    """
    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
        return f"{checkpoint} is not a directory"
    state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"it has no {TRAINER_STATE_NAME}, which Trainer writes last: the run was stopped while saving it"
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"its {TRAINER_STATE_NAME} is truncated or corrupt ({err})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"its {TRAINER_STATE_NAME} holds no `global_step`"
    if optimizer_state:
        missing = [name for name in OPTIMIZER_FILES if not os.path.isfile(os.path.join(checkpoint, name))]
        if not glob.glob(os.path.join(glob.escape(checkpoint), RNG_STATE_PATTERN)):
            missing.append(RNG_STATE_PATTERN)
        if missing:
            return (
                f"it lacks {', '.join(missing)} (saved with `save_only_model=True`, or partly deleted), so the "
                "optimizer, scheduler or random state would restart from scratch"
            )
    return None


def last_complete_checkpoint(directory: str | os.PathLike, optimizer_state: bool = True) -> str | None:
    """The `checkpoint-N` directory in `directory` with the highest `N` that `checkpoint_problem` accepts."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = sorted(
        ((int(match.group(1)), name) for name in os.listdir(directory) if (match := _CHECKPOINT.match(name))),
        reverse=True,
    )
    for _, name in steps:
        path = os.path.join(directory, name)
        if checkpoint_problem(path, optimizer_state) is None:
            return path
    return None
