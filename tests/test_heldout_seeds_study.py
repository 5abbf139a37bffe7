"""The held-out seeds study (`benchmarks/heldout_seeds_study.py`) on a tiny random model and the fixtures."""

import dataclasses
import json

import pytest
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK, run_study_command

from benchmarks import heldout_seeds_study
from benchmarks.heldout_seeds_study import HeldoutSeedsConfig, seed_run, study
from benchmarks.real_data.benchmark import RealDataConfig, benchmark, load_pairs, split_pairs, write
from iav_trl.models.base_models import load_base_tokenizer


@pytest.fixture(scope="module")
def benchmark_results(tiny_model, tmp_path_factory):
    """A miniature real-data benchmark run and the path of its JSON."""
    output_dir = str(tmp_path_factory.mktemp("benchmark"))
    config = RealDataConfig(
        model=tiny_model, hh_rlhf=HH, ultrafeedback=ULTRAFEEDBACK, output_dir=output_dir, **MINIATURE
    )
    json_path, _ = write(benchmark(config, "pytest"), output_dir)
    with open(json_path) as fh:
        return json_path, json.load(fh)


def study_config(tiny_model, benchmark_results, tmp_path, **settings) -> HeldoutSeedsConfig:
    path, _ = benchmark_results
    return HeldoutSeedsConfig(
        model=tiny_model,
        hh_rlhf=HH,
        ultrafeedback=ULTRAFEEDBACK,
        output_dir=str(tmp_path),
        benchmark_results=path,
        **{**MINIATURE, **settings},
    )


def test_retraining_the_benchmarks_own_seed_gives_its_heldout_figures_back(tiny_model, benchmark_results, tmp_path):
    config = study_config(tiny_model, benchmark_results, tmp_path, seeds=[1])
    _, saved = benchmark_results
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, _ = load_pairs(HH, tokenizer, config.max_length)
    splits = split_pairs(pairs, config)
    figures = saved["datasets"]["hh_rlhf"]
    rates = {method: figures["tuning"][method]["chosen_learning_rate"] for method in ("iav", "dpo_lora")}
    run = seed_run(config, splits, rates, 0, str(tmp_path / "runs"), str(tmp_path / "features"), tokenizer)
    for ours, theirs in zip(run["heldout"]["iav"], figures["heldout"]["iav"], strict=True):
        assert ours["alpha"] == theirs["alpha"]
        assert ours["win_rate"] == pytest.approx(theirs["win_rate"], abs=1e-6)
        assert ours["margin"] == pytest.approx(theirs["margin"], abs=1e-5)
    assert run["heldout"]["dpo_lora"]["margin"] == pytest.approx(figures["heldout"]["dpo_lora"]["margin"], abs=1e-5)
    chosen = next(r for r in figures["tuning"]["iav"]["runs"] if r["learning_rate"] == rates["iav"])
    assert run["validation_accuracy"]["iav"] == pytest.approx(chosen["validation"]["accuracy"])


def test_every_seed_is_scored_and_the_bar_reads_the_means_over_seeds(tiny_model, benchmark_results, tmp_path):
    results = study(study_config(tiny_model, benchmark_results, tmp_path, seeds=[1, 2]))
    _, saved = benchmark_results
    for dataset, figures in results["datasets"].items():
        runs = figures["runs"]
        assert [(run["seed"], run["source"]) for run in runs] == [
            (0, "benchmark"),
            (1, "trained here"),
            (2, "trained here"),
        ]
        assert runs[0]["heldout"]["iav"] == saved["datasets"][dataset]["heldout"]["iav"]
        summary = figures["summary"]
        iav_1 = [run["heldout"]["iav"][2]["win_rate"] for run in runs]  # alphas 0, 0.5, 1, ...
        dpo = [run["heldout"]["dpo_lora"]["win_rate"] for run in runs]
        assert summary["iav"]["1.0"]["win_rate"] == pytest.approx(sum(iav_1) / 3)
        assert summary["dpo_lora"]["win_rate"] == pytest.approx(sum(dpo) / 3)
        check = summary["bar"]["iav_alpha_1_accuracy_at_least_dpo_lora"]
        assert check["passed"] == (sum(iav_1) >= sum(dpo) - 1e-12)
        # alpha 0 is the base model for every seed: a tie, margin exactly 0
        assert summary["iav"]["0.0"] == {"alpha": 0.0, "win_rate": 0.5, "win_rate_seed_se": 0.0, "margin": 0.0}
        # different training seeds train different heads
        assert len({run["heldout"]["iav"][2]["margin"] for run in runs}) == 3


def test_other_settings_and_missing_benchmark_results_are_refused_by_name(tiny_model, benchmark_results, tmp_path):
    config = study_config(tiny_model, benchmark_results, tmp_path, beta=0.2)
    with pytest.raises(ValueError, match=r"beta: 0\.2 here, 0\.1 there"):
        study(config)
    with pytest.raises(ValueError, match="other than `seed`"):
        dataclasses.replace(config, beta=0.1, seeds=[0, 1])
    missing = str(tmp_path / "no-such-results.json")
    with pytest.raises(FileNotFoundError, match="Run the benchmark first"):
        study(dataclasses.replace(config, beta=0.1, benchmark_results=missing))


def test_the_command_line_writes_the_figures_and_prints_the_report_it_wrote(
    tiny_model, benchmark_results, tmp_path, monkeypatch, capsys
):
    path, _ = benchmark_results
    flags = ["--model", tiny_model, "--hh_rlhf", HH, "--ultrafeedback", ULTRAFEEDBACK, "--output_dir", str(tmp_path)]
    flags += ["--benchmark_results", path, "--seeds", "3", "--isolate_training", "False"]
    for name in ("max_length", "num_train", "num_validation", "num_heldout", "batch_size", "eval_batch_size"):
        flags += [f"--{name}", str(MINIATURE[name])]
    report, figures = run_study_command(heldout_seeds_study, flags, tmp_path, monkeypatch, capsys)
    assert [run["seed"] for run in figures["datasets"]["hh_rlhf"]["runs"]] == [0, 3]
    assert "| 0 (benchmark) |" in report and "| 3 |" in report and "### UltraFeedback" in report
