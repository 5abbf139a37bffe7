"""Cached backbone features: the frozen backbone's pass over a preference dataset, run once and kept.

With the backbone frozen, everything a training step needs from it is, for each scored position `t` (a completion
token's predecessor, see `IAVModel.scored_hidden_states`), the hidden state `h_t` the LM head receives: `z_base`,
the head's offset and the reference all follow from `h_t` and the frozen unembedding. So `IAVTrainer` with
`IAVConfig.precompute_backbone_features=True` runs the backbone once per example and stores, per pair,

    chosen_features   = bytes of h_t for the chosen sequence's scored positions     (n_chosen, d)
    rejected_features = bytes of h_t for the rejected sequence's scored positions   (n_rejected, d)

as two columns of the tokenized dataset, in an Arrow file under `$IAV_TRL_CACHE/features` (memory-mapped: the
cache lives on disk and the operating system keeps what fits in memory). A dataset needs
`(n_chosen + n_rejected) x d x bytes per value` over its pairs, which `feature_cache_bytes` computes before the
pass. `BackboneFeatureCollator` puts a batch's features, in the order `scored_hidden_states` returns them, next to
TRL's padded batch as `backbone_features` `(N, d)`, and `IAVModel.forward(..., fused_lm_head=True,
backbone_features=...)` uses them instead of running the backbone. Every epoch, evaluation and checkpoint resume
then reads the cache.

Under DDP each process computes the features of its own contiguous shard of the dataset into its own file; every
process then reads all shards (the files must be on a filesystem all processes see, as a single node's are).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset, Features, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from transformers.utils import logging

from iav_trl.utils.files import cache_dir

logger = logging.get_logger(__name__)

FEATURE_COLUMNS = ("chosen_features", "rejected_features")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
FEATURES_DTYPES = ("float32", "auto")


def features_dtype(name: str, backbone_dtype: torch.dtype) -> torch.dtype:
    """The stored dtype: `"float32"`, or `"auto"` for the backbone's own (bf16 halves the cache)."""
    return torch.float32 if name == "float32" else backbone_dtype


def _scored_count(prompt: int, completion: int, max_length: int | None, truncation_mode: str) -> int:
    """Scored positions of one sequence (completion tokens after the first position) once truncated as TRL does."""
    total = prompt + completion
    if max_length is None or total <= max_length:
        kept_prompt, kept = prompt, total
    elif truncation_mode == "keep_end":
        kept_prompt, kept = max(prompt - (total - max_length), 0), max_length
    else:
        kept_prompt, kept = min(prompt, max_length), max_length
    return max(kept - max(kept_prompt, 1), 0)


def feature_cache_bytes(
    dataset: Dataset, hidden_size: int, dtype: torch.dtype, max_length: int | None, truncation_mode: str
) -> int:
    """Bytes the cached features of a tokenized preference dataset take: scored positions x `hidden_size` x bytes."""
    tokens = 0
    for row in dataset.select_columns(list(TOKEN_COLUMNS)):
        for side in ("chosen_ids", "rejected_ids"):
            tokens += _scored_count(len(row["prompt_ids"]), len(row[side]), max_length, truncation_mode)
    return tokens * hidden_size * torch.empty((), dtype=dtype).element_size()


def token_digest(dataset: Dataset) -> str:
    """SHA-256 of a tokenized preference dataset's `prompt_ids`, `chosen_ids` and `rejected_ids`, row by row."""
    digest = hashlib.sha256()
    for table in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=1024):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _encode(features: torch.Tensor) -> bytes:
    return features.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _decode(blob: bytes, dtype: torch.dtype, hidden_size: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=dtype).view(-1, hidden_size)


class BackboneFeatureCollator:
    """
    TRL's preference collator, plus `backbone_features` `(N, d)` when the examples carry cached features: the
    chosen rows' then the rejected rows' scored positions, row by row, as `IAVModel.scored_hidden_states` orders
    them. Examples without features (a dataset passed to `evaluate()` later) are collated as TRL does, and the
    backbone runs for them.
    """

    def __init__(
        self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], dtype: torch.dtype, hidden_size: int
    ):
        self.collator = collator
        self.dtype = dtype
        self.hidden_size = hidden_size

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        cached = all(column in example for example in examples for column in FEATURE_COLUMNS)
        stripped = [{k: v for k, v in example.items() if k not in FEATURE_COLUMNS} for example in examples]
        batch = self.collator(stripped)
        if cached:
            blobs = [example[column] for column in FEATURE_COLUMNS for example in examples]
            batch["backbone_features"] = torch.cat([_decode(blob, self.dtype, self.hidden_size) for blob in blobs])
        return batch


def cache_backbone_features(
    dataset: Dataset,
    name: str,
    compute: Callable[[dict[str, Any]], torch.Tensor],
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    batch_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    max_length: int | None,
    truncation_mode: str,
    model_fingerprint: Any,
    process_index: int = 0,
    num_processes: int = 1,
    share: Callable[[str], str] = lambda fingerprint: fingerprint,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Dataset:
    """
    `dataset` (tokenized by `DPOTrainer`) with the `FEATURE_COLUMNS` of its pairs. `compute(batch)` returns the
    scored hidden states `(N, d)` of a batch padded by `collator`. Process `process_index` of `num_processes`
    computes its contiguous shard into a cache file, then every process reads all shards.

    The files are keyed by the pairs' tokens (`token_digest`), the backbone (`model_fingerprint`) and the settings,
    and reused while those stay the same (so a sweep of runs over one dataset pays for one pass), in
    `$IAV_TRL_CACHE/features`. `share` gives every process the main process's key.
    """
    settings = {"dtype": str(dtype), "max_length": max_length, "truncation_mode": truncation_mode}
    key = share(Hasher.hash((token_digest(dataset), model_fingerprint, sorted(settings.items()))))
    directory = cache_dir("features")
    os.makedirs(directory, exist_ok=True)
    size = feature_cache_bytes(dataset, hidden_size, dtype, max_length, truncation_mode)
    logger.info(f"Caching backbone features of the {name} dataset: {_human(size)} ({len(dataset)} pairs).")

    def add_features(rows: dict[str, list]) -> dict[str, list[bytes]]:
        examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = collator(examples)
        features = compute(batch).to(dtype)
        counts = (batch["completion_mask"][:, 1:] != 0).sum(dim=1).tolist()
        pieces = [_encode(piece) for piece in torch.split(features, counts)]
        half = len(examples)
        return {"chosen_features": pieces[:half], "rejected_features": pieces[half:]}

    shards = []
    for index in range(num_processes):
        shard = dataset.shard(num_shards=num_processes, index=index, contiguous=True)
        fingerprint = Hasher.hash((key, index, num_processes))
        cache_file = os.path.join(directory, f"iav-backbone-features-{fingerprint}.arrow")
        if index == process_index:
            shard.map(
                add_features,
                batched=True,
                batch_size=batch_size,
                writer_batch_size=batch_size,
                remove_columns=shard.column_names,
                features=Features({column: Value("large_binary") for column in FEATURE_COLUMNS}),
                cache_file_name=cache_file,
                new_fingerprint=fingerprint,
                desc=f"Caching backbone features of the {name} dataset ({_human(size)})",
            )
        shards.append(cache_file)
    wait_for_everyone()
    features = concatenate_datasets([Dataset.from_file(path) for path in shards])
    return concatenate_datasets([dataset, features], axis=1)


def check_features_apply(
    *,
    trainable_backbone: bool,
    peft: bool,
    ref_model: bool,
    datasets: dict[str, Any],
    dropout: Sequence[str],
    sharded: str | None,
) -> None:
    """Refuse `precompute_backbone_features` where the backbone's pass is not the same every epoch."""
    advice = "or set `precompute_backbone_features=False`."
    if trainable_backbone or peft:
        raise ValueError(
            "`precompute_backbone_features=True` caches a frozen backbone's pass, but this backbone is trained ("
            f"{'LoRA' if peft else 'freeze_backbone=False'}): its features change every step. Train the head alone "
            f"(`freeze_backbone=True`, no `peft.LoraConfig`), {advice}"
        )
    if ref_model:
        raise ValueError(
            "`precompute_backbone_features=True` serves the policy and its reference from one cached pass, but a "
            f"separate `ref_model` was given. Drop `ref_model` (the reference is then z_base), {advice}"
        )
    for name, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"`precompute_backbone_features=True` needs map-style datasets to cache, but `{name}` is a "
                f"{type(dataset).__name__} (streaming). Load it as a `datasets.Dataset`, {advice}"
            )
    if dropout:
        raise ValueError(
            "`precompute_backbone_features=True` caches one pass, but the backbone has dropout on "
            f"({', '.join(dropout)}), so every epoch's pass would differ. Set `disable_dropout=True` (and the "
            "model config's dropout to 0), "
            f"{advice}"
        )
    if sharded:
        raise ValueError(
            f"`precompute_backbone_features=True` runs the backbone before training, which {sharded} does not "
            f"support yet (its parameters are sharded until training starts). Use DDP or DeepSpeed ZeRO-1/2, {advice}"
        )


def active_dropout(model: torch.nn.Module, disable_dropout: bool) -> list[str]:
    """
    Where a backbone would apply dropout in training mode: `nn.Dropout` modules with `p > 0` (unless
    `disable_dropout`, with which `DPOTrainer` sets them to 0), and the config's `attention_dropout`, which
    transformers' attention functions read directly and `disable_dropout` leaves alone.
    """
    found = []
    if not disable_dropout:
        found += sorted(
            {
                f"{type(module).__name__}(p={module.p})"
                for module in model.modules()
                if isinstance(module, torch.nn.Dropout) and module.p > 0
            }
        )
    attention = getattr(model.config.get_text_config(), "attention_dropout", 0.0)
    if isinstance(attention, (int, float)) and attention > 0:
        found.append(f"config.attention_dropout={attention}")
    return found
