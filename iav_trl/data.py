r"""Preference data: load Hub preference datasets, local files or mixtures into TRL's preference format.

Output format
-------------
Every loader returns a `datasets.Dataset` with exactly the columns ``prompt``, ``chosen`` and ``rejected``: TRL's
preference format with an explicit prompt. It is conversational (lists of ``{"role", "content"}`` messages) for
every conversational source and for hh-rlhf::

    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": [{"role": "assistant", "content": "It is blue."}],
     "rejected": [{"role": "assistant", "content": "It is green."}]}

and standard (plain strings, e.g. ``{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}``) only
for a source that is already standard. Messages keep only ``role`` and ``content``.

Source schemas (``schema=``; ``"auto"`` picks one by known Hub name, then by the columns' types)
-------------------------------------------------------------------------------------------------
``"hh-rlhf"`` (``Anthropic/hh-rlhf``)
    ``chosen`` and ``rejected`` are whole dialogues, ``"\n\nHuman: ...\n\nAssistant: ..."``. `parse_hh_dialogue`
    turns each into messages (Human -> user, Assistant -> assistant). Its one normalisation: leading whitespace
    before the first turn is dropped and each turn's content is stripped, so rendering the messages back as
    ``"\n\n{Human|Assistant}: {content}"`` gives the source text up to whitespace. A marker not preceded by a
    blank line ("...drag kings.  Human: Then...") stays content; consecutive turns of one role stay separate.
``"ultrafeedback"`` (``HuggingFaceH4/ultrafeedback_binarized``)
    ``chosen`` and ``rejected`` are whole conversations (user turn, then assistant turn). The string ``prompt`` and
    the other columns (``prompt_id``, ``messages``, ``score_*``) are not used.
``"trl"`` (any TRL preference dataset, e.g. ``trl-lib/ultrafeedback_binarized``)
    With a ``prompt`` column of the same type as ``chosen`` (explicit prompt), rows pass through unchanged.
    Otherwise the prompt is implicit in ``chosen``/``rejected`` and is split off as below, as TRL's own trainers do
    (`trl.maybe_extract_prompt`).

Splitting off the prompt
------------------------
For hh-rlhf, ultrafeedback and implicit-prompt data, the prompt is the longest common prefix of ``chosen`` and
``rejected``, in whole messages for conversations (characters for strings), computed by `trl.extract_prompt`; the
completions are the rest. When the two dialogues differ only in their final assistant turn, the prompt is every
turn before it and each completion is that one turn. When they diverge earlier (about 1 row in 1500 of hh-rlhf), the
prompt is the turns they share and a completion may span several turns; the row is kept only if both completions
start and end with an assistant turn, that is if both answer the same prompt.

Malformed rows
--------------
Rows that are no usable preference pair are dropped, and one warning per dataset gives the count for each reason
(the keys of `MALFORMED_REASONS`, checked in that order): ``unparseable``, ``no_assistant_turn``,
``empty_completion``, ``prompt_mismatch``, ``empty_prompt``, ``identical``. A dataset with no usable row left
raises a ValueError naming the dataset and these counts. A dataset whose columns fit no schema raises a ValueError
listing the columns found and the columns each schema expects, before any row is read.

Loading and mixing
------------------
`load_preference_dataset` reads a Hub id (through `datasets.load_dataset`, so offline only from the cache), a local
``.json``/``.jsonl``/``.json.gz``/``.jsonl.gz``/``.parquet`` file, a directory of data files, or an in-memory
`datasets.Dataset`/`datasets.DatasetDict`. `build_dataset_mixture` mixes several of them with alignment-handbook's
``dataset_mixture`` semantics.
"""

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Json, LargeList, List, Value, concatenate_datasets
from trl.data_utils import extract_prompt

logger = logging.getLogger(__name__)

Message = dict[str, str]
Row = dict[str, Any]
DataSource = str | os.PathLike | Dataset | DatasetDict
MixtureSpec = Mapping[str, float] | Sequence[Mapping[str, Any]] | Mapping[str, Any]

SCHEMAS = ("hh-rlhf", "ultrafeedback", "trl")

MALFORMED_REASONS = {
    "unparseable": "a value is missing, a dialogue string has no '\\n\\nHuman:'/'\\n\\nAssistant:' turn or has text "
    "before its first turn, or a conversation is not a list of {role, content} messages",
    "no_assistant_turn": "a completion does not end in an assistant turn",
    "empty_completion": "a completion (its final turn, or the whole string) is empty or whitespace",
    "prompt_mismatch": "a completion does not start with an assistant turn: chosen and rejected diverge at a user "
    "turn, so they answer different prompts",
    "empty_prompt": "the prompt is empty (chosen and rejected share no leading turn or text)",
    "identical": "chosen and rejected are the same",
}

_EXPECTED_COLUMNS = {
    "hh-rlhf": "chosen, rejected: strings, whole dialogues of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns "
    "(Anthropic/hh-rlhf)",
    "ultrafeedback": "chosen, rejected: lists of {role, content} messages, each a whole conversation; "
    "prompt: string, optional (HuggingFaceH4/ultrafeedback_binarized)",
    "trl": "prompt, chosen, rejected (explicit prompt) or chosen, rejected (implicit prompt), all strings or all "
    "lists of {role, content} messages (trl-lib/ultrafeedback_binarized)",
}

_KNOWN_SCHEMAS = {
    "Anthropic/hh-rlhf": "hh-rlhf",
    "HuggingFaceH4/ultrafeedback_binarized": "ultrafeedback",
    "trl-lib/ultrafeedback_binarized": "trl",
}

# Short names (as the IAV seed's `train.sh <model> ultrafeedback <dir>` took them) -> Hub ids. A local file or
# directory of the same name wins.
DATASET_SHORT_NAMES = {
    "hh-rlhf": "Anthropic/hh-rlhf",
    "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
}

# H4's ultrafeedback has no "train"/"test" splits; its preference splits are "train_prefs"/"test_prefs".
_SPLIT_ALIASES = {"HuggingFaceH4/ultrafeedback_binarized": {"train": "train_prefs", "test": "test_prefs"}}

_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
}

_MIXTURE_KEYS = {"datasets", "seed", "test_split_size"}
_MIXTURE_ENTRY_KEYS = {"id", "config", "split", "columns", "weight", "schema"}

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

# Column kinds (`column_kind`): strings, lists of {role, content} messages, anything else.
TEXT, MESSAGES, OTHER = "text", "messages", "other"
_MESSAGE_FEATURE = List({"role": Value("string"), "content": Value("string")})
_REASON = "__malformed_reason__"
_IN_MEMORY = "<in-memory dataset>"

# `datasets` keys its map cache on functions by module and name only; hashing this file's text into the map's
# arguments keeps a newer iav_trl from reusing rows that an older one converted.
_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def parse_hh_dialogue(text: str) -> list[Message] | None:
    """Parse one hh-rlhf dialogue string into ``{"role", "content"}`` messages; never raises.

    A turn starts at ``"\\n\\nHuman:"`` (role ``user``) or ``"\\n\\nAssistant:"`` (role ``assistant``) and runs to the
    next such marker; its content is stripped. Whitespace before the first turn is ignored, and the first turn may
    omit the leading blank line. Turns with empty content are kept (the row-level checks judge them).

    Returns:
        The messages, or ``None`` when ``text`` is not a string, has no turn, or has other text before its first turn.
    """
    if not isinstance(text, str):
        return None
    # With one capture group, split() gives [text before the first marker, role, content, role, content, ...].
    pieces = _HH_TURN.split("\n\n" + text.lstrip())
    if pieces[0]:
        return None
    roles, contents = pieces[1::2], pieces[2::2]
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(roles, contents)]


def column_kind(feature: Any) -> str:
    """Classify a column's feature as ``"text"`` (strings), ``"messages"`` (lists of chat messages) or ``"other"``.

    A list column is messages when its items are structs with a ``role`` (as `trl.is_conversational` decides) or
    JSON values (``List(Json)``, which `datasets` infers for messages of differing keys, such as tool calls); each
    row's messages are then checked by `row_problem`.
    """
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return TEXT
    if isinstance(feature, (List, LargeList)):
        item = feature.feature
        if (isinstance(item, dict) and "role" in item) or isinstance(item, Json):
            return MESSAGES
    return OTHER


def _column_kinds(dataset: Dataset) -> dict[str, str]:
    """Map each column of ``dataset`` to its kind (see `column_kind`)."""
    return {column: column_kind(feature) for column, feature in dataset.features.items()}


def _completion_kind(kinds: Mapping[str, str]) -> str | None:
    """Return the kind shared by the ``chosen`` and ``rejected`` columns, or ``None`` if they lack one."""
    chosen = kinds.get("chosen")
    return chosen if chosen in (TEXT, MESSAGES) and kinds.get("rejected") == chosen else None


def _looks_like_hh(dataset: Dataset) -> bool:
    """Tell hh-rlhf dialogues from TRL standard strings: any of the first 10 ``chosen`` values parses as a dialogue."""
    head = dataset.select(range(min(10, len(dataset))))
    return any(parse_hh_dialogue(text) is not None for text in head["chosen"])


def _schema_error(dataset: Dataset, name: str, schema: str) -> ValueError:
    """Build the error for a dataset whose columns fit ``schema`` (or, for ``"auto"``, no schema)."""
    found = ", ".join(f"{column} ({kind})" for column, kind in _column_kinds(dataset).items()) or "none"
    wanted = SCHEMAS if schema == "auto" else (schema,)
    expected = "\n".join(f"  - {each}: {_EXPECTED_COLUMNS[each]}" for each in wanted)
    target = "any known preference schema" if schema == "auto" else f"schema={schema!r}"
    return ValueError(
        f"Dataset {name!r} does not fit {target}.\nColumns found: {found}.\nColumns expected:\n{expected}\n"
        "Rename or select its columns to match one of these before loading, e.g. "
        "`dataset.rename_columns({'question': 'prompt', 'good': 'chosen', 'bad': 'rejected'})` "
        f"(or `columns` in a mixture entry), or pass another `schema` (one of {', '.join(SCHEMAS)}, or 'auto')."
    )


def detect_schema(dataset: Dataset, name: str | None = None) -> str:
    """Return which of `SCHEMAS` ``dataset`` is in, judged by its column types (and, for strings, its first rows).

    A known Hub ``name`` decides directly. Otherwise: message-list ``chosen``/``rejected`` with a string ``prompt``
    are ``"ultrafeedback"``, with a message-list prompt or none ``"trl"``; string ``chosen``/``rejected`` with a
    string prompt are ``"trl"``, without one ``"hh-rlhf"`` if its first rows parse as Human/Assistant dialogues, else
    ``"trl"`` (standard, implicit prompt).

    Raises:
        ValueError: if the columns fit no schema; the message lists the columns found and those expected.
    """
    if name in _KNOWN_SCHEMAS:
        return _KNOWN_SCHEMAS[name]
    kinds = _column_kinds(dataset)
    completion, prompt = _completion_kind(kinds), kinds.get("prompt")
    if completion == MESSAGES and prompt in (None, TEXT, MESSAGES):
        return "ultrafeedback" if prompt == TEXT else "trl"
    if completion == TEXT and prompt in (None, TEXT):
        return "hh-rlhf" if prompt is None and _looks_like_hh(dataset) else "trl"
    raise _schema_error(dataset, name or _IN_MEMORY, "auto")


@dataclass(frozen=True)
class _Layout:
    """How to read a row: the ``kind`` of its output columns and the ``prompt`` source.

    ``prompt`` is ``"explicit"`` (a prompt column), ``"implicit"`` (split off chosen/rejected) or ``"dialogue"``
    (hh-rlhf strings, parsed into messages, then split like implicit ones). ``code_digest`` only enters the map's
    cache key (see `_CODE_DIGEST`).
    """

    kind: str
    prompt: str
    whole_messages: bool = False
    code_digest: str = _CODE_DIGEST


def _layout(dataset: Dataset, schema: str, name: str) -> _Layout:
    """Return how to read the rows of ``dataset`` under ``schema``, or raise if its columns do not fit."""
    kinds = _column_kinds(dataset)
    completion = _completion_kind(kinds)
    if schema == "hh-rlhf" and completion == TEXT:
        return _Layout(MESSAGES, "dialogue")
    if schema == "ultrafeedback" and completion == MESSAGES:
        return _Layout(MESSAGES, "implicit")
    if schema == "trl" and completion is not None:
        # As trl.maybe_extract_prompt: a prompt column of another type than the completions is not the prompt.
        prompt = "explicit" if kinds.get("prompt") == completion else "implicit"
        # Messages beyond {role, content} (tool calls, tool results, content parts) are kept whole, as TRL reads them.
        whole = completion == MESSAGES and dataset.features["chosen"] != _MESSAGE_FEATURE
        return _Layout(completion, prompt, whole_messages=whole)
    raise _schema_error(dataset, name, schema)


class _MalformedRow(Exception):
    """Raised while reading a row that is no usable preference pair; ``reason`` is a key of `MALFORMED_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_text(value: Any) -> str:
    """Return ``value`` if it is a string, else raise ``unparseable``."""
    if not isinstance(value, str):
        raise _MalformedRow("unparseable")
    return value


def _read_messages(value: Any) -> list[Message]:
    """Return ``value`` as ``{"role", "content"}`` messages (other keys dropped), or raise ``unparseable``."""
    if not isinstance(value, list) or not all(
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
        for message in value
    ):
        raise _MalformedRow("unparseable")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _message_text(message: Mapping[str, Any]) -> str:
    """The text of a chat message: its ``content`` string, or the ``text`` of its content parts (multimodal)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))
    return content or ""


def _is_chat_message(message: Any) -> bool:
    """Whether ``message`` is a chat message as TRL's chat templates take it: a dict with a string ``role`` and a
    ``content`` that is a string or a list of content parts, or that is missing or null in a message carrying
    ``tool_calls`` (an assistant calling a tool)."""
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        return False
    content = message.get("content")
    if isinstance(content, str):
        return True
    if isinstance(content, list):
        return all(isinstance(part, Mapping) for part in content)
    return content is None and bool(message.get("tool_calls"))


def _read_chat(value: Any) -> list[Mapping[str, Any]]:
    """Return ``value`` unchanged if it is a list of chat messages (`_is_chat_message`: tool calls, tool results
    and content parts included, as DPOTrainer trains on them), else raise ``unparseable``."""
    if not isinstance(value, list) or not all(_is_chat_message(message) for message in value):
        raise _MalformedRow("unparseable")
    return value


def _read_dialogue(value: Any) -> list[Message]:
    """Return the messages of an hh-rlhf dialogue string, or raise ``unparseable``."""
    messages = parse_hh_dialogue(value)
    if messages is None:
        raise _MalformedRow("unparseable")
    return messages


_READERS = {TEXT: _read_text, MESSAGES: _read_messages}


def _split_prompt(chosen: Sequence, rejected: Sequence) -> Row:
    """Split the shared prefix off ``chosen`` and ``rejected`` with `trl.extract_prompt`.

    Pairs with no shared first element get an empty prompt here: `trl.extract_prompt` fails on an empty side and,
    for strings whose first characters differ, its space adjustment would cut at index -1.
    """
    if not chosen or not rejected or chosen[0] != rejected[0]:
        return {"prompt": chosen[:0], "chosen": chosen, "rejected": rejected}
    return extract_prompt({"chosen": chosen, "rejected": rejected})


def _check_messages(pair: Row) -> None:
    """Raise the first `MALFORMED_REASONS` key a conversational ``{prompt, chosen, rejected}`` pair violates."""
    completions = (pair["chosen"], pair["rejected"])
    if not all(completion and completion[-1]["role"] == "assistant" for completion in completions):
        raise _MalformedRow("no_assistant_turn")
    if not all(
        _message_text(completion[-1]).strip() or completion[-1].get("tool_calls") for completion in completions
    ):
        raise _MalformedRow("empty_completion")
    if not all(completion[0]["role"] == "assistant" for completion in completions):
        raise _MalformedRow("prompt_mismatch")
    if not pair["prompt"]:
        raise _MalformedRow("empty_prompt")
    if pair["chosen"] == pair["rejected"]:
        raise _MalformedRow("identical")


def _check_text(pair: Row) -> None:
    """Raise the first `MALFORMED_REASONS` key a standard (string) ``{prompt, chosen, rejected}`` pair violates."""
    if not (pair["chosen"].strip() and pair["rejected"].strip()):
        raise _MalformedRow("empty_completion")
    if not pair["prompt"].strip():
        raise _MalformedRow("empty_prompt")
    if pair["chosen"] == pair["rejected"]:
        raise _MalformedRow("identical")


def _read_pair(row: Row, layout: _Layout) -> Row:
    """Return the checked ``{prompt, chosen, rejected}`` of one source row, or raise `_MalformedRow`."""
    read = (
        _read_dialogue
        if layout.prompt == "dialogue"
        else _read_chat
        if layout.whole_messages
        else _READERS[layout.kind]
    )
    chosen, rejected = read(row["chosen"]), read(row["rejected"])
    if layout.prompt == "explicit":
        pair = {"prompt": read(row["prompt"]), "chosen": chosen, "rejected": rejected}
    else:
        pair = _split_prompt(chosen, rejected)
    (_check_messages if layout.kind == MESSAGES else _check_text)(pair)
    return pair


def row_problem(row: Mapping[str, Any], kind: str, explicit_prompt: bool) -> tuple[str, str | None] | None:
    """
    What is wrong with one TRL preference row (``prompt``, if ``explicit_prompt``, ``chosen`` and ``rejected``, all
    of ``kind``, `TEXT` or `MESSAGES`), judged as `load_preference_dataset` judges rows: ``None`` for a usable pair,
    else ``(reason, column)``, the reason a key of `MALFORMED_REASONS` and the column the unparseable value is in
    (``None`` for the other reasons, which concern the pair).
    """
    read = _read_chat if kind == MESSAGES else _read_text
    values = {}
    for column in ("prompt", "chosen", "rejected") if explicit_prompt else ("chosen", "rejected"):
        try:
            values[column] = read(row[column])
        except _MalformedRow as malformed:
            return malformed.reason, column
    pair = values if explicit_prompt else _split_prompt(values["chosen"], values["rejected"])
    try:
        (_check_messages if kind == MESSAGES else _check_text)(pair)
    except _MalformedRow as malformed:
        return malformed.reason, None
    return None


def _convert_row(row: Row, layout: _Layout) -> Row:
    """Map one source row to ``{prompt, chosen, rejected}`` plus its malformed reason (``""`` when usable)."""
    try:
        return {**_read_pair(row, layout), _REASON: ""}
    except _MalformedRow as malformed:
        return {"prompt": None, "chosen": None, "rejected": None, _REASON: malformed.reason}


def _format_counts(counts: Counter) -> str:
    """Render reason counts as ``"reason=count, ..."`` in `MALFORMED_REASONS` order."""
    return ", ".join(f"{reason}={counts[reason]}" for reason in MALFORMED_REASONS if counts[reason]) or "none"


def _drop_malformed(converted: Dataset, name: str, schema: str) -> Dataset:
    """Drop the rows with a malformed reason, warn once with the counts, and raise if no row is left."""
    reasons = list(converted[_REASON])
    dropped = Counter(reason for reason in reasons if reason)
    total = sum(dropped.values())
    if total == len(reasons):
        raise ValueError(
            f"Dataset {name!r} (schema {schema!r}) has no usable preference pair: {len(reasons)} rows read, "
            f"dropped as malformed: {_format_counts(dropped)}. Check the split and columns; the reasons are "
            "explained in iav_trl.data.MALFORMED_REASONS."
        )
    if total:
        logger.warning(
            f"Dropped {total} of {len(reasons)} rows of {name!r} (schema {schema!r}) as malformed: "
            f"{_format_counts(dropped)}. The reasons are explained in iav_trl.data.MALFORMED_REASONS."
        )
    return converted.select([index for index, reason in enumerate(reasons) if not reason]).remove_columns(_REASON)


def _to_preference_format(dataset: Dataset, schema: str, name: str, num_proc: int | None) -> Dataset:
    """Convert a loaded source ``dataset`` to the preference format, dropping and reporting malformed rows."""
    if schema != "auto" and schema not in SCHEMAS:
        raise ValueError(f"Unknown schema {schema!r}; pass 'auto' or one of {', '.join(SCHEMAS)}.")
    resolved = detect_schema(dataset, name) if schema == "auto" else schema
    layout = _layout(dataset, resolved, name)
    column = (
        List(Json()) if layout.whole_messages else _MESSAGE_FEATURE if layout.kind == MESSAGES else Value("string")
    )
    # A `tools` column (the functions a tool-calling conversation may call) goes to the chat template: kept as is.
    kept = {"tools": dataset.features["tools"]} if "tools" in dataset.column_names else {}
    converted = dataset.map(
        _convert_row,
        fn_kwargs={"layout": layout},
        remove_columns=[name for name in dataset.column_names if name not in kept],
        features=Features({"prompt": column, "chosen": column, "rejected": column, **kept, _REASON: Value("string")}),
        num_proc=num_proc,
        desc=f"Converting {name} ({resolved}) to preference format",
    )
    return _drop_malformed(converted, name, resolved)


def _data_file_builder(path: str) -> str | None:
    """Return the `datasets` builder for a data file name (``"json"`` or ``"parquet"``), ``None`` for other names."""
    return next((builder for suffix, builder in _DATA_FILE_BUILDERS.items() if path.lower().endswith(suffix)), None)


def _hub_split(name: str, split: str) -> str:
    """Apply `_SPLIT_ALIASES` to the split name, keeping any slice (``"train[:10%]"`` -> ``"train_prefs[:10%]"``)."""
    base, bracket, rest = split.partition("[")
    return _SPLIT_ALIASES.get(name, {}).get(base, base) + bracket + rest


def resolve_dataset_name(name_or_path: str | os.PathLike) -> str:
    """The Hub id a short name stands for (`DATASET_SHORT_NAMES`: ``"hh-rlhf"``, ``"ultrafeedback"``), unless a local
    file or directory has that name; any other name unchanged."""
    path = os.fspath(name_or_path)
    if path in DATASET_SHORT_NAMES and not os.path.exists(path):
        return DATASET_SHORT_NAMES[path]
    return path


def _load_source(
    source: DataSource, split: str, config: str | None, data_files: Any, load_kwargs: Mapping[str, Any]
) -> Dataset:
    """Load ``split`` of ``source`` in its own schema (see `load_preference_dataset` for what sources mean)."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        if split not in source:
            raise ValueError(f"The DatasetDict has no split {split!r}; its splits are {', '.join(source)}.")
        return source[split]
    path = resolve_dataset_name(source)
    builder = _data_file_builder(path)
    if os.path.isfile(path):
        if builder is None:
            raise ValueError(f"Cannot read {path!r}: data files must end in {', '.join(_DATA_FILE_BUILDERS)}.")
        if data_files is not None:
            raise ValueError(f"`data_files` is for Hub ids and directories; {path!r} is already a data file.")
        return datasets.load_dataset(builder, data_files=path, split="train", **load_kwargs)
    if builder is not None and not os.path.isdir(path):
        raise FileNotFoundError(f"No data file at {path!r} (looked for a local file because of its extension).")
    return datasets.load_dataset(path, config, split=_hub_split(path, split), data_files=data_files, **load_kwargs)


def _source_name(source: DataSource) -> str:
    """Name ``source`` in messages and for known-name schema detection."""
    return _IN_MEMORY if isinstance(source, (Dataset, DatasetDict)) else resolve_dataset_name(source)


def load_preference_dataset(
    name_or_path: DataSource,
    split: str = "train",
    *,
    config: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    schema: str = "auto",
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Load a preference dataset and convert it to TRL's preference format (see the module docstring).

    Args:
        name_or_path: What to read. An existing file ending in ``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz`` or
            ``.parquet`` is read whole, as one split (``split`` is not used). The short names ``"hh-rlhf"`` and
            ``"ultrafeedback"`` mean ``Anthropic/hh-rlhf`` and ``HuggingFaceH4/ultrafeedback_binarized``
            (`DATASET_SHORT_NAMES`) unless a local path has that name. A directory or a Hub id goes to
            ``datasets.load_dataset(name_or_path, config, split=split, data_files=data_files)``, which names a
            directory's splits after its files (``train.jsonl``, ``test.jsonl``) and reads a Hub id from the local
            cache when offline. A `datasets.Dataset` is used as is, a `datasets.DatasetDict` by ``split`` (for a
            ``save_to_disk`` folder, pass ``datasets.load_from_disk(folder)``).
        split: The split to read, slices allowed (``"train[:1000]"``). For ``HuggingFaceH4/ultrafeedback_binarized``,
            ``train``/``test`` mean its preference splits ``train_prefs``/``test_prefs``.
        config: The dataset configuration name (``datasets.load_dataset``'s ``name``), for Hub ids and directories.
        data_files: Passed to ``datasets.load_dataset`` for Hub ids and directories.
        schema: ``"auto"`` (detect with `detect_schema`), or one of `SCHEMAS` to force it.
        num_proc: Processes for the conversion ``map``; the default converts in this process.
        **load_kwargs: Further arguments for ``datasets.load_dataset`` (``data_dir``, ``revision``, ``cache_dir``...).

    Returns:
        A `datasets.Dataset` with exactly the columns ``prompt``, ``chosen`` and ``rejected``.

    Raises:
        ValueError: if the columns fit no schema (or not the given one), if no usable row is left, or for an
            unknown ``schema`` or file type.
        FileNotFoundError: if ``name_or_path`` has a data file extension but no such file exists.
    """
    raw = _load_source(name_or_path, split, config, data_files, load_kwargs)
    return _to_preference_format(raw, schema, _source_name(name_or_path), num_proc)


def _weight(entry: Mapping[str, Any]) -> float:
    """Return a mixture entry's weight (default 1.0) after checking that it is a fraction in (0, 1]."""
    weight = entry.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise ValueError(
            f"Mixture weight {weight!r} of {entry['id']!r} is not a fraction in (0, 1]: a weight is the share of "
            "that dataset's rows to keep, as in alignment-handbook. To use its rows more than once, list the entry "
            "again."
        )
    return float(weight)


def _mixture_entries(mixture: MixtureSpec) -> tuple[list[Mapping[str, Any]], dict[str, Any]]:
    """Normalise the accepted mixture shapes to (entries, top-level settings ``seed``/``test_split_size``)."""
    if isinstance(mixture, Mapping) and isinstance(mixture.get("datasets"), Sequence):
        unknown = set(mixture) - _MIXTURE_KEYS
        if unknown:
            raise ValueError(f"Unknown dataset_mixture keys {sorted(unknown)}; allowed: {sorted(_MIXTURE_KEYS)}.")
        return list(mixture["datasets"]), {key: mixture[key] for key in ("seed", "test_split_size") if key in mixture}
    if isinstance(mixture, Mapping):
        return [{"id": source, "weight": weight} for source, weight in mixture.items()], {}
    return list(mixture), {}


def _check_entry(entry: Any) -> None:
    """Raise a ValueError naming the problem if ``entry`` is not a mapping with an ``id`` and only known keys."""
    if not isinstance(entry, Mapping) or "id" not in entry or set(entry) - _MIXTURE_ENTRY_KEYS:
        raise ValueError(
            f"Invalid mixture entry {entry!r}: each entry is a mapping with an 'id' (Hub id or local path) and "
            f"optionally {', '.join(sorted(_MIXTURE_ENTRY_KEYS - {'id'}))}."
        )


def _load_mixture_entry(entry: Mapping[str, Any], split: str, seed: int, num_proc: int | None) -> Dataset:
    """Load one mixture entry: select its ``columns``, keep its ``weight`` share of rows, convert it."""
    weight = _weight(entry)
    raw = _load_source(entry["id"], entry.get("split") or split, entry.get("config"), None, {})
    if entry.get("columns") is not None:
        raw = raw.select_columns(list(entry["columns"]))
    kept = int(len(raw) * weight)
    if kept == 0:
        raise ValueError(f"Mixture weight {weight} of {entry['id']!r} keeps none of its {len(raw)} rows.")
    raw = raw.shuffle(seed=seed).select(range(kept))
    return _to_preference_format(raw, entry.get("schema", "auto"), _source_name(entry["id"]), num_proc)


def build_dataset_mixture(
    mixture: MixtureSpec, split: str = "train", *, seed: int | None = None, num_proc: int | None = None
) -> Dataset | DatasetDict:
    """Mix several preference datasets, as alignment-handbook's ``dataset_mixture`` does, in TRL's preference format.

    Three shapes are accepted:

    - ``{"Anthropic/hh-rlhf": 0.5, "data/uf.jsonl": 1.0}``: source -> weight, all read from ``split``;
    - ``[{"id": ..., "config": ..., "split": ..., "columns": [...], "weight": ..., "schema": ...}, ...]``: every key
      but ``id`` optional (``split`` defaults to ``split``, ``weight`` to 1.0, ``schema`` to ``"auto"``);
    - alignment-handbook's recipe block, ``{"datasets": [<entries as above>], "seed": 0, "test_split_size": 0.1}``.

    Each entry is loaded as `load_preference_dataset` does, restricted to ``columns`` (before conversion, as in
    alignment-handbook) and cut to ``int(rows * weight)`` rows of a ``shuffle(seed)``; malformed rows are then
    dropped. The parts are concatenated and shuffled with ``seed``.

    Args:
        mixture: One of the shapes above.
        split: The split of entries that name none.
        seed: Seed of the subsampling and of the final shuffle; defaults to the mixture's ``seed``, else 0.
        num_proc: Processes for each conversion ``map``.

    Returns:
        A `datasets.Dataset` with only ``prompt``, ``chosen``, ``rejected``; or, when the mixture sets
        ``test_split_size`` (a fraction or a row count), a `datasets.DatasetDict` with ``train`` and ``test``.

    Raises:
        ValueError: for an empty mixture, a malformed entry, a weight outside (0, 1], a mix of conversational and
            standard datasets, or any error of `load_preference_dataset`.
    """
    entries, settings = _mixture_entries(mixture)
    if not entries:
        raise ValueError("The dataset mixture is empty; give at least one dataset.")
    for entry in entries:
        _check_entry(entry)
    seed = settings.get("seed", 0) if seed is None else seed
    parts = [_load_mixture_entry(entry, split, seed, num_proc) for entry in entries]
    kinds = {_source_name(entry["id"]): column_kind(part.features["chosen"]) for entry, part in zip(entries, parts)}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"The mixture combines conversational and standard (string) datasets: {kinds}. TRL trains on one format; "
            "convert the standard datasets to messages first or mix them separately."
        )
    mixed = concatenate_datasets(parts).shuffle(seed=seed)
    if settings.get("test_split_size") is None:
        return mixed
    return mixed.train_test_split(test_size=settings["test_split_size"], seed=seed)
