"""Cached backbone features (`IAVConfig.precompute_backbone_features`) against training that runs the backbone."""

import os

import pytest
import torch
from datasets import IterableDataset
from peft import LoraConfig
from testing_utils import HEAD, pairs
from testing_utils import make_trainer as tiny_trainer

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVTrainer, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.trainer.features import FEATURE_COLUMNS, feature_cache_bytes


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IAV_TRL_CACHE", str(tmp_path / "iav_cache"))


def make_trainer(tokenizer, output_dir, cached, train=None, eval_dataset=None, model=None, **config):
    settings = dict(
        per_device_train_batch_size=3,
        per_device_eval_batch_size=4,
        max_steps=-1,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        max_length=30,  # truncates some pairs
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=2,
        precompute_backbone_features=cached,
    )
    train = train if train is not None else pairs(12)
    data = dict(train_dataset=train, eval_dataset=eval_dataset, model=model)
    return tiny_trainer(output_dir, tokenizer, **data, **{**settings, **config})


def backbone_calls(trainer) -> list:
    calls = []
    trainer.model.get_base_model().base_model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def history(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_training_from_the_cache_equals_training_with_the_backbone(tokenizer, tmp_path):
    """3 epochs, shuffled, gradient accumulation, evaluation every 2 steps: the same losses, metrics and head."""
    evaluation = pairs(5, offset=100)
    plain = make_trainer(tokenizer, tmp_path / "plain", cached=False, eval_dataset=evaluation)
    plain.train()
    cached = make_trainer(tokenizer, tmp_path / "cached", cached=True, eval_dataset=evaluation)
    calls = backbone_calls(cached)
    cached.train()
    assert calls == []  # every step and every evaluation read the cache
    assert set(FEATURE_COLUMNS) <= set(cached.train_dataset.column_names)
    assert cached.state.global_step == plain.state.global_step == 6
    for key, count in (("loss", 6), ("eval_loss", 3), ("eval_rewards/margins", 3), ("iav/kl", 6)):
        assert len(history(plain, key)) == count, key
        assert history(cached, key) == pytest.approx(history(plain, key), rel=1e-5, abs=1e-6), key
    for name, value in plain.model.alignment_heads.state_dict().items():
        torch.testing.assert_close(cached.model.alignment_heads.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_second_run_over_the_same_data_reuses_the_cache(tokenizer, tmp_path):
    data = pairs(9)
    first = make_trainer(tokenizer, tmp_path / "a", cached=True, train=data)
    cache_dir = os.path.join(os.environ["IAV_TRL_CACHE"], "features")

    def cached_files():
        return {name for name in os.listdir(cache_dir) if name.startswith("iav-backbone-features")}

    files = cached_files()
    assert files
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))
    second = make_trainer(tokenizer, tmp_path / "b", cached=True, train=data, model=model, learning_rate=1e-2)
    assert calls == [] and cached_files() == files  # no pass, no new file
    other = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)  # other weights: other features
    make_trainer(tokenizer, tmp_path / "c", cached=True, train=data, model=other)
    assert len(cached_files()) == 2 * len(files)
    batch = second._prepare_inputs(next(iter(second.get_train_dataloader())))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    expected = first.model.scored_hidden_states(batch["input_ids"], batch["attention_mask"], labels)
    torch.testing.assert_close(batch["backbone_features"], expected, rtol=1e-5, atol=1e-6)


def test_the_cache_resumes_from_a_checkpoint_as_the_run_that_did_not_stop(tokenizer, tmp_path):
    straight = make_trainer(tokenizer, tmp_path / "a", cached=True, max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    resumed = make_trainer(tokenizer, tmp_path / "b", cached=True, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name, value in straight.model.alignment_heads.state_dict().items():
        torch.testing.assert_close(resumed.model.alignment_heads.state_dict()[name], value, rtol=0, atol=1e-6)


def test_the_backbones_dtype_is_cached_as_such_and_trains_as_without_the_cache(tokenizer, tmp_path):
    def bf16_model():
        return tiny_causal_lm("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)

    plain = make_trainer(tokenizer, tmp_path / "plain", cached=False, model=bf16_model(), max_steps=2)
    plain.train()
    cached = make_trainer(
        tokenizer, tmp_path / "cached", cached=True, model=bf16_model(), max_steps=2, backbone_features_dtype="auto"
    )
    cached.train()
    batch = cached._prepare_inputs(next(iter(cached.get_train_dataloader())))
    assert batch["backbone_features"].dtype == torch.bfloat16
    assert history(cached, "loss") == pytest.approx(history(plain, "loss"), rel=1e-5)


def test_the_cache_size_is_scored_tokens_times_hidden_size_times_bytes(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, cached=True)
    scored = 0
    for batch in trainer.get_train_dataloader():
        scored += int((batch["completion_mask"][:, 1:] != 0).sum())
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    size = feature_cache_bytes(trainer.train_dataset.select_columns(columns), 32, torch.float32, 30, "keep_start")
    assert size == scored * 32 * 4
    hidden = trainer.model.output_embeddings.weight.shape[1]
    stored = sum(len(row[c]) for row in trainer.train_dataset.select_columns(list(FEATURE_COLUMNS)) for c in row)
    assert stored == scored * hidden * 4


def _stream(data):
    return IterableDataset.from_generator(lambda: iter(data))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"peft_config": LoraConfig(r=2, target_modules="all-linear")}, "LoRA"),
        ({"ref_model": True}, "separate `ref_model`"),
        ({"stream": True}, "streaming"),
        ({"attention_dropout": 0.1}, "dropout"),
        ({"disable_dropout": False, "dropout_module": True}, "Dropout"),
    ],
)
def test_where_the_cache_cannot_apply_it_is_refused_saying_what_to_do(tokenizer, tmp_path, setting, message):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    if "attention_dropout" in setting:
        model.config.attention_dropout = setting["attention_dropout"]
    if setting.get("dropout_module"):
        model.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1))
    args = IAVConfig(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        precompute_backbone_features=True,
        disable_dropout=setting.get("disable_dropout", True),
        **HEAD,
    )
    data = pairs(4)
    kwargs = dict(args=args, processing_class=tokenizer, train_dataset=_stream(data) if "stream" in setting else data)
    if "peft_config" in setting:
        kwargs["peft_config"] = setting["peft_config"]
    if "ref_model" in setting:
        kwargs["ref_model"] = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=message) as error:
        IAVTrainer(model, **kwargs)
    assert "precompute_backbone_features=False" in str(error.value)


def test_a_trained_backbone_and_a_bad_dtype_are_refused_by_the_config():
    with pytest.raises(ValueError, match="freeze_backbone=True"):
        IAVConfig(output_dir="x", precompute_backbone_features=True, freeze_backbone=False)
    with pytest.raises(ValueError, match="backbone_features_dtype"):
        IAVConfig(output_dir="x", backbone_features_dtype="float16")


def test_features_for_other_sequences_are_refused_and_ignored_without_the_fused_head(tokenizer):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), AlignmentHeadConfig(**HEAD))
    input_ids = torch.randint(3, 100, (2, 7))
    labels = input_ids.masked_fill(torch.arange(7) < 4, -100)  # 3 scored positions per row
    features = model.scored_hidden_states(input_ids, None, labels)
    assert features.shape == (6, 32)
    outputs = model(input_ids, labels=labels, fused_lm_head=True, backbone_features=features)
    expected = model(input_ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(outputs.log_probs, expected.log_probs)
    with pytest.raises(ValueError, match="6 scored positions but 5 cached"):
        model(input_ids, labels=labels, fused_lm_head=True, backbone_features=features[:5])
    logits = model(input_ids, backbone_features=features).logits  # ignored: every position's logits need the pass
    torch.testing.assert_close(logits, model(input_ids).logits)
