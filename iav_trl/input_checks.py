"""Checks `IAVTrainer` runs on its inputs before training, so that a wrong input fails early with a message that
names the problem and the fix, instead of deep inside TRL's preprocessing or the first step."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from datasets import Dataset
from transformers import ProcessorMixin
from trl import DPOConfig

logger = logging.getLogger(__name__)


def named_datasets(train_dataset, eval_dataset) -> dict[str, Any]:
    """The datasets given to the trainer, by the argument (and key) they were passed under."""
    named = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, Mapping):
        named.update({f"eval_dataset[{key!r}]": dataset for key, dataset in eval_dataset.items()})
    elif eval_dataset is not None:
        named["eval_dataset"] = eval_dataset
    return named


def check_preference_datasets(named: Mapping[str, Any]) -> None:
    """Refuse datasets that TRL's preprocessing would fail on deep inside `datasets` (no pairs, no rows)."""
    for name, dataset in named.items():
        columns = getattr(dataset, "column_names", None)
        if columns is not None and not {"chosen", "rejected"} <= set(columns):
            raise ValueError(
                f"`{name}` has the columns {columns}, but IAVTrainer (like DPOTrainer) trains on preference pairs: "
                "`chosen` and `rejected` columns, and an optional `prompt`. Convert Anthropic/hh-rlhf, UltraFeedback "
                "and other preference layouts with `iav_trl.load_preference_dataset(dataset)`, or rename your "
                "columns, e.g. `dataset.rename_columns({'good': 'chosen', 'bad': 'rejected'})`."
            )
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise ValueError(f"`{name}` has no rows. Check its split, and any filtering done before the trainer.")


def check_pad_token(processing_class, args: DPOConfig) -> None:
    """TRL pads with the eos token when the tokenizer has no pad token: say so, and fail clearly without either."""
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    if tokenizer is None or args.pad_token is not None or getattr(tokenizer, "pad_token", None) is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has neither a pad token nor an eos token to pad with. Set one of its tokens as pad "
            "token (`tokenizer.pad_token = ...`) or pass `pad_token=...` in the config."
        )
    logger.warning(
        "The tokenizer has no pad token: padding with its eos token %r, as TRL does. Padded positions are masked out "
        "of attention and loss; set `tokenizer.pad_token` or `pad_token=...` in the config to pad with another token.",
        tokenizer.eos_token,
    )


def check_not_emptied(before: Mapping[str, int], after: Mapping[str, Any], max_length: int | None) -> None:
    """TRL drops the rows whose prompt alone fills `max_length`: warn with the count, and fail when none is left."""
    for name, dataset in after.items():
        if name not in before or not isinstance(dataset, Dataset) or len(dataset) == before[name]:
            continue
        if len(dataset) == 0:
            raise ValueError(
                f"Every prompt of `{name}` is at least max_length={max_length} tokens long, so no completion token "
                "would be left to train on and every row was dropped. Raise `max_length` (or set it to None), or "
                "set `truncation_mode='keep_end'` to keep the end of each sequence."
            )
        logger.warning(
            "Dropped %d of %d rows of `%s`: their prompt alone is at least max_length=%s tokens long. Raise "
            "`max_length` to keep them.",
            before[name] - len(dataset),
            before[name],
            name,
            max_length,
        )
