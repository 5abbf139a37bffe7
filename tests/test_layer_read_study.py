"""The layer-read study (`benchmarks/layer_read_study.py`) on a tiny random model and the fixtures."""

import pytest
import torch
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK, run_study_command

from benchmarks import layer_read_study
from benchmarks.layer_read_study import (
    LayerReadConfig,
    _batch,
    backbone_features,
    build_head,
    logits,
    pair_margins,
    study,
    tokenize_pair,
)
from benchmarks.real_data.methods import load_model
from iav_trl import get_iav_model, load_preference_dataset
from iav_trl.models.base_models import load_base_tokenizer
from iav_trl.tuners.iav.head import AlignmentHead


def miniature_config(tiny_model, tmp_path, **settings) -> LayerReadConfig:
    fields = {k: v for k, v in MINIATURE.items() if k in LayerReadConfig.__dataclass_fields__}
    fields.update(num_train=4, num_validation=2, num_heldout=2, learning_rate=1e-2, seeds=[0, 1])
    fields.update(alphas=[0.5, 1.0], extra_validation=3, read_layers=["", "1"])
    fields.update(settings)
    return LayerReadConfig(
        model=tiny_model, hh_rlhf=HH, ultrafeedback=ULTRAFEEDBACK, output_dir=str(tmp_path), **fields
    )


@pytest.fixture(scope="module")
def pairs():
    return load_preference_dataset(HH).select(range(3))


def test_features_are_the_models_own_hidden_states_and_log_probs(tiny_model, pairs):
    model, tokenizer = load_model(tiny_model), load_base_tokenizer(tiny_model)
    features = backbone_features(model, tokenizer, pairs, layers=(1,))
    for row, pair in zip(pairs, features):
        ids = tokenize_pair(tokenizer, row)
        for side in ("chosen", "rejected"):
            sequence = torch.tensor([ids["prompt"] + ids[side]])
            with torch.no_grad():
                outputs = model(sequence, output_hidden_states=True)
            scored = slice(len(ids["prompt"]) - 1, sequence.shape[1] - 1)
            norm = model.model.norm(outputs.hidden_states[1][0, scored])
            torch.testing.assert_close(pair[side]["extra"][:, 0], norm)
            labels = sequence[0, len(ids["prompt"]) :]
            assert torch.equal(pair[side]["labels"], labels)
            # z_base from the stored final state is the model's own next-token distribution
            expected = outputs.logits[0, scored].log_softmax(-1).gather(-1, labels[:, None])[:, 0]
            base = (pair[side]["final"] @ model.lm_head.weight.T).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
            torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-5)


def test_the_studys_margins_are_those_of_the_same_head_decoding_through_iav_trl(tiny_model, pairs):
    model, tokenizer = load_model(tiny_model), load_base_tokenizer(tiny_model)
    features = backbone_features(model, tokenizer, pairs, layers=())
    unembedding = model.lm_head.weight.detach()
    head = build_head(unembedding.shape[1], 0, seed=0)
    torch.nn.init.normal_(head.write.weight, std=0.5)  # a non-zero offset (a fresh head's is zero)
    with torch.no_grad():
        batch = _batch(features, [])
        margins, _, _ = pair_margins(*logits(head, unembedding, batch), batch, alpha=1.5, beta=0.1)
    iav = get_iav_model(load_model(tiny_model))
    iav.alignment_heads["default"].load_state_dict(head.state_dict())
    for row, margin in zip(pairs, margins):
        ids, sums = tokenize_pair(tokenizer, row), {}
        for side in ("chosen", "rejected"):
            sequence = torch.tensor([ids["prompt"] + ids[side]])
            labels = sequence[0, len(ids["prompt"]) :, None]
            scored = slice(len(ids["prompt"]) - 1, sequence.shape[1] - 1)
            with torch.no_grad():
                aligned = iav(sequence, alpha=1.5).logits[0, scored].log_softmax(-1).gather(-1, labels)
                base = iav(sequence, alpha=0.0).logits[0, scored].log_softmax(-1).gather(-1, labels)
            sums[side] = (aligned - base).sum()
        torch.testing.assert_close(margin, 0.1 * (sums["chosen"] - sums["rejected"]), rtol=1e-4, atol=1e-5)


def test_every_variant_and_seed_is_scored_and_the_command_line_writes_what_it_prints(
    tiny_model, tmp_path, monkeypatch, capsys
):
    results = study(miniature_config(tiny_model, tmp_path))
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [
        ("last layer", 0),
        ("last layer", 1),
        ("last + 1", 0),
        ("last + 1", 1),
    ]
    wide, narrow = results["runs"][2]["trainable"], results["runs"][0]["trainable"]
    assert wide - narrow == 32 * 256  # the read's extra columns: one more hidden size, into the 256-dim subspace
    for row in results["summary"]:
        runs = [run for run in results["runs"] if run["variant"] == row["variant"]]
        mean = sum(run["validation"][1]["win_rate"] for run in runs) / len(runs)
        assert row["alphas"][1.0]["win_rate"] == pytest.approx(mean) and row["alphas"][1.0]["completion_kl"] > 0
    with pytest.raises(ValueError, match="read_layers"):
        study(miniature_config(tiny_model, tmp_path, read_layers=["2"]))  # the last layer itself, not an extra one
    with pytest.raises(ValueError, match="head_sizes"):
        study(miniature_config(tiny_model, tmp_path, head_sizes=["8by256"]))

    flags = ["--model", tiny_model, "--hh_rlhf", HH, "--output_dir", str(tmp_path), "--read_layers", "1"]
    flags += ["--num_train", "4", "--num_validation", "2", "--num_heldout", "2", "--extra_validation", "3"]
    flags += ["--max_length", "128", "--batch_size", "4", "--seeds", "0", "--alphas", "1.0", "--head_sizes", "2x16"]
    report, figures = run_study_command(layer_read_study, flags, tmp_path, monkeypatch, capsys)
    assert [run["variant"] for run in figures["runs"]] == ["last + 1, 2x16 head"]
    assert "| last + 1, 2x16 head |" in report
    small = AlignmentHead(32, num_interventions=2, intervention_dim=16)
    assert figures["runs"][0]["trainable"] == sum(p.numel() for p in small.parameters()) + 32 * 16  # + the wider read
