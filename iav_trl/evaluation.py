"""`IAVEvaluator`: reward, KL, cost and controllability of an `IAVModel` across alignment strengths.

    evaluator = IAVEvaluator(model, tokenizer, EvaluationConfig(alphas=[0.0, 0.5, 1.0, 1.5, 2.0]))
    performance = evaluator.evaluate_performance(prompts, reward_fn=my_reward)   # or reward_model=...
    efficiency = evaluator.evaluate_efficiency(prompts)
    vectors = evaluator.analyze_alignment_vectors(prompts)
    control = evaluator.evaluate_controllability(prompts, reward_fn=my_reward)  # or refusal_fn=...
    evaluator.save_results("results.json"); evaluator.plot_results(out_dir="plots")
    evaluator.export_alpaca_eval("model_outputs.json", alpha=1.0)

Every method returns plain dicts (lists of floats, one entry per alpha), keeps them in `evaluator.results`, logs a
summary and shows progress bars.

What is measured:

- **Reward**: `reward_fn(prompts=[...], completions=[...]) -> list[float]` (TRL's reward-function convention; prompts
  as given, completions as decoded strings), or the score (`logits[:, 0]`) of an `AutoModelForSequenceClassification`
  on the chat-formatted prompt + response. **Win rate** against alpha 0: paired on (prompt, sample), a win counts 1,
  a tie 1/2.
- **Sequence-level KL** to the base model, from `num_samples` samples `y ~ p_alpha` per prompt, each scored in one
  forward pass that returns `z_base` and `z_final` (`return_alignment=True`), both at the sampling temperature `T`:

      kl          = mean_y  sum_t [log p_alpha(y_t | x, y_<t) - log p_base(y_t | x, y_<t)]
      kl_stepwise = mean_y  sum_t KL(p_alpha(. | x, y_<t) || p_base(. | x, y_<t))

  with `p = softmax(z / T)`, summed over the response up to and including its EOS. Both are unbiased estimates of
  `KL(p_alpha || p_base)` over whole responses (the second, the exact per-step KL along the sampled prefixes, has
  lower variance). They estimate the KL of the distributions actually sampled when `top_k = 0` and `top_p = 1` (the
  defaults); with truncation the scored distributions are the untruncated temperature-`T` ones. With greedy decoding
  (`temperature = 0`) the sums run along the greedy response at `T = 1` and are not KL estimates.
- **Cost** (`evaluate_efficiency`): the base model, IAV at alpha 1 and a GenARM-style baseline
  (`iav_trl.genarm`: the base model plus a reward LM of the same size, each with its own KV cache) decode the same
  prompts greedily with exactly `max_new_tokens` new tokens each, interleaved over rounds; speeds are medians over
  rounds and ratios medians of per-round ratios. Memory: on CUDA, the weights (parameters and buffers) a method
  uses plus the peak of `torch.cuda.max_memory_allocated` above what was allocated before its run; on CPU (no
  allocator statistics), those weights plus the KV caches measured at the end of decoding (activations not
  included).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .genarm import GenARMLogitsProcessor, output_cache
from .inference import (
    Prompt,
    as_prompt_list,
    completion_mask,
    decode_completions,
    encode_prompts,
    format_prompt,
    is_conversation,
    sampling_kwargs,
)
from .io import atomic_write_text
from .model import IAVModel

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


@dataclass
class EvaluationConfig:
    """
    Configuration of `IAVEvaluator`.

    Parameters that control generation:
        alphas (`list[float]`, defaults to `[0.0, 0.5, 1.0, 1.5, 2.0]`):
            Alignment strengths to evaluate. Alpha 0 (the base model) is always added, as the reference of the
            win rate and the KL.
        max_new_tokens (`int`, defaults to `128`):
            New tokens per response. `evaluate_efficiency` decodes exactly this many for every method.
        num_samples (`int`, defaults to `1`):
            Responses sampled per prompt and alpha. More samples lower the variance of the reward and KL estimates
            (the KL's standard error is reported); needs `temperature > 0`.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature; 0 decodes greedily. At 1 (with `top_k=0`, `top_p=1`) the KL is that of the
            model's own distributions.
        top_p (`float`, defaults to `1.0`):
            Nucleus sampling. Below 1 the KL estimate scores the untruncated distributions (see the module
            docstring).
        top_k (`int`, defaults to `0`):
            Top-k sampling (0 = off; note that `transformers` otherwise defaults to 50).
        batch_size (`int`, defaults to `8`):
            (prompt, alpha) rows per `generate` call (each yields `num_samples` responses) and per scoring pass.
        seed (`int`, defaults to `0`):
            Seed of each batch's sampling, so that results are reproducible.
        device (`str`, *optional*):
            Device to run on (the model is moved there); defaults to where the model is.

    Parameters that control scoring and the analyses:
        reward_batch_size (`int`, defaults to `16`):
            Responses per call of the reward function / reward model.
        top_tokens (`int`, defaults to `10`):
            Promoted / suppressed tokens listed by `analyze_alignment_vectors`.
        max_analysis_tokens (`int`, defaults to `512`):
            Response positions whose alignment vectors `analyze_alignment_vectors` collects (an `(N, V)` matrix is
            decomposed, so this bounds its memory).

    Parameters that control the cost comparison:
        efficiency_rounds (`int`, defaults to `5`):
            Timed rounds; in each, every method decodes all prompts once, in rotating order.
        efficiency_warmup (`int`, defaults to `1`):
            Untimed passes per method before timing.
        genarm_alpha (`float`, defaults to `1.0`):
            Guidance strength of the GenARM baseline (`1 / beta`); its cost does not depend on it.

    Other parameters:
        show_progress (`bool`, defaults to `True`):
            Show progress bars.
        generator_name (`str`, *optional*):
            Name written in the `generator` field of the AlpacaEval export; defaults to
            `<base model name>-iav-alpha<alpha>`.
    """

    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0], metadata={"help": "Alignment strengths to evaluate."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per response."})
    num_samples: int = field(default=1, metadata={"help": "Responses sampled per prompt and alpha."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    batch_size: int = field(default=8, metadata={"help": "(prompt, alpha) rows per generate / scoring call."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    device: str | None = field(default=None, metadata={"help": "Device to run on (default: the model's)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Responses per reward call."})
    top_tokens: int = field(default=10, metadata={"help": "Promoted/suppressed tokens listed per head."})
    max_analysis_tokens: int = field(default=512, metadata={"help": "Positions collected for the spectrum."})
    efficiency_rounds: int = field(default=5, metadata={"help": "Timed rounds of the cost comparison."})
    efficiency_warmup: int = field(default=1, metadata={"help": "Untimed passes per method before timing."})
    genarm_alpha: float = field(default=1.0, metadata={"help": "Guidance strength of the GenARM baseline."})
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    generator_name: str | None = field(default=None, metadata={"help": "`generator` of the AlpacaEval export."})

    def __post_init__(self) -> None:
        alphas = list(self.alphas) if isinstance(self.alphas, Sequence) and not isinstance(self.alphas, str) else None
        if not alphas or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas
        ):
            raise ValueError(f"`alphas` must be a non-empty list of finite floats, got {self.alphas!r}.")
        self.alphas = [float(a) for a in alphas]
        for name in ("max_new_tokens", "num_samples", "batch_size", "reward_batch_size", "top_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("max_analysis_tokens", "efficiency_rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.efficiency_warmup, int) or self.efficiency_warmup < 0:
            raise ValueError(f"`efficiency_warmup` must be a non-negative integer, got {self.efficiency_warmup!r}.")
        if not self.temperature >= 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(
                f"`num_samples={self.num_samples}` needs sampling: greedy decoding (temperature 0) gives one "
                "response per prompt. Set `temperature > 0` or `num_samples=1`."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be a non-negative integer (0 = off), got {self.top_k!r}.")
        if not math.isfinite(self.genarm_alpha):
            raise ValueError(f"`genarm_alpha` must be finite, got {self.genarm_alpha!r}.")


# --------------------------------------------------------------------------------------------------------------------
# Statistics, written out so that each can be checked on its own.


@torch.no_grad()
def score_sequence_kl(
    model: IAVModel,
    sequences: torch.LongTensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    alpha: float | Sequence[float],
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """
    Per-sequence KL terms of `(N, L + T)` sequences (left-padded prompts of length `L`, then responses), in one
    forward pass. `attention_mask` covers both parts (0 on prompt padding and on response tokens after EOS).

    Returns `(N,)` tensors: `log_ratio = sum_t [log p_alpha(y_t) - log p_base(y_t)]`,
    `stepwise_kl = sum_t KL(p_alpha || p_base)` at each response position, and `length` (scored tokens), with
    `p = softmax(z / temperature)`. Only the response positions' logits are computed (`logits_to_keep`), and the
    float32 statistics one row at a time, so memory stays at two `(N, T + 1, V)` logit tensors.
    """
    response_length = sequences.shape[1] - prompt_length
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        alpha=alpha,
        return_alignment=True,
        logits_to_keep=response_length + 1,
    )
    # The kept positions are L - 1 ... L + T - 1; position L - 1 + t predicts response token t.
    targets = sequences[:, prompt_length:]
    mask = attention_mask[:, prompt_length:].float()
    log_ratio, stepwise = [], []
    for row in range(sequences.shape[0]):
        logp_final = torch.log_softmax(out.logits[row, :-1].float() / temperature, dim=-1)  # (T, V)
        logp_base = torch.log_softmax(out.base_logits[row, :-1].float() / temperature, dim=-1)
        index = targets[row].unsqueeze(-1)
        log_ratio.append((logp_final.gather(-1, index) - logp_base.gather(-1, index)).squeeze(-1))
        stepwise.append((logp_final.exp() * (logp_final - logp_base)).sum(-1))
    log_ratio, stepwise = torch.stack(log_ratio), torch.stack(stepwise)
    return {"log_ratio": (log_ratio * mask).sum(-1), "stepwise_kl": (stepwise * mask).sum(-1), "length": mask.sum(-1)}


def win_rate(scores: Sequence[float], reference: Sequence[float]) -> float:
    """Paired win rate of `scores` over `reference`: mean of 1 (higher), 1/2 (equal) and 0 (lower)."""
    if len(scores) != len(reference) or not scores:
        raise ValueError("win_rate needs two non-empty lists of the same length.")
    return sum(1.0 if s > r else 0.5 if s == r else 0.0 for s, r in zip(scores, reference)) / len(scores)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for i in order[start : stop + 1]:
            ranks[i] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman_correlation needs two lists of the same length, at least 2.")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var > 0 else float("nan")


def singular_spectrum(vectors: torch.Tensor, keep: int = 64) -> dict[str, Any]:
    """
    Energy spectrum of the `(N, V)` matrix of alignment vectors: singular values `s_i`, energies `s_i^2` (their sum
    is `||A||_F^2 = sum_t ||a_t||^2`), the fraction of energy in the top-k directions, the ranks holding 90% / 99%
    of it, and the effective rank `exp(-sum_i e_i log e_i)` of the normalised energies `e_i`.
    """
    singular = torch.linalg.svdvals(vectors.double())
    energy = singular.pow(2)
    total = energy.sum()
    fractions = energy / total if total > 0 else torch.zeros_like(energy)
    cumulative = fractions.cumsum(0)
    nonzero = fractions[fractions > 0]

    def rank_for(level: float) -> int:
        return int((cumulative < level - 1e-12).sum().item()) + 1 if total > 0 else 0

    return {
        "singular_values": singular[:keep].tolist(),
        "energy_fraction": fractions[:keep].tolist(),
        "cumulative_energy": cumulative[:keep].tolist(),
        "total_energy": total.item(),
        "rank_90": rank_for(0.9),
        "rank_99": rank_for(0.99),
        "effective_rank": math.exp(-(nonzero * nonzero.log()).sum().item()) if total > 0 else 0.0,
    }


def cache_bytes(cache: Any) -> int:
    """Bytes held by the tensors of a KV cache (a transformers `Cache`, or nested tuples of tensors)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif hasattr(obj, "layers"):
            for layer in obj.layers:
                for value in vars(layer).values():
                    visit(value)

    visit(cache)
    return total


def _parameter_bytes(*modules: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN/inf become null, tuples lists, tensors numbers or lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    return value


def _console_logging() -> None:
    """Print this module's INFO summaries to the console when the application configured no logging at all (as
    transformers does for its own loggers); otherwise the application's logging configuration decides."""
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# --------------------------------------------------------------------------------------------------------------------
# The evaluator


@dataclass
class _Rollouts:
    """Responses per alpha: `texts[alpha][prompt][sample]`, and their KL terms in the same layout."""

    texts: dict[float, list[list[str]]]
    log_ratio: dict[float, list[list[float]]] | None = None
    stepwise_kl: dict[float, list[list[float]]] | None = None
    length: dict[float, list[list[float]]] | None = None


class IAVEvaluator:
    """
    Evaluates an `IAVModel` across alignment strengths (see the module docstring for what each method measures).

    Args:
        model (`IAVModel`): the model with its alignment head(s).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (needs a pad token); its chat template, when it has
            one, formats the prompts.
        config (`EvaluationConfig`, *optional*): the settings; defaults to `EvaluationConfig()`.

    Prompts are strings or conversations (lists of `{"role", "content"}` messages).
    """

    def __init__(
        self, model: IAVModel, tokenizer: PreTrainedTokenizerBase, config: EvaluationConfig | None = None
    ) -> None:
        if not isinstance(model, IAVModel):
            raise TypeError(
                f"IAVEvaluator needs an IAVModel, got {type(model).__name__}: wrap the base model with "
                "`get_iav_model(model, config)` or load a head with `IAVModel.from_pretrained(model, path)`."
            )
        config = config if config is not None else EvaluationConfig()
        if not isinstance(config, EvaluationConfig):
            raise TypeError(f"`config` must be an EvaluationConfig, got {type(config).__name__}.")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token; set one, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        if config.device is not None:
            model.to(config.device)
        self.device = model.output_embeddings.weight.device
        self.results: dict[str, Any] = {}
        self.generations: dict[float, list[dict[str, Any]]] = {}
        _console_logging()

    # -- generation and scoring ---------------------------------------------------------------------------------------

    @property
    def _alphas(self) -> list[float]:
        return sorted(set(self.config.alphas) | {0.0})

    def _eos_token_id(self) -> int | list[int] | None:
        eos = self.model.generation_config.eos_token_id
        return eos if eos is not None else self.tokenizer.eos_token_id

    def _progress(self, iterable, desc: str, total: int | None = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.config.show_progress)

    def _rollouts(self, prompts: Sequence[Prompt], alphas: Sequence[float], score_kl: bool) -> _Rollouts:
        """Sample `num_samples` responses per (prompt, alpha), packing alphas as per-row values into batches."""
        cfg = self.config
        rows = [(i, alpha) for i in range(len(prompts)) for alpha in alphas]
        layout = {alpha: [[] for _ in prompts] for alpha in alphas}
        rollouts = _Rollouts(texts=copy.deepcopy(layout))
        if score_kl:
            rollouts.log_ratio, rollouts.stepwise_kl, rollouts.length = (copy.deepcopy(layout) for _ in range(3))
        generate_kwargs = sampling_kwargs(cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        if generate_kwargs["do_sample"]:
            generate_kwargs.update(top_p=cfg.top_p, top_k=cfg.top_k, num_return_sequences=cfg.num_samples)
        eos = self._eos_token_id()
        starts = range(0, len(rows), cfg.batch_size)
        for chunk, start in enumerate(self._progress(starts, "generating", total=len(starts))):
            batch = rows[start : start + cfg.batch_size]
            inputs = encode_prompts(self.tokenizer, [prompts[i] for i, _ in batch], self.device)
            row_alphas = [alpha for _, alpha in batch]
            torch.manual_seed(cfg.seed + chunk)
            sequences = self.model.generate(
                **inputs, alpha=row_alphas, pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs
            )
            prompt_length = inputs["input_ids"].shape[1]
            completion = sequences[:, prompt_length:]
            mask = completion_mask(completion, eos)
            texts = decode_completions(self.tokenizer, completion, mask)
            samples = cfg.num_samples if generate_kwargs["do_sample"] else 1
            owners = [row for row in batch for _ in range(samples)]  # generate repeats each row in place
            if score_kl:
                attention_mask = torch.cat([inputs["attention_mask"].repeat_interleave(samples, 0), mask], dim=1)
                pieces = [
                    score_sequence_kl(
                        self.model,
                        sequences[part : part + cfg.batch_size],
                        attention_mask[part : part + cfg.batch_size],
                        prompt_length,
                        alpha=[alpha for _, alpha in owners[part : part + cfg.batch_size]],
                        temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
                    )
                    for part in range(0, len(owners), cfg.batch_size)
                ]
                terms = {name: torch.cat([piece[name] for piece in pieces]) for name in pieces[0]}
            for k, (i, alpha) in enumerate(owners):
                rollouts.texts[alpha][i].append(texts[k])
                if score_kl:
                    rollouts.log_ratio[alpha][i].append(terms["log_ratio"][k].item())
                    rollouts.stepwise_kl[alpha][i].append(terms["stepwise_kl"][k].item())
                    rollouts.length[alpha][i].append(terms["length"][k].item())
        return rollouts

    def _score(
        self,
        prompts: Sequence[Prompt],
        texts: Mapping[float, list[list[str]]],
        reward_fn: RewardFn | None,
        reward_model: PreTrainedModel | None,
        reward_tokenizer: PreTrainedTokenizerBase | None,
        desc: str = "scoring",
    ) -> dict[float, list[list[float]]]:
        """Rewards in the layout of `texts` (`[alpha][prompt][sample]`), in batches of `reward_batch_size`."""
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("Pass exactly one of `reward_fn` (a callable) or `reward_model` (a sequence classifier).")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(
                f"`reward_fn` must be callable as reward_fn(prompts=..., completions=...), got {reward_fn!r}."
            )
        flat = [(alpha, i, j) for alpha in texts for i in range(len(prompts)) for j in range(len(texts[alpha][i]))]
        scores: list[float] = []
        size = self.config.reward_batch_size
        for start in self._progress(range(0, len(flat), size), desc, total=math.ceil(len(flat) / size)):
            batch = flat[start : start + size]
            batch_prompts = [prompts[i] for _, i, _ in batch]
            completions = [texts[alpha][i][j] for alpha, i, j in batch]
            if reward_fn is not None:
                values = list(reward_fn(prompts=batch_prompts, completions=completions))
            else:
                values = self._reward_model_scores(
                    reward_model, reward_tokenizer or self.tokenizer, batch_prompts, completions
                )
            if len(values) != len(batch):
                raise ValueError(f"The reward function returned {len(values)} scores for {len(batch)} completions.")
            values = [float(v) for v in values]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"The reward function returned non-finite scores: {values}.")
            scores.extend(values)
        rewards = {alpha: [[] for _ in prompts] for alpha in texts}
        for (alpha, i, _), value in zip(flat, scores):
            rewards[alpha][i].append(value)
        return rewards

    @torch.no_grad()
    def _reward_model_scores(
        self,
        reward_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
    ) -> list[float]:
        """`logits[:, 0]` of a sequence classifier on each chat-formatted (prompt, response)."""
        if getattr(reward_model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"The reward model has num_labels={reward_model.config.num_labels}; a reward model scores each "
                "response with one number (an AutoModelForSequenceClassification with num_labels=1)."
            )
        if reward_model.config.pad_token_id is None and len(prompts) > 1:
            raise ValueError(
                "The reward model's config has no pad_token_id, so it cannot find the last token of padded rows: set "
                "`reward_model.config.pad_token_id = reward_tokenizer.pad_token_id`."
            )
        if getattr(tokenizer, "chat_template", None):
            texts = []
            for prompt, completion in zip(prompts, completions):
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                messages = [*messages, {"role": "assistant", "content": completion}]
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            add_special_tokens = False
        else:
            texts = [format_prompt(tokenizer, p) + c for p, c in zip(prompts, completions)]
            add_special_tokens = True
        device = next(reward_model.parameters()).device
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        logits = reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, 0].float().tolist()

    def _remember(self, prompts: Sequence[Prompt], texts, rewards=None) -> None:
        self.generations = {
            alpha: [
                {
                    "prompt": prompts[i],
                    "completions": texts[alpha][i],
                    **({"rewards": rewards[alpha][i]} if rewards is not None else {}),
                }
                for i in range(len(prompts))
            ]
            for alpha in texts
        }

    # -- the evaluations ----------------------------------------------------------------------------------------------

    def evaluate_performance(
        self,
        prompts: Sequence[Prompt],
        reward_fn: RewardFn | None = None,
        reward_model: PreTrainedModel | None = None,
        reward_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> dict[str, Any]:
        """
        Reward, win rate against alpha 0 and sequence-level KL to the base model, for each alpha.

        Args:
            prompts: the evaluation prompts.
            reward_fn: `reward_fn(prompts=[...], completions=[...]) -> list[float]`.
            reward_model: or an `AutoModelForSequenceClassification` (num_labels=1) scoring prompt + response.
            reward_tokenizer: the reward model's tokenizer (defaults to the evaluator's).

        Returns `{"alphas", "reward_mean", "reward_stderr", "win_rate_vs_base", "kl", "kl_stderr", "kl_stepwise",
        "mean_length", "num_prompts", "num_samples"}`, each metric a list aligned with `alphas`.
        """
        prompts, _ = as_prompt_list(prompts)
        alphas = self._alphas
        rollouts = self._rollouts(prompts, alphas, score_kl=True)
        rewards = self._score(prompts, rollouts.texts, reward_fn, reward_model, reward_tokenizer)
        self._remember(prompts, rollouts.texts, rewards)

        def flat(table: Mapping[float, list[list[float]]], alpha: float) -> list[float]:
            return [value for row in table[alpha] for value in row]

        metrics = ("reward_mean", "reward_stderr", "win_rate_vs_base", "kl", "kl_stderr", "kl_stepwise", "mean_length")
        result: dict[str, Any] = {"alphas": alphas, **{name: [] for name in metrics}}
        for alpha in alphas:
            reward_mean, reward_stderr = _mean_stderr(flat(rewards, alpha))
            kl, kl_stderr = _mean_stderr(flat(rollouts.log_ratio, alpha))
            result["reward_mean"].append(reward_mean)
            result["reward_stderr"].append(reward_stderr)
            result["win_rate_vs_base"].append(win_rate(flat(rewards, alpha), flat(rewards, 0.0)))
            result["kl"].append(kl)
            result["kl_stderr"].append(kl_stderr)
            result["kl_stepwise"].append(statistics.fmean(flat(rollouts.stepwise_kl, alpha)))
            result["mean_length"].append(statistics.fmean(flat(rollouts.length, alpha)))
        result.update(num_prompts=len(prompts), num_samples=self.config.num_samples)
        self.results["performance"] = result
        self._log_table(
            "performance",
            result,
            ("reward_mean", "win_rate_vs_base", "kl", "kl_stepwise", "mean_length"),
        )
        return result

    def evaluate_controllability(
        self,
        prompts: Sequence[Prompt],
        reward_fn: RewardFn | None = None,
        reward_model: PreTrainedModel | None = None,
        reward_tokenizer: PreTrainedTokenizerBase | None = None,
        refusal_fn: RewardFn | None = None,
    ) -> dict[str, Any]:
        """
        How a behaviour follows alpha: the mean reward (`reward_fn` / `reward_model`) or, on safety prompts, the
        refusal rate (`refusal_fn(prompts=..., completions=...) -> list[bool | float]`, 1 = refusal) at each alpha.

        Returns `{"alphas", "metric", "values", "spearman", "monotonic", "monotonic_fraction"}`: `spearman` is the
        rank correlation of the values with alpha; `monotonic_fraction` the share of consecutive alpha steps that
        move in the direction of that correlation (ties count), and `monotonic` whether all do.
        """
        prompts, _ = as_prompt_list(prompts)
        alphas = self._alphas
        if len(alphas) < 2:
            raise ValueError(
                f"evaluate_controllability correlates the metric with alpha, so it needs two alphas or more; got "
                f"{alphas}. Set `EvaluationConfig(alphas=[...])`."
            )
        rollouts = self._rollouts(prompts, alphas, score_kl=False)
        if refusal_fn is not None:
            if reward_fn is not None or reward_model is not None:
                raise ValueError("Pass either `refusal_fn` or a reward (`reward_fn` / `reward_model`), not both.")
            scores = self._score(prompts, rollouts.texts, refusal_fn, None, None, desc="classifying")
            metric = "refusal_rate"
        else:
            scores = self._score(prompts, rollouts.texts, reward_fn, reward_model, reward_tokenizer)
            metric = "reward"
        self._remember(prompts, rollouts.texts, scores)
        values = [statistics.fmean(v for row in scores[alpha] for v in row) for alpha in alphas]
        rho = spearman_correlation(alphas, values)
        direction = -1.0 if rho < 0 else 1.0
        steps = [direction * (b - a) >= 0 for a, b in zip(values, values[1:])]
        result = {
            "alphas": alphas,
            "metric": metric,
            "values": values,
            "spearman": rho,
            "monotonic": all(steps),
            "monotonic_fraction": sum(steps) / len(steps) if steps else 1.0,
        }
        self.results["controllability"] = result
        self._log_table("controllability", {"alphas": alphas, metric: values}, (metric,))
        logger.info("spearman(alpha, %s) = %.3f, monotonic: %s", metric, rho, result["monotonic"])
        return result

    @torch.no_grad()
    def analyze_alignment_vectors(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """
        The alignment vectors `a_t` of each loaded head at unit strength, collected on the responses the model
        generates at alpha 1 (up to `max_analysis_tokens` positions):

        - `norm_mean` / `norm_std` / `norm_max` of `||a_t||_2`, and `rms_mean` (`||a_t||_2 / sqrt(V)`);
        - `spectrum`: the singular-value energy spectrum of the `(N, V)` matrix (`singular_spectrum`);
        - `promoted` / `suppressed`: the `top_tokens` tokens with the largest / smallest mean `a_t` (decoded);
        - with several heads, `cosine_similarity[a][b]`: the mean over positions of `cos(a_t^(a), a_t^(b))`, and
          `mean_vector_cosine[a][b]`: the cosine of their mean vectors.
        """
        prompts, _ = as_prompt_list(prompts)
        cfg = self.config
        names = self.model.adapter_names
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        count = 0
        eos = self._eos_token_id()
        generate_kwargs = sampling_kwargs(cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        if generate_kwargs["do_sample"]:
            generate_kwargs.update(top_p=cfg.top_p, top_k=cfg.top_k)
        starts = range(0, len(prompts), cfg.batch_size)
        for chunk, start in enumerate(self._progress(starts, "alignment vectors", total=len(starts))):
            if count >= cfg.max_analysis_tokens:
                break
            inputs = encode_prompts(self.tokenizer, prompts[start : start + cfg.batch_size], self.device)
            torch.manual_seed(cfg.seed + chunk)
            sequences = self.model.generate(
                **inputs, alpha=1.0, pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs
            )
            prompt_length = inputs["input_ids"].shape[1]
            mask = completion_mask(sequences[:, prompt_length:], eos)
            attention_mask = torch.cat([inputs["attention_mask"], mask], dim=1)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            keep = mask.bool()
            for name in names:
                out = self.model(
                    input_ids=sequences,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    alpha={name: 1.0},
                    return_alignment=True,
                    logits_to_keep=keep.shape[1] + 1,
                )
                collected[name].append(out.alignment_logits[:, :-1][keep].float().cpu())
            count += int(keep.sum())
        vectors = {name: torch.cat(parts)[: cfg.max_analysis_tokens] for name, parts in collected.items()}
        heads = {}
        for name, a in vectors.items():
            norms = a.norm(dim=-1)
            mean_vector = a.mean(0)
            k = min(cfg.top_tokens, a.shape[-1])
            top, bottom = mean_vector.topk(k), (-mean_vector).topk(k)
            heads[name] = {
                "num_tokens": a.shape[0],
                "norm_mean": norms.mean().item(),
                "norm_std": norms.std().item() if a.shape[0] > 1 else 0.0,
                "norm_max": norms.max().item(),
                "rms_mean": (norms / math.sqrt(a.shape[-1])).mean().item(),
                "spectrum": singular_spectrum(a),
                "promoted": [
                    [self.tokenizer.decode([i]), v] for i, v in zip(top.indices.tolist(), top.values.tolist())
                ],
                "suppressed": [
                    [self.tokenizer.decode([i]), -v] for i, v in zip(bottom.indices.tolist(), bottom.values.tolist())
                ],
            }
        result: dict[str, Any] = {"adapters": names, "heads": heads}
        if len(names) > 1:
            result["cosine_similarity"] = {
                a: {b: torch.cosine_similarity(vectors[a], vectors[b], dim=-1).mean().item() for b in names}
                for a in names
            }
            result["mean_vector_cosine"] = {
                a: {b: torch.cosine_similarity(vectors[a].mean(0), vectors[b].mean(0), dim=0).item() for b in names}
                for a in names
            }
        self.results["alignment_vectors"] = result
        for name, head in heads.items():
            logger.info(
                "head %r: ||a_t|| %.3f +- %.3f over %d tokens, effective rank %.1f, rank for 90%% energy %d; "
                "promotes %s; suppresses %s",
                name,
                head["norm_mean"],
                head["norm_std"],
                head["num_tokens"],
                head["spectrum"]["effective_rank"],
                head["spectrum"]["rank_90"],
                [t for t, _ in head["promoted"][:5]],
                [t for t, _ in head["suppressed"][:5]],
            )
        return result

    @torch.no_grad()
    def evaluate_efficiency(
        self, prompts: Sequence[Prompt], genarm_model: PreTrainedModel | None = None
    ) -> dict[str, Any]:
        """
        Decoding cost of the base model, IAV at alpha 1 and a GenARM-style baseline, side by side (see the module
        docstring). `genarm_model` is the GenARM reward LM; by default a randomly initialised model of the base
        model's architecture and size (the cost does not depend on its weights).

        Returns `{"device", "num_prompts", "batch_size", "new_tokens", "rounds", "memory_measure", "methods":
        {name: {"tokens_per_second", "latency_per_token_ms", "memory_bytes", "weights_bytes", "kv_cache_bytes",
        "new_tokens_per_row"}}, "ratios": {"iav/base" | "genarm/base" | "genarm/iav": {"tokens_per_second",
        "latency_per_token", "memory"}}}`.
        """
        prompts, _ = as_prompt_list(prompts)
        cfg = self.config
        base = self.model.get_base_model()
        if genarm_model is None:  # a reward LM of the base model's architecture and size (its weights do not matter)
            genarm_model = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype).to(self.device)
        reward = genarm_model.eval()
        batches = [
            encode_prompts(self.tokenizer, prompts[start : start + cfg.batch_size], self.device)
            for start in range(0, len(prompts), cfg.batch_size)
        ]
        generate_kwargs = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )

        def run(method: str, inputs: dict[str, torch.Tensor], **extra: Any) -> tuple[torch.Tensor, Any]:
            kwargs = {**generate_kwargs, **extra}
            if method == "base":
                return base.generate(**inputs, **kwargs), None
            if method == "iav":
                return self.model.generate(**inputs, alpha=1.0, **kwargs), None
            processor = GenARMLogitsProcessor(reward, cfg.genarm_alpha, attention_mask=inputs["attention_mask"])
            return base.generate(**inputs, logits_processor=[processor], **kwargs), processor

        methods = ("base", "iav", "genarm")
        weights = {
            "base": _parameter_bytes(base),
            "iav": _parameter_bytes(base, self.model.alignment_heads),
            "genarm": _parameter_bytes(base, reward),
        }
        is_cuda = self.device.type == "cuda"
        report: dict[str, dict[str, Any]] = {}
        for method in self._progress(methods, "measuring memory"):
            if is_cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            kv, new_tokens = 0, []
            for inputs in batches:
                out, processor = run(method, inputs, return_dict_in_generate=True)
                new_tokens.append(out.sequences.shape[1] - inputs["input_ids"].shape[1])
                batch_kv = cache_bytes(output_cache(out))
                if processor is not None:
                    batch_kv += cache_bytes(processor.past_key_values)
                kv = max(kv, batch_kv)
                del out, processor
            entry = {"weights_bytes": weights[method], "kv_cache_bytes": kv, "new_tokens_per_row": min(new_tokens)}
            if is_cuda:
                torch.cuda.synchronize(self.device)
                entry["peak_memory_bytes"] = weights[method] + torch.cuda.max_memory_allocated(self.device) - before
                entry["memory_bytes"] = entry["peak_memory_bytes"]
            else:
                entry["memory_bytes"] = weights[method] + kv
            report[method] = entry

        def timed(method: str) -> float:
            if is_cuda:
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            for inputs in batches:
                run(method, inputs)
            if is_cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - start

        for _ in range(cfg.efficiency_warmup):
            for method in methods:
                timed(method)
        rows = sum(inputs["input_ids"].shape[0] for inputs in batches)
        steps = len(batches) * cfg.max_new_tokens
        seconds: dict[str, list[float]] = {method: [] for method in methods}
        for r in self._progress(range(cfg.efficiency_rounds), "timing"):
            for method in methods[r % 3 :] + methods[: r % 3]:  # rotate the order between rounds
                seconds[method].append(timed(method))
        for method in methods:
            report[method]["tokens_per_second"] = statistics.median(
                rows * cfg.max_new_tokens / s for s in seconds[method]
            )
            report[method]["latency_per_token_ms"] = statistics.median(1000 * s / steps for s in seconds[method])
        ratios = {}
        for a, b in (("iav", "base"), ("genarm", "base"), ("genarm", "iav")):
            per_round = [sb / sa for sa, sb in zip(seconds[a], seconds[b])]  # speed ratio = inverse time ratio
            ratios[f"{a}/{b}"] = {
                "tokens_per_second": statistics.median(per_round),
                "latency_per_token": statistics.median(1 / x for x in per_round),
                "memory": report[a]["memory_bytes"] / report[b]["memory_bytes"],
            }
        result = {
            "device": str(self.device),
            "num_prompts": len(prompts),
            "batch_size": cfg.batch_size,
            "new_tokens": cfg.max_new_tokens,
            "rounds": cfg.efficiency_rounds,
            "memory_measure": (
                "weights + peak torch.cuda.max_memory_allocated above the allocation before the run"
                if is_cuda
                else "weights + KV caches at the end of decoding (CPU: activations not measured)"
            ),
            "methods": report,
            "ratios": ratios,
        }
        self.results["efficiency"] = result
        for name, ratio in ratios.items():
            logger.info(
                "%-12s speed %.3fx, latency/token %.3fx, memory %.3fx",
                name,
                ratio["tokens_per_second"],
                ratio["latency_per_token"],
                ratio["memory"],
            )
        return result

    # -- output -------------------------------------------------------------------------------------------------------

    def save_results(self, path: str | os.PathLike) -> str:
        """Write `results` (and the config) as JSON (NaN as null); returns the path."""
        if not self.results:
            raise ValueError("Nothing to save yet: run an evaluation (e.g. `evaluate_performance`) first.")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        payload = {"config": dataclasses.asdict(self.config), **self.results}
        atomic_write_text(path, json.dumps(_json_safe(payload), indent=2))
        return os.fspath(path)

    def plot_results(self, results: Mapping[str, Any] | None = None, out_dir: str | os.PathLike = "plots") -> dict:
        """PNG plots of `results` (default: this evaluator's) in `out_dir`; see `iav_trl.plotting.plot_results`."""
        from .plotting import plot_results

        return plot_results(self.results if results is None else results, out_dir)

    def export_alpaca_eval(
        self, path: str | os.PathLike, alpha: float = 1.0, generator: str | None = None
    ) -> list[dict[str, str]]:
        """
        Write the latest evaluation's responses at `alpha` in AlpacaEval's `model_outputs.json` format: a list of
        `{"instruction", "output", "generator"}` (the first sample per prompt; a conversation's instruction is its
        last user message). Returns the records.
        """
        if not self.generations:
            raise ValueError("No generations yet: run `evaluate_performance` (or `evaluate_controllability`) first.")
        alpha = float(alpha)
        if alpha not in self.generations:
            raise ValueError(f"No generations at alpha={alpha}; evaluated alphas are {sorted(self.generations)}.")
        if generator is None:
            name = self.config.generator_name
            if name is None:
                base_name = getattr(self.model.get_base_model().config, "_name_or_path", "") or "model"
                name = f"{os.path.basename(base_name.rstrip('/'))}-iav-alpha{alpha:g}"
            generator = name
        records = []
        for item in self.generations[alpha]:
            prompt = item["prompt"]
            if is_conversation(prompt):
                prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
            records.append({"instruction": prompt, "output": item["completions"][0], "generator": generator})
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(path, json.dumps(records, indent=2, ensure_ascii=False))
        return records

    def _log_table(self, title: str, table: Mapping[str, Sequence[float]], columns: Sequence[str]) -> None:
        header = "alpha   " + "  ".join(f"{name:>16}" for name in columns)
        lines = [f"{title}:", header]
        for k, alpha in enumerate(table["alphas"]):
            lines.append(f"{alpha:<7g} " + "  ".join(f"{table[name][k]:>16.4f}" for name in columns))
        logger.info("\n".join(lines))


__all__ = [
    "EvaluationConfig",
    "IAVEvaluator",
    "cache_bytes",
    "score_sequence_kl",
    "singular_spectrum",
    "spearman_correlation",
    "win_rate",
]
