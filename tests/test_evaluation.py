"""IAVEvaluator on a tiny model: each number checked against a plain recomputation from the model itself."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from testing_utils import randomize_heads
from transformers import AutoConfig, AutoModelForSequenceClassification

from iav_trl import AlignmentHeadConfig, EvaluationConfig, IAVEvaluator, IAVInference, get_iav_model
from iav_trl.evaluation.evaluator import DEFAULT_RESULTS_FILE
from iav_trl.evaluation.metrics import (
    kl_per_token,
    score_sequence_kl,
    sequence_kl_terms,
    spearman_correlation,
    win_rate,
)
from iav_trl.models.tiny import tiny_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "How do I bake bread?",
    "Tell me a joke.",
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ],
]
HEAD = AlignmentHeadConfig(num_interventions=2, intervention_dim=8)


def tiny_iav(vocab_size=400, seed=0):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=vocab_size), HEAD)
    randomize_heads(model, seed=seed, std=1.0)
    return model.eval()


def small_config(**overrides):
    settings = dict(
        alphas=[0.0, 1.0, 2.0],
        max_new_tokens=6,
        num_samples=2,
        batch_size=4,
        efficiency_rounds=2,
        efficiency_warmup=0,
        show_progress=False,
    )
    return EvaluationConfig(**{**settings, **overrides})


def length_reward(prompts, completions):
    """A programmatic reward: the number of characters of the response."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def evaluated(tokenizer):
    """One evaluator run through every evaluation, shared by the output tests."""
    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config())
    evaluator.evaluate_performance(PROMPTS, reward_fn=length_reward)
    evaluator.evaluate_efficiency(PROMPTS[:2])
    evaluator.evaluate_controllability(PROMPTS, reward_fn=length_reward)
    evaluator.analyze_alignment_vectors(PROMPTS[:2])
    return evaluator


# -- the sequence-level KL --------------------------------------------------------------------------------------------


def exact_log_probs(model, sequences, prompt_length, alpha, temperature):
    """log p(y) of each completion from two plain full forwards: the model at alpha, and the bare base model."""
    with torch.no_grad():
        z_final = model(sequences, alpha=alpha).logits[:, prompt_length - 1 : -1] / temperature
        z_base = model.get_base_model()(sequences).logits[:, prompt_length - 1 : -1] / temperature
    targets = sequences[:, prompt_length:, None]
    log_final = torch.log_softmax(z_final.double(), -1).gather(-1, targets).squeeze(-1).sum(-1)
    log_base = torch.log_softmax(z_base.double(), -1).gather(-1, targets).squeeze(-1).sum(-1)
    return log_final, log_base


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_kl_estimates_match_exact_enumeration_over_all_responses(temperature):
    vocab, length, alpha = 8, 3, 1.5
    model = tiny_iav(vocab_size=vocab)
    prompt = torch.tensor([[1, 4, 2]])
    responses = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # all 512 responses
    sequences = torch.cat([prompt.expand(len(responses), -1), responses], dim=1)
    log_final, log_base = exact_log_probs(model, sequences, 3, alpha, temperature)
    p_final = log_final.exp()
    assert p_final.sum().item() == pytest.approx(1.0, abs=1e-6)
    exact_kl = (p_final * (log_final - log_base)).sum().item()
    assert exact_kl > 0.05

    terms = score_sequence_kl(model, sequences, torch.ones_like(sequences), 3, alpha, temperature)
    torch.testing.assert_close(terms["log_ratio"].double(), log_final - log_base, atol=1e-4, rtol=1e-4)
    # The stepwise estimator is unbiased: its expectation under p_alpha is the exact KL.
    assert (p_final * terms["stepwise_kl"].double()).sum().item() == pytest.approx(exact_kl, rel=1e-4)

    # Monte Carlo: samples drawn by generate at the same temperature, scored by the log-ratio estimator.
    model.generation_config.eos_token_id = None
    torch.manual_seed(0)
    samples = model.generate(
        input_ids=prompt.expand(4000, -1),
        alpha=alpha,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=length,
        pad_token_id=0,
    )
    estimate = score_sequence_kl(model, samples, torch.ones_like(samples), 3, alpha, temperature)["log_ratio"]
    stderr = estimate.std().item() / math.sqrt(len(estimate))
    assert abs(estimate.mean().item() - exact_kl) < 4 * stderr


def test_sequence_kl_ignores_padding_and_tokens_after_eos():
    model = tiny_iav(vocab_size=16)
    full = torch.tensor([[1, 5, 7, 9, 6, 3, 3]])  # prompt [1, 5, 7], response [9, 6] then padding after EOS 6
    padded = torch.tensor([[0, 0, 1, 5, 7, 9, 6, 3, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]])
    terms = score_sequence_kl(model, padded, mask, 5, 1.0)
    log_final, log_base = exact_log_probs(model, full[:, :5], 3, 1.0, 1.0)
    assert terms["length"].item() == 2
    assert terms["log_ratio"].item() == pytest.approx((log_final - log_base).item(), abs=1e-4)


# -- evaluate_performance ---------------------------------------------------------------------------------------------


def hand_win_rate(candidate, reference):
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(candidate, reference)) / len(candidate)


def test_evaluate_performance_with_a_reward_function(tokenizer):
    seen = []

    def reward_fn(prompts, completions):
        seen.extend(zip(prompts, completions))
        return length_reward(prompts, completions)

    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(alphas=[1.0, 2.0]))
    result = evaluator.evaluate_performance(PROMPTS, reward_fn=reward_fn)
    assert result["alphas"] == [0.0, 1.0, 2.0], "alpha 0, the reference, is always evaluated"
    assert len(seen) == 3 * len(PROMPTS) * 2 and all(p in PROMPTS and isinstance(c, str) for p, c in seen)
    by_alpha = {
        alpha: [len(c) for item in evaluator.generations[alpha] for c in item["completions"]]
        for alpha in result["alphas"]
    }
    for k, alpha in enumerate(result["alphas"]):
        assert len(by_alpha[alpha]) == len(PROMPTS) * 2
        assert result["reward_mean"][k] == pytest.approx(sum(by_alpha[alpha]) / len(by_alpha[alpha]))
        assert result["win_rate_vs_base"][k] == pytest.approx(hand_win_rate(by_alpha[alpha], by_alpha[0.0]))
    assert result["kl"][0] == 0.0 and result["kl_stepwise"][0] == 0.0, "alpha 0 is the base model"
    assert result["kl_stepwise"][2] > result["kl_stepwise"][1] > 0
    assert evaluator.results["performance"] is result


def test_each_response_is_decoded_at_its_own_alpha(tokenizer):
    # At a temperature near 0 sampling is greedy, so each sample must equal a separate greedy call at its alpha.
    model = tiny_iav()
    evaluator = IAVEvaluator(model, tokenizer, small_config(alphas=[0.5, 1.0, 2.0], temperature=1e-3, batch_size=3))
    evaluator.evaluate_performance(PROMPTS, reward_fn=length_reward)
    helper = IAVInference(model, tokenizer)
    for alpha, items in evaluator.generations.items():
        for prompt, item in zip(PROMPTS, items):
            expected = helper.generate(prompt, alpha=alpha, max_new_tokens=6)
            assert item["completions"] == [expected, expected], (alpha, prompt)


def test_evaluate_performance_with_a_sequence_classification_reward_model(tokenizer):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=400,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_config(config).eval()
    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(alphas=[0.0, 1.0], num_samples=1, temperature=0.0))
    result = evaluator.evaluate_performance(PROMPTS, reward_model=reward_model)
    for k, alpha in enumerate(result["alphas"]):
        scores = []
        for item in evaluator.generations[alpha]:
            prompt = item["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages.append({"role": "assistant", "content": item["completions"][0]})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                scores.append(reward_model(ids).logits[0, 0].item())  # one unpadded row at a time
        assert result["reward_mean"][k] == pytest.approx(sum(scores) / len(scores), abs=1e-5)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, -1.0]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)


# -- evaluate_controllability -----------------------------------------------------------------------------------------


def test_spearman_correlation_matches_a_hand_computation_with_ties():
    # Ranks of y = [1, 3, 2, 2, 5] are [1, 4, 2.5, 2.5, 5]; Pearson of the ranks: 6.5 / sqrt(10 * 9.5).
    assert spearman_correlation([0.0, 0.5, 1.0, 1.5, 2.0], [1, 3, 2, 2, 5]) == pytest.approx(6.5 / math.sqrt(95))
    assert spearman_correlation([0, 1, 2], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman_correlation([0, 1, 2], [1, 1, 1]))


def test_evaluate_controllability_reports_the_refusal_rate_per_alpha(tokenizer):
    def refusal_fn(prompts, completions):
        return [len(c) % 2 == 0 for c in completions]  # a stand-in classifier

    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(alphas=[0.0, 0.5, 1.0, 2.0]))
    result = evaluator.evaluate_controllability(PROMPTS, refusal_fn=refusal_fn)
    assert result["metric"] == "refusal_rate"
    rates = []
    for alpha in result["alphas"]:
        flags = [len(c) % 2 == 0 for item in evaluator.generations[alpha] for c in item["completions"]]
        rates.append(sum(flags) / len(flags))
    assert result["values"] == pytest.approx(rates)
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.spearmanr(result["alphas"], rates).statistic
    if math.isnan(expected):
        assert math.isnan(result["spearman"])
    else:
        assert result["spearman"] == pytest.approx(expected)
    direction = -1 if result["spearman"] < 0 else 1
    steps = [direction * (b - a) >= 0 for a, b in zip(rates, rates[1:])]
    assert result["monotonic"] == all(steps)
    assert result["monotonic_fraction"] == pytest.approx(sum(steps) / len(steps))


# -- analyze_alignment_vectors ----------------------------------------------------------------------------------------


def test_alignment_vector_statistics_match_a_plain_recomputation_with_two_heads(tokenizer):
    model = tiny_iav()
    model.add_adapter("other", HEAD)
    randomize_heads(model, seed=1, std=1.0)  # both heads, fresh random weights
    evaluator = IAVEvaluator(model, tokenizer, small_config(temperature=0.0, num_samples=1, top_tokens=3))
    prompts = ["How do I bake bread?", "Tell me a joke, please, a long one."]
    result = evaluator.analyze_alignment_vectors(prompts)
    # Reference: each prompt alone (no padding), greedy at alpha 1; a_t = logits with that head alone - base logits.
    vectors = {"default": [], "other": []}
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(input_ids=ids, alpha=1.0, max_new_tokens=6, do_sample=False, pad_token_id=0)
        response = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in response:
            response = response[: response.index(tokenizer.eos_token_id) + 1]
        sequence = torch.cat([ids, torch.tensor([response])], dim=1)
        with torch.no_grad():
            base = model.get_base_model()(sequence).logits[0]
            for name in vectors:
                logits = model(sequence, alpha={name: 1.0}).logits[0]
                vectors[name].append((logits - base)[ids.shape[1] - 1 : -1])
    vectors = {name: torch.cat(parts) for name, parts in vectors.items()}
    for name, a in vectors.items():
        head = result["heads"][name]
        norms = a.norm(dim=-1)
        assert head["num_tokens"] == a.shape[0]
        assert head["norm_mean"] == pytest.approx(norms.mean().item(), rel=1e-4)
        assert head["norm_max"] == pytest.approx(norms.max().item(), rel=1e-4)
        spectrum = head["spectrum"]
        assert spectrum["total_energy"] == pytest.approx(norms.pow(2).sum().item(), rel=1e-4)
        assert sum(s**2 for s in spectrum["singular_values"]) == pytest.approx(spectrum["total_energy"], rel=1e-6)
        assert sum(spectrum["energy_fraction"]) == pytest.approx(1.0)
        top = a.mean(0).topk(3).indices.tolist()
        assert [t for t, _ in head["promoted"]] == [tokenizer.decode([i]) for i in top]
        bottom = (-a.mean(0)).topk(3).indices.tolist()
        assert [t for t, _ in head["suppressed"]] == [tokenizer.decode([i]) for i in bottom]
    cosine = F.cosine_similarity(vectors["default"], vectors["other"], dim=-1).mean().item()
    assert result["cosine_similarity"]["default"]["other"] == pytest.approx(cosine, abs=1e-5)
    assert result["cosine_similarity"]["other"]["default"] == pytest.approx(cosine, abs=1e-5)
    assert result["cosine_similarity"]["default"]["default"] == pytest.approx(1.0, abs=1e-5)
    mean_cosine = F.cosine_similarity(vectors["default"].mean(0), vectors["other"].mean(0), dim=0).item()
    assert result["mean_vector_cosine"]["default"]["other"] == pytest.approx(mean_cosine, abs=1e-5)


# -- evaluate_efficiency ----------------------------------------------------------------------------------------------


def test_efficiency_compares_base_iav_and_genarm_on_the_same_tokens(tokenizer):
    model = tiny_iav()
    genarm_model = tiny_causal_lm("llama", vocab_size=400, seed=3).eval()
    calls = []
    genarm_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    evaluator = IAVEvaluator(model, tokenizer, small_config(max_new_tokens=5, batch_size=2, efficiency_rounds=3))
    prompts = PROMPTS  # 3 prompts -> batches of 2 and 1
    result = evaluator.evaluate_efficiency(prompts, genarm_model=genarm_model)
    methods = result["methods"]
    assert all(methods[m]["new_tokens_per_row"] == 5 for m in ("base", "iav", "genarm"))
    # The reward LM runs once per token with its own cache: the prompt, then one new token per step.
    runs = 1 + 3  # the memory pass and three timed rounds, over 2 batches each
    assert len(calls) == runs * 2 * 5 and calls.count(1) == runs * 2 * 4

    # Weights and KV caches computed by hand: 4-byte floats; a Llama layer caches K and V of 2 heads x 8 dims.
    base = model.get_base_model()
    param_bytes = sum(t.numel() * 4 for t in [*base.parameters(), *base.buffers()])  # buffers: RoPE frequencies
    head_bytes = sum(p.numel() * 4 for p in model.alignment_heads.parameters())
    config = base.config
    encoded = [evaluator_batch_length(tokenizer, prompts[:2]), evaluator_batch_length(tokenizer, prompts[2:])]
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * 8 * 4
    kv = max(rows * (length + 5 - 1) * per_position for rows, length in encoded)
    assert methods["base"]["weights_bytes"] == param_bytes
    assert methods["iav"]["weights_bytes"] == param_bytes + head_bytes
    assert methods["genarm"]["weights_bytes"] == 2 * param_bytes
    assert methods["base"]["kv_cache_bytes"] == methods["iav"]["kv_cache_bytes"] == kv
    assert methods["genarm"]["kv_cache_bytes"] == 2 * kv
    assert methods["base"]["memory_bytes"] == param_bytes + kv
    ratios = result["ratios"]
    assert ratios["genarm/base"]["memory"] == pytest.approx(2.0)
    assert ratios["iav/base"]["memory"] == pytest.approx((param_bytes + head_bytes + kv) / (param_bytes + kv))
    for name in ("iav/base", "genarm/base", "genarm/iav"):
        assert ratios[name]["tokens_per_second"] > 0
        assert ratios[name]["latency_per_token"] > 0
    for method in methods.values():  # medians of an odd number of rounds: speed and latency from the same round
        assert method["tokens_per_second"] == pytest.approx(3 * 5 / (method["latency_per_token_ms"] * 2 * 5 / 1000))


def evaluator_batch_length(tokenizer, prompts):
    """(rows, padded length) of a batch of chat-formatted prompts."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else p, tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    ids = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.shape


# -- outputs ----------------------------------------------------------------------------------------------------------


def test_save_results_round_trips_through_json(evaluated, tmp_path):
    path = evaluated.save_results(tmp_path / "out" / "results.json")
    with open(path) as fh:
        loaded = json.load(fh)
    assert loaded["config"]["alphas"] == [0.0, 1.0, 2.0]
    for section in ("performance", "efficiency", "controllability", "alignment_vectors"):
        expected = json.loads(json.dumps(evaluated.results[section], allow_nan=True).replace("NaN", "null"))
        assert loaded[section] == expected


def test_save_results_without_a_path_writes_the_documented_default_file(tokenizer, tmp_path, monkeypatch):
    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(alphas=[0.0, 1.0], num_samples=1, max_new_tokens=2))
    evaluator.evaluate_performance(PROMPTS[:1], reward_fn=length_reward)
    monkeypatch.chdir(tmp_path)
    path = evaluator.save_results()
    assert path == DEFAULT_RESULTS_FILE == "iav_eval_results.json"
    with open(tmp_path / DEFAULT_RESULTS_FILE) as fh:
        assert json.load(fh)["performance"]["alphas"] == [0.0, 1.0]


def test_plot_results_writes_pngs_that_open_at_the_expected_size(evaluated, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    paths = evaluated.plot_results(out_dir=tmp_path / "plots")
    assert set(paths) == {"reward_vs_alpha", "kl_vs_alpha", "reward_kl_frontier", "cost_bars", "controllability"}
    for path in paths.values():
        pixels = image.imread(path)
        assert pixels.shape[:2] == (600, 900)
        assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_plot_results_accepts_one_section_or_the_saved_json(evaluated, tmp_path):
    pytest.importorskip("matplotlib")
    paths = evaluated.plot_results(evaluated.results["efficiency"], tmp_path / "cost")
    assert set(paths) == {"cost_bars"}
    saved = evaluated.save_results(tmp_path / "results.json")
    with open(saved) as fh:
        assert len(evaluated.plot_results(json.load(fh), tmp_path / "all")) == 5
    with pytest.raises(ValueError, match="Nothing to plot"):
        evaluated.plot_results({"unrelated": 1}, tmp_path / "none")


def test_alpaca_eval_export_has_the_expected_schema(evaluated, tmp_path):
    records = evaluated.export_alpaca_eval(tmp_path / "model_outputs.json", alpha=1.0, generator="tiny-iav")
    with open(tmp_path / "model_outputs.json") as fh:
        assert json.load(fh) == records
    assert [r["instruction"] for r in records] == [PROMPTS[0], PROMPTS[1], "Why?"]
    assert all(set(r) == {"instruction", "output", "generator"} and r["generator"] == "tiny-iav" for r in records)
    assert [r["output"] for r in records] == [item["completions"][0] for item in evaluated.generations[1.0]]
    with pytest.raises(ValueError, match="alpha=0.3"):
        evaluated.export_alpaca_eval(tmp_path / "x.json", alpha=0.3)


# -- errors -----------------------------------------------------------------------------------------------------------


def test_bad_settings_and_inputs_are_refused(tokenizer):
    with pytest.raises(ValueError, match="num_samples"):
        EvaluationConfig(num_samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="alphas"):
        EvaluationConfig(alphas=[])
    with pytest.raises(ValueError, match="alphas"):
        EvaluationConfig(alphas=[float("nan")])
    with pytest.raises(TypeError, match="IAVModel"):
        IAVEvaluator(tiny_causal_lm("llama", vocab_size=400), tokenizer)
    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(max_new_tokens=2))
    with pytest.raises(ValueError, match="exactly one"):
        evaluator.evaluate_performance(PROMPTS[:1])
    with pytest.raises(ValueError, match="returned 1 scores"):
        evaluator.evaluate_performance(PROMPTS[:2], reward_fn=lambda prompts, completions: [0.0])
    with pytest.raises(ValueError, match="Nothing to save"):
        evaluator.save_results("unused.json")


def test_refusal_fn_errors_name_refusal_fn_and_a_missing_scorer_fails_before_generating(tokenizer, monkeypatch):
    evaluator = IAVEvaluator(tiny_iav(), tokenizer, small_config(num_samples=1, max_new_tokens=2))
    with pytest.raises(ValueError, match="`refusal_fn` returned 1 scores"):
        evaluator.evaluate_controllability(PROMPTS[:2], refusal_fn=lambda prompts, completions: [True])
    monkeypatch.setattr(evaluator, "_rollouts", lambda *args, **kwargs: pytest.fail("generated before the check"))
    with pytest.raises(TypeError, match=r"`refusal_fn` must be callable as refusal_fn\(prompts=..., completions="):
        evaluator.evaluate_controllability(PROMPTS[:2], refusal_fn="a classifier")
    with pytest.raises(ValueError, match=r"needs what to measure: `refusal_fn\(.*or a reward: `reward_fn`"):
        evaluator.evaluate_controllability(PROMPTS[:2])
    with pytest.raises(TypeError, match="`reward_fn` must be callable"):
        evaluator.evaluate_performance(PROMPTS[:2], reward_fn=3.0)


# -- the example ------------------------------------------------------------------------------------------------------


def test_evaluate_example_runs_as_written_against_a_tiny_model(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "examples/evaluate.py", "--output-dir", str(tmp_path), "--prompts", "4"]
    command += ["--max-new-tokens", "8", "--rounds", "1"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    assert results["performance"]["alphas"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert len(set(results["performance"]["kl_stepwise"])) > 1, "the alphas should decode differently"
    assert sorted(os.listdir(tmp_path / "plots")) == [
        "controllability.png",
        "cost_bars.png",
        "kl_vs_alpha.png",
        "reward_kl_frontier.png",
        "reward_vs_alpha.png",
    ]
    with open(tmp_path / "alpaca_eval" / "model_outputs.json") as fh:
        assert len(json.load(fh)) == 4
    assert "genarm/base" in result.stdout + result.stderr


def test_kl_per_token_is_the_ratio_estimator_with_its_linearised_standard_error():
    log_ratio, stepwise, length = (
        torch.tensor([1.0, 3.0, 2.0]),
        torch.tensor([0.5, 1.5, 1.0]),
        torch.tensor([2.0, 4.0, 2.0]),
    )
    figures = kl_per_token(log_ratio, stepwise, length)
    kl = 6.0 / 8.0
    residual = [1.0 - kl * 2, 3.0 - kl * 4, 2.0 - kl * 2]
    stderr = math.sqrt(sum(r * r for r in residual) / (3 * 2)) / (8.0 / 3)
    assert figures["kl_per_token"] == pytest.approx(kl) and figures["kl_per_token_stderr"] == pytest.approx(stderr)
    assert figures["stepwise_kl_per_token"] == pytest.approx(3.0 / 8.0) and figures["kl_per_response"] == 2.0
    assert (figures["response_tokens"], figures["responses"]) == (pytest.approx(8.0 / 3), 3)


def test_sequence_kl_terms_sum_the_log_ratio_and_the_stepwise_kl_over_the_masked_tokens():
    torch.manual_seed(0)
    logp, ref = torch.randn(2, 3, 5).log_softmax(-1), torch.randn(2, 3, 5).log_softmax(-1)
    tokens, mask = torch.randint(0, 5, (2, 3)), torch.tensor([[1, 1, 0], [1, 0, 0]])
    log_ratio, stepwise = sequence_kl_terms(logp, ref, tokens, mask)
    for row in range(2):
        positions = [t for t in range(3) if mask[row, t]]
        expected_ratio = sum(logp[row, t, tokens[row, t]] - ref[row, t, tokens[row, t]] for t in positions)
        expected_kl = sum((logp[row, t].exp() * (logp[row, t] - ref[row, t])).sum() for t in positions)
        assert log_ratio[row] == pytest.approx(float(expected_ratio), abs=1e-6)
        assert stepwise[row] == pytest.approx(float(expected_kl), abs=1e-6)
