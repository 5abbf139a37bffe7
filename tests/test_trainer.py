"""IAVTrainer against a plain-PyTorch computation of the IAV loss, and its training behaviour."""

import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file
from testing_utils import preference_data, randomize_heads, reference_alignment
from trl import DPOConfig

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVModel, IAVTrainer
from iav_trl.models.tiny import tiny_causal_lm

HEAD = dict(num_interventions=3, intervention_dim=8)


def make_trainer(tokenizer, tmp_path, model=None, peft_config=None, **config):
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=3,
        report_to=[],
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **HEAD,
    )
    defaults.update(config)
    model = model if model is not None else tiny_causal_lm("llama", vocab_size=len(tokenizer))
    return IAVTrainer(
        model,
        args=IAVConfig(**defaults),
        train_dataset=preference_data(6),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def reference_loss(model, inputs, beta, alpha, lambda_kl, lambda_l2, loss_type):
    """L = L_pref + lambda_kl L_KL + lambda_l2 L_L2 from full logits, written from the docstrings' equations."""
    base = model.get_base_model()
    with torch.no_grad():
        out = base(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    z_base = out.logits[:, :-1]
    a = reference_alignment(model.alignment_heads["default"], out.hidden_states[-1], base.lm_head.weight)[:, :-1]
    z_final = z_base + alpha * a
    labels = inputs["input_ids"][:, 1:].unsqueeze(-1)
    mask = inputs["completion_mask"][:, 1:].float()
    logp_final, logp_base = z_final.log_softmax(-1), z_base.log_softmax(-1)
    policy = (logp_final.gather(-1, labels).squeeze(-1) * mask).sum(1)
    ref = (logp_base.gather(-1, labels).squeeze(-1) * mask).sum(1)
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        pref = -F.logsigmoid(beta * delta).mean()
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * delta).mean()
    else:  # ipo: length-normalised log-ratio differences
        lc, lr = inputs["completion_mask"].sum(1).float().chunk(2)
        pref = (((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)).pow(2).mean()
    kl = ((logp_final.exp() * (logp_final - logp_base)).sum(-1) * mask).sum() / mask.sum()
    l2 = ((alpha * a).pow(2).mean(-1) * mask).sum() / mask.sum()
    total = pref + lambda_kl * kl + lambda_l2 * l2
    rewards = dict(chosen=(beta * (pc - rc)).mean(), rejected=(beta * (pr - rr)).mean())
    return total, pref, kl, l2, rewards


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_terms_gradients_and_logged_rewards_match_plain_pytorch(tokenizer, tmp_path, loss_type):
    settings = dict(beta=0.2, alpha=1.5, lambda_kl=0.3, lambda_l2=0.05)
    trainer = make_trainer(tokenizer, tmp_path, loss_type=loss_type, **settings)
    model = trainer.model
    randomize_heads(model, std=0.3)
    inputs = first_batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.alignment_heads.named_parameters()}
    model.zero_grad()

    total, pref, kl, l2, rewards = reference_loss(model, inputs, loss_type=loss_type, **settings)
    total.backward()
    metrics = trainer._metrics["train"]
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-5)
    assert metrics["iav/pref_loss"][-1] == pytest.approx(pref.item(), rel=1e-5, abs=1e-5)
    assert metrics["iav/kl"][-1] == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)
    assert metrics["iav/l2"][-1] == pytest.approx(l2.item(), rel=1e-5, abs=1e-6)
    assert kl.item() > 1e-3 and l2.item() > 1e-3  # the regularisers are really exercised
    assert metrics["rewards/chosen"][-1] == pytest.approx(rewards["chosen"].item(), rel=1e-5, abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rewards["rejected"].item(), rel=1e-5, abs=1e-5)
    for name, param in model.alignment_heads.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6)


def test_frozen_backbone_one_forward_per_micro_batch_no_gradients_only_head_changes(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=3, gradient_accumulation_steps=2)
    model = trainer.model
    decoder = model.get_base_model().base_model
    calls = []
    decoder.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    assert len(calls) == 3 * 2  # max_steps x gradient_accumulation_steps micro-batches, one pass each
    assert not any(calls)  # the backbone ran without building a graph
    for name, param in model.named_parameters():
        if name.startswith("alignment_heads."):
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]) and param.grad is None, f"backbone {name} changed"
    assert trainer.ref_model is None


def implicit_margin(model, trainer, dataset, alpha):
    """Mean over pairs of [log pi_alpha - log pi_0](chosen) - [log pi_alpha - log pi_0](rejected)."""
    prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, "probe")
    batch = trainer._prepare_inputs(trainer.data_collator([prepared[i] for i in range(len(prepared))]))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(
            batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, alpha=alpha, fused_lm_head=True
        )
    ratio = (out.log_probs - out.ref_log_probs).sum(1)
    chosen, rejected = ratio.chunk(2)
    return (chosen - rejected).mean().item(), (chosen > rejected).float().mean().item()


def test_clear_preference_signal_is_learned_and_alpha_scales_the_reward(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, max_steps=30, learning_rate=3e-3, per_device_train_batch_size=4, beta=0.1
    )
    trainer.train_dataset = trainer._prepare_dataset(preference_data(32), tokenizer, trainer.args, "train")
    trainer.train()
    held_out = preference_data(12, offset=1000)
    metrics = trainer.evaluate(held_out)
    assert metrics["eval_rewards/accuracies"] >= 0.9
    margins = [implicit_margin(trainer.model, trainer, held_out, alpha)[0] for alpha in (0.0, 0.5, 1.0, 1.5)]
    assert margins[0] == 0.0
    assert margins[0] < margins[1] < margins[2] < margins[3], margins
    assert implicit_margin(trainer.model, trainer, held_out, 1.0)[1] >= 0.9


def test_save_model_writes_only_the_adapter_and_loads_back(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "alignment_head.safetensors" in files and "alignment_head_config.json" in files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    assert "backbone" not in files
    base = trainer.model.get_base_model()
    loaded = IAVModel.from_pretrained(base, tmp_path / "final", adapter_name="loaded")
    for key, value in trainer.model.alignment_heads["default"].state_dict().items():
        assert torch.equal(loaded.alignment_heads["loaded"].state_dict()[key], value)


def test_resume_from_checkpoint_continues_the_same_run(tokenizer, tmp_path):
    straight = make_trainer(tokenizer, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert {"alignment_head.safetensors", "optimizer.pt"} <= set(os.listdir(checkpoint))
    assert not any(f.startswith("model") for f in os.listdir(checkpoint))
    resumed = make_trainer(tokenizer, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in straight.model.alignment_heads.state_dict().items():
        torch.testing.assert_close(resumed.model.alignment_heads.state_dict()[key], value, rtol=0, atol=1e-6)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(straight)[-2:], abs=1e-6)


def test_trainer_push_to_hub_uploads_the_adapter_and_its_model_card(monkeypatch, tokenizer, tmp_path):
    uploads = []

    class FakeApi:  # huggingface_hub.HfApi at the boundary transformers' Trainer calls it
        def create_repo(self, repo_id, token=None, private=None, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            files = sorted(os.listdir(folder_path))
            card = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
            weights = load_file(os.path.join(folder_path, "alignment_head.safetensors"))
            uploads.append(dict(repo_id=repo_id, files=files, card=card, weights=weights, ignore=ignore_patterns))
            return "https://hub/commit"

    monkeypatch.setattr("transformers.trainer.hf_api", FakeApi)
    trainer = make_trainer(tokenizer, tmp_path / "iav-head", max_steps=1)
    trainer.train()
    assert trainer.push_to_hub() == "https://hub/commit"
    (upload,) = uploads
    assert upload["repo_id"] == "me/iav-head"
    assert {"alignment_head.safetensors", "alignment_head_config.json", "README.md", "tokenizer.json"} <= set(
        upload["files"]
    )
    assert not any(f.startswith("model") for f in upload["files"])  # no backbone weights
    assert "library_name: iav-trl" in upload["card"] and "IAVModel.from_pretrained" in upload["card"]
    assert "Trained with `IAVTrainer`" in upload["card"]
    for key, value in trainer.model.alignment_heads["default"].state_dict().items():
        assert torch.equal(upload["weights"][key], value)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # gpt2: the LM head is tied to the embeddings
def test_full_fine_tuning_resumes_backbone_and_head_exactly(tokenizer, tmp_path, architecture):
    def run(directory, resume=None):
        model = tiny_causal_lm(architecture, vocab_size=len(tokenizer))
        trainer = make_trainer(
            tokenizer,
            directory,
            model=model,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            freeze_backbone=False,
            learning_rate=1e-3,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert os.path.isfile(checkpoint / "backbone" / "model.safetensors")
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    fresh = tiny_causal_lm(architecture, vocab_size=len(tokenizer)).state_dict()
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=1e-6)
        if key.startswith("base_model.") and "norm" not in key and "ln_" not in key and "bias" not in key:
            assert not torch.equal(value, fresh[key[len("base_model.") :]]), f"{key} did not train"


def test_resuming_onto_another_backbone_fails_with_a_clear_error(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2, freeze_backbone=False
    )
    trainer.train()
    other = make_trainer(
        tokenizer,
        tmp_path / "b",
        model=tiny_causal_lm("llama", vocab_size=len(tokenizer), num_layers=1),
        max_steps=4,
        freeze_backbone=False,
    )
    with pytest.raises(ValueError, match="does not match the model being trained"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_lora_backbone_trains_with_the_head_against_the_untouched_base(tokenizer, tmp_path):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    reference_logits = model(torch.tensor([[5, 6, 7]])).logits
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = IAVTrainer(
        model,
        args=IAVConfig(
            str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=3,
            report_to=[],
            bf16=False,
            learning_rate=1e-2,
            **HEAD,
        ),
        train_dataset=preference_data(6),
        processing_class=tokenizer,
        peft_config=lora,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any(n.startswith("alignment_heads.") for n in changed)
    assert all("lora_" in n or n.startswith("alignment_heads.") for n in changed)
    with trainer.model.base_model.disable_adapter(), trainer.model.disable_alignment():
        torch.testing.assert_close(trainer.model(torch.tensor([[5, 6, 7]])).logits, reference_logits)
    trainer.save_model(str(tmp_path / "final"))
    assert os.path.isfile(tmp_path / "final" / "backbone" / "adapter_model.safetensors")


def test_mixture_of_experts_load_balancing_loss_is_added_when_the_router_trains(tokenizer, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(tokenizer, tmp_path, model=model, peft_config=lora)
    inputs = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    # The reference: the Mixtral model's own forward and its own load-balancing loss (LoRA starts as a no-op).
    with torch.no_grad():
        own = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_router_logits=True)
    metrics = trainer._metrics["train"]
    assert metrics["aux_loss"][-1] == pytest.approx(own.aux_loss.item(), rel=1e-5)
    without_aux = metrics["iav/pref_loss"][-1] - 0.5 * own.aux_loss.item()
    expected = without_aux + 0.5 * own.aux_loss.item() + 0.1 * metrics["iav/kl"][-1] + 0.01 * metrics["iav/l2"][-1]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert without_aux == pytest.approx(0.6931, abs=1e-3)  # a fresh head and LoRA: sigmoid DPO loss at log(2)


def test_full_fine_tuning_trains_backbone_against_a_frozen_copy(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=2, freeze_backbone=False, learning_rate=1e-3)
    weight = trainer.model.get_base_model().model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    trainer.train()
    assert not torch.equal(weight, before)
    assert trainer.ref_model is not None
    assert torch.equal(trainer.ref_model.model.layers[0].mlp.up_proj.weight, before)


def test_plain_dpo_config_and_an_explicit_head_config_are_accepted(tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
    args = DPOConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], bf16=False)
    trainer = IAVTrainer(
        model,
        args=args,
        train_dataset=preference_data(4),
        processing_class=tokenizer,
        peft_config=AlignmentHeadConfig(num_interventions=2, intervention_dim=4),
    )
    assert trainer.model.alignment_heads["default"].num_interventions == 2
    trainer.train()
    assert trainer._metrics["train"] == {} and "iav/kl" in trainer.state.log_history[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(lambda_kl=-1.0), ValueError, "lambda_kl"),
        (dict(lambda_l2=float("nan")), ValueError, "lambda_l2"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(alpha=0.0), ValueError, "non-zero"),
        (dict(intervention_dim=0), ValueError, "intervention_dim"),
    ],
)
def test_bad_iav_settings_fail_before_training(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        IAVConfig(str(tmp_path), **kwargs)


def test_incompatible_peft_configs_and_sync_ref_model_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prompt learning"):
        IAVTrainer(
            tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            args=IAVConfig(str(tmp_path), report_to=[], bf16=False, **HEAD),
            train_dataset=preference_data(4),
            processing_class=tokenizer,
            peft_config=PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        )
    with pytest.raises(ValueError, match="sync_ref_model"):
        make_trainer(tokenizer, tmp_path, sync_ref_model=True)


def test_one_seed_gives_bit_identical_initial_and_trained_heads_whatever_the_global_rng_state(tokenizer, tmp_path):
    # The head is built (randomly initialised) in `IAVTrainer.__init__`: it must come from `args.seed`, not from
    # whatever the global RNG happened to hold before the trainer was created.
    heads = []
    for disturbance in (1, 12345):
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
        torch.manual_seed(disturbance)
        torch.rand(disturbance % 97 + 1)
        trainer = make_trainer(tokenizer, tmp_path / str(disturbance), model=model, max_steps=2, learning_rate=1e-2)
        initial = {k: v.clone() for k, v in trainer.model.alignment_heads.state_dict().items()}
        trainer.train()
        heads.append((initial, trainer.model.alignment_heads.state_dict()))
    (initial_a, trained_a), (initial_b, trained_b) = heads
    assert any(v.abs().sum() > 0 for v in initial_a.values())
    for key in initial_a:
        assert torch.equal(initial_a[key], initial_b[key]), key
        assert torch.equal(trained_a[key], trained_b[key]), key
    assert any(not torch.equal(initial_a[k], trained_a[k]) for k in initial_a)  # the two steps did train the head
