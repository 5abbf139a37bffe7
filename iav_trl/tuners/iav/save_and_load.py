"""How an alignment head is laid out on disk, saved and loaded (PEFT keeps the same in `peft/utils/save_and_load.py`).

An adapter directory holds `alignment_head_config.json` (`CONFIG_NAME`, with the SHA-256 of the weights) and
`alignment_head.safetensors` (`WEIGHTS_NAME`, with that digest and the config in its metadata); a model card
`README.md` goes next to them. The `default` adapter is the directory itself, any other adapter `<directory>/<name>/`.
A checkpoint of a run that trained its backbone (`freeze_backbone=False`, no PEFT) also holds that backbone in
`backbone/` (`backbone_dir`).

Saving is atomic per file, the config first and the weights last; loading checks each file against the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from iav_trl.tuners.iav.config import CONFIG_NAME, WEIGHTS_DIGEST_KEY, AlignmentHeadConfig, read_config_file
from iav_trl.utils.files import atomic_write, tensor_digest
from iav_trl.utils.hub import resolve_adapter_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "alignment_head.safetensors"
PICKLE_WEIGHTS_NAMES = ("alignment_head.bin", "alignment_head.pt")  # loaded only with `allow_pickle=True`
CONFIG_METADATA_KEY = "iav_config"  # the config, as JSON, in the safetensors metadata of the weights
HEADS_PREFIX = "alignment_heads."
BACKBONE_DIR = "backbone"


def backbone_dir(directory: str | os.PathLike) -> str:
    """Where a checkpoint in `directory` holds a fully trained backbone (`freeze_backbone=False` without PEFT)."""
    return os.path.join(os.fspath(directory), BACKBONE_DIR)


def get_head_state_dict(
    model: nn.Module, name: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """
    Head `name`'s tensors (keyed as in the head: `read.weight`, ...), on the CPU: from `state_dict` (keys
    `alignment_heads.<name>.*`, e.g. gathered under DeepSpeed ZeRO-3) if it holds them, else from the live, whole
    parameters of `model.alignment_heads[name]`.
    """
    prefix = f"{HEADS_PREFIX}{name}."
    source = {k[len(prefix) :]: v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
    if not source:
        head = model.alignment_heads[name]
        partitioned = [k for k, p in head.named_parameters() if getattr(p, "ds_numel", p.numel()) != p.numel()]
        if partitioned:
            raise ValueError(
                f"The parameters {partitioned} of adapter {name!r} are partitioned by DeepSpeed ZeRO-3: this "
                "process holds a slice of each. Save with `trainer.save_model()`, or call `save_pretrained` on "
                "every process inside `with deepspeed.zero.GatheredParameters(heads):`, with "
                "`heads = list(model.alignment_heads.parameters())`."
            )
        source = head.state_dict()
    return {key: value.detach().to("cpu").contiguous() for key, value in source.items()}


def set_head_state_dict(model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `tensors` (from `source`, named in the error) into the existing head `name` of `model`, after checking
    that they are exactly the head's tensors, with its shapes."""
    head = model.alignment_heads[name]
    expected = head.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != v.shape for k, v in expected.items()):
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        wanted = {k: tuple(v.shape) for k, v in expected.items()}
        raise ValueError(f"{source} does not match its config: tensors {found}, expected {wanted}.")
    head.load_state_dict(tensors)


def save_head(
    directory: str | os.PathLike, adapter_name: str, config: AlignmentHeadConfig, tensors: Mapping[str, torch.Tensor]
) -> None:
    """
    Write one head into `directory`: the config first (with the SHA-256 of the weights, see
    `iav_trl.utils.files.tensor_digest`), then the weights (with that digest and the config in their safetensors
    metadata), each to a temporary name renamed into place. A process killed mid-save leaves the old adapter or the
    new one, never a mix: a loader that finds the config's digest differing from the weights' knows the save stopped
    between the two renames, and uses the config stored with the weights (the previous adapter).
    """
    digest = tensor_digest(tensors)
    metadata = {
        "format": "pt",
        "adapter_name": adapter_name,
        CONFIG_METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True),
        WEIGHTS_DIGEST_KEY: digest,
    }
    config.save_pretrained(directory, weights_sha256=digest)
    atomic_write(
        os.path.join(directory, WEIGHTS_NAME),
        lambda path, t=tensors, m=metadata: save_file(t, path, metadata=m),
    )


def load_head(
    model_id: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False, **hub_kwargs: Any
) -> tuple[AlignmentHeadConfig, dict[str, torch.Tensor], str]:
    """
    A saved head's config, tensors and weights path (a local directory or a Hub repo, `hub_kwargs` for the
    download), checked against each other (see `save_head`).

    Weights whose tensors differ from the digest stored with them are corrupt, as are non-finite weights. A config
    whose digest differs from the weights' was written by a save that stopped before its weights were renamed into
    place; the weights are then the previous save's, loaded with the config stored in them.
    """
    config_path = resolve_adapter_file(model_id, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    config, recorded = read_config_file(config_path)
    tensors, metadata, path = _read_weights(model_id, subfolder, hub_kwargs, allow_pickle)
    digest = tensor_digest(tensors)
    if metadata.get(WEIGHTS_DIGEST_KEY, digest) != digest:
        raise ValueError(
            f"{path} is corrupt: its tensors do not match the SHA-256 digest saved with them. Re-save or re-download "
            "the adapter."
        )
    if recorded is not None and recorded != digest:
        if CONFIG_METADATA_KEY not in metadata:
            raise ValueError(
                f"{config_path} was saved with other weights than those in {path} (SHA-256 {recorded[:12]}... vs "
                f"{digest[:12]}...): the two files come from different saves. Re-save the adapter."
            )
        logger.warning(
            "%s belongs to a save that stopped before its weights were written; loading the previous adapter in %s, "
            "with the config saved in it.",
            config_path,
            path,
        )
        config = AlignmentHeadConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    non_finite = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if non_finite:
        raise ValueError(
            f"{path} holds NaN or inf values in {non_finite}: it was saved from a diverged run. Load an earlier "
            "checkpoint instead."
        )
    return config, tensors, path


def _read_weights(
    model_id: str | os.PathLike, subfolder: str | None, hub_kwargs: Mapping[str, Any], allow_pickle: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The tensors and safetensors metadata of a saved head; pickles only with `allow_pickle` (else a clear error)."""
    try:
        path = resolve_adapter_file(model_id, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except FileNotFoundError as missing:
        pickled = _pickled_weights(model_id, subfolder, hub_kwargs, allow_pickle)
        if pickled is None:
            raise
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickle file, and iav-trl reads adapter weights from safetensors only "
                f"({WEIGHTS_NAME}): unpickling a file can run arbitrary code. If you trust its source, pass "
                "`allow_pickle=True` (it is then read with `torch.load(weights_only=True)`), and re-save the adapter "
                "with `save_pretrained` to get a safetensors file."
            ) from missing
        return _load_pickled(pickled), {}, pickled
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupt or truncated and cannot be loaded ({err}). Re-save the adapter.") from err
    return tensors, metadata, path


def _load_pickled(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a pickle, with `torch.load(weights_only=True)` (no arbitrary objects)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be read as a state dict of tensors ({err}).") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors).")
    return tensors


def _pickled_weights(
    model_id: str | os.PathLike, subfolder: str | None, hub_kwargs: Mapping[str, Any], allow_pickle: bool
) -> str | None:
    """An `alignment_head.bin`/`.pt` in a local adapter directory, or on the Hub when pickles are allowed."""
    if not (allow_pickle or os.path.isdir(os.path.join(os.fspath(model_id), subfolder or ""))):
        return None
    for name in PICKLE_WEIGHTS_NAMES:
        with contextlib.suppress(FileNotFoundError):
            return resolve_adapter_file(model_id, name, subfolder=subfolder, **hub_kwargs)
    return None
