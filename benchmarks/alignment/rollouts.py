"""Sampling from each method, with the exact log-probabilities of what was sampled, and what is measured on it.

Every method is a `Decoder`: a function with the signature of `generate` (`input_ids`, `attention_mask`, generate
keywords). All are sampled with the same settings, `SAMPLING` (temperature 1, no top-k/top-p truncation), so the
distribution a method samples from is exactly the softmax of the scores `generate` returns with `output_scores=True`
(the logits after every logits processor: IAV's `z_base + alpha * a_t`, GenARM's `z_base + alpha *
log_softmax(z_arm)`, the DPO model's own logits). For `N` sampled responses `y` of up to `T` tokens:

    log p_method(y) = sum_t log softmax(scores_t)[y_t]            (N,)    from the decoding itself
    log p_sft(y)    = sum_t log softmax(z_sft(x, y_<t))[y_t]      (N,)    one teacher-forced pass of the SFT model
    kl          = mean_y [log p_method(y) - log p_sft(y)]
    kl_stepwise = mean_y sum_t KL(softmax(scores_t) || softmax(z_sft(x, y_<t)))

summed over each response up to and including its EOS. Both are unbiased estimates of the sequence-level
`KL(p_method || p_sft)`; the second (the exact per-step KL along the sampled prefixes) has the lower variance.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.alignment.task import Prompt, is_well_formed, true_reward
from iav_trl.evaluation.metrics import sequence_kl_terms
from iav_trl.evaluation.timing import summarize_times, time_rounds
from iav_trl.inference.iav_inference import completion_mask, decode_completions, encode_prompts

Decoder = Callable[..., Any]

SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
GREEDY: dict[str, Any] = {"do_sample": False}


@dataclass
class Rollouts:
    """Responses sampled for a list of prompts (one row each), with their true rewards and log-probabilities."""

    prompts: list[Prompt]
    completions: list[str]
    completion_ids: list[torch.Tensor]  # N rows of sampled token ids, up to and including EOS
    rewards: torch.Tensor  # (N,) true rewards
    logps: torch.Tensor  # (N,) log p_method(y) under the decoding distribution
    ref_logps: torch.Tensor | None = None  # (N,) log p_sft(y), when a reference model was given
    stepwise_kl: torch.Tensor | None = None  # (N,) sum_t KL(p_method(. | x, y_<t) || p_sft(. | x, y_<t))
    lengths: torch.Tensor | None = None  # (N,) response tokens, EOS included


@torch.no_grad()
def _reference_logprobs(model: PreTrainedModel, sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int):
    """`(B, T, V)` log-probabilities of `model` at the `T` response positions, teacher-forced as in `generate`."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    length = sequences.shape[1] - prompt_length
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions, logits_to_keep=length + 1).logits
    return logits[:, :-1].float().log_softmax(-1)  # position L - 1 + t predicts response token t


@torch.no_grad()
def sample(
    decoder: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    reference: PreTrainedModel | None = None,
) -> Rollouts:
    """
    Sample one response per prompt (repeat a prompt for several samples), `batch_size` rows per `generate` call;
    with a `reference` model, also score the responses under it (`ref_logps`, `stepwise_kl`).

    Batch `i` is sampled after `torch.manual_seed(seed + i)`, so two decoders with identical distributions (IAV at
    alpha 0 and the SFT model) draw identical responses.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completions, completion_ids, logps, ref_logps, stepwise_kl, lengths = [], [], [], [], [], []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        inputs = encode_prompts(tokenizer, [prompt.messages() for prompt in prompts[start : start + batch_size]])
        torch.manual_seed(seed + index)
        out = decoder(
            **inputs,
            **SAMPLING,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
        )
        prompt_length = inputs["input_ids"].shape[1]
        new = out.sequences[:, prompt_length:]  # (B, T), T <= max_new_tokens
        mask = completion_mask(new, eos).float()
        logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B, T, V): the decoding distribution
        logps.append((logp.gather(-1, new.unsqueeze(-1)).squeeze(-1) * mask).sum(-1))
        completions += decode_completions(tokenizer, new, mask)
        completion_ids += [row[keep.bool()] for row, keep in zip(new, mask)]
        lengths.append(mask.sum(-1))
        if reference is not None:
            full_mask = torch.cat([inputs["attention_mask"], mask.long()], dim=1)
            ref = _reference_logprobs(reference, out.sequences, full_mask, prompt_length)
            log_ratio, steps = sequence_kl_terms(logp, ref, new, mask)
            ref_logps.append(logps[-1] - log_ratio)
            stepwise_kl.append(steps)
    rewards = torch.tensor([true_reward(text) for text in completions])
    return Rollouts(
        prompts=list(prompts),
        completions=completions,
        completion_ids=completion_ids,
        rewards=rewards,
        logps=torch.cat(logps),
        ref_logps=torch.cat(ref_logps) if ref_logps else None,
        stepwise_kl=torch.cat(stepwise_kl) if stepwise_kl else None,
        lengths=torch.cat(lengths),
    )


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), (values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def evaluate(
    decoder: Decoder,
    sft_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> tuple[dict[str, float], Rollouts]:
    """
    Mean true reward and KL to the SFT model over `num_samples` samples per prompt: `kl`, the mean log-ratio of the
    module docstring, and `kl_stepwise`, the mean of `sum_t KL(p_method || p_sft)` along the sampled prefixes (also
    unbiased, lower variance, never negative), each with its standard error; plus the mean response length in tokens
    and the fraction of responses in the corpus grammar (`well_formed`).
    """
    rows = [prompt for prompt in prompts for _ in range(num_samples)]
    rollouts = sample(decoder, tokenizer, rows, max_new_tokens, seed, batch_size, reference=sft_model)
    reward, reward_se = mean_and_stderr(rollouts.rewards)
    kl, kl_se = mean_and_stderr(rollouts.logps - rollouts.ref_logps)
    kl_stepwise, kl_stepwise_se = mean_and_stderr(rollouts.stepwise_kl)
    metrics = {
        "reward": reward,
        "reward_stderr": reward_se,
        "kl": kl,
        "kl_stderr": kl_se,
        "kl_stepwise": kl_stepwise,
        "kl_stepwise_stderr": kl_stepwise_se,
        "response_tokens": rollouts.lengths.mean().item(),
        "well_formed": sum(map(is_well_formed, rollouts.completions)) / len(rollouts.completions),
    }
    return metrics, rollouts


def preference_pairs(rollouts: Rollouts, temperature: float, seed: int) -> Dataset:
    """
    Label consecutive rollouts `(2i, 2i + 1)` of the same prompt by Bradley-Terry sampling on the true reward:
    `P(y_a preferred) = sigmoid((r_a - r_b) / temperature)`. Pairs of identical responses carry no preference and
    are dropped. Returns TRL's conversational preference format (`prompt`, `chosen`, `rejected`).
    """
    rng = random.Random(seed)
    rows = []
    for a in range(0, len(rollouts.prompts) - 1, 2):
        b = a + 1
        if rollouts.prompts[a] != rollouts.prompts[b]:
            raise ValueError("preference_pairs needs the two responses of a pair on consecutive rows of one prompt.")
        if rollouts.completions[a] == rollouts.completions[b]:
            continue
        margin = (rollouts.rewards[a] - rollouts.rewards[b]).item() / temperature
        a_wins = rng.random() < 1 / (1 + math.exp(-margin))
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append(
            {
                "prompt": rollouts.prompts[a].messages(),
                "chosen": [{"role": "assistant", "content": rollouts.completions[chosen]}],
                "rejected": [{"role": "assistant", "content": rollouts.completions[rejected]}],
            }
        )
    return Dataset.from_list(rows)


def decode_speed(
    decoders: Mapping[str, Decoder],
    inputs: Mapping[str, torch.Tensor],
    new_tokens: int,
    rounds: int,
    seed: int,
    do_sample: bool = False,
) -> dict[str, dict[str, float]]:
    """
    Tokens/s of each decoder on the same `inputs`, decoding exactly `new_tokens` tokens per row
    (`min_new_tokens = max_new_tokens`) greedily, or with `SAMPLING` when `do_sample`, timed with
    `iav_trl.evaluation.timing` (interleaved rounds, rotating order, one warm-up call each; round `r` seeded with
    `seed + r`). Returns per decoder the best and the median seconds, tokens/s at the best time (interference only
    adds time on a shared machine), and `speedup_vs`: the median over rounds of `t(other) / t(decoder)`.
    """
    kwargs = dict(**(SAMPLING if do_sample else GREEDY), min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    runs = {name: (lambda decoder=decoder: decoder(**inputs, **kwargs)) for name, decoder in decoders.items()}
    with torch.no_grad():
        seconds = time_rounds(runs, rounds, warmup=1, before_call=lambda r: torch.manual_seed(seed + r))
    summary = summarize_times(seconds, work=inputs["input_ids"].shape[0] * new_tokens)
    return {
        name: {
            "best_s": row["best_s"],
            "median_s": row["median_s"],
            "tokens_per_s": inputs["input_ids"].shape[0] * new_tokens / row["best_s"],
            "speedup_vs": row["speed_vs"],
        }
        for name, row in summary.items()
    }
