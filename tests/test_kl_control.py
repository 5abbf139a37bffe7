"""The adaptive `lambda_kl` (`IAVConfig.target_kl`): PPO's proportional controller, in training and across resumes."""

import json
import math
import os

import pytest
from testing_utils import make_trainer as tiny_trainer
from testing_utils import preference_data

from iav_trl import IAVConfig
from iav_trl.trainer.kl_control import AdaptiveKLController


def make_trainer(tokenizer, output_dir, **config):
    settings = dict(per_device_train_batch_size=3, max_steps=6, learning_rate=3e-2)
    return tiny_trainer(output_dir, tokenizer, train_dataset=preference_data(18), **{**settings, **config})


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_the_controller_steps_log_lambda_kl_by_the_clipped_log_ratio():
    controller = AdaptiveKLController(value=0.5, target=0.2, horizon=4)
    expected = 0.5
    # within the clip both ways (two micro-batches averaged), beyond it both ways (0: the untrained head), on target
    for kls, error in (([0.3], math.log(1.5)), ([0.1, 0.15], math.log(0.625)), ([2.0], 1), ([0.0], -1), ([0.2], 0)):
        for kl in kls:
            controller.observe(kl)
        controller.update()
        expected *= math.exp(error / 4)
        assert controller.value == pytest.approx(expected, rel=1e-12)
    controller.update()  # nothing observed since: no change
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_lambda_kl_rises_above_the_target_falls_below_it_and_is_the_one_in_the_loss(tokenizer, tmp_path):
    for target, direction in ((1e-7, 1), (1e3, -1)):
        trainer = make_trainer(tokenizer, tmp_path / str(target), target_kl=target, lambda_kl=0.5, kl_horizon=2)
        trainer.train()
        values, kls = logged(trainer, "iav/lambda_kl"), logged(trainer, "iav/kl")
        # The first step's KL is exactly 0 (a fresh head is the base model): below any target.
        assert kls[0] == 0 and len(values) == 6
        assert values[:2] == pytest.approx([0.5, 0.5 * math.exp(-1 / 2)], rel=1e-6)
        assert all(direction * (b - a) > 0 for a, b in zip(values[1:], values[2:])), values
        assert values[-1] == pytest.approx(values[-2] * math.exp(direction / 2), rel=1e-6)
        assert trainer.kl_controller.value == pytest.approx(values[-1] * math.exp(direction / 2), rel=1e-6)
        # each step's loss used that step's lambda_kl
        for entry in (e for e in trainer.state.log_history if "loss" in e):
            parts = entry["iav/pref_loss"] + entry["iav/lambda_kl"] * entry["iav/kl"] + 0.01 * entry["iav/l2"]
            assert entry["loss"] == pytest.approx(parts, rel=1e-4)
    assert kls[-1] > 0


def test_an_adaptive_lambda_kl_resumes_where_it_was(tokenizer, tmp_path):
    settings = dict(target_kl=1e-5, lambda_kl=0.5, kl_horizon=2, save_strategy="steps", save_steps=3)
    straight = make_trainer(tokenizer, tmp_path / "a", **settings)
    straight.train()
    with open(tmp_path / "a" / "checkpoint-3" / "trainer_state.json") as fh:
        saved = json.load(fh)["stateful_callbacks"]["AdaptiveKLController"]["attributes"]["value"]
    assert saved == pytest.approx(logged(straight, "iav/lambda_kl")[3], rel=1e-9)
    resumed = make_trainer(tokenizer, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert logged(resumed, "iav/lambda_kl")[-3:] == pytest.approx(logged(straight, "iav/lambda_kl")[-3:], rel=1e-9)
    assert resumed.kl_controller.value == pytest.approx(straight.kl_controller.value, rel=1e-9)
    fixed = make_trainer(tokenizer, tmp_path / "c", max_steps=3, save_strategy="steps", save_steps=3)
    fixed.train()
    with pytest.raises(ValueError, match="fixed `lambda_kl`"):
        make_trainer(tokenizer, tmp_path / "d", **settings).train(
            resume_from_checkpoint=os.path.join(tmp_path, "c", "checkpoint-3")
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"target_kl": 0.0}, "target_kl"),
        ({"target_kl": float("nan")}, "target_kl"),
        ({"target_kl": 0.1, "kl_horizon": 0.5}, "kl_horizon"),
        ({"target_kl": 0.1, "lambda_kl": 0.0}, "lambda_kl"),
    ],
)
def test_bad_controller_settings_fail_in_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        IAVConfig(output_dir="x", **settings)
