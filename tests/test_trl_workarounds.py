"""The `DPOTrainer` behaviour that `IAVTrainer` works around (`iav_trl.trainer.trl_workarounds`), pinned against TRL
itself: if TRL changes it, these tests say which workaround to revisit."""

import pytest
import torch
from testing_utils import make_trainer, preference_data
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as dpo_trainer_module

from iav_trl import IAVModel
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.trainer.trl_workarounds import LazyReferenceBatch, reference_model_load_skipped


@pytest.fixture
def model_loads(monkeypatch, tokenizer):
    """Every call of TRL's `create_model_from_path`, answered with a tiny model."""
    calls = []

    def create_model_from_path(path, **kwargs):
        calls.append(path)
        return tiny_causal_lm("llama", vocab_size=len(tokenizer))

    monkeypatch.setattr(dpo_trainer_module, "create_model_from_path", create_model_from_path)
    return calls


def test_dpo_trainer_loads_a_reference_model_and_iav_trainer_does_not(tokenizer, tmp_path, model_loads):
    args = DPOConfig(str(tmp_path / "dpo"), report_to=[], bf16=False, use_cpu=True, max_steps=1)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    DPOTrainer(model, args=args, train_dataset=preference_data(4), processing_class=tokenizer)
    assert len(model_loads) == 1  # TRL's reference copy: what `reference_model_load_skipped` avoids
    trainer = make_trainer(tmp_path / "iav", tokenizer)
    assert len(model_loads) == 1 and trainer.ref_model is None
    assert dpo_trainer_module.create_model_from_path.__name__ == "create_model_from_path"  # the patch was undone


def test_the_reference_load_skip_is_scoped_and_undone_when_the_block_raises():
    original = dpo_trainer_module.create_model_from_path
    with pytest.raises(RuntimeError, match="inside"):
        with reference_model_load_skipped():
            assert dpo_trainer_module.create_model_from_path("any/model", dtype=torch.float32) is None
            raise RuntimeError("inside")
    assert dpo_trainer_module.create_model_from_path is original
    with reference_model_load_skipped(skip=False):
        assert dpo_trainer_module.create_model_from_path is original


def test_dpo_trainer_sets_its_fused_forward_on_the_model_and_iav_trainer_removes_it(tokenizer, tmp_path):
    args = DPOConfig(str(tmp_path / "dpo"), report_to=[], bf16=False, use_cpu=True, max_steps=1)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    reference = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    DPOTrainer(model, ref_model=reference, args=args, train_dataset=preference_data(4), processing_class=tokenizer)
    assert "forward" in vars(model)  # TRL's fused LM head, which knows nothing of alignment heads
    trainer = make_trainer(tmp_path / "iav", tokenizer)
    assert "forward" not in vars(trainer.model) and type(trainer.model).forward is IAVModel.forward


def test_dpo_trainer_reads_the_reference_after_the_policy_pass_which_gives_the_base_log_probs(
    tokenizer, tmp_path, monkeypatch
):
    """The lazy reference batch relies on TRL's order inside `compute_loss`: the policy forward first, then the
    reference entries of the batch. The entries it then holds are the base model's own log-probs of the completions."""
    trainer = make_trainer(tmp_path, tokenizer)
    events, references = [], {}
    forward, missing = IAVModel.forward, LazyReferenceBatch.__missing__

    def recording_forward(self, *args, **kwargs):
        events.append("policy forward")
        return forward(self, *args, **kwargs)

    def recording_missing(self, key):
        events.append(f"read {key}")
        value = missing(self, key)
        references.update({k: self[k] for k in ("ref_chosen_logps", "ref_rejected_logps")})
        return value

    monkeypatch.setattr(IAVModel, "forward", recording_forward)
    monkeypatch.setattr(LazyReferenceBatch, "__missing__", recording_missing)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch)
    assert events == ["policy forward", "read ref_chosen_logps"]  # one pass; the second entry was filled with it
    assert trainer.precompute_ref_logps is False  # the flag is on only inside the call

    with torch.no_grad():
        logits = trainer.model.get_base_model()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (log_probs * batch["completion_mask"][:, 1:]).sum(1)
    chosen, rejected = expected.chunk(2)
    torch.testing.assert_close(references["ref_chosen_logps"], chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(references["ref_rejected_logps"], rejected, rtol=1e-5, atol=1e-5)
