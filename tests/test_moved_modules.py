"""The module paths of iav-trl 0.1's flat layout still import (for one release), as the modules they moved to."""

import importlib
import json
import pathlib
import pickle
import re
import sys

import pytest

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVTrainer
from iav_trl.moved_modules import MOVED_MODULES, SPLIT_MODULES


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_an_old_module_path_is_the_new_module_with_a_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"`{old}` moved to `{new}`"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_split_io_module_still_holds_its_public_names(monkeypatch):
    monkeypatch.delitem(sys.modules, "iav_trl.io", raising=False)
    with pytest.warns(FutureWarning, match="`iav_trl.io` moved to"):
        io = importlib.import_module("iav_trl.io")
    from iav_trl.trainer.checkpoints import last_complete_checkpoint
    from iav_trl.utils.files import atomic_write_text
    from iav_trl.utils.hub import resolve_adapter_file

    assert io.atomic_write_text is atomic_write_text and io.resolve_adapter_file is resolve_adapter_file
    assert io.last_complete_checkpoint is last_complete_checkpoint and io.TRAINER_STATE_NAME == "trainer_state.json"


def test_old_package_level_names_of_modules_that_became_packages_still_import():
    from iav_trl.cli import COMMANDS, main  # noqa: F401
    from iav_trl.evaluation import DEFAULT_RESULTS_FILE, EvaluationConfig, IAVEvaluator  # noqa: F401
    from iav_trl.inference import (  # noqa: F401
        DEFAULT_MAX_NEW_TOKENS,
        IAVInference,
        as_prompt_list,
        completion_mask,
        decode_completions,
        encode_prompts,
        format_prompt,
        is_conversation,
        sampling_kwargs,
    )


def test_training_args_pickled_under_the_old_class_path_load(tmp_path, monkeypatch):
    """A 0.1 checkpoint's `training_args.bin` names `iav_trl.iav_config.IAVConfig`; `Trainer` unpickles it to
    resume."""
    args = IAVConfig(str(tmp_path), lambda_kl=0.3, num_interventions=3, use_cpu=True, bf16=False)
    data = pickle.dumps(args, protocol=2)  # protocol 2 names classes as text lines: "c<module>\n<name>\n"
    assert b"ciav_trl.trainer.iav_config\nIAVConfig\n" in data
    old = data.replace(b"ciav_trl.trainer.iav_config\n", b"ciav_trl.iav_config\n")
    monkeypatch.delitem(sys.modules, "iav_trl.iav_config", raising=False)
    with pytest.warns(FutureWarning):
        loaded = pickle.loads(old)
    assert type(loaded) is IAVConfig and loaded.lambda_kl == 0.3 and loaded.num_interventions == 3
    assert importlib.import_module("iav_trl.iav_trainer").IAVTrainer is IAVTrainer


def test_an_adapter_config_written_by_0_1_with_its_revision_field_loads(tmp_path):
    """0.1 wrote a `revision` field that nothing filled or read (always null); it is dropped on read."""
    config = AlignmentHeadConfig(num_interventions=2, intervention_dim=4, hidden_size=8, vocab_size=16)
    config.save_pretrained(tmp_path)
    path = tmp_path / "alignment_head_config.json"
    data = json.loads(path.read_text())
    assert "revision" not in data
    path.write_text(json.dumps({**data, "revision": None}))
    config = AlignmentHeadConfig.from_pretrained(str(tmp_path))
    assert (config.num_interventions, config.intervention_dim, config.hidden_size) == (2, 4, 8)


def test_no_module_of_the_package_or_its_benchmarks_imports_a_0_1_path():
    """The old paths are for users' code only: iav-trl itself would print the deprecation warning to its users."""
    old = sorted({*MOVED_MODULES, *SPLIT_MODULES})
    names = "|".join(re.escape(path.split(".", 1)[1]) for path in old)
    pattern = re.compile(
        rf"(from iav_trl import ({names})\b|import iav_trl\.({names})\b|from iav_trl\.({names}) import)"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("iav_trl", "benchmarks", "examples")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
