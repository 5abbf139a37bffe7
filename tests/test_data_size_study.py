"""The data-size study (`benchmarks/data_size_study.py`) on a tiny random model and the fixtures."""

import dataclasses
import json

import pytest
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK, run_study_command

from benchmarks import data_size_study
from benchmarks.data_size_study import DataSizeConfig, growth_splits, study
from benchmarks.heldout_seeds_study import HeldoutSeedsConfig
from benchmarks.heldout_seeds_study import study as heldout_seeds
from benchmarks.real_data.benchmark import RealDataConfig, benchmark, load_pairs, split_pairs, write, write_report
from iav_trl.models.base_models import load_base_tokenizer

# 13 HH-RLHF fixture pairs fit 128 tokens: 8 in the splits leave 5 for the study to add.
SMALL = {**MINIATURE, "num_train": 4, "num_validation": 2, "num_heldout": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def recorded(tiny_model, tmp_path_factory):
    """A miniature benchmark run and a held-out seeds study on it (seed 1 added), as the study reads them."""
    output_dir = tmp_path_factory.mktemp("recorded")
    settings = dict(model=tiny_model, hh_rlhf=HH, ultrafeedback=ULTRAFEEDBACK, output_dir=str(output_dir), **SMALL)
    benchmark_path, _ = write(benchmark(RealDataConfig(**settings), "pytest"), str(output_dir))
    seeds = heldout_seeds(HeldoutSeedsConfig(**settings, benchmark_results=benchmark_path, seeds=[1]))
    seeds_path, _ = write_report(seeds, "", str(output_dir), "heldout_seeds_study")
    return {"benchmark_results": benchmark_path, "heldout_seeds_results": seeds_path, **settings}


def config_for(recorded, tmp_path, **settings) -> DataSizeConfig:
    return DataSizeConfig(**{**recorded, "output_dir": str(tmp_path), "extra_train": 4, "seeds": [0], **settings})


def test_the_larger_training_split_adds_unused_pairs_and_keeps_the_benchmarks_other_splits(recorded, tmp_path):
    config = config_for(recorded, tmp_path)
    pairs, _ = load_pairs(HH, load_base_tokenizer(config.model), config.max_length)
    theirs, ours = split_pairs(pairs, config), growth_splits(pairs, config)
    assert ours["validation"].to_list() == theirs["validation"].to_list()
    assert ours["heldout"].to_list() == theirs["heldout"].to_list()
    assert ours["train"].to_list()[:4] == theirs["train"].to_list()
    assert len(ours["train"]) == 8
    prompts = {json.dumps(row["prompt"]) for row in ours["train"]}
    assert len(prompts) == 8 and not prompts & {json.dumps(row["prompt"]) for row in ours["heldout"]}
    with pytest.raises(ValueError, match="Lower `extra_train` to at most 5"):
        growth_splits(pairs, dataclasses.replace(config, extra_train=6))


def test_both_sizes_are_scored_on_the_same_heldout_pairs_and_summarized_per_size(recorded, tmp_path):
    results = study(config_for(recorded, tmp_path))
    with open(recorded["heldout_seeds_results"]) as fh:
        base_size = json.load(fh)["datasets"]["hh_rlhf"]
    small, grown = results["sizes"]
    assert (small["train_pairs"], grown["train_pairs"]) == (4, 8)
    assert small["runs"] == base_size["runs"] and small["summary"] == base_size["summary"]
    assert [run["seed"] for run in grown["runs"]] == [0]
    run = grown["runs"][0]
    # alpha 0 is the base model whatever the data; seed 0 on 8 pairs trains another head than on the benchmark's 4
    assert run["heldout"]["iav"][0]["margin"] == 0.0 and run["heldout"]["iav"][0]["win_rate"] == 0.5
    assert run["heldout"]["iav"][2]["margin"] != small["runs"][0]["heldout"]["iav"][2]["margin"]
    check = grown["summary"]["bar"]["iav_alpha_1_accuracy_at_least_dpo_lora"]
    assert check["iav"] == run["heldout"]["iav"][2]["win_rate"]
    assert check["dpo_lora"] == run["heldout"]["dpo_lora"]["win_rate"]


def test_missing_or_other_heldout_seeds_results_are_refused_by_name(recorded, tmp_path):
    with open(recorded["heldout_seeds_results"]) as fh:
        other = json.load(fh)
    other["config"]["beta"] = 0.2
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"beta: 0\.1 here, 0\.2 there\)\. Pass the held-out seeds study's settings"):
        study(config_for(recorded, tmp_path, heldout_seeds_results=str(path)))
    with pytest.raises(FileNotFoundError, match="make bench-heldout-seeds"):
        study(config_for(recorded, tmp_path, heldout_seeds_results=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="`extra_train` must be a positive"):
        config_for(recorded, tmp_path, extra_train=0)


def test_the_command_line_writes_the_figures_and_prints_the_report_it_wrote(recorded, tmp_path, monkeypatch, capsys):
    flags = ["--output_dir", str(tmp_path), "--extra_train", "2", "--seeds", "3", "--isolate_training", "False"]
    for name in ("model", "hh_rlhf", "ultrafeedback", "benchmark_results", "heldout_seeds_results"):
        flags += [f"--{name}", recorded[name]]
    for name in ("max_length", "num_train", "num_validation", "num_heldout", "batch_size", "eval_batch_size"):
        flags += [f"--{name}", str(SMALL[name])]
    report, figures = run_study_command(data_size_study, flags, tmp_path, monkeypatch, capsys)
    assert [size["train_pairs"] for size in figures["sizes"]] == [4, 6]
    assert "| 6 (trained here) | 3 |" in report and "| 4 (held-out seeds study) | 1 |" in report
    # two runs at 4 pairs have a mean and a spread; one run at 6 has neither
    assert "| 4 (held-out seeds study) | **mean** |" in report and "| 6 (trained here) | **mean** |" not in report
