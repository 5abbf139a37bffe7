"""`IAVEvaluator`: reward, KL, cost and controllability of an `IAVModel` across alignment strengths.

    evaluator = IAVEvaluator(model, tokenizer, EvaluationConfig(alphas=[0.0, 0.5, 1.0, 1.5, 2.0]))
    performance = evaluator.evaluate_performance(prompts, reward_fn=my_reward)   # or reward_model=...
    efficiency = evaluator.evaluate_efficiency(prompts)
    vectors = evaluator.analyze_alignment_vectors(prompts)
    control = evaluator.evaluate_controllability(prompts, reward_fn=my_reward)  # or refusal_fn=...
    evaluator.save_results("results.json"); evaluator.plot_results(out_dir="plots")  # default: iav_eval_results.json
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
  (`iav_trl.inference.genarm`: the base model plus a reward LM of the same size, each with its own KV cache) decode the
  same prompts greedily with exactly `max_new_tokens` new tokens each, interleaved over rounds; speeds are medians over
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from iav_trl.evaluation.config import EvaluationConfig
from iav_trl.evaluation.metrics import (
    cache_bytes,
    mean_stderr,
    parameter_bytes,
    score_sequence_kl,
    singular_spectrum,
    spearman_correlation,
    win_rate,
)
from iav_trl.evaluation.timing import summarize_times, time_rounds
from iav_trl.inference.genarm import GenARMLogitsProcessor, output_cache
from iav_trl.inference.iav_inference import (
    Prompt,
    as_prompt_list,
    completion_mask,
    decode_completions,
    encode_prompts,
    format_prompt,
    is_conversation,
    sampling_kwargs,
)
from iav_trl.tuners.iav.model import IAVModel
from iav_trl.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

# Where `IAVEvaluator.save_results()` writes when given no path: this name, in the working directory.
DEFAULT_RESULTS_FILE = "iav_eval_results.json"

RewardFn = Callable[..., Sequence[float]]


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

    @staticmethod
    def _check_scorer(reward_fn: Any, reward_model: Any, fn_name: str = "reward_fn") -> None:
        """Refuse, before any generation, a scorer that `_score` could not use."""
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("Pass exactly one of `reward_fn` (a callable) or `reward_model` (a sequence classifier).")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(
                f"`{fn_name}` must be callable as {fn_name}(prompts=..., completions=...) -> list[float], got "
                f"{reward_fn!r}."
            )

    def _score(
        self,
        prompts: Sequence[Prompt],
        texts: Mapping[float, list[list[str]]],
        reward_fn: RewardFn | None,
        reward_model: PreTrainedModel | None,
        reward_tokenizer: PreTrainedTokenizerBase | None,
        desc: str = "scoring",
        fn_name: str = "reward_fn",
    ) -> dict[float, list[list[float]]]:
        """Rewards in the layout of `texts` (`[alpha][prompt][sample]`), in batches of `reward_batch_size`;
        `fn_name` is the argument `reward_fn` came in as (`"refusal_fn"` for a refusal classifier), for messages."""
        self._check_scorer(reward_fn, reward_model, fn_name)
        source = f"`{fn_name}`" if reward_fn is not None else "The reward model"
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
                raise ValueError(
                    f"{source} returned {len(values)} scores for {len(batch)} completions: it must return one per "
                    "completion, in order."
                )
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError) as err:
                raise TypeError(f"{source} must return numbers (or booleans), got {values!r}.") from err
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{source} returned non-finite scores: {values}; return finite numbers.")
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
        self._check_scorer(reward_fn, reward_model)
        alphas = self._alphas
        rollouts = self._rollouts(prompts, alphas, score_kl=True)
        rewards = self._score(prompts, rollouts.texts, reward_fn, reward_model, reward_tokenizer)
        self._remember(prompts, rollouts.texts, rewards)

        def flat(table: Mapping[float, list[list[float]]], alpha: float) -> list[float]:
            return [value for row in table[alpha] for value in row]

        metrics = ("reward_mean", "reward_stderr", "win_rate_vs_base", "kl", "kl_stderr", "kl_stepwise", "mean_length")
        result: dict[str, Any] = {"alphas": alphas, **{name: [] for name in metrics}}
        for alpha in alphas:
            reward_mean, reward_stderr = mean_stderr(flat(rewards, alpha))
            kl, kl_stderr = mean_stderr(flat(rollouts.log_ratio, alpha))
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
        if refusal_fn is not None:
            if reward_fn is not None or reward_model is not None:
                raise ValueError("Pass either `refusal_fn` or a reward (`reward_fn` / `reward_model`), not both.")
            self._check_scorer(refusal_fn, None, "refusal_fn")
        elif reward_fn is None and reward_model is None:
            raise ValueError(
                "evaluate_controllability needs what to measure: `refusal_fn(prompts=..., completions=...)` (1 = "
                "refusal) on safety prompts, or a reward: `reward_fn` (a callable) or `reward_model`."
            )
        else:
            self._check_scorer(reward_fn, reward_model)
        rollouts = self._rollouts(prompts, alphas, score_kl=False)
        if refusal_fn is not None:
            scores = self._score(
                prompts, rollouts.texts, refusal_fn, None, None, desc="classifying", fn_name="refusal_fn"
            )
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
            "base": parameter_bytes(base),
            "iav": parameter_bytes(base, self.model.alignment_heads),
            "genarm": parameter_bytes(base, reward),
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

        rows = sum(inputs["input_ids"].shape[0] for inputs in batches)
        steps = len(batches) * cfg.max_new_tokens

        def decode_all(method: str) -> Callable[[], None]:
            return lambda: [run(method, inputs) for inputs in batches]

        seconds = time_rounds(
            {method: decode_all(method) for method in methods},
            rounds=cfg.efficiency_rounds,
            warmup=cfg.efficiency_warmup,
            device=self.device,
        )
        summary = summarize_times(seconds, work=rows * cfg.max_new_tokens)
        for method in methods:
            report[method]["tokens_per_second"] = summary[method]["per_s"]
            report[method]["latency_per_token_ms"] = 1000 * summary[method]["median_s"] / steps
        ratios = {}
        for a, b in (("iav", "base"), ("genarm", "base"), ("genarm", "iav")):
            speed = summary[a]["speed_vs"][b]  # median over rounds of t_b / t_a
            ratios[f"{a}/{b}"] = {
                "tokens_per_second": speed,
                "latency_per_token": 1 / speed,
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

    def save_results(self, path: str | os.PathLike = DEFAULT_RESULTS_FILE) -> str:
        """Write `results` (and the config) as JSON (NaN as null) to `path`, by default `iav_eval_results.json` in
        the working directory (`DEFAULT_RESULTS_FILE`); returns the path."""
        if not self.results:
            raise ValueError("Nothing to save yet: run an evaluation (e.g. `evaluate_performance`) first.")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        payload = {"config": dataclasses.asdict(self.config), **self.results}
        atomic_write_text(path, json.dumps(_json_safe(payload), indent=2))
        return os.fspath(path)

    def plot_results(self, results: Mapping[str, Any] | None = None, out_dir: str | os.PathLike = "plots") -> dict:
        """PNG plots of `results` (default: this evaluator's) in `out_dir`; see
        `iav_trl.evaluation.plotting.plot_results`."""
        from iav_trl.evaluation.plotting import plot_results

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


__all__ = ["EvaluationConfig", "IAVEvaluator"]
