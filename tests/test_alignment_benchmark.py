"""The ground-truth alignment benchmark (`benchmarks/alignment/benchmark.py`) in miniature, and its parts."""

import json
import math
import os
import random

import datasets
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig

from benchmarks.alignment.benchmark import BenchmarkConfig, bar_checks, kl_matched_alpha, run, tune, write
from benchmarks.alignment.methods import ReferenceFreeDPOTrainer, Trained, TrainingSettings
from benchmarks.alignment.report import markdown_table
from benchmarks.alignment.rollouts import Rollouts, decode_speed, preference_pairs
from benchmarks.alignment.task import (
    Prompt,
    all_prompts,
    corpus,
    is_well_formed,
    sample_response,
    split_prompts,
    true_reward,
)
from iav_trl.models.tiny import tiny_causal_lm, train_tokenizer

MINIATURE = dict(
    hidden_size=32,
    corpus_dialogues=320,
    pretrain_batch_size=16,
    num_validation_prompts=8,
    num_test_prompts=4,
    num_pairs=24,
    num_validation_pairs=8,
    dpo_betas=[0.1, 0.3],
    genarm_alphas=[1.0, 2.0],
    iav_learning_rates=[1e-2],
    iav_lambda_kls=[0.1, 3.0],
    dpo_learning_rates=[1e-2],
    arm_learning_rates=[3e-3, 1e-2],
    eval_samples=3,
    max_new_tokens=12,
    sample_batch_size=8,
    speed_rounds=1,
    speed_hidden_sizes=[32],
    speed_num_layers=1,
    speed_vocab_size=256,
    speed_batch_size=2,
    speed_new_tokens=4,
)


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    datasets.disable_progress_bars()
    config = BenchmarkConfig(output_dir=str(tmp_path_factory.mktemp("alignment")), **MINIATURE)
    results = run(config, TrainingSettings(max_steps=2, batch_size=4, num_interventions=2, intervention_dim=8))
    return config, results


def test_true_reward_counts_positive_minus_negative_over_all_adjectives():
    assert true_reward("the water is lovely, the boat looks warm.") == 1.0
    assert true_reward("the water is lovely, the boat is awful, the bridge is old.") == 0.0
    assert true_reward("the sand looks dull, the pier is old.") == -0.5
    assert true_reward("the sand looks dull, the pier is old, the sun is old, the shell is long.") == -0.25
    assert true_reward("") == 0.0
    assert true_reward("lovely lovely lovely") == 1.0  # a ratio: repetition does not add reward


def test_grammar_check_accepts_the_corpus_and_rejects_broken_text():
    assert is_well_formed("the water is lovely, the boat looks old.")
    assert not is_well_formed("the water is lovely the boat looks old.")  # a dropped comma
    assert not is_well_formed("the water is lovely, the boat looks old")  # no full stop
    assert not is_well_formed("the water is lovely.")  # one clause
    assert not is_well_formed("the water is lovely, the boat about old.")  # not a verb
    rng = random.Random(1)
    assert all(is_well_formed(sample_response(prompt, rng)) for prompt in all_prompts())


def test_corpus_has_every_mood_centred_on_neutral():
    rng = random.Random(0)
    prompts = all_prompts()
    rewards = [true_reward(sample_response(rng.choice(prompts), rng)) for _ in range(4000)]
    mean = sum(rewards) / len(rewards)
    assert abs(mean) < 0.03  # (1 - NEUTRAL_RATE) * (2 E[m] - 1) = 0 for m ~ Uniform(0, 1)
    assert min(rewards) == -1.0 and max(rewards) == 1.0
    assert sum(abs(r) < 0.5 for r in rewards) > 0.3 * len(rewards)


def test_prompt_split_is_disjoint_and_seeded():
    train, validation, test = split_prompts(seed=3, num_validation=40, num_test=30)
    assert len(train) + len(validation) + len(test) == len(all_prompts())
    assert not set(train) & set(test) and not set(validation) & set(test) and not set(train) & set(validation)
    assert split_prompts(seed=3, num_validation=40, num_test=30)[2] == test
    assert split_prompts(seed=4, num_validation=40, num_test=30)[2] != test
    with pytest.raises(ValueError, match="leave training prompts"):
        split_prompts(seed=0, num_validation=400, num_test=100)


def test_benchmark_config_refuses_settings_the_bar_cannot_be_read_from():
    with pytest.raises(ValueError, match="must contain `beta`"):
        BenchmarkConfig(beta=0.1, dpo_betas=[0.05, 0.3])
    with pytest.raises(ValueError, match="start at 0"):
        BenchmarkConfig(iav_alphas=[0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="must contain 1.0"):
        BenchmarkConfig(iav_alphas=[0.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="`arm_learning_rates` must not be empty"):
        BenchmarkConfig(arm_learning_rates=[])
    with pytest.raises(ValueError, match="`iav_lambda_kls` must not be empty"):
        BenchmarkConfig(iav_lambda_kls=[])
    for margin in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="`kl_budget_stderrs` must be >= 0"):
            BenchmarkConfig(kl_budget_stderrs=margin)


def _rollouts(rewards, completions):
    prompt = Prompt("describe", "river", "today")
    return Rollouts(
        prompts=[prompt] * len(rewards),
        completions=completions,
        completion_ids=[torch.tensor([1])] * len(rewards),
        rewards=torch.tensor(rewards),
        logps=torch.zeros(len(rewards)),
    )


def test_bradley_terry_labels_prefer_the_higher_reward_at_the_logistic_rate():
    n = 3000
    rollouts = _rollouts([0.5, 0.0] * n, [f"a{i}" if i % 2 == 0 else f"b{i}" for i in range(2 * n)])
    pairs = preference_pairs(rollouts, temperature=0.5, seed=0)
    assert len(pairs) == n
    wins = sum(row["chosen"][0]["content"].startswith("a") for row in pairs)
    expected = 1 / (1 + math.exp(-0.5 / 0.5))  # sigmoid((r_a - r_b) / T) = 0.731
    assert abs(wins / n - expected) < 3 * math.sqrt(expected * (1 - expected) / n)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "describe the river today"}]


def test_identical_responses_make_no_pair():
    pairs = preference_pairs(_rollouts([1.0, 1.0, 1.0, 0.0], ["x", "x", "y", "z"]), temperature=0.1, seed=0)
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "y"


def test_reference_free_trainer_loss_is_genarms_reward_model_loss(tmp_path):
    train, _, _ = split_prompts(0, 8, 8)
    dialogues = corpus(train, 64, seed=0)
    tokenizer = train_tokenizer([f"{p.text} {r}" for p, r in dialogues], vocab_size=400)
    rows = [
        {
            "prompt": dialogues[i][0].messages(),
            "chosen": [{"role": "assistant", "content": dialogues[i][1]}],
            "rejected": [{"role": "assistant", "content": dialogues[i + 1][1]}],
        }
        for i in range(0, 8, 2)
    ]
    beta = 0.7
    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, precompute_ref_log_probs=True, per_device_train_batch_size=4,
        report_to=[], bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    trainer = ReferenceFreeDPOTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    logp = (logp * inputs["completion_mask"][:, 1:]).sum(-1)  # sum_t log pi_r(y_t | x, y_<t)
    chosen, rejected = logp.chunk(2)
    expected = -F.logsigmoid(beta * (chosen - rejected)).mean()  # no reference model anywhere
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_miniature_benchmark_table_has_every_method_and_setting(miniature):
    config, results = miniature
    keys = [(row["method"], row["setting"]) for row in results["rows"]]
    assert keys == (
        [("SFT", "-")]
        + [("IAV", f"alpha={a:g}") for a in config.iav_alphas]
        + [("IAV", f"alpha={results['bar']['iav_kl_matched']['iav_alpha']:g} (KL-matched)")]
        + [("DPO", f"beta={b:g}") for b in config.dpo_betas]
        + [("GenARM", f"alpha={a:g}") for a in config.genarm_alphas]
    )
    for row in results["rows"]:
        for name in (
            "reward",
            "reward_stderr",
            "gain",
            "kl",
            "kl_stderr",
            "kl_stepwise",
            "response_tokens",
            "well_formed",
        ):
            assert math.isfinite(row[name]), (row, name)
        assert -1.0 <= row["reward"] <= 1.0
        assert row["kl_stepwise"] >= -1e-4  # a sum of per-step KLs
    tuning = results["tuning"]
    arm_grid = tuning["GenARM"]["grid"]
    assert [row["learning_rate"] for row in arm_grid] == config.arm_learning_rates
    assert (
        tuning["GenARM"]["chosen"]["learning_rate"]
        == max(arm_grid, key=lambda row: row["validation_reward"])["learning_rate"]
    )
    # IAV's budget is DPO's validation KL at its chosen learning rate; IAV searched learning rate x lambda_kl.
    dpo_lr = tuning["DPO"]["chosen"]["learning_rate"]
    dpo_kl = next(row["validation_kl"] for row in tuning["DPO"]["grid"] if row["learning_rate"] == dpo_lr)
    assert tuning["IAV"]["kl_budget"] == dpo_kl and tuning["DPO"]["kl_budget"] is None
    assert {(row["learning_rate"], row["lambda_kl"]) for row in tuning["IAV"]["grid"]} == {
        (lr, lambda_kl) for lr in config.iav_learning_rates for lambda_kl in config.iav_lambda_kls
    }
    assert {r["steps"] for r in tuning.values()} == {2}  # same optimizer steps for every method
    d, r, k = config.hidden_size, 8, 2  # the head of the fixture: 2 d r + K (r + 1)^2 parameters
    assert results["trainable_parameters"]["IAV"] == 2 * d * r + k * (r + 1) ** 2
    assert results["trainable_parameters"]["DPO"] == results["trainable_parameters"]["GenARM"]  # same LoRA
    table = markdown_table(results["rows"], results["decode_speed"]["variants"]).splitlines()
    assert len(table) == 2 + len(results["rows"]) and all(line.count("|") == 8 for line in table)


def test_iav_at_alpha_zero_samples_exactly_the_sft_model(miniature):
    _, results = miniature
    sft, iav_0 = results["_rollouts"][("SFT", "-")], results["_rollouts"][("IAV", "alpha=0")]
    assert iav_0.completions == sft.completions
    assert torch.equal(iav_0.rewards, sft.rewards)
    rows = {(row["method"], row["setting"]): row for row in results["rows"]}
    assert rows[("IAV", "alpha=0")]["reward"] == rows[("SFT", "-")]["reward"]
    assert rows[("IAV", "alpha=0")]["gain"] == 0.0
    assert abs(rows[("SFT", "-")]["kl_stepwise"]) < 1e-4 and abs(rows[("IAV", "alpha=0")]["kl"]) < 1e-3


@pytest.mark.parametrize("method", [("IAV", "alpha=1"), ("DPO", "beta=0.1"), ("GenARM", "alpha=2")])
def test_kl_is_scored_with_each_methods_exact_decoding_distribution(miniature, method):
    """Each sampled response, re-scored one at a time without padding from the method's documented formula."""
    _, results = miniature
    models, tokenizer = results["_models"], results["_tokenizer"]
    rollouts = results["_rollouts"][method]
    sft = models["sft"]
    for i in range(4):
        prompt = tokenizer.apply_chat_template(
            rollouts.prompts[i].messages(), add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt_ids, rollouts.completion_ids[i][None]], dim=1)
        with torch.no_grad():
            z_sft = sft(input_ids=ids).logits.log_softmax(-1)
            if method[0] == "IAV":
                z = models["iav"](input_ids=ids, alpha=1.0).logits
            elif method[0] == "DPO":
                z = models["dpo"][0.1](input_ids=ids).logits
            else:
                z = sft(input_ids=ids).logits + 2.0 * models["arm"](input_ids=ids).logits.log_softmax(-1)
        start, targets = prompt_ids.shape[1] - 1, rollouts.completion_ids[i]
        policy = z[0, start:-1].log_softmax(-1).gather(-1, targets[:, None]).sum()
        reference = z_sft[0, start:-1].gather(-1, targets[:, None]).sum()
        torch.testing.assert_close(rollouts.logps[i], policy, atol=2e-4, rtol=1e-5)
        torch.testing.assert_close(rollouts.ref_logps[i], reference, atol=2e-4, rtol=1e-5)
    # The check can fail: after two steps each method already moves log-probabilities by 10x the tolerance.
    assert (rollouts.logps - rollouts.ref_logps).abs().max() > 2e-3


def test_miniature_benchmark_writes_json_and_plot(miniature):
    config, results = miniature
    json_path, png_path = write(results, config.output_dir)
    with open(json_path) as fh:
        saved = json.load(fh)
    assert [row["setting"] for row in saved["rows"]] == [row["setting"] for row in results["rows"]]
    assert not any(key.startswith("_") for key in saved)
    assert os.path.getsize(png_path) > 10_000
    for name in ("SFT", "IAV", "DPO", "GenARM"):
        assert saved["decode_speed"]["variants"][name]["tokens_per_s"] > 0
    [larger] = saved["decode_speed_larger_models"]
    assert set(larger["variants"]) == {"SFT", "IAV", "GenARM"} and larger["hidden_size"] == 32
    assert {"iav_alpha_1", "iav_kl_matched", "reward_monotonic_in_alpha", "decode_speed", "passed"} <= set(
        saved["bar"]
    )
    assert {"gain_ratio", "iav_kl", "dpo_kl", "kl_no_larger", "passed"} <= set(saved["bar"]["iav_alpha_1"])
    assert set(saved["bar"]["iav_alpha_1_passed_vs_every_dpo_beta"]) == {f"{b:g}" for b in config.dpo_betas}
    assert saved["bar"]["decode_speed"]["judged_at"] in saved["bar"]["decode_speed"]["larger_models"]
    assert saved["wall_time_s"]["total"] > 0


def test_kl_matched_alpha_is_the_largest_grid_alpha_within_the_kl_budget():
    calls = []

    def validation_kl(alpha):
        calls.append(alpha)
        return 4.0 * alpha**2

    assert kl_matched_alpha(validation_kl, target=1.0, step=0.1, max_alpha=2.0) == 0.5  # 4 * 0.5^2 <= 1 < 4 * 0.6^2
    assert 0.5 in calls and 0.6 in calls  # both sides of the boundary were evaluated
    assert len(calls) <= math.ceil(math.log2(21))  # bisection of the 20-step grid, not a walk
    assert kl_matched_alpha(validation_kl, target=0.01, step=0.1, max_alpha=2.0) == 0.0
    assert kl_matched_alpha(validation_kl, target=100.0, step=0.25, max_alpha=2.0) == 2.0  # never beyond max_alpha
    for target in (0.05, 0.3, 2.0, 7.0, 15.9):  # against a plain walk over the grid
        walk = max((i / 20 for i in range(41) if 4.0 * (i / 20) ** 2 <= target), default=0.0)
        assert kl_matched_alpha(validation_kl, target=target, step=0.05, max_alpha=2.0) == walk


def _fake_run(validation_reward, validation_kl):
    return Trained(model=(validation_reward, validation_kl), validation_loss=0.5, steps=3, trainable_parameters=1)


def test_tuning_keeps_the_best_validation_reward_within_the_kl_budget():
    outcomes = {1e-3: (0.2, 0.4), 3e-3: (0.5, 0.9), 1e-2: (0.8, 2.5)}  # learning rate -> (reward, KL); stderr 0.1
    grid = [{"learning_rate": lr} for lr in outcomes]
    trained = []

    def train(learning_rate):
        trained.append(learning_rate)
        return _fake_run(*outcomes[learning_rate])

    def validate(decoder):
        reward, kl = decoder
        return {"reward": reward, "kl": kl, "kl_stderr": 0.1}

    run_, report = tune(train, lambda model: model, grid, validate)
    assert report["chosen"] == {"learning_rate": 1e-2} and run_.model == (0.8, 2.5)  # no budget: best reward
    assert trained == list(outcomes)
    run_, report = tune(train, lambda model: model, grid, validate, kl_budget=1.0)
    assert report["chosen"] == {"learning_rate": 3e-3} and report["within_budget"]  # 1e-2 spends too much KL
    assert [row["validation_kl"] for row in report["grid"]] == [0.4, 0.9, 2.5] and report["kl_budget"] == 1.0
    run_, report = tune(train, lambda model: model, grid, validate, kl_budget=1.0, kl_stderrs=2.0)
    assert report["chosen"] == {"learning_rate": 1e-3}  # 0.9 + 2 * 0.1 > 1.0: only 0.4 + 0.2 is surely within
    run_, report = tune(train, lambda model: model, grid, validate, kl_budget=0.1)
    assert report["chosen"] == {"learning_rate": 1e-3} and not report["within_budget"]  # none fits: lowest KL


def _row(method, reward, kl, **extra):
    return {"method": method, "reward": reward, "gain": reward, "kl": kl, **extra}


def _speed(sft_s, iav_s, genarm_s):
    times = {"SFT": sft_s, "IAV": iav_s, "GenARM": genarm_s}
    return {name: {"speedup_vs": {o: times[o] / times[name] for o in times if o != name}} for name in times}


def test_bar_needs_dpos_gain_at_no_larger_kl_a_rising_alpha_sweep_and_the_speedup_on_the_largest_model():
    rows = [
        _row("IAV", 0.0, 0.0, alpha=0.0),
        _row("IAV", 0.3, 0.5, alpha=1.0),
        _row("IAV", 0.6, 1.5, alpha=2.0),
        _row("IAV", 0.4, 0.9, alpha=1.5, kl_matched=True),
        _row("DPO", 0.2, 1.0, beta=0.1),
        _row("DPO", 0.1, 0.4, beta=0.3),
    ]
    larger = [
        {"parameters": 66e6, "variants": _speed(1.0, 1.0, 1.8)},
        {"parameters": 200e6, "variants": _speed(1.0, 1.01, 1.95)},
    ]
    bar = bar_checks(rows, 0.1, _speed(1.0, 1.05, 1.5), larger)
    assert bar["iav_alpha_1"]["gain_ratio"] == pytest.approx(1.5) and bar["iav_alpha_1"]["passed"]
    assert bar["iav_alpha_1_passed_vs_every_dpo_beta"] == {"0.1": True, "0.3": False}  # 0.5 nats > 0.4
    assert bar["reward_monotonic_in_alpha"]
    speed = bar["decode_speed"]
    assert speed["judged_at"] == "200M" and speed["passed"]
    assert speed["larger_models"]["66M"]["iav_vs_genarm"] == pytest.approx(1.8)
    assert speed["benchmark_size"]["ceiling_sft_vs_genarm"] == pytest.approx(1.5)
    assert bar["passed"]

    rows[1] = _row("IAV", 0.3, 1.1, alpha=1.0)  # more KL than DPO at beta 0.1
    assert not bar_checks(rows, 0.1, _speed(1.0, 1.0, 1.5), larger)["passed"]
    rows[1] = _row("IAV", 0.19, 0.5, alpha=1.0)  # 95% of DPO's gain
    assert not bar_checks(rows, 0.1, _speed(1.0, 1.0, 1.5), larger)["iav_alpha_1"]["passed"]
    rows[1] = _row("IAV", 0.7, 0.5, alpha=1.0)  # more reward at alpha 1 than at alpha 2
    assert not bar_checks(rows, 0.1, _speed(1.0, 1.0, 1.5), larger)["reward_monotonic_in_alpha"]
    rows[1] = _row("IAV", 0.3, 0.5, alpha=1.0)
    larger[1]["variants"] = _speed(1.0, 1.1, 1.95)  # GenARM only 1.77x IAV's time on the largest model
    assert not bar_checks(rows, 0.1, _speed(1.0, 1.0, 1.5), larger)["passed"]


def test_decode_speed_times_exactly_new_tokens_greedily_unless_asked_to_sample():
    calls = []

    def decoder(**kwargs):
        calls.append(kwargs)

    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    speed = decode_speed({"a": decoder, "b": decoder}, inputs, new_tokens=5, rounds=2, seed=0)
    assert len(calls) == 2 * (1 + 2)  # one warm-up call and two timed rounds per decoder
    assert all(not call["do_sample"] and call["min_new_tokens"] == call["max_new_tokens"] == 5 for call in calls)
    assert set(speed) == {"a", "b"} and set(speed["a"]["speedup_vs"]) == {"b"}
    assert speed["a"]["tokens_per_s"] == pytest.approx(2 * 5 / speed["a"]["best_s"])  # the best of the rounds
    assert speed["a"]["best_s"] <= speed["a"]["median_s"]
    assert speed["a"]["speedup_vs"]["b"] > 0  # the estimator itself: tests/test_timing.py
    calls.clear()
    decode_speed({"a": decoder}, inputs, new_tokens=5, rounds=1, seed=0, do_sample=True)
    assert all(call["do_sample"] and call["temperature"] == 1.0 and call["top_k"] == 0 for call in calls)
