"""Bad input fails early with a clear error, training never goes on with NaNs, and nothing saved is lost or corrupted.

Each test is one row of the README's "What happens when..." table.
"""

import copy
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import time

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from testing_utils import HEAD, checkpoints, logged, make_trainer, preference_data
from transformers import TrainerCallback

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVModel, IAVTrainer, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm

SMALL = AlignmentHeadConfig(**HEAD)


def fresh_base():
    return tiny_causal_lm("llama", vocab_size=400)


def head_with(config: AlignmentHeadConfig, seed: int) -> IAVModel:
    """A head with random non-zero weights (a fresh head writes zeros)."""
    model = get_iav_model(fresh_base(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.alignment_heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def head_tensors(model: IAVModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.alignment_heads[name].state_dict().items()}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# Early, clear errors


@pytest.mark.parametrize(
    ("datasets", "name"),
    [
        (dict(train_dataset=Dataset.from_dict({"question": ["q"], "answer": ["a"]})), "train_dataset"),
        (
            dict(train_dataset=preference_data(2), eval_dataset={"held_out": Dataset.from_dict({"text": ["t"]})}),
            "eval_dataset['held_out']",
        ),
    ],
)
def test_dataset_without_preference_columns_fails_before_the_model_is_loaded(tokenizer, tmp_path, datasets, name):
    # "no/such-model" would fail to download: the dataset error comes first, before any model is loaded.
    with pytest.raises(ValueError, match=rf"`{re.escape(name)}` has the columns .*`chosen` and `rejected`") as error:
        IAVTrainer("no/such-model", args=IAVConfig(str(tmp_path), bf16=False), processing_class=tokenizer, **datasets)
    assert "load_preference_dataset" in str(error.value) and "rename_columns" in str(error.value)


def test_empty_dataset_fails_naming_it(tokenizer, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="`train_dataset` has no rows"):
        make_trainer(tmp_path, tokenizer, train_dataset=empty)


def conversation(*turns: tuple[str, str | None]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


GOOD_STANDARD = {"prompt": "How do I bake bread?", "chosen": " Mix flour and water.", "rejected": " I cannot help."}
GOOD_CHAT = {
    "prompt": conversation(("user", "How do I bake bread?")),
    "chosen": conversation(("assistant", "Mix flour and water.")),
    "rejected": conversation(("assistant", "I cannot help.")),
}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD_STANDARD, {**GOOD_STANDARD, "chosen": None}], r"`train_dataset` row 1, column `chosen`: None is not"),
        ([{**GOOD_STANDARD, "rejected": 3}] * 2, r"`train_dataset` column `rejected` holds Value\('int64'\) values"),
        ([{**GOOD_STANDARD, "chosen": [" Mix", " flour"]}] * 2, r"`train_dataset` column `chosen` holds List\(Value"),
        (
            [GOOD_CHAT, {**GOOD_CHAT, "rejected": conversation(("assistant", None))}],
            r"`train_dataset` row 1, column `rejected`: .* is not a list of chat messages",
        ),
        ([{**GOOD_CHAT, "prompt": "How do I bake bread?"}] * 2, r"column `prompt` holds Value\('string'\) values"),
    ],
    ids=["none", "numbers", "list-for-string", "chat-content-none", "string-prompt-chat-completions"],
)
def test_rows_of_the_wrong_type_fail_before_the_model_is_loaded_naming_column_row_and_fix(
    tokenizer, tmp_path, rows, message
):
    with pytest.raises(ValueError, match=message) as error:
        IAVTrainer(
            "no/such-model",
            args=IAVConfig(str(tmp_path), bf16=False),
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
        )
    assert "load_preference_dataset" in str(error.value)


def tool_call(name: str, arguments: dict, result: str, answer: str) -> list[dict]:
    return [
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
        },
        {"role": "tool", "name": name, "content": result},
        {"role": "assistant", "content": answer},
    ]


TOOLS = [{"type": "function", "function": {"name": "roll_dice", "parameters": {"type": "object"}}}]
TOOL_ROWS = [
    {
        "prompt": conversation(("user", f"Roll a {sides}-sided die.")),
        "chosen": tool_call("roll_dice", {"sides": sides}, "3", "You rolled a 3."),
        "rejected": conversation(("assistant", f"You rolled a {sides + 5}."))
        if sides % 2
        else tool_call("roll_dice", {"sides": sides + 1}, "9", "You rolled a 9."),
        "tools": TOOLS,
    }
    for sides in range(4, 12)
]


def test_tool_calling_preference_rows_train_as_dpotrainer_trains_them(tokenizer, tmp_path):
    # TRL's tool-call layout: assistant messages with `tool_calls` and no content, `tool` messages, a `tools` column;
    # `datasets` types such mixed messages as List(Json).
    dataset = Dataset.from_list(TOOL_ROWS, on_mixed_types="use_json")
    assert str(dataset.features["chosen"]) == "List(Json(decode=True))"
    trainer = make_trainer(tmp_path, tokenizer, train_dataset=dataset, max_steps=2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert [step for step, _ in logged(trainer)] == [1, 2]
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # The rendered prompt and completions carry the tool calls: TRL tokenized the messages whole.
    row = trainer.train_dataset[0]
    rendered = tokenizer.decode(row["prompt_ids"] + row["chosen_ids"])
    assert "roll_dice" in rendered and "<|tool|>" in rendered


def test_a_message_without_content_or_tool_calls_is_refused_naming_the_row(tokenizer, tmp_path):
    rows = [*TOOL_ROWS[:2], {**TOOL_ROWS[2], "chosen": [{"role": "assistant"}]}]
    with pytest.raises(ValueError, match=r"`train_dataset` row 2, column `chosen`: .* is not a list of chat messages"):
        make_trainer(tmp_path, tokenizer, train_dataset=Dataset.from_list(rows, on_mixed_types="use_json"))


def test_rows_of_the_eval_dataset_are_checked_too(tokenizer, tmp_path):
    bad = Dataset.from_list([GOOD_STANDARD, GOOD_STANDARD, {**GOOD_STANDARD, "prompt": None}])
    with pytest.raises(ValueError, match=r"`eval_dataset\['held_out'\]` row 2, column `prompt`: None"):
        IAVTrainer(
            "no/such-model",
            args=IAVConfig(str(tmp_path), bf16=False),
            processing_class=tokenizer,
            train_dataset=preference_data(2),
            eval_dataset={"held_out": bad},
        )


@pytest.mark.parametrize("good", [GOOD_STANDARD, GOOD_CHAT], ids=["standard", "conversational"])
def test_pairs_without_signal_are_counted_in_a_warning_and_a_dataset_of_only_those_fails(
    good, tokenizer, tmp_path, caplog
):
    empty = conversation(("assistant", "  ")) if isinstance(good["chosen"], list) else "  "
    identical = {**good, "rejected": good["chosen"]}
    rows = [good, {**good, "chosen": empty}, identical, good, identical]
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, tokenizer, train_dataset=Dataset.from_list(rows))
    assert "3 of 5 rows of `train_dataset` carry no usable preference signal" in caplog.text
    assert "empty_completion=1 (row 1), identical=2 (rows 2, 4)" in caplog.text
    with pytest.raises(ValueError, match=r"`train_dataset` has no usable preference pair: all 2 rows are malformed"):
        make_trainer(tmp_path, tokenizer, train_dataset=Dataset.from_list(rows[1:3]))


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tokenizer, tmp_path, caplog):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with caplog.at_level("WARNING", logger="iav_trl.trainer.iav_trainer"):
        trainer = make_trainer(tmp_path, no_pad, max_steps=1)
    assert "no pad token: padding with its eos token '<|end|>', as TRL does" in caplog.text
    batch = next(iter(trainer.get_train_dataloader()))
    padding = batch["input_ids"][batch["attention_mask"] == 0]
    assert padding.numel() > 0 and (padding == tokenizer.convert_tokens_to_ids("<|end|>")).all()
    trainer.train()
    assert [step for step, _ in logged(trainer)] == [1]


def test_tokenizer_without_pad_and_eos_tokens_fails_naming_the_fix(tokenizer, tmp_path):
    broken = copy.deepcopy(tokenizer)
    broken.pad_token = None
    broken.eos_token = None
    with pytest.raises(ValueError, match=r"neither a pad token nor an eos token.*tokenizer\.pad_token = "):
        make_trainer(tmp_path, broken)


def test_max_length_shorter_than_every_prompt_fails_before_training(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"Every prompt of `train_dataset` is at least max_length=4 tokens") as error:
        make_trainer(tmp_path, tokenizer, max_length=4)
    assert "truncation_mode='keep_end'" in str(error.value)


def test_rows_whose_prompt_fills_max_length_are_counted_in_a_warning(tokenizer, tmp_path, caplog):
    rows = preference_data(2).to_list() + [{**row, "prompt": row["prompt"] * 8} for row in preference_data(3)]
    with caplog.at_level("WARNING", logger="iav_trl.trainer.iav_trainer"):
        trainer = make_trainer(tmp_path, tokenizer, train_dataset=Dataset.from_list(rows), max_length=64)
    assert len(trainer.train_dataset) == 2
    assert "Dropped 3 of 5 rows of `train_dataset`" in caplog.text


def test_peft_config_of_an_unknown_type_is_refused(tokenizer, tmp_path):
    with pytest.raises(TypeError, match=r"`peft_config` must be an `AlignmentHeadConfig` or a `peft.PeftConfig`"):
        make_trainer(tmp_path, tokenizer, trainer_kwargs=dict(peft_config={"r": 8}))


# ---------------------------------------------------------------------------------------------------------------------
# No silent numerical failure


def nan_from_step(trainer, step: int, training: bool = True) -> None:
    """Make the head's output NaN in training (or evaluation) forward passes once `step` optimizer steps are done."""

    def hook(module, args, output):
        if module.training == training and trainer.state.global_step >= step:
            return output * float("nan")

    trainer.model.alignment_heads["default"].register_forward_hook(hook)


class StopAt(TrainerCallback):
    """Ends a run after `step` steps, keeping the learning-rate schedule of the full run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_nan_alignment_vector_stops_training_at_its_step_and_keeps_the_last_checkpoint(tokenizer, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=2)
    trainer = make_trainer(tmp_path / "run", tokenizer, **settings)
    nan_from_step(trainer, 3)  # the forward pass of step 4
    with pytest.raises(FloatingPointError, match=r"step 4: the gradients of alignment_heads\.default\.") as error:
        trainer.train()
    message = str(error.value)
    assert "The optimizer step was not taken" in message and "checkpoint-2, is intact" in message
    assert "learning_rate" in message and "max_grad_norm" in message and "bf16=False" in message
    assert checkpoints(tmp_path / "run") == ["checkpoint-2"]
    # The weights are those after step 3, as in a run of the same schedule stopped there.
    reference = make_trainer(tmp_path / "reference", tokenizer, trainer_kwargs=dict(callbacks=[StopAt(3)]), **settings)
    reference.train()
    for key, value in head_tensors(reference.model).items():
        torch.testing.assert_close(head_tensors(trainer.model)[key], value, rtol=0, atol=1e-6)
    # The checkpoint before the NaN loads with finite weights, and training resumes from it.
    loaded = IAVModel.from_pretrained(fresh_base(), tmp_path / "run" / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in head_tensors(loaded).values())
    resumed = make_trainer(tmp_path / "run", tokenizer, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 6


def test_nan_in_evaluation_stops_before_the_checkpoint_of_that_step(tokenizer, tmp_path):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        eval_dataset=preference_data(4, offset=1000),
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    nan_from_step(trainer, 4, training=False)
    with pytest.raises(
        FloatingPointError, match=r"step 4: logged values are NaN or inf \(.*eval_iav/alignment_norm=nan"
    ):
        trainer.train()
    assert checkpoints(tmp_path) == ["checkpoint-2"]


def test_optimizer_writing_non_finite_weights_stops_before_they_are_saved(tokenizer, tmp_path):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), SMALL)
    optimizer = torch.optim.SGD(model.alignment_heads.parameters(), lr=float("inf"))
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        model=model,
        save_strategy="steps",
        save_steps=1,
        trainer_kwargs=dict(optimizers=(optimizer, None)),
    )
    with pytest.raises(FloatingPointError, match=r"step 1: the parameters alignment_heads\.default\..* became NaN"):
        trainer.train()
    assert checkpoints(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# Atomic saves


BIG = {  # two versions of a large-ish adapter (34 MB and 24 MB), of different shapes and default strengths
    "A": (AlignmentHeadConfig(num_interventions=8, intervention_dim=1024, default_alpha=1.0), 0.25),
    "B": (AlignmentHeadConfig(num_interventions=6, intervention_dim=1000, default_alpha=2.0), -0.5),
}


def save_versions_forever(models, directory, progress):
    """The process the test kills: save A, B, A, ... into one directory, noting each completed save."""
    for version in itertools.cycle("AB"):
        models[version].save_pretrained(directory)
        with open(progress, "a") as fh:
            fh.write(version)


def loaded_version(directory) -> str:
    """Which of `BIG`'s versions `directory` loads as: config and every weight must be that version's."""
    model = IAVModel.from_pretrained(fresh_base(), directory)
    config = model.iav_config["default"]
    [version] = [v for v, (c, _) in BIG.items() if c.num_interventions == config.num_interventions]
    assert config.default_alpha == BIG[version][0].default_alpha
    value = BIG[version][1]
    assert all((t == value).all() for t in head_tensors(model).values()), "weights of another version"
    return version


def test_killing_save_pretrained_leaves_the_old_or_the_new_adapter_never_a_mix(tmp_path):
    models = {}
    for version, (config, value) in BIG.items():
        models[version] = get_iav_model(fresh_base(), config)
        with torch.no_grad():
            for param in models[version].alignment_heads.parameters():
                param.fill_(value)
    directory, progress = tmp_path / "adapter", tmp_path / "progress"
    rng = random.Random(0)
    context = multiprocessing.get_context("fork")
    on_disk = None  # the version the directory loaded as after the previous kill (None: nothing loadable yet)
    for _ in range(10):
        done_before = progress.read_text() if progress.exists() else ""
        process = context.Process(target=save_versions_forever, args=(models, directory, progress), daemon=True)
        process.start()
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        completed = (progress.read_text() if progress.exists() else "")[len(done_before) :]
        in_progress = "AB"[len(completed) % 2]
        # The last version this process saved completely (or, if none, what was on disk before it started: a save
        # can get through just before a kill that stops its progress note), or the version it was writing.
        before = completed[-1] if completed else on_disk
        if before is None:
            # Nothing was ever completely saved: a clear error, or the version being written if it got through.
            try:
                on_disk = loaded_version(directory)
                assert on_disk == in_progress
            except (FileNotFoundError, ValueError) as error:
                assert "save_pretrained" in str(error) or "neither an adapter directory" in str(error)
            continue
        on_disk = loaded_version(directory)
        assert on_disk in {before, in_progress}


def test_config_of_an_interrupted_save_loads_the_previous_adapter(tmp_path, caplog):
    old = head_with(AlignmentHeadConfig(num_interventions=3, intervention_dim=8, default_alpha=1.0), seed=0)
    new = head_with(AlignmentHeadConfig(num_interventions=2, intervention_dim=4, default_alpha=0.5), seed=1)
    old.save_pretrained(tmp_path)
    old_weights = (tmp_path / "alignment_head.safetensors").read_bytes()
    new.save_pretrained(tmp_path)
    # What a kill between the two renames leaves: the new config, the old weights.
    (tmp_path / "alignment_head.safetensors").write_bytes(old_weights)
    with caplog.at_level("WARNING", logger="iav_trl.tuners.iav.model"):
        loaded = IAVModel.from_pretrained(fresh_base(), tmp_path)
    assert "stopped before its weights were written" in caplog.text
    assert loaded.iav_config["default"].num_interventions == 3 and loaded.iav_config["default"].default_alpha == 1.0
    assert_same_tensors(head_tensors(loaded), head_tensors(old))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
        (lambda p: p.write_bytes(os.urandom(1000)), "corrupt or truncated"),
        (lambda p: p.write_bytes(b""), "corrupt or truncated"),
        (flip_last_byte, "do not match the SHA-256 digest saved with them"),
        (lambda p: (p.parent / "alignment_head_config.json").write_text('{"num_interventions": 3,'), "not valid JSON"),
        (lambda p: p.unlink(), r"No alignment_head\.safetensors in .*save_pretrained"),
    ],
    ids=["truncated", "garbage", "empty", "flipped-byte", "truncated-config", "missing"],
)
def test_corrupt_or_truncated_adapter_fails_to_load_with_a_clear_error(tmp_path, damage, message):
    head_with(SMALL, seed=0).save_pretrained(tmp_path)
    damage(tmp_path / "alignment_head.safetensors")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IAVModel.from_pretrained(fresh_base(), tmp_path)


def test_adapter_with_nan_weights_is_refused(tmp_path):
    model = head_with(SMALL, seed=0)
    with torch.no_grad():
        model.alignment_heads["default"].write.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds NaN or inf values in \['write.weight'\].*earlier checkpoint"):
        IAVModel.from_pretrained(fresh_base(), tmp_path)


def test_adapters_saved_without_digests_still_load_and_mismatched_ones_are_refused(tmp_path):
    model = head_with(SMALL, seed=0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "alignment_head_config.json").read_text())
    assert len(config.pop("weights_sha256")) == 64  # saved adapters record the SHA-256 of their weights
    weights = head_tensors(model)
    # The layout of adapters saved before digests: plain safetensors, a config without a digest.
    save_file(weights, tmp_path / "alignment_head.safetensors", metadata={"format": "pt"})
    (tmp_path / "alignment_head_config.json").write_text(json.dumps(config))
    assert_same_tensors(head_tensors(IAVModel.from_pretrained(fresh_base(), tmp_path)), weights)
    # A digest that does not match such weights, and no config stored with them: the files come from two saves.
    (tmp_path / "alignment_head_config.json").write_text(json.dumps({**config, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="come from different saves"):
        IAVModel.from_pretrained(fresh_base(), tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """A 4-step run with complete checkpoints at steps 2 and 4 (copied by each test that damages it)."""
    directory = tmp_path_factory.mktemp("finished")
    make_trainer(directory, tokenizer, save_strategy="steps", save_steps=2).train()
    return directory


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hist'), "truncated or corrupt"),
        (lambda c: (c / "optimizer.pt").unlink(), "lacks optimizer.pt"),
        (lambda c: (c / "alignment_head.safetensors").write_bytes(b"\0" * 64), "corrupt or truncated"),
    ],
    ids=["truncated-state", "missing-optimizer", "corrupt-head"],
)
def test_resume_refuses_a_damaged_checkpoint_with_a_clear_error(finished_run, tokenizer, tmp_path, damage, message):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "checkpoint-4")
    trainer = make_trainer(tmp_path, tokenizer, max_steps=6, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match=message) as error:
        trainer.train(resume_from_checkpoint=True)
    assert "checkpoint-4" in str(error.value)
    if "corrupt or truncated" not in message:
        assert "resume from" in str(error.value) and "checkpoint-2" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Safe loading


def test_pickled_adapter_is_refused_unless_allowed(tmp_path):
    model = head_with(SMALL, seed=0)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "alignment_head.safetensors")
    (tmp_path / "alignment_head.safetensors").unlink()
    torch.save(weights, tmp_path / "alignment_head.bin")
    with pytest.raises(ValueError, match=r"alignment_head\.bin is a pickle file.*safetensors only.*allow_pickle=True"):
        IAVModel.from_pretrained(fresh_base(), tmp_path)
    loaded = IAVModel.from_pretrained(fresh_base(), tmp_path, allow_pickle=True)
    assert_same_tensors(head_tensors(loaded), head_tensors(model))


class _Payload:
    """A pickle that runs code when loaded without `weights_only`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_not_run_even_when_pickles_are_allowed(tmp_path):
    head_with(SMALL, seed=0).save_pretrained(tmp_path)
    (tmp_path / "alignment_head.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"read.weight": _Payload(marker)}, tmp_path / "alignment_head.pt")
    with pytest.raises(ValueError, match=r"alignment_head\.pt cannot be read as a state dict"):
        IAVModel.from_pretrained(fresh_base(), tmp_path, allow_pickle=True)
    assert not marker.exists()


def test_remote_code_is_not_run_by_default(tokenizer, tmp_path):
    model_dir = tmp_path / "custom-model"
    fresh_base().save_pretrained(model_dir)
    marker = tmp_path / "code-ran"
    (model_dir / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(
        model_type="custom-lm", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.LM"}
    )
    (model_dir / "config.json").write_text(json.dumps(config))
    head_with(SMALL, seed=0).save_pretrained(tmp_path / "adapter")
    assert IAVConfig(str(tmp_path), bf16=False).trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        IAVModel.from_pretrained(str(model_dir), tmp_path / "adapter")
    with pytest.raises(ValueError, match="trust_remote_code"):
        make_trainer(tmp_path / "run", tokenizer, model=str(model_dir))
    assert not marker.exists()


def test_adapter_names_subfolders_and_repo_ids_cannot_escape(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded for an invalid repo id")

    monkeypatch.setattr("iav_trl.utils.hub.hf_hub_download", no_download)
    (tmp_path / "adapters").mkdir()
    model = head_with(SMALL, seed=0)
    model.save_pretrained(tmp_path / "adapters" / "one")
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.load_adapter(tmp_path / "adapters" / "one", adapter_name="../../escaped")
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter("a/b", SMALL)
    for subfolder in ("../one", "/etc", "one/../../x", "."):
        with pytest.raises(ValueError, match="Invalid subfolder"):
            IAVModel.from_pretrained(fresh_base(), tmp_path / "adapters", subfolder=subfolder)
    for repo_id in ("../../etc/passwd", "owner/name/extra", "owner/na..me", "owner/na--me", "/no/such/dir"):
        with pytest.raises(ValueError, match="neither an adapter directory nor a valid Hub repo id"):
            IAVModel.from_pretrained(fresh_base(), repo_id)
    assert os.listdir(tmp_path) == ["adapters"] and os.listdir(tmp_path / "adapters") == ["one"]


def test_an_adapter_directory_that_does_not_exist_yet_says_to_run_train_first(tmp_path, monkeypatch):
    from trl import ModelConfig

    from iav_trl.scripts.models import load_adapter_for_inference

    monkeypatch.chdir(tmp_path)  # `outputs/never-trained` is a relative path and also a valid Hub repo id
    with pytest.raises(FileNotFoundError, match=r"No adapter at 'outputs/never-trained'.*run train first"):
        load_adapter_for_inference(ModelConfig(), "outputs/never-trained")


def test_a_base_model_id_that_cannot_be_loaded_offline_is_named_in_the_error():
    from iav_trl import load_base_model

    with pytest.raises(OSError, match=r"(?s)Cannot load the base model 'me/no-such-model'.*package:<module>/<file>"):
        load_base_model("me/no-such-model")
