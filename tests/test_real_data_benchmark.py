"""The real-data benchmark (`benchmarks/real_data/benchmark.py`) end to end on a tiny random model and the fixtures."""

import dataclasses
import json
import math
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from datasets import Dataset
from testing_utils import ALPHAS, HH, MINIATURE, ULTRAFEEDBACK

from benchmarks.alignment.benchmark import Clock, genarm_decoder, iav_decoder
from benchmarks.alignment.rollouts import SAMPLING
from benchmarks.real_data.benchmark import (
    DATASETS,
    RealDataConfig,
    StageDone,
    benchmark,
    load_pairs,
    outcomes,
    paired_bootstrap,
    rises,
    safety_prompts,
    split_pairs,
    split_sizes,
    train_grid,
    write,
)
from benchmarks.real_data.methods import (
    METHODS,
    genarm_scorer,
    iav_scorer,
    model_scorer,
    train_isolated,
    train_run,
)
from benchmarks.train_step import maxrss_mb
from iav_trl import get_iav_model, load_preference_dataset
from iav_trl.inference.iav_inference import completion_mask, decode_completions, encode_prompts
from iav_trl.models.base_models import load_base_model, load_base_tokenizer

# A run's report figures, small: KL on 2 prompts, 1 generation.
FIGURES = dict(kl_prompts=2, kl_samples=1, kl_new_tokens=4, num_generation_prompts=1, generation_new_tokens=4)


PKU_MARK = "PKU-style request: "


@pytest.fixture(scope="module")
def noncommercial(tmp_path_factory):
    """A stand-in for PKU-SafeRLHF (CC BY-NC, read from a path): TRL standard-format rows, each one marked request
    (the HH-RLHF fixture's last user turn) and two answers."""
    path = tmp_path_factory.mktemp("pku") / "safe-vs-unsafe.jsonl"
    rows = [
        {
            "prompt": PKU_MARK + row["prompt"][-1]["content"],
            "chosen": row["chosen"][-1]["content"],
            "rejected": row["rejected"][-1]["content"],
        }
        for row in load_preference_dataset(HH)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def miniature(tiny_model, tmp_path_factory, noncommercial):
    config = RealDataConfig(
        model=tiny_model,
        hh_rlhf=[HH],
        ultrafeedback=[ULTRAFEEDBACK],
        pku_saferlhf=[noncommercial],
        output_dir=str(tmp_path_factory.mktemp("results")),
        runs_dir=str(tmp_path_factory.mktemp("runs")),
        **MINIATURE,
    )
    results = benchmark(config, "pytest")
    json_path, md_path = write(results, config.output_dir)
    with open(json_path) as fh:
        saved = json.load(fh)
    with open(md_path) as fh:
        report = fh.read()
    return config, saved, report


def _numbers(value, path="results"):
    """Every number in a JSON tree, with where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_every_section_is_there_with_finite_numbers(miniature):
    config, saved, _ = miniature
    assert {"config", "environment", "model", "data", "datasets", "bar", "wall_time_s"} <= set(saved)
    assert list(saved["datasets"]) == ["hh_rlhf", "ultrafeedback", "pku_saferlhf"]  # no GPT-4-LLM path given
    for dataset in saved["datasets"]:
        figures = saved["datasets"][dataset]
        assert {"tuning", "training", "heldout", "kl", "decode_speed", "generations"} <= set(figures)
        paired, interval = figures["paired_outcomes"], figures["iav_alpha_1_minus_dpo_lora"]
        assert len(paired["iav_alpha_1"]) == len(paired["dpo_lora"]) == saved["data"][dataset]["heldout"]
        assert statistics.fmean(paired["iav_alpha_1"]) == pytest.approx(figures["heldout"]["iav"][2]["win_rate"])
        assert statistics.fmean(paired["dpo_lora"]) == pytest.approx(figures["heldout"]["dpo_lora"]["win_rate"])
        assert interval["low"] <= interval["difference"] <= interval["high"]
        assert set(figures["tuning"]) == set(figures["training"]) == set(figures["heldout"]) == set(METHODS)
        assert [row["alpha"] for row in figures["heldout"]["iav"]] == ALPHAS
        assert [row["setting"] for row in figures["kl"]] == [f"IAV alpha={a:g}" for a in ALPHAS] + [
            "DPO + LoRA",
            "GenARM alpha=1",
        ]
        assert set(figures["decode_speed"]["variants"]) == {"base", *METHODS}
        assert len(figures["generations"]) == config.num_generation_prompts
        assert all(len(entry["responses"]) == len(ALPHAS) + 2 for entry in figures["generations"])
        assert figures["training"]["dpo_lora"]["time_vs_dpo_lora"] == 1.0
    hh = saved["datasets"]["hh_rlhf"]
    assert [row["setting"] for row in hh["kl_on_ultrafeedback_prompts"]] == ["IAV alpha=1", "DPO + LoRA"]
    assert len(hh["generations_on_ultrafeedback_prompts"]) == config.num_generation_prompts
    pooled = saved["pooled"]
    assert pooled["iav_alpha_1_minus_dpo_lora"]["pairs"] == sum(saved["data"][d]["heldout"] for d in saved["datasets"])
    numbers = list(_numbers(saved))
    assert len(numbers) > 200
    assert all(math.isfinite(value) for _, value in numbers), [path for path, v in numbers if not math.isfinite(v)]


def test_the_hh_rlhf_models_answer_every_safety_prompt_at_every_setting(miniature, tiny_model):
    """IAV at each alpha and DPO + LoRA answer the held-out safety prompts; IAV at alpha 0 answers as the base model
    does greedily (`generate` with the head off), an independent reference."""
    config, saved, _ = miniature
    # The HH-RLHF fixture is harmless-base: no helpful prompts; no GPT-4-LLM path.
    assert saved["safety_prompts"] == {"hh_rlhf_harmless": 2, "pku_saferlhf": 2}
    for dataset in ("hh_rlhf", "pku_saferlhf"):
        answers = saved["datasets"][dataset]["safety_answers"]
        assert list(answers) == ["hh_rlhf_harmless", "pku_saferlhf"]
        for settings in answers.values():
            assert list(settings) == [f"IAV alpha={a:g}" for a in ALPHAS] + ["DPO + LoRA"]
            assert all(len(texts) == 2 for texts in settings.values())
    assert "safety_answers" not in saved["datasets"]["ultrafeedback"]
    settings = saved["datasets"]["hh_rlhf"]["safety_answers"]["hh_rlhf_harmless"]
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, _ = load_pairs([HH], tokenizer, config.max_length)
    prompts = [row["prompt"] for row in split_pairs(pairs, config)["heldout"]][:2]
    base = load_base_model(tiny_model).eval()
    inputs = encode_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    out = base.generate(
        **inputs, do_sample=False, max_new_tokens=3, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    new = out[:, inputs["input_ids"].shape[1] :]
    assert settings["IAV alpha=0"] == decode_completions(tokenizer, new, completion_mask(new, eos))


def test_safety_prompts_are_held_out_distinct_and_by_source(tiny_model, tmp_path):
    helpful = tmp_path / "helpful-base-test.jsonl"
    rows = [json.loads(line) for line in open(HH)]
    # Other prompts (each first request rephrased), in a file named as HH-RLHF's helpful subsets are.
    sides = ("chosen", "rejected")
    rows = [{side: row[side].replace("Human: ", "Human: Please, ", 1) for side in sides} for row in rows]
    helpful.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_base_tokenizer(tiny_model)
    config = RealDataConfig(model=tiny_model, hh_rlhf=[HH, str(helpful)], num_train=4, num_validation=8)
    config.num_heldout = 8
    pairs, _ = load_pairs(config.data_paths("hh_rlhf"), tokenizer, 128)
    assert len(pairs) >= 20
    splits = {"hh_rlhf": split_pairs(pairs, config)}
    chosen = safety_prompts(dataclasses.replace(config, safety_prompts=3), splits)
    helpful_prompts = {json.dumps(row["prompt"]) for row in load_pairs([str(helpful)], tokenizer, 128)[0]}
    assert list(chosen) == ["hh_rlhf_harmless", "hh_rlhf_helpful"]
    held_out = {json.dumps(prompt) for prompt in splits["hh_rlhf"]["heldout"]["prompt"]}
    trained = {json.dumps(prompt) for prompt in splits["hh_rlhf"]["train"]["prompt"]}
    for source, prompts in chosen.items():
        keys = [json.dumps(prompt) for prompt in prompts]
        assert 0 < len(keys) == len(set(keys)) <= 3 and set(keys) <= held_out and not set(keys) & trained
        assert all((key in helpful_prompts) == (source == "hh_rlhf_helpful") for key in keys)


def test_iav_at_alpha_zero_ties_every_pair_and_spends_no_kl(miniature):
    _, saved, report = miniature
    for dataset in saved["datasets"]:
        figures = saved["datasets"][dataset]
        alpha_0, alpha_1 = figures["heldout"]["iav"][0], figures["heldout"]["iav"][2]
        assert alpha_0["margin"] == 0.0 and alpha_0["chosen_reward"] == alpha_0["rejected_reward"] == 0.0
        assert (
            alpha_0["tie"] and alpha_0["win_rate"] == 0.5 and alpha_0["accuracy"] == 0.0
        )  # TRL counts ties as losses
        kl_0 = figures["kl"][0]
        assert kl_0["setting"] == "IAV alpha=0"
        assert kl_0["kl_per_token"] == 0.0 and kl_0["stepwise_kl_per_token"] == 0.0
        # The checks can fail: the trained head moves both.
        assert alpha_1["margin"] != 0.0 and not alpha_1["tie"]
        assert figures["kl"][2]["stepwise_kl_per_token"] > 0.0
    assert "| IAV | alpha=0 | tie (0.5) | 0.0000 |" in report


def test_every_method_trains_the_same_pairs_for_the_same_steps(miniature):
    config, saved, _ = miniature
    for dataset in saved["datasets"]:
        data = saved["data"][dataset]
        tuning = saved["datasets"][dataset]["tuning"]
        steps = {run["steps"] for report in tuning.values() for run in report["runs"]}
        assert steps == {math.ceil(data["train"] / config.batch_size)}
        assert [run["learning_rate"] for run in tuning["iav"]["runs"]] == config.iav_learning_rates
        best = max(tuning["iav"]["runs"], key=lambda run: (run["validation"]["accuracy"], -run["validation"]["loss"]))
        assert tuning["iav"]["chosen_learning_rate"] == best["learning_rate"]
        assert data["train"] + data["validation"] + data["heldout"] <= min(data["fitting"], 24)
    assert saved["data"]["hh_rlhf"]["train"] == 13 * 16 // 24  # 13 pairs fit: scaled down


def test_a_noncommercial_dataset_s_text_is_never_written(miniature):
    """PKU-SafeRLHF's prompts (CC BY-NC) are referred to by position: no request of it is in the JSON or the report."""
    _, saved, report = miniature
    assert PKU_MARK not in json.dumps(saved) and PKU_MARK not in report
    assert [entry["prompt"] for entry in saved["datasets"]["pku_saferlhf"]["generations"]] == [None, None]
    assert "Held-out prompt 0 (CC BY-NC 4.0: not quoted here)" in report
    assert saved["datasets"]["hh_rlhf"]["generations"][0]["prompt"]  # MIT data is quoted


def test_report_has_each_dataset_and_the_bar(miniature):
    _, saved, report = miniature
    for dataset in saved["datasets"]:
        assert f"### {DATASETS[dataset]}" in report
    assert "### Pooled" in report and "paired bootstrap 95% interval" in report
    assert "### Bar" in report and report.count("| PASS |") + report.count("| FAIL |") == 18
    assert isinstance(saved["bar"]["passed"], bool)
    for dataset in saved["datasets"]:
        assert len([name for name in saved["bar"][dataset] if name != "passed"]) == 5
    assert len([name for name in saved["bar"]["pooled"] if name != "passed"]) == 2


def test_pairs_fit_and_splits_are_seeded_and_disjoint(tiny_model):
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, counts = load_pairs([HH], tokenizer, 128)
    assert (
        counts["fitting"] == len(pairs) < counts["pairs"] and counts["fitting_prompts"] <= counts["distinct_prompts"]
    )
    config = RealDataConfig(num_train=6, num_validation=3, num_heldout=4)
    splits = split_pairs(pairs, config)
    assert [len(splits[name]) for name in ("train", "validation", "heldout")] == [6, 3, 4]
    prompts = [{json.dumps(row["prompt"]) for row in split} for split in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert split_pairs(pairs, config)["heldout"]["prompt"] == splits["heldout"]["prompt"]
    assert split_pairs(pairs, dataclasses.replace(config, seed=1))["heldout"]["prompt"] != splits["heldout"]["prompt"]


def test_standard_format_pairs_are_read_as_one_user_turn_and_its_answers(tiny_model, tmp_path):
    """PKU-SafeRLHF and GPT-4-LLM come in TRL's standard format (strings): a chat model reads each as a chat."""
    path = tmp_path / "standard.jsonl"
    rows = [{"prompt": f"Request {i}?", "chosen": f"Safe answer {i}.", "rejected": f"Bad answer {i}."} for i in (0, 1)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, counts = load_pairs([str(path), HH], tokenizer, 128)
    assert pairs[0] == {
        "prompt": [{"role": "user", "content": "Request 0?"}],
        "chosen": [{"role": "assistant", "content": "Safe answer 0."}],
        "rejected": [{"role": "assistant", "content": "Bad answer 0."}],
    }
    assert counts["fitting"] == len(pairs) > 2  # and the conversational file after it


def test_pairs_that_share_a_prompt_go_to_one_split():
    """PKU-SafeRLHF has several pairs per prompt: each prompt's pairs stay together, the sizes are reached."""
    rows = [
        {"prompt": f"request {p}", "chosen": f"safe {p}.{k}", "rejected": f"unsafe {p}.{k}"}
        for p in range(30)
        for k in range(1 + p % 4)
    ]
    pairs = Dataset.from_list(rows)
    splits = split_pairs(pairs, RealDataConfig(num_train=20, num_validation=8, num_heldout=10))
    prompts = {name: set(split["prompt"]) for name, split in splits.items()}
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["heldout"])
    assert not prompts["validation"] & prompts["heldout"]
    for name, size in (("train", 20), ("validation", 8), ("heldout", 10)):
        assert size <= len(splits[name]) < size + 4  # reached, by at most one prompt's pairs more
        assert all(
            sum(r["prompt"] == prompt for r in rows) == splits[name]["prompt"].count(prompt)
            for prompt in prompts[name]
        )


def test_split_sizes_cap_the_heldout_split_and_scale_down_together_when_few_pairs_fit():
    requested = {"train": 64, "validation": 24, "heldout": 48}
    assert split_sizes(500, requested) == requested
    assert split_sizes(107, requested) == {"train": 61, "validation": 22, "heldout": 22}
    assert split_sizes(107, {"train": 128, "validation": 64, "heldout": 256}) == {
        "train": 53,
        "validation": 26,
        "heldout": 26,
    }
    assert split_sizes(120, requested) == {"train": 64, "validation": 24, "heldout": 24}
    with pytest.raises(ValueError, match="too few"):
        split_sizes(2, requested)


def test_rising_means_never_falling_and_ending_higher():
    assert rises([0.5, 0.5, 0.6]) and rises([0.0, 0.1, 0.3])
    assert not rises([0.5, 0.5, 0.5]) and not rises([0.5, 0.7, 0.6])


def test_config_refuses_an_alpha_sweep_the_bar_cannot_read():
    for alphas in ([0.5, 1.0], [0.0, 2.0], [0.0, 1.0, 0.5]):
        with pytest.raises(ValueError, match="iav_alphas"):
            RealDataConfig(iav_alphas=alphas)
    with pytest.raises(ValueError, match="`dpo_learning_rates` must not be empty"):
        RealDataConfig(dpo_learning_rates=[])


def test_a_spawned_training_run_reports_its_own_time_and_memory_and_its_report_figures(tiny_model):
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, _ = load_pairs([ULTRAFEEDBACK], tokenizer, 128)
    config = RealDataConfig(model=tiny_model, max_length=128, batch_size=2, eval_batch_size=2, **FIGURES)
    splits = {"train": pairs.select(range(4)), "validation": pairs.select(range(4, 6))}
    splits["heldout"] = pairs.select(range(6, 9))
    # As for PKU-SafeRLHF (CC BY-NC 4.0): the record never quotes a held-out prompt.
    others = [row["prompt"] for row in splits["validation"]]
    prompt_sets = {"ultrafeedback": others, "safety": {"pku_saferlhf": others[:1]}}
    run = train_isolated(config, "iav", 1e-2, splits, prompt_sets, False)
    assert run["steps"] == 2 and run["train_seconds"] > 0
    assert run["abs_peak_mb"] >= run["rss_before_train_mb"] > 0
    report = run["report"]
    assert [row["alpha"] for row in report["heldout"]] == config.iav_alphas
    assert all(len(row["margins"]) == 3 for row in report["heldout"])
    assert [row["setting"] for row in report["kl"]] == [f"IAV alpha={a:g}" for a in config.iav_alphas]
    assert [row["setting"] for row in report["kl_on_ultrafeedback_prompts"]] == ["IAV alpha=1"]
    assert len(report["generations"]) == len(report["generations_on_ultrafeedback_prompts"]) == 1
    assert report["generations"][0]["prompt"] is None and len(report["generations"][0]["responses"]) == 5
    assert {setting: len(texts) for setting, texts in report["safety_answers"]["pku_saferlhf"].items()} == {
        f"IAV alpha={a:g}": 1 for a in config.iav_alphas
    }
    text = json.dumps(run)  # a record: plain JSON
    assert all(message["content"] not in text for row in splits["heldout"] for message in row["prompt"])


@pytest.mark.parametrize("method", ["dpo_lora", "genarm"])
def test_a_reloaded_adapter_is_scored_as_the_trainer_that_trained_it(tiny_model, method):
    """
    The held-out path of a run's record (adapter saved, loaded into a fresh base, scored pair by pair from
    `DPOTrainer.compute_ref_log_probs`) against the training trainer's own `evaluate()` of the same pairs: same
    rewards, and not all 0 (a reloaded DPO adapter evaluated without the base as reference is scored against a copy
    of itself, every margin exactly 0); the per-pair margins average to TRL's margin.
    """
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, _ = load_pairs([HH], tokenizer, 128)
    config = RealDataConfig(model=tiny_model, max_length=128, batch_size=4, eval_batch_size=4, **FIGURES)
    validation = pairs.select(range(8, 12))
    splits = {"train": pairs.select(range(8)), "validation": validation, "heldout": validation}
    run = train_run(config, method, 5e-2, splits)
    row = run["report"]["heldout"]
    expected = run["validation"]
    assert abs(expected["margin"]) > 1e-3
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert row[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert len(row["margins"]) == 4 and sum(row["margins"]) / 4 == pytest.approx(expected["margin"], rel=1e-4)
    assert sum(m > 0 for m in row["margins"]) / 4 == pytest.approx(expected["accuracy"])


def test_scorers_give_the_distribution_each_method_samples_from(tiny_model):
    """
    Teacher-forced scores against `generate`'s own scores, for IAV, a fine-tuned model and GenARM; every scorer's
    base log-probabilities against the base model's decoding distribution (IAV at alpha 0, where both are one).
    """
    tokenizer = load_base_tokenizer(tiny_model)
    base = load_base_model(tiny_model).eval()
    iav = get_iav_model(base).eval()
    other = load_base_model(tiny_model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero head and a perturbed copy, as after training
        for param in iav.alignment_heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    pairs, _ = load_pairs([HH], tokenizer, 128)
    inputs = encode_prompts(tokenizer, pairs["prompt"][:3])
    base_scorer = iav_scorer(iav, 0.0)
    methods = {
        "base": (iav_decoder(iav, 0.0), base_scorer),
        "IAV alpha=1": (iav_decoder(iav, 1.0), iav_scorer(iav, 1.0)),
        "fine-tuned": (other.generate, model_scorer(other, base)),
        "GenARM alpha=2": (genarm_decoder(base, other, 2.0), genarm_scorer(base, other, 2.0)),
    }
    eos, length = tokenizer.eos_token_id, inputs["input_ids"].shape[1]
    for name, (decoder, scorer) in methods.items():
        torch.manual_seed(0)
        out = decoder(
            **inputs, **SAMPLING, max_new_tokens=8, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        mask = completion_mask(out.sequences[:, length:], eos)
        full_mask = torch.cat([inputs["attention_mask"], mask], dim=1)
        logp, ref = scorer(out.sequences, full_mask, length)
        decoded = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        keep = mask.bool().unsqueeze(-1).expand_as(logp)
        torch.testing.assert_close(logp[keep], decoded[keep], atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(ref, base_scorer(out.sequences, full_mask, length)[0], atol=1e-5, rtol=1e-5)
        if name == "base":
            assert torch.equal(logp, ref)
        else:
            assert (logp - ref)[keep].abs().max() > 1e-2, name  # the comparison can fail


def _peak_after_touching(megabytes: int) -> float:
    block = bytearray(megabytes * 2**20)
    block[:: 2**12] = b"\x01" * (len(block) // 2**12)  # touch every page, so that it counts in the RSS
    return maxrss_mb()


def test_a_spawned_worker_measures_its_own_peak_memory_not_its_parents():
    """A worker started by fork + exec must not report the parent's RSS at the fork (`ru_maxrss` does)."""
    parent = bytearray(1024 * 2**20)
    parent[:: 2**12] = b"\x01" * (len(parent) // 2**12)
    assert maxrss_mb() > 1024
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child_peak = pool.submit(_peak_after_touching, 64).result()
    assert 64 < child_peak < 700, child_peak  # the worker's interpreter, torch and its 64 MB; not the parent's 1 GB


def test_default_paths_are_the_repository_s():
    """The defaults read data files a clone has (the MIT samples in `examples/data` and `benchmarks/data`) and write
    to the committed `benchmarks/results`, wherever the benchmark module sits."""
    from benchmarks.alignment.benchmark import BenchmarkConfig
    from benchmarks.serving_throughput import DATA

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = RealDataConfig()
    assert config.datasets() == ["hh_rlhf", "ultrafeedback"]
    for dataset in config.datasets():
        for path in config.data_paths(dataset):
            assert path.startswith(root + os.sep) and os.path.isfile(path)
    assert os.path.normpath(DATA) == config.data_paths("hh_rlhf")[0]
    for output_dir, committed in ((config.output_dir, "real_data_benchmark.json"),
                                  (BenchmarkConfig().output_dir, "alignment_benchmark.json")):  # fmt: skip
        assert os.path.isfile(os.path.join(output_dir, committed))


def test_the_paired_bootstrap_interval_is_the_normal_one_for_many_pairs():
    """Against the normal approximation of a mean of paired differences (sd / sqrt(n)), and its edge cases."""
    generator = torch.Generator().manual_seed(0)
    first = (torch.rand(2000, generator=generator) < 0.6).double()
    second = torch.where(torch.rand(2000, generator=generator) < 0.7, first, 1 - first)  # correlated with first
    interval = paired_bootstrap(first.tolist(), second.tolist(), 4000, seed=1)
    difference = first - second
    half_width = 1.96 * difference.std().item() / math.sqrt(len(difference))
    assert interval["difference"] == pytest.approx(difference.mean().item())
    assert interval["high"] - interval["low"] == pytest.approx(2 * half_width, rel=0.1)
    assert interval["low"] < interval["difference"] < interval["high"]
    same = paired_bootstrap([1.0, 0.0, 0.5], [1.0, 0.0, 0.5], 100, seed=0)
    assert same["difference"] == same["low"] == same["high"] == 0.0  # a paired difference: no spread at all
    assert outcomes([0.3, 0.0, -1e-9]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="the same pairs for both"):
        paired_bootstrap([1.0], [1.0, 0.0], 10, seed=0)


def test_a_finished_training_run_is_read_back_not_trained_again(tiny_model, tmp_path):
    """A second invocation with the same settings and pairs reads each run's record; other settings train anew."""
    tokenizer = load_base_tokenizer(tiny_model)
    pairs, _ = load_pairs([HH], tokenizer, 128)
    splits = {"train": pairs.select(range(4)), "validation": pairs.select(range(4, 6))}
    splits["heldout"] = pairs.select(range(6, 8))
    config = RealDataConfig(model=tiny_model, **{**MINIATURE, "iav_learning_rates": [1e-2]})

    def grid(config):
        return train_grid(config, "iav", splits, str(tmp_path), "HH-RLHF", Clock())

    first, again = grid(config), grid(config)
    assert [run["resumed"] for run in first["runs"] + again["runs"]] == [False, True]
    strip = [{k: v for k, v in run.items() if k != "resumed"} for run in first["runs"] + again["runs"]]
    assert strip[0] == strip[1] and again["report"] == first["report"]  # the same figures, time included
    (record,) = os.listdir(tmp_path)  # one small JSON record, no head kept
    assert record.startswith("iav-0.01-") and record.endswith(".json")
    other = grid(dataclasses.replace(config, seed=1))
    assert other["runs"][0]["resumed"] is False and len(os.listdir(tmp_path)) == 2
    held_out = grid(dataclasses.replace(config, kl_prompts=config.kl_prompts + 1))  # an evaluation setting
    assert held_out["runs"][0]["resumed"] is False


def test_a_second_invocation_reads_every_run_and_reports_the_same_figures(miniature):
    """What a later session does with the committed records: nothing is trained, the report's figures are equal
    (decoding speed, measured anew, aside)."""
    config, saved, _ = miniature
    again = json.loads(json.dumps(benchmark(config, "pytest")))
    for dataset, figures in again["datasets"].items():
        for report in figures["tuning"].values():
            assert all(run["resumed"] for run in report["runs"])
        first = saved["datasets"][dataset]
        for key in ("heldout", "paired_outcomes", "iav_alpha_1_minus_dpo_lora", "kl", "generations", "training"):
            assert figures[key] == first[key], key
    assert again["pooled"] == saved["pooled"]


def test_a_stage_trains_at_most_max_new_runs_the_longest_method_first(tiny_model, tmp_path):
    config = RealDataConfig(
        model=tiny_model, hh_rlhf=[HH], ultrafeedback=[ULTRAFEEDBACK], runs_dir=str(tmp_path), max_new_runs=1,
        **MINIATURE,
    )  # fmt: skip
    with pytest.raises(StageDone, match="Run the same command again"):
        benchmark(config, "pytest")
    (record,) = os.listdir(tmp_path / "hh_rlhf")
    assert record.startswith("dpo_lora-0.01-")
    with pytest.raises(ValueError, match="max_new_runs"):
        RealDataConfig(max_new_runs=-2)
