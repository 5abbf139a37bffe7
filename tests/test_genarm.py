"""GenARM-style decoding: z_t = z_base + alpha * log_softmax(z_arm), each model with its own KV cache."""

import pytest
import torch

from iav_trl.inference.genarm import GenARMLogitsProcessor, genarm_generate
from iav_trl.models.tiny import tiny_causal_lm

VOCAB = 400


@pytest.fixture(params=["llama", "gpt2"])
def models(request):
    base = tiny_causal_lm(request.param, vocab_size=VOCAB, seed=0).eval()
    reward = tiny_causal_lm(request.param, vocab_size=VOCAB, seed=1).eval()
    return base, reward


def left_padded_batch():
    """Two prompts of lengths 7 and 4, left-padded with token 0."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(7, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = 0
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


@torch.no_grad()
def full_recompute_logits(model, sequences, attention_mask):
    """Last-position logits of a fresh forward over the whole (left-padded) sequences, no cache."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]


def expected_step_scores(base, reward, sequences, prompt_mask, alpha):
    """
    For each generated position t: z_base + alpha * log_softmax(z_arm), both recomputed from scratch, with the EOS
    logit at -inf (the tests decode with `min_new_tokens` = `max_new_tokens`).
    """
    prompt_length = prompt_mask.shape[1]
    rows = sequences.shape[0]
    prompt_mask = prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], dim=0)
    expected = []
    for t in range(prompt_length, sequences.shape[1]):
        mask = torch.cat([prompt_mask, torch.ones(rows, t - prompt_length, dtype=prompt_mask.dtype)], dim=1)
        z_base = full_recompute_logits(base, sequences[:, :t], mask)
        z_arm = full_recompute_logits(reward, sequences[:, :t], mask)
        scores = z_base + alpha * torch.log_softmax(z_arm, dim=-1)
        scores[:, base.generation_config.eos_token_id] = -float("inf")
        expected.append(scores)
    return expected


def test_alpha_zero_reproduces_base_greedy_generation(models):
    base, reward = models
    input_ids, attention_mask = left_padded_batch()
    expected = base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    out = genarm_generate(base, reward, input_ids, attention_mask, alpha=0.0, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)


def test_each_greedy_step_equals_uncached_recompute_with_left_padding(models):
    base, reward = models
    input_ids, attention_mask = left_padded_batch()
    alpha = 2.0
    out = genarm_generate(
        base,
        reward,
        input_ids,
        attention_mask,
        alpha=alpha,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    expected = expected_step_scores(base, reward, out.sequences, attention_mask, alpha)
    assert len(out.scores) == len(expected) == 6
    for step, (scores, reference) in enumerate(zip(out.scores, expected)):
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        assert torch.equal(out.sequences[:, input_ids.shape[1] + step], reference.argmax(-1))
    plain = base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out.sequences, plain), "the guidance should change some greedy choices at alpha=2"


def test_sampling_with_several_return_sequences_follows_the_guided_distribution(models):
    base, reward = models
    input_ids, attention_mask = left_padded_batch()
    torch.manual_seed(0)
    out = genarm_generate(
        base,
        reward,
        input_ids,
        attention_mask,
        alpha=1.5,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=True,
        top_k=0,  # no truncation after the guidance, so the scores are the whole guided distribution
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (4, input_ids.shape[1] + 4)
    expected = expected_step_scores(base, reward, out.sequences, attention_mask, 1.5)
    for scores, reference in zip(out.scores, expected):
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)


def test_processor_passed_to_generate_matches_genarm_generate(models):
    base, reward = models
    input_ids, attention_mask = left_padded_batch()
    processor = GenARMLogitsProcessor(reward, alpha=1.0, attention_mask=attention_mask)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    direct = base.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor], **kwargs)
    processor.reset()
    again = base.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor], **kwargs)
    assert torch.equal(direct, again), "after reset() the processor starts a new generation from its prompt"
    assert torch.equal(direct, genarm_generate(base, reward, input_ids, attention_mask, alpha=1.0, **kwargs))


def test_beam_search_is_refused(models):
    base, reward = models
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(ValueError, match="beam search"):
        genarm_generate(base, reward, input_ids, attention_mask, num_beams=2, max_new_tokens=3)


def test_reward_model_with_another_vocabulary_is_refused():
    base = tiny_causal_lm("llama", vocab_size=VOCAB).eval()
    reward = tiny_causal_lm("llama", vocab_size=VOCAB + 8).eval()
    input_ids, attention_mask = left_padded_batch()
    with pytest.raises(ValueError, match="vocabulary"):
        genarm_generate(base, reward, input_ids, attention_mask, max_new_tokens=2)


def test_non_finite_alpha_is_refused(models):
    with pytest.raises(ValueError, match="finite"):
        GenARMLogitsProcessor(models[1], alpha=float("nan"))
