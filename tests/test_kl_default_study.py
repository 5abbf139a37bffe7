"""The default-`lambda_kl` study (`benchmarks/kl_default_study.py`) on a tiny random model and the fixtures."""

import pytest
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK, run_study_command

from benchmarks import kl_default_study
from benchmarks.kl_default_study import KLDefaultConfig, study, study_splits
from benchmarks.real_data.benchmark import load_pairs, split_pairs
from iav_trl.models.base_models import load_base_tokenizer


def miniature_config(tiny_model, tmp_path, **settings) -> KLDefaultConfig:
    fields = {k: v for k, v in MINIATURE.items() if k in KLDefaultConfig.__dataclass_fields__}
    fields.update(num_train=4, num_validation=2, num_heldout=2, learning_rates=[1e-2], seeds=[0, 1])
    fields.update(alphas=[0.5, 1.0], extra_validation=3, **settings)
    return KLDefaultConfig(
        model=tiny_model, hh_rlhf=HH, ultrafeedback=ULTRAFEEDBACK, output_dir=str(tmp_path), **fields
    )


def test_the_study_validates_on_pairs_the_benchmark_never_uses_and_never_on_its_heldout_pairs(tiny_model, tmp_path):
    config = miniature_config(tiny_model, tmp_path)
    pairs, _ = load_pairs(HH, load_base_tokenizer(tiny_model), config.max_length)
    benchmark, ours = split_pairs(pairs, config), study_splits(pairs, config)
    prompts = {name: {str(row["prompt"]) for row in split} for name, split in benchmark.items()}
    validation = [str(row["prompt"]) for row in ours["validation"]]
    assert len(validation) == len(benchmark["validation"]) + 3 == len(set(validation))
    assert prompts["validation"] <= set(validation) and not prompts["heldout"] & set(validation)
    assert not prompts["train"] & set(validation) and ours["train"]["prompt"] == benchmark["train"]["prompt"]


def test_every_setting_and_seed_is_scored_at_every_alpha_and_summarized_over_seeds(tiny_model, tmp_path):
    results = study(miniature_config(tiny_model, tmp_path, lambda_kls=[0.3, 1.0]))
    assert [(run["lambda_kl"], run["seed"]) for run in results["runs"]] == [(0.3, 0), (0.3, 1), (1.0, 0), (1.0, 1)]
    assert all([row["alpha"] for row in run["validation"]] == [0.5, 1.0] for run in results["runs"])
    for row in results["summary"]:
        runs = [run for run in results["runs"] if run["variant"] == row["variant"]]
        mean = sum(run["validation"][1]["win_rate"] for run in runs) / len(runs)
        assert row["seeds"] == 2 and row["alphas"][1.0]["win_rate"] == pytest.approx(mean)
        assert row["alphas"][1.0]["completion_kl"] > 0
    # different seeds train different heads: the same variant's two runs differ somewhere
    first, second = (run["validation"][1]["margin"] for run in results["runs"][:2])
    assert first != second


def test_the_command_line_writes_the_figures_and_prints_the_report_it_wrote(tiny_model, tmp_path, monkeypatch, capsys):
    config = miniature_config(tiny_model, tmp_path, lambda_kls=[1.0], seeds=[0])
    flags = ["--model", tiny_model, "--hh_rlhf", HH, "--output_dir", str(tmp_path), "--lambda_kls", "1.0"]
    for name in ("max_length", "num_train", "num_validation", "num_heldout", "batch_size", "eval_batch_size"):
        flags += [f"--{name}", str(getattr(config, name))]
    flags += ["--learning_rates", "0.01", "--seeds", "0", "--alphas", "1.0", "--extra_validation", "3"]
    report, figures = run_study_command(kl_default_study, flags, tmp_path, monkeypatch, capsys)
    assert [run["lambda_kl"] for run in figures["runs"]] == [1.0] and "| lr 0.01, lambda_kl=1 |" in report
