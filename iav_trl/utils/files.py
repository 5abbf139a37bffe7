"""Files that are never left half-written: atomic writes, iav-trl's cache directories, digests of saved tensors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping

import torch


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
