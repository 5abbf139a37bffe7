"""Checks `IAVTrainer` runs on its inputs before training, so that a wrong input fails early with a message that
names the problem and the fix, instead of deep inside TRL's preprocessing or the first step."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from datasets import Dataset
from transformers import ProcessorMixin
from trl import DPOConfig

from iav_trl.data import MALFORMED_REASONS, MESSAGES, TEXT, column_kind, row_problem

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


_EXPECTED = {
    TEXT: "a string",
    MESSAGES: "a list of chat messages ({'role': str, 'content': str or content parts}, or an assistant message "
    "with `tool_calls`)",
}
_LOADER_FIX = (
    "`iav_trl.load_preference_dataset(dataset)`, which reads TRL preference rows (and hh-rlhf and UltraFeedback "
    "ones) and drops the malformed ones with a count per reason"
)
_ROWS_SCANNED = 1000  # rows read at a time


def _rows(indices: list[int]) -> str:
    shown = ", ".join(str(index) for index in indices[:5])
    return f"row{'s' if len(indices) > 1 else ''} {shown}{', ...' if len(indices) > 5 else ''}"


def check_preference_rows(named: Mapping[str, Any]) -> None:
    """
    Check every row of the preference datasets given to the trainer, as `load_preference_dataset` checks the rows it
    reads (`iav_trl.data.MALFORMED_REASONS`), so that datasets passed straight to `IAVTrainer` are held to the same
    rules:

    - a column of the wrong type (numbers, lists of strings, nulls; a `prompt` in another format than `chosen`) and
      a value that is not a string / a list of `{role, content}` messages (`None`, a message without content) are
      a `ValueError` naming the dataset, the column, the first rows and the fix; TRL would fail on them deep in its
      preprocessing;
    - pairs that carry no preference signal (`empty_completion`, `identical`, `empty_prompt`, ...) are counted in
      one warning per dataset, with their first rows; when no row is usable, a `ValueError`.

    Vision datasets (an `image`/`images` column, which DPOTrainer does not preprocess) and datasets other than a
    `datasets.Dataset` (an `IterableDataset` cannot be read ahead) are left to TRL.
    """
    for name, dataset in named.items():
        if not isinstance(dataset, Dataset) or {"image", "images"} & set(dataset.column_names):
            continue
        kinds = {
            column: column_kind(dataset.features[column])
            for column in ("prompt", "chosen", "rejected")
            if column in dataset.column_names
        }
        source = next((column for column in ("chosen", "rejected") if kinds[column] in (TEXT, MESSAGES)), None)
        kind = kinds[source] if source else None
        for column in ("chosen", "rejected", "prompt"):
            if column in kinds and (kinds[column] != kind or kind is None):
                first = dataset.with_format(None)[0][column] if len(dataset) else None
                wanted = f"{_EXPECTED[kind]}, as `{source}` is" if kind else "a string or a list of messages"
                raise ValueError(
                    f"`{name}` column `{column}` holds {dataset.features[column]} values (row 0: {first!r:.80}), but "
                    f"each `{column}` must be {wanted}: `prompt`, `chosen` and `rejected` are all strings (standard) "
                    "or all lists of chat messages (conversational). Convert the column with "
                    f"`dataset.map(...)`, or use {_LOADER_FIX}."
                )
        explicit_prompt = "prompt" in kinds
        unparseable: dict[str, list[int]] = defaultdict(list)
        reasons: dict[str, list[int]] = defaultdict(list)
        columns = list(kinds)
        index = 0
        for batch in dataset.select_columns(columns).with_format(None).iter(batch_size=_ROWS_SCANNED):
            for values in zip(*(batch[column] for column in columns)):
                problem = row_problem(dict(zip(columns, values)), kind, explicit_prompt)
                if problem is not None:
                    reason, column = problem
                    (unparseable[column] if column else reasons[reason]).append(index)
                index += 1
        for column, indices in unparseable.items():
            value = dataset.with_format(None)[indices[0]][column]
            raise ValueError(
                f"`{name}` {_rows(indices)}, column `{column}`: {value!r:.80} is not {_EXPECTED[kind]} "
                f"({len(indices)} of {len(dataset)} rows of `{column}` are not). TRL would fail on it while "
                f"tokenizing. Fix or drop those rows (`dataset.filter(...)`), or use {_LOADER_FIX}."
            )
        if not reasons:
            continue
        counts = ", ".join(
            f"{reason}={len(reasons[reason])} ({_rows(reasons[reason])})"
            for reason in MALFORMED_REASONS
            if reason in reasons
        )
        total = sum(len(indices) for indices in reasons.values())
        if total == len(dataset):
            raise ValueError(
                f"`{name}` has no usable preference pair: all {total} rows are malformed: {counts} (reasons in "
                f"iav_trl.data.MALFORMED_REASONS). Check how the dataset was built, or read it with {_LOADER_FIX}."
            )
        logger.warning(
            "%d of %d rows of `%s` carry no usable preference signal: %s (reasons in iav_trl.data.MALFORMED_REASONS). "
            "They are trained on as they are; drop them with `dataset.filter(...)`, or use %s.",
            total,
            len(dataset),
            name,
            counts,
            _LOADER_FIX,
        )


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
