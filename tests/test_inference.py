"""IAVInference: chat-formatted generation, batched alpha comparison, and the per-token alignment analysis."""

import pytest
import torch
from testing_utils import randomize_heads

from iav_trl import AlignmentHeadConfig, IAVInference, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm

PROMPTS = ["How do I bake bread?", "Tell me a joke."]


@pytest.fixture(params=["llama", "gpt2"])
def iav_model(request):
    model = get_iav_model(
        tiny_causal_lm(request.param, vocab_size=400), AlignmentHeadConfig(num_interventions=2, intervention_dim=8)
    )
    randomize_heads(model, std=1.0)
    return model.eval()


def chat_inputs(tokenizer, prompt):
    """The chat-templated prompt, tokenized on its own (no padding)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def test_generate_applies_the_chat_template_and_returns_only_the_response(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    inputs = chat_inputs(tokenizer, PROMPTS[0])
    expected = iav_model.generate(**inputs, alpha=1.0, max_new_tokens=8, do_sample=False)
    response = expected[0, inputs["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    assert helper.generate(PROMPTS[0], max_new_tokens=8) == tokenizer.decode(response, skip_special_tokens=True)


def test_compare_alphas_greedy_rows_equal_separate_single_alpha_calls(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    alphas = [0.0, 0.5, 1.0, 1.5]
    batched = helper.compare_alphas(PROMPTS[0], alphas=alphas, max_new_tokens=12)
    assert list(batched) == alphas
    for alpha in alphas:
        assert batched[alpha] == helper.generate(PROMPTS[0], alpha=alpha, max_new_tokens=12)
    assert len(set(batched.values())) > 1, "the randomized head should make the alphas decode differently"


def test_compare_alphas_makes_one_generate_call(iav_model, tokenizer, monkeypatch):
    calls = []
    original = type(iav_model).generate

    def counting_generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(iav_model), "generate", counting_generate)
    IAVInference(iav_model, tokenizer).compare_alphas(PROMPTS[1], alphas=[0.0, 1.0, 2.0], max_new_tokens=4)
    assert calls == [3]


def test_alpha_zero_generation_is_the_base_model(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    inputs = chat_inputs(tokenizer, PROMPTS[1])
    base = iav_model.get_base_model().generate(**inputs, max_new_tokens=10, do_sample=False)
    response = base[0, inputs["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    assert helper.generate(PROMPTS[1], alpha=0.0, max_new_tokens=10) == tokenizer.decode(
        response, skip_special_tokens=True
    )


def test_batched_generate_with_left_padding_equals_one_prompt_at_a_time(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    prompts = ["Hi", "How do I bake bread? Mix flour, water, salt and yeast."]
    batched = helper.generate(prompts, alpha=1.0, max_new_tokens=8)
    assert batched == [helper.generate(p, alpha=1.0, max_new_tokens=8) for p in prompts]


def test_analyze_alignment_effect_matches_a_plain_recomputation(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    alpha = 1.5
    report = helper.analyze_alignment_effect(PROMPTS[0], alpha=alpha, max_new_tokens=6, top_k=3)
    inputs = chat_inputs(tokenizer, PROMPTS[0])
    ids = [token["token_id"] for token in report["tokens"]]
    assert len(ids) > 0
    # Reference: the base model alone gives z_base; the head's contribution at unit strength is a_t.
    sequence = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    with torch.no_grad():
        z_base = iav_model.get_base_model()(sequence).logits[0]
        z_unit = iav_model(sequence, alpha=1.0).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    for t, token in enumerate(report["tokens"]):
        base, a_t = z_base[start + t], z_unit[start + t] - z_base[start + t]
        p, q = torch.softmax(base + alpha * a_t, -1), torch.softmax(base, -1)
        assert token["kl"] == pytest.approx((p * (p.log() - q.log())).sum().item(), abs=1e-4)
        entropy_change = -(p * p.log()).sum() + (q * q.log()).sum()
        assert token["entropy_change"] == pytest.approx(entropy_change.item(), abs=1e-4)
        assert token["alignment_norm"] == pytest.approx(a_t.norm().item(), rel=1e-4)
        assert token["prob_final"] == pytest.approx(p[ids[t]].item(), abs=1e-5)
        assert [tokenizer.decode([i]) for i in a_t.topk(3).indices.tolist()] == [w for w, _ in token["promoted"]]
        assert [tokenizer.decode([i]) for i in (-a_t).topk(3).indices.tolist()] == [w for w, _ in token["suppressed"]]
        # Greedy decoding at alpha picked the argmax of z_base + alpha * a_t.
        assert ids[t] == (base + alpha * a_t).argmax().item()
    assert report["summary"]["total_kl"] == pytest.approx(sum(t["kl"] for t in report["tokens"]))


def test_plain_text_prompts_without_a_chat_template(iav_model, tokenizer):
    tokenizer = tokenizer.__class__(
        tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="<|end|>"
    )
    helper = IAVInference(iav_model, tokenizer)
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    expected = iav_model.generate(**inputs, alpha=0.5, max_new_tokens=5, do_sample=False)
    response = expected[0, inputs["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    assert helper.generate(PROMPTS[0], alpha=0.5, max_new_tokens=5) == tokenizer.decode(
        response, skip_special_tokens=True
    )
    with pytest.raises(ValueError, match="chat template"):
        helper.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)


def test_bad_inputs_are_refused(iav_model, tokenizer):
    with pytest.raises(TypeError, match="IAVModel"):
        IAVInference(iav_model.get_base_model(), tokenizer)
    helper = IAVInference(iav_model, tokenizer)
    with pytest.raises(ValueError, match="temperature"):
        helper.generate("hi", temperature=-1.0)
    with pytest.raises(ValueError, match="do_sample"):
        helper.generate("hi", temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="distinct"):
        helper.compare_alphas("hi", alphas=[1.0, 1.0])
    with pytest.raises(ValueError, match="prompt"):
        helper.generate([])


def test_the_seeds_generate_call_samples_within_max_length_total_tokens(iav_model, tokenizer, monkeypatch):
    helper = IAVInference(iav_model, tokenizer)
    prompt_length = chat_inputs(tokenizer, PROMPTS[0])["input_ids"].shape[1]
    lengths = []
    original = type(iav_model).generate

    def recording_generate(self, *args, **kwargs):
        sequences = original(self, *args, **kwargs)
        lengths.append(sequences.shape[1])
        return sequences

    monkeypatch.setattr(type(iav_model), "generate", recording_generate)
    max_length = prompt_length + 12  # prompt tokens count towards max_length, as in transformers
    samples = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        samples.append(helper.generate(prompt=PROMPTS[0], alpha=1.5, max_length=max_length, temperature=0.7))
    assert all(isinstance(sample, str) for sample in samples)
    assert all(prompt_length < length <= max_length for length in lengths)
    assert samples[0] == samples[1] != samples[2]  # sampled: the seed decides


def test_prompt_given_both_ways_or_not_at_all_is_refused(iav_model, tokenizer):
    helper = IAVInference(iav_model, tokenizer)
    with pytest.raises(TypeError, match="not both"):
        helper.generate("hi", prompt="hi")
    with pytest.raises(TypeError, match="Pass the prompt"):
        helper.generate(alpha=1.0)


def test_an_empty_prompt_without_a_chat_template_is_refused_naming_it(iav_model, tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="<|end|>")
    helper = IAVInference(iav_model, plain)
    with pytest.raises(ValueError, match=r"Prompt\(s\) \[1\] are empty"):
        helper.generate(["How do I bake bread?", ""], max_new_tokens=2)
