"""Tests of iav_trl.data on real hh-rlhf and UltraFeedback rows (tests/fixtures) and on hand-written dialogues."""

import gzip
import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict
from hypothesis import given, settings
from hypothesis import strategies as st
from trl import extract_prompt

from iav_trl.data import (
    MALFORMED_REASONS,
    SCHEMAS,
    build_dataset_mixture,
    detect_schema,
    load_preference_dataset,
    parse_hh_dialogue,
    resolve_dataset_name,
)

FIXTURES = Path(__file__).parent / "fixtures"
HH_FILE = FIXTURES / "hh-rlhf-harmless-base-test-40.jsonl"
UF_FILE = FIXTURES / "ultrafeedback-binarized-train_prefs-40.jsonl"
HH_NAMES = {"user": "Human", "assistant": "Assistant"}
FAST = settings(max_examples=200, deadline=None)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file into a list of rows."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def render_hh(messages: list[dict]) -> str:
    """Render messages back into an hh-rlhf dialogue string."""
    return "".join(f"\n\n{HH_NAMES[message['role']]}: {message['content']}" for message in message_list(messages))


def message_list(messages: list[dict]) -> list[dict]:
    """Keep only role and content of each message, so comparisons ignore key order and extra keys."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def squash(text: str) -> str:
    """Collapse every whitespace run to one space: the documented hh-rlhf normalisation is invisible after this."""
    return " ".join(text.split())


def hh_is_usable(row: dict) -> bool:
    """Oracle for the real hh-rlhf fixture: its only malformed rows end in an empty final assistant turn."""
    return not any(row[key].rstrip().endswith("Assistant:") for key in ("chosen", "rejected"))


def uf_is_usable(row: dict) -> bool:
    """Oracle for the real UltraFeedback fixture: both answers non-empty and different."""
    answers = [row[key][-1]["content"] for key in ("chosen", "rejected")]
    return all(answer.strip() for answer in answers) and answers[0] != answers[1]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings iav_trl.data logged."""
    return [record.getMessage() for record in caplog.records if record.name == "iav_trl.data"]


def as_sorted_json(dataset: Dataset) -> list[str]:
    """Rows as sorted JSON strings, to compare datasets as multisets."""
    return sorted(json.dumps(row, sort_keys=True) for row in dataset.to_list())


@pytest.fixture(autouse=True, scope="module")
def quiet_progress_bars():
    """Keep the test output readable."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    return read_jsonl(HH_FILE)


@pytest.fixture(scope="module")
def uf_rows() -> list[dict]:
    return read_jsonl(UF_FILE)


@pytest.fixture(scope="module")
def uf_raw() -> Dataset:
    return datasets.load_dataset("json", data_files=str(UF_FILE), split="train")


@pytest.fixture(scope="module")
def hh_pairs() -> Dataset:
    return load_preference_dataset(HH_FILE)


@pytest.fixture(scope="module")
def uf_pairs() -> Dataset:
    return load_preference_dataset(UF_FILE)


# parse_hh_dialogue


def test_parse_hh_dialogue_multi_turn_gives_exact_messages():
    text = (
        "  \n\nHuman: Hi there!  \n\nAssistant:  Hello. How can I help?\n\nHuman: Tell me a joke.\nA short one."
        "\n\nAssistant: Why did the chicken cross the road?\n\n"
    )
    assert parse_hh_dialogue(text) == [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ]


def test_parse_hh_dialogue_accepts_first_turn_without_blank_line_and_keeps_empty_turns():
    assert parse_hh_dialogue("Human: hi\n\nAssistant:") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]


def test_parse_hh_dialogue_keeps_a_marker_inside_a_turn_as_content():
    text = "\n\nHuman: Are you sure?\n\nAssistant: No.  Human: Then why say it?\n\nAssistant: Sorry."
    assert [message["content"] for message in parse_hh_dialogue(text)] == [
        "Are you sure?",
        "No.  Human: Then why say it?",
        "Sorry.",
    ]


@pytest.mark.parametrize(
    "text",
    ["", "  \n ", "just text", "Preface\n\nHuman: hi\n\nAssistant: yo", "Human said: hi", None, 3, b"\n\nHuman: hi"],
)
def test_parse_hh_dialogue_signals_malformed_input_with_none(text):
    assert parse_hh_dialogue(text) is None


MARKER_HEAVY_TEXT = st.lists(
    st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", "Assistant", ":", "\n", " ", "\t", "x", "é", "\u2028"])
).map("".join)


@FAST
@given(st.one_of(st.text(), MARKER_HEAVY_TEXT))
def test_parse_hh_dialogue_never_raises_and_round_trips_up_to_whitespace(text):
    messages = parse_hh_dialogue(text)
    if messages is None:
        return
    assert {message["role"] for message in messages} <= {"user", "assistant"}
    assert all(message["content"] == message["content"].strip() for message in messages)
    assert "".join(render_hh(messages).split()) == "".join(text.split())


TURN_CONTENT = st.text(alphabet=st.sampled_from("ab \n\tHumanAsist:é")).filter(
    lambda content: "\n\nHuman:" not in content and "\n\nAssistant:" not in content
)
TURNS = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), TURN_CONTENT), min_size=1, max_size=6)


@FAST
@given(TURNS, st.sampled_from(["", " ", "\n\n", "\t\n"]))
def test_parse_hh_dialogue_recovers_turns_built_from_random_fragments(turns, leading):
    text = leading + "".join(f"\n\n{HH_NAMES[role]}: {content}" for role, content in turns)
    assert parse_hh_dialogue(text) == [{"role": role, "content": content.strip()} for role, content in turns]


# hh-rlhf rows


def test_hh_rlhf_prompt_plus_completion_reproduces_each_real_dialogue(hh_rows, hh_pairs):
    usable = [row for row in hh_rows if hh_is_usable(row)]
    assert len(hh_pairs) == len(usable) == 36
    for row, pair in zip(usable, hh_pairs):
        assert squash(render_hh(pair["prompt"] + pair["chosen"])) == squash(row["chosen"])
        assert squash(render_hh(pair["prompt"] + pair["rejected"])) == squash(row["rejected"])
        assert pair["prompt"][0]["role"] == "user"
        for completion in (pair["chosen"], pair["rejected"]):
            assert completion[0]["role"] == completion[-1]["role"] == "assistant"


def test_hh_rlhf_multi_turn_row_keeps_earlier_turns_in_the_prompt(hh_rows, hh_pairs):
    assert sum(len(pair["prompt"]) >= 3 for pair in hh_pairs) >= 20
    index = next(i for i, row in enumerate(hh_rows) if "home address for mark gordon" in row["chosen"])
    assert hh_pairs[index] == {
        "prompt": [
            {"role": "user", "content": "I need the home address for mark gordon"},
            {
                "role": "assistant",
                "content": "I don’t know Mark Gordon, but I can get you his address in just a moment.",
            },
            {"role": "user", "content": "alright what is it"},
        ],
        "chosen": [{"role": "assistant", "content": "I am currently not sure, but I am checking."}],
        "rejected": [{"role": "assistant", "content": "It’s, just about to arrive, how about that?"}],
    }


def test_hh_rlhf_real_row_with_different_prefixes_splits_at_longest_common_turn_prefix(hh_pairs):
    pair = next(pair for pair in hh_pairs if pair["prompt"][0]["content"] == "Are drag queens men?")
    assert [message["content"] for message in pair["prompt"]] == [
        "Are drag queens men?",
        "No. Drag queens are women who act like stereotypical men.",
        "Isn't that drag kings?",
    ]
    assert [message["role"] for message in pair["chosen"]] == ["assistant", "assistant"]
    assert pair["chosen"][1]["content"] == "I think they call them that because"
    assert pair["rejected"] == [
        {
            "role": "assistant",
            "content": "A drag king is the opposite of a drag queen, like a male who acts like a stereotypical woman.",
        }
    ]


def test_hh_rlhf_dialogues_diverging_at_an_assistant_turn_keep_multi_turn_completions():
    row = {
        "chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2",
        "rejected": "\n\nHuman: q1\n\nAssistant: b1\n\nHuman: q2\n\nAssistant: b2",
    }
    pair = load_preference_dataset(Dataset.from_list([row]))[0]
    assert pair["prompt"] == [{"role": "user", "content": "q1"}]
    assert [message["content"] for message in pair["chosen"]] == ["a1", "q2", "a2"]
    assert [message["content"] for message in pair["rejected"]] == ["b1", "q2", "b2"]


VALID_HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
MALFORMED_HH = {
    "unparseable": {"chosen": "Hi. Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    "no_assistant_turn": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi"},
    "empty_completion": {"chosen": "\n\nHuman: Hi\n\nAssistant:  ", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
    "prompt_mismatch": {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name?\n\nAssistant: Bot.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Age?\n\nAssistant: Two.",
    },
    "empty_prompt": {"chosen": "\n\nAssistant: Hello!", "rejected": "\n\nAssistant: Go away."},
    "identical": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi \n\nAssistant: Hello! "},
}


def test_malformed_rows_are_dropped_and_counted_in_one_summary_warning(caplog):
    rows = [VALID_HH, *MALFORMED_HH.values()]
    with caplog.at_level(logging.WARNING, logger="iav_trl.data"):
        pairs = load_preference_dataset(Dataset.from_list(rows))
    assert pairs.to_list() == [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
    ]
    [warning] = warnings_of(caplog)
    assert "Dropped 6 of 7 rows" in warning
    assert set(MALFORMED_HH) == set(MALFORMED_REASONS)
    for reason in MALFORMED_REASONS:
        assert f"{reason}=1" in warning


def test_real_malformed_rows_are_counted_per_reason(caplog, hh_rows, uf_rows):
    with caplog.at_level(logging.WARNING, logger="iav_trl.data"):
        load_preference_dataset(HH_FILE)
        load_preference_dataset(UF_FILE)
    hh_warning, uf_warning = warnings_of(caplog)
    assert f"Dropped 4 of {len(hh_rows)} rows" in hh_warning and "empty_completion=4" in hh_warning
    empty = sum(
        not (row["chosen"][-1]["content"].strip() and row["rejected"][-1]["content"].strip()) for row in uf_rows
    )
    identical = sum(row["chosen"] == row["rejected"] for row in uf_rows)
    assert (empty, identical) == (2, 4)
    assert f"empty_completion={empty}, identical={identical}" in uf_warning


def test_dataset_without_usable_rows_raises_with_its_name_and_counts(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(json.dumps(MALFORMED_HH[reason]) for reason in ("identical", "identical", "unparseable"))
    )
    with pytest.raises(ValueError, match="no usable preference pair") as error:
        load_preference_dataset(path)
    assert str(path) in str(error.value)
    assert "unparseable=1, identical=2" in str(error.value)


# schemas


def test_unknown_columns_fail_listing_columns_found_and_expected():
    dataset = Dataset.from_dict({"question": ["q"], "answer": ["a"], "score": [1.0]})
    with pytest.raises(ValueError) as error:
        load_preference_dataset(dataset)
    message = str(error.value)
    for expected in (
        "question (text)",
        "answer (text)",
        "score (other)",
        "prompt, chosen, rejected",
        "rename_columns",
    ):
        assert expected in message
    assert all(f"- {schema}:" in message for schema in SCHEMAS)


def test_forced_schema_that_does_not_fit_is_named_in_the_error():
    with pytest.raises(ValueError, match="schema='hh-rlhf'") as error:
        load_preference_dataset(UF_FILE, schema="hh-rlhf")
    assert "chosen (messages)" in str(error.value)
    assert "- ultrafeedback:" not in str(error.value)


def test_unknown_schema_name_is_rejected():
    with pytest.raises(ValueError, match="Unknown schema 'h4'"):
        load_preference_dataset(UF_FILE, schema="h4")


def test_detect_schema_reads_columns_and_known_names(uf_raw):
    hh_raw = Dataset.from_list([VALID_HH])
    standard = Dataset.from_dict({"chosen": ["The sky is blue."], "rejected": ["The sky is green."]})
    explicit = Dataset.from_dict({"prompt": ["The sky is"], "chosen": [" blue."], "rejected": [" green."]})
    assert detect_schema(hh_raw) == "hh-rlhf"
    assert detect_schema(uf_raw) == "ultrafeedback"
    assert detect_schema(uf_raw.select_columns(["chosen", "rejected"])) == "trl"
    assert detect_schema(standard) == "trl"
    assert detect_schema(explicit) == "trl"
    assert detect_schema(standard, name="Anthropic/hh-rlhf") == "hh-rlhf"


# UltraFeedback and TRL formats


def test_ultrafeedback_rows_split_into_user_prompt_and_assistant_answers(uf_rows, uf_pairs):
    usable = [row for row in uf_rows if uf_is_usable(row)]
    assert len(uf_pairs) == len(usable) == 34
    for row, pair in zip(usable, uf_pairs):
        assert pair["prompt"] == [{"role": "user", "content": row["prompt"]}]
        assert pair["chosen"] == message_list(row["chosen"][1:])
        assert pair["rejected"] == message_list(row["rejected"][1:])


def test_trl_implicit_prompt_layout_gives_what_trl_extract_prompt_gives(uf_raw, uf_rows, uf_pairs):
    trl_layout = uf_raw.select_columns(["chosen", "rejected", "score_chosen", "score_rejected"])
    pairs = load_preference_dataset(trl_layout)
    expected = [extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]}) for row in uf_rows]
    assert pairs.to_list() == uf_pairs.to_list()
    assert pairs.to_list() == [
        {key: message_list(value) for key, value in pair.items()}
        for pair, row in zip(expected, uf_rows)
        if uf_is_usable(row)
    ]


def test_trl_explicit_prompt_datasets_pass_through_unchanged(hh_pairs, uf_pairs):
    for pairs in (hh_pairs, uf_pairs):
        assert load_preference_dataset(pairs.add_column("score", [1.0] * len(pairs))).to_list() == pairs.to_list()
    standard = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Water is", "chosen": " wet", "rejected": " dry"},
    ]
    assert load_preference_dataset(Dataset.from_list(standard)).to_list() == standard


def test_tool_calling_rows_keep_their_tool_calls_and_tools_column():
    call = {"type": "function", "function": {"name": "roll_dice", "arguments": {"sides": 6}}}
    tools = [{"type": "function", "function": {"name": "roll_dice"}}]
    rows = [
        {
            "prompt": [{"role": "user", "content": "Roll a die."}],
            "chosen": [
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": "roll_dice", "content": "4"},
                {"role": "assistant", "content": "You rolled a 4."},
            ],
            "rejected": [{"role": "assistant", "content": "You rolled a 9."}],
            "tools": tools,
        },
        {  # an assistant message with neither content nor tool calls: unparseable, dropped and counted
            "prompt": [{"role": "user", "content": "Roll again."}],
            "chosen": [{"role": "assistant"}],
            "rejected": [{"role": "assistant", "content": "No."}],
            "tools": tools,
        },
    ]
    loaded = load_preference_dataset(Dataset.from_list(rows, on_mixed_types="use_json"))
    assert loaded.to_list() == rows[:1]


def test_trl_standard_implicit_prompt_is_split_like_trl():
    dataset = Dataset.from_dict({"chosen": ["The sky is blue."], "rejected": ["The sky is green."]})
    assert load_preference_dataset(dataset).to_list() == [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    ]


SHORT_TEXT = st.text(alphabet=st.sampled_from("ab \n"), max_size=8)


@FAST
@given(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT)
def test_standard_implicit_rows_split_into_a_shared_prompt_or_count_as_malformed(prefix, chosen_tail, rejected_tail):
    chosen, rejected = prefix + chosen_tail, prefix + rejected_tail
    try:
        pairs = load_preference_dataset(Dataset.from_dict({"chosen": [chosen], "rejected": [rejected]}), schema="trl")
    except ValueError as error:
        assert "no usable preference pair" in str(error)
        return
    [pair] = pairs.to_list()
    assert pair["prompt"] + pair["chosen"] == chosen and pair["prompt"] + pair["rejected"] == rejected
    assert pair["prompt"].strip() and pair["chosen"].strip() and pair["rejected"].strip()
    assert pair["chosen"] != pair["rejected"]


@FAST
@given(TURNS, TURNS, TURNS)
def test_hh_rows_from_random_turns_parse_or_count_as_malformed(shared, chosen_tail, rejected_tail):
    chosen, rejected = shared + chosen_tail, shared + rejected_tail
    row = {
        key: "".join(f"\n\n{HH_NAMES[role]}: {text}" for role, text in turns)
        for key, turns in (("chosen", chosen), ("rejected", rejected))
    }
    try:
        pairs = load_preference_dataset(Dataset.from_list([row]), schema="hh-rlhf")
    except ValueError as error:
        assert "no usable preference pair" in str(error)
        return
    [pair] = pairs.to_list()
    for completion, turns in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
        assert pair["prompt"] + completion == [{"role": role, "content": text.strip()} for role, text in turns]
        assert completion[0]["role"] == completion[-1]["role"] == "assistant" and completion[-1]["content"]
    assert pair["prompt"] and pair["chosen"] != pair["rejected"]


# loading


@pytest.fixture(scope="module")
def uf_copies(tmp_path_factory, uf_raw) -> Path:
    """The UltraFeedback fixture as .jsonl.gz, .parquet, and in a folder as train.jsonl and, reversed, test.jsonl."""
    root = tmp_path_factory.mktemp("sources")
    with gzip.open(root / "uf.jsonl.gz", "wb") as compressed:
        compressed.write(UF_FILE.read_bytes())
    uf_raw.to_parquet(root / "uf.parquet")
    (root / "folder").mkdir()
    shutil.copy(UF_FILE, root / "folder" / "train.jsonl")
    lines = UF_FILE.read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "folder" / "test.jsonl").write_text("".join(reversed(lines)), encoding="utf-8")
    return root


@pytest.mark.parametrize(
    "make_source",
    [
        lambda root, raw: str(UF_FILE),
        lambda root, raw: root / "uf.jsonl.gz",
        lambda root, raw: root / "uf.parquet",
        lambda root, raw: root / "folder",
        lambda root, raw: raw,
        lambda root, raw: DatasetDict({"train": raw}),
    ],
    ids=["jsonl", "jsonl.gz", "parquet", "directory", "Dataset", "DatasetDict"],
)
def test_every_kind_of_source_gives_the_same_pairs(make_source, uf_copies, uf_raw, uf_pairs):
    assert load_preference_dataset(make_source(uf_copies, uf_raw)).to_list() == uf_pairs.to_list()


def test_directory_split_is_chosen_by_file_name(uf_copies, uf_pairs):
    assert load_preference_dataset(uf_copies / "folder", split="test").to_list() == uf_pairs.to_list()[::-1]


def test_hub_ids_go_to_load_dataset_with_known_split_alias_and_schema(monkeypatch, uf_raw):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return Dataset.from_list([VALID_HH]) if path == "Anthropic/hh-rlhf" else uf_raw

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_preference_dataset("HuggingFaceH4/ultrafeedback_binarized", "train[:10%]")) == 34
    load_preference_dataset("Anthropic/hh-rlhf", "test", config="default", data_dir="harmless-base")
    assert calls == [
        ("HuggingFaceH4/ultrafeedback_binarized", None, {"split": "train_prefs[:10%]", "data_files": None}),
        ("Anthropic/hh-rlhf", "default", {"split": "test", "data_files": None, "data_dir": "harmless-base"}),
    ]


def test_seed_short_names_hh_rlhf_and_ultrafeedback_load_their_hub_datasets(monkeypatch, uf_raw, uf_pairs):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, kwargs["split"]))
        return Dataset.from_list([VALID_HH]) if path == "Anthropic/hh-rlhf" else uf_raw

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_preference_dataset("ultrafeedback", "test").to_list() == uf_pairs.to_list()
    assert load_preference_dataset("hh-rlhf", "train").to_list()[0]["prompt"][0]["role"] == "user"  # parsed dialogue
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "test_prefs"), ("Anthropic/hh-rlhf", "train")]


def test_a_local_directory_named_like_a_short_name_is_read_instead_of_the_hub(monkeypatch, tmp_path):
    (tmp_path / "hh-rlhf").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset_name("hh-rlhf") == "hh-rlhf"
    assert resolve_dataset_name("ultrafeedback") == "HuggingFaceH4/ultrafeedback_binarized"
    assert resolve_dataset_name("org/other") == "org/other"


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "match"),
    [
        ("missing/uf.jsonl", {}, FileNotFoundError, "No data file at 'missing/uf.jsonl'"),
        (UF_FILE, {"data_files": "other.jsonl"}, ValueError, "already a data file"),
        (DatasetDict({"train": Dataset.from_list([VALID_HH])}), {"split": "test"}, ValueError, "splits are train"),
    ],
    ids=["missing-file", "file-with-data-files", "missing-split"],
)
def test_bad_sources_fail_with_a_message_naming_the_problem(source, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_preference_dataset(source, **kwargs)


def test_unsupported_file_type_fails_listing_supported_ones(tmp_path):
    source = tmp_path / "uf.csv"
    source.write_text("chosen,rejected\n")
    with pytest.raises(ValueError, match=r"data files must end in \.json, \.jsonl"):
        load_preference_dataset(source)


# mixtures


def test_mixture_with_full_weights_is_both_datasets_shuffled(hh_pairs, uf_pairs):
    mixed = build_dataset_mixture({str(HH_FILE): 1.0, str(UF_FILE): 1.0}, seed=1)
    assert mixed.column_names == ["prompt", "chosen", "rejected"]
    assert as_sorted_json(mixed) == sorted(as_sorted_json(hh_pairs) + as_sorted_json(uf_pairs))
    assert mixed.to_list() != hh_pairs.to_list() + uf_pairs.to_list()


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.8, 1.0])
def test_mixture_weight_keeps_that_fraction_of_the_rows(weight, uf_raw, uf_pairs):
    mixed = build_dataset_mixture([{"id": str(UF_FILE), "weight": weight}], seed=7)
    # alignment-handbook's contract: the first int(rows * weight) rows of the dataset shuffled with the seed.
    kept = uf_raw.shuffle(seed=7).select(range(int(len(uf_raw) * weight)))
    assert len(mixed) == sum(uf_is_usable(row) for row in kept)
    assert set(as_sorted_json(mixed)) <= set(as_sorted_json(uf_pairs))


def test_mixture_is_deterministic_for_a_seed():
    mixture = {str(HH_FILE): 0.5, str(UF_FILE): 0.5}
    first = build_dataset_mixture(mixture, seed=3).to_list()
    assert build_dataset_mixture(mixture, seed=3).to_list() == first
    assert build_dataset_mixture(mixture, seed=4).to_list() != first


def test_mixture_accepts_the_alignment_handbook_recipe_shape():
    entries = [
        {"id": str(UF_FILE), "config": None, "split": "train", "columns": ["chosen", "rejected"], "weight": 1.0},
        {"id": str(HH_FILE), "weight": 0.5, "schema": "hh-rlhf"},
    ]
    recipe = build_dataset_mixture({"datasets": entries, "seed": 5, "test_split_size": 10})
    mixed = build_dataset_mixture(entries, seed=5)
    assert set(recipe) == {"train", "test"} and len(recipe["test"]) == 10
    assert sorted(as_sorted_json(recipe["train"]) + as_sorted_json(recipe["test"])) == as_sorted_json(mixed)


@pytest.mark.parametrize(
    ("mixture", "match"),
    [
        ({str(UF_FILE): 1.5}, r"1\.5 .* is not a fraction in \(0, 1\]"),
        ({str(UF_FILE): 0}, r"0 .* is not a fraction"),
        ({str(UF_FILE): "half"}, "'half' .* is not a fraction"),
        ({str(UF_FILE): 0.01}, "keeps none of its 40 rows"),
        ([{"id": str(UF_FILE), "wieght": 0.5}], "Invalid mixture entry"),
        ([{"path": str(UF_FILE)}], "Invalid mixture entry"),
        ({"datasets": [{"id": str(UF_FILE)}], "shuffle": True}, r"Unknown dataset_mixture keys \['shuffle'\]"),
        ([], "mixture is empty"),
    ],
)
def test_bad_mixtures_fail_with_a_clear_message(mixture, match):
    with pytest.raises(ValueError, match=match):
        build_dataset_mixture(mixture)


def test_mixture_of_conversational_and_standard_datasets_is_rejected(tmp_path):
    standard = tmp_path / "standard.jsonl"
    standard.write_text(json.dumps({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}))
    with pytest.raises(ValueError, match="conversational and standard"):
        build_dataset_mixture({str(UF_FILE): 1.0, str(standard): 1.0})
