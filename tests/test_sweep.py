"""`lambda_kl_sweep`: several heads from one backbone pass, each trained as its own run would train it."""

import json
import os
from unittest.mock import patch

import pytest
import torch
from peft import LoraConfig
from testing_utils import HEAD, pairs
from testing_utils import make_trainer as tiny_trainer

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVModel, IAVTrainer, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.tuners.iav.readout import LogitReadout

SWEEP = [0.0, 0.5, 4.0]


def make_trainer(tokenizer, output_dir, model=None, **config):
    settings = dict(
        per_device_train_batch_size=3,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-2,
        max_grad_norm=1e-3,  # small enough to clip every step: each head must be clipped on its own
    )
    data = dict(train_dataset=pairs(12), eval_dataset=pairs(6, 50))
    return tiny_trainer(output_dir, tokenizer, model=model, **data, **{**settings, **config})


def test_each_head_of_a_sweep_trains_as_its_own_run_from_one_backbone_pass(tokenizer, tmp_path):
    sweep = make_trainer(tokenizer, tmp_path / "sweep", lambda_kl_sweep=SWEEP)
    model = sweep.model
    assert model.adapter_names == ["lambda_kl_0", "lambda_kl_1", "lambda_kl_2"]
    initial = {
        name: {k: v.clone() for k, v in model.alignment_heads[name].state_dict().items()} for name in sweep.sweep
    }
    calls = []
    model.get_base_model().base_model.register_forward_hook(lambda *args: calls.append(1))
    with patch.object(LogitReadout, "base_logits", autospec=True, side_effect=LogitReadout.base_logits) as z_base:
        sweep.train()
    assert len(calls) == 4 * 2  # one backbone pass per micro-batch, whatever the number of heads
    assert z_base.call_count == 4 * 2  # and one z_base (a single chunk of the tiny vocabulary) for all heads
    for index, value in enumerate(SWEEP):
        name = f"lambda_kl_{index}"
        single = make_trainer(tokenizer, tmp_path / name, lambda_kl=value)
        single.model.alignment_heads["default"].load_state_dict(initial[name])
        single.train()
        for key, trained in single.model.alignment_heads["default"].state_dict().items():
            torch.testing.assert_close(model.alignment_heads[name].state_dict()[key], trained, rtol=1e-5, atol=1e-7)
        sweep_losses = [e[f"{name}/iav/pref_loss"] for e in sweep.state.log_history if f"{name}/iav/pref_loss" in e]
        single_losses = [e["iav/pref_loss"] for e in single.state.log_history if "iav/pref_loss" in e]
        assert sweep_losses == pytest.approx(single_losses, rel=1e-5)
    assert not any("rewards/accuracies" in entry for entry in sweep.state.log_history)  # only per head


def test_the_readout_memory_budget_changes_speed_not_training(tokenizer, tmp_path):
    """`readout_memory_gb=0` takes the gradient projected in the forward pass, the default keeps the logits for the
    backward pass: the same losses and heads, for a single head and for a sweep's heads."""
    runs = {}
    for budget in (2.0, 0.0):
        for settings in ({"lambda_kl": 0.5}, {"lambda_kl_sweep": SWEEP}):
            torch.manual_seed(0)
            trainer = make_trainer(
                tokenizer, tmp_path / f"{budget}-{len(settings)}", readout_memory_gb=budget, **settings
            )
            trainer.train()
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            heads = {name: head.state_dict() for name, head in trainer.model.alignment_heads.items()}
            runs[budget, next(iter(settings))] = losses, heads
    for kind in ("lambda_kl", "lambda_kl_sweep"):
        (kept_losses, kept_heads), (projected_losses, projected_heads) = runs[2.0, kind], runs[0.0, kind]
        assert kept_losses == pytest.approx(projected_losses, rel=1e-5)
        for name, state in kept_heads.items():
            for key, value in state.items():
                torch.testing.assert_close(value, projected_heads[name][key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="readout_memory_gb"):
        IAVConfig(output_dir=str(tmp_path), readout_memory_gb=-1.0)


def test_the_sweep_chooses_the_best_head_on_evaluation_and_saves_every_head(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "out", lambda_kl_sweep=SWEEP, max_grad_norm=1.0)
    trainer.train()
    metrics = trainer.evaluate()
    scores = {
        name: (metrics[f"eval_{name}/rewards/accuracies"], -metrics[f"eval_{name}/iav/pref_loss"])
        for name in trainer.sweep
    }
    assert trainer.best_head == max(scores, key=scores.get)
    assert trainer.model.active_adapter == trainer.best_head
    trainer.save_model()
    with open(tmp_path / "out" / "sweep.json") as fh:
        record = json.load(fh)
    assert record["best_head"] == trainer.best_head
    assert [record["heads"][name]["lambda_kl"] for name in trainer.sweep] == SWEEP
    assert record["heads"][trainer.best_head]["eval"]["rewards/accuracies"] == scores[trainer.best_head][0]
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    for name in trainer.sweep:
        loaded = IAVModel.from_pretrained(base, str(tmp_path / "out"), adapter_name=name, subfolder=name)
        for key, value in loaded.alignment_heads[name].state_dict().items():
            assert value.equal(trainer.model.alignment_heads[name].state_dict()[key])
        loaded.unload()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lambda_kl_sweep": []}, "non-empty list"),
        ({"lambda_kl_sweep": [0.1, -1.0]}, "finite numbers >= 0"),
        ({"lambda_kl_sweep": [0.1, 1.0], "target_kl": 0.1}, "Choose one"),
        ({"lambda_kl_sweep": [0.1, 1.0], "freeze_backbone": False}, "freeze_backbone=True"),
    ],
)
def test_bad_sweeps_fail_in_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        IAVConfig(output_dir="x", **settings)


def test_a_sweep_needs_the_base_model_and_a_frozen_backbone(tokenizer, tmp_path):
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="Pass the base model"):
        make_trainer(
            tokenizer, tmp_path, model=get_iav_model(base, AlignmentHeadConfig(**HEAD)), lambda_kl_sweep=SWEEP
        )
    args = IAVConfig(output_dir=str(tmp_path), report_to=[], bf16=False, lambda_kl_sweep=SWEEP, **HEAD)
    with pytest.raises(ValueError, match="LoRA backbone"):
        IAVTrainer(
            tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            args=args,
            train_dataset=pairs(4),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, target_modules="all-linear"),
        )
    assert not os.path.exists(tmp_path / "sweep.json")
