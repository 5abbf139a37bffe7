"""The fit study (`benchmarks/fit_study.py`) and the layer-read study's context reads, on a tiny random model."""

import pytest
import torch
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK, run_study_command

from benchmarks import fit_study
from benchmarks.fit_study import FitStudyConfig, parse_variant, study
from benchmarks.layer_read_study import backbone_features, tokenize_pair
from benchmarks.real_data.methods import load_model
from iav_trl import load_preference_dataset
from iav_trl.models.base_models import load_base_tokenizer


def miniature_config(tiny_model, tmp_path, **settings) -> FitStudyConfig:
    fields = {k: v for k, v in MINIATURE.items() if k in FitStudyConfig.__dataclass_fields__}
    fields.update(num_train=4, num_validation=2, num_heldout=2, learning_rate=1e-2, seeds=[0, 1])
    fields.update(alphas=[1.0], extra_validation=3, variants=["", "epochs=3", "reads=running_mean"])
    fields.update(settings)
    return FitStudyConfig(
        model=tiny_model, hh_rlhf=HH, ultrafeedback=ULTRAFEEDBACK, output_dir=str(tmp_path), **fields
    )


def test_context_reads_are_means_of_the_models_own_final_hidden_states(tiny_model):
    model, tokenizer = load_model(tiny_model), load_base_tokenizer(tiny_model)
    pairs = load_preference_dataset(HH).select(range(2))
    features = backbone_features(model, tokenizer, pairs, layers=(1,), contexts=("prompt_mean", "running_mean"))
    for row, pair in zip(pairs, features):
        ids = tokenize_pair(tokenizer, row)
        for side in ("chosen", "rejected"):
            sequence = torch.tensor([ids["prompt"] + ids[side]])
            with torch.no_grad():
                final = model(sequence, output_hidden_states=True).hidden_states[-1][0]
            prompt = len(ids["prompt"])
            extra = pair[side]["extra"]
            assert extra.shape == (sequence.shape[1] - prompt, 3, final.shape[-1])  # layer 1, then the two reads
            for i, t in enumerate(range(prompt - 1, sequence.shape[1] - 1)):
                torch.testing.assert_close(extra[i, 1], final[:prompt].mean(0))
                torch.testing.assert_close(extra[i, 2], final[: t + 1].mean(0))


def test_variants_are_trained_and_scored_on_both_splits_and_bad_ones_refused(
    tiny_model, tmp_path, monkeypatch, capsys
):
    results = study(miniature_config(tiny_model, tmp_path))
    names = ["default (1 epoch, no regularizer, reads h_t)", "epochs=3", "reads=running_mean"]
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [(n, s) for n in names for s in (0, 1)]
    default, longer, wider = (results["runs"][i] for i in (0, 2, 4))
    assert wider["trainable"] - default["trainable"] == 32 * 256  # the read's extra columns, into the subspace
    assert longer["train"] != default["train"]  # three epochs train the seed's head further
    for split, key in (("train", "train"), ("validation", "validation")):
        for row in results["summary"][split]:
            runs = [run for run in results["runs"] if run["variant"] == row["variant"]]
            mean = sum(run[key][0]["win_rate"] for run in runs) / len(runs)
            assert row["alphas"][1.0]["win_rate"] == pytest.approx(mean)
    for bad, match in (
        ("depth=3", "setting=value"),
        ("epochs=three", "must be a whole number"),
        ("reads=last", "reads"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_variant(bad)
        with pytest.raises(ValueError, match=match):
            miniature_config(tiny_model, tmp_path, variants=[bad])

    flags = ["--model", tiny_model, "--hh_rlhf", HH, "--output_dir", str(tmp_path), "--variants", "head_dropout=0.5"]
    flags += ["--num_train", "4", "--num_validation", "2", "--num_heldout", "2", "--extra_validation", "3"]
    flags += ["--max_length", "128", "--batch_size", "4", "--seeds", "0", "--alphas", "1.0"]
    report, figures = run_study_command(fit_study, flags, tmp_path, monkeypatch, capsys)
    assert [run["variant"] for run in figures["runs"]] == ["head_dropout=0.5"]
    assert "### Scored on the 4 train pairs" in report and report.count("| head_dropout=0.5 |") == 2
