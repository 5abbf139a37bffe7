"""The three methods of the real-data benchmark: how each is trained, evaluated, sampled and scored.

- IAV: `iav_trl.IAVTrainer` on the frozen base model with the default alignment head (`IAVConfig`'s defaults);
  decoded as `z_base + alpha * a_t`.
- DPO + LoRA: `trl.DPOTrainer` with `LORA` on the base model (reference: the base model, adapters disabled); merged
  into a copy of the base model for decoding.
- GenARM: the same LoRA on the same base model, trained with GenARM's reference-free loss through
  `benchmarks.alignment.methods.ReferenceFreeDPOTrainer`, so that `r(x, y) = beta * log pi_r(y | x)`; decoded by
  `iav_trl.inference.genarm` as `z_base + alpha * log_softmax(z_arm)`.

`train_run` trains one method at one learning rate on the training pairs, scores it on the validation pairs and then
computes every figure of the report that needs its trained weights (`report_figures`: held-out rewards pair by pair,
`heldout_metrics`; KL to the base model, `sample_kl`; greedy generations, `greedy_completions`), so that a finished
run is a small JSON record and no head or adapter has to be kept; `train_isolated` does it in a fresh (spawned)
process, so that its wall time and RSS high-water mark are the training's own. `load_trained` reads a saved head or
adapter back.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback
from trl import DPOConfig, DPOTrainer

from benchmarks.alignment.benchmark import genarm_decoder, iav_decoder
from benchmarks.alignment.methods import ReferenceFreeDPOTrainer
from benchmarks.alignment.rollouts import GREEDY, SAMPLING
from benchmarks.train_step import maxrss_mb, release_memory, reset_peak_rss, rss_mb
from iav_trl import IAVConfig, IAVModel, IAVTrainer
from iav_trl.evaluation.metrics import kl_per_token, sequence_kl_terms
from iav_trl.inference.iav_inference import completion_mask, decode_completions, encode_prompts
from iav_trl.models.base_models import load_base_model, load_base_tokenizer
from iav_trl.trainer.preference_eval import preference_scores

METHODS = {"iav": "IAV", "dpo_lora": "DPO + LoRA", "genarm": "GenARM"}
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")

Decoder = Callable[..., Any]


def load_model(name: str) -> PreTrainedModel:
    """The base model, float32, in evaluation mode."""
    return load_base_model(name, dtype="float32").eval()


def _arguments(
    config, method: str, output_dir: str, learning_rate: float, iav_settings: dict[str, Any] | None = None
) -> DPOConfig:
    """
    Every method's trainer arguments: the same pairs per step, epochs, schedule, beta and maximum length.
    `iav_settings`: `IAVConfig` fields of the head and the IAV loss that differ from the defaults.
    """
    common = dict(
        output_dir=output_dir,
        beta=config.beta,
        learning_rate=learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        gradient_checkpointing=None,  # off (DPOConfig's default is on) under the current name, which does not warn
        activation_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=False,
        max_length=config.max_length,
        seed=config.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if method == "iav":
        return IAVConfig(**{**common, **(iav_settings or {})})
    # GenARM's reference-free loss rides on DPOTrainer's precomputed-reference path (see `ReferenceFreeDPOTrainer`).
    return DPOConfig(**common, precompute_ref_log_probs=method == "genarm")


def build_trainer(
    method: str,
    model: PreTrainedModel | IAVModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    config,
    output_dir: str,
    learning_rate: float = 0.0,
    ref_model: PreTrainedModel | None = None,
    iav_settings: dict[str, Any] | None = None,
) -> DPOTrainer:
    """
    The method's trainer. A plain base model gets a fresh head (IAV) or `LORA` adapter (DPO, GenARM); a trained
    `IAVModel` or `PeftModel` is evaluated as it is.

    A trained `PeftModel` needs `ref_model`, the untouched base model, for DPO: given a pretrained adapter and no
    reference, `DPOTrainer` makes a frozen copy of that adapter its reference ("ref"), so that every held-out reward
    would be exactly 0.
    """
    args = _arguments(config, method, output_dir, learning_rate, iav_settings)
    kwargs = dict(args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    if method == "iav":
        trainer = IAVTrainer(model, **kwargs)
    else:
        trained = isinstance(model, PeftModel)
        if trained and method == "dpo_lora" and ref_model is None:
            raise ValueError("Evaluating a trained DPO adapter needs `ref_model`, the untouched base model.")
        trainer_class = DPOTrainer if method == "dpo_lora" else ReferenceFreeDPOTrainer
        peft_config = None if trained else LoraConfig(**LORA)
        trainer = trainer_class(model, ref_model=ref_model, peft_config=peft_config, **kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


# Reported metric -> the `DPOTrainer.evaluate` metric it is (DPO + LoRA and GenARM are scored by TRL's evaluation).
TRL_METRICS = {
    "accuracy": "eval_rewards/accuracies",
    "margin": "eval_rewards/margins",
    "chosen_reward": "eval_rewards/chosen",
    "rejected_reward": "eval_rewards/rejected",
    "loss": "eval_loss",
}


def iav_metrics(trainer: IAVTrainer, alphas: Sequence[float], per_pair: bool = False) -> list[dict[str, Any]]:
    """
    IAV's implicit-reward figures at each of `alphas` from `IAVTrainer.evaluate_alphas` (one backbone pass per batch
    for every alpha, the reference `z_base` of the same pass), in `reward_metrics`' keys: `tie` when every pair
    ties (alpha 0 is the base model), `win_rate` with ties as half, and `completion_kl`, the teacher-forced
    KL(p_final || p_base) per completion token of the pairs; with `per_pair`, every pair's `margins`.
    """
    return [
        {
            "alpha": row["alpha"],
            **{name: row[name] for name in TRL_METRICS},
            "tie": row["ties"] == 1.0,
            "win_rate": row["win_rate"],
            "completion_kl": row["kl"],
            **({"margins": row["margins"]} if per_pair else {}),
        }
        for row in trainer.evaluate_alphas(alphas, per_pair=per_pair)
    ]


def pair_metrics(method: str, trainer: DPOTrainer) -> dict[str, Any]:
    """
    DPO + LoRA's or GenARM's implicit-reward figures (`reward_metrics`' keys) and every pair's `margins`, in the
    evaluation dataset's order, from `DPOTrainer.compute_ref_log_probs` (TRL's sequence log-probs of a batch under
    a model):

        DPO + LoRA:  r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))   (`trainer.ref_model`, the base)
        GenARM:      r(x, y) = beta * log pi_r(y | x)                       (reference-free)

    The same figures as `trainer.evaluate()` gives (its means of batch means, where every batch is full), pair by
    pair, so that a paired comparison with IAV on the same pairs can be made.
    """
    if method == "dpo_lora" and trainer.ref_model is None:
        raise ValueError("DPO + LoRA's per-pair rewards need the trainer's `ref_model`, the untouched base model.")
    rewards: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
            if method == "dpo_lora":
                ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
                chosen, rejected = chosen - ref_chosen, rejected - ref_rejected
            rewards["chosen"].append(trainer.beta * chosen.float().cpu())
            rewards["rejected"].append(trainer.beta * rejected.float().cpu())
    scores = preference_scores(torch.cat(rewards["chosen"]), torch.cat(rewards["rejected"]), per_pair=True)
    row = {name: scores[name] for name in TRL_METRICS}
    row["tie"] = scores["ties"] == 1.0
    row["win_rate"] = scores["win_rate"]
    return row | {"margins": scores["margins"]}


def reward_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """
    The implicit-reward figures of `trainer.evaluate()`. TRL's accuracy counts a pair whose two rewards are equal as
    a loss; when every reward is exactly 0 (IAV at alpha 0 is the base model, so every pair ties) the row is marked
    `tie` and its `win_rate` (ties counted as half) is 0.5. Otherwise `win_rate` is the accuracy.
    """
    row = {name: metrics[key] for name, key in TRL_METRICS.items()}
    row["tie"] = row["chosen_reward"] == 0.0 and row["rejected_reward"] == 0.0 and row["margin"] == 0.0
    row["win_rate"] = 0.5 if row["tie"] else row["accuracy"]
    return row


def quiet() -> None:
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def train_run(
    config,
    method: str,
    learning_rate: float,
    splits: dict[str, Dataset],
    prompt_sets: dict[str, Any] | None = None,
    quote_prompts: bool = True,
) -> dict[str, Any]:
    """
    Train `method` at `learning_rate` on `splits["train"]`, evaluate it on `splits["validation"]` (the method's own
    implicit reward at its training strength), then compute its `report_figures` on `splits["heldout"]` (and
    `prompt_sets`; `quote_prompts` as there). Memory is measured as in `train_step.py`: the peak-RSS mark is
    reset right before `trainer.train()`, so `train_peak_mb` is what training added on top of the loaded model and
    trainer; `abs_peak_mb` is the process's high-water mark (taken before the report figures).
    """
    quiet()
    tokenizer = load_base_tokenizer(config.model)
    with tempfile.TemporaryDirectory(prefix=f"real-data-{method}-") as output_dir:
        trainer = build_trainer(
            method,
            load_model(config.model),
            tokenizer,
            splits["train"],
            splits["validation"],
            config,
            output_dir,
            learning_rate,
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        release_memory()
        before = rss_mb()
        peak_reset = reset_peak_rss()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        train_peak = maxrss_mb()
        if method == "iav":
            validation_metrics = iav_metrics(trainer, [trainer.training_alpha])[0]
        else:
            validation_metrics = reward_metrics(trainer.evaluate())
        steps = trainer.state.global_step
        save_dir = os.path.join(output_dir, "trained")
        trainer.save_model(save_dir)
        del trainer
        release_memory()
        # The report's figures from the saved head or adapter in a fresh base model, as a user would load it.
        model = load_trained(method, save_dir, load_model(config.model))
        figures = report_figures(config, method, model, tokenizer, splits["heldout"], prompt_sets, quote_prompts)
    del model
    release_memory()
    return {
        "learning_rate": learning_rate,
        "steps": steps,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        "rss_before_train_mb": before,
        "train_peak_mb": train_peak - before,
        "abs_peak_mb": train_peak,
        "peak_reset": peak_reset,
        "validation": validation_metrics,
        "report": figures,
    }


def train_isolated(*args: Any) -> dict[str, Any]:
    """`train_run(*args)` in a freshly spawned process (its own wall time and RSS high-water mark)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_run, *args).result()


def load_trained(method: str, save_dir: str, base: PreTrainedModel) -> IAVModel | PeftModel:
    """
    IAV: the trained head attached to `base`, whose own calls stay the base model's (the head acts only inside the
    `IAVModel`'s calls). DPO, GenARM: the trained adapter injected into `base`, which is then that model.
    """
    if method == "iav":
        return IAVModel.from_pretrained(base, save_dir).eval()
    return PeftModel.from_pretrained(base, save_dir).eval()


def heldout_metrics(
    method: str,
    model: IAVModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Dataset,
    config,
    alphas: Sequence[float] = (1.0,),
    base: PreTrainedModel | None = None,
) -> list[dict[str, Any]]:
    """
    The held-out implicit-reward figures, each row with every pair's `margins` (in `heldout`'s order): for IAV one
    row per alpha (`iav_metrics`: every alpha from one backbone pass per batch); for the others one row
    (`pair_metrics`). DPO's rewards are measured against `base`, an untouched base model (its reference in
    training) that no other code calls: `DPOTrainer` patches its reference model's `forward`.
    """
    reference = base if method == "dpo_lora" else None
    with tempfile.TemporaryDirectory(prefix=f"real-data-eval-{method}-") as output_dir:
        trainer = build_trainer(method, model, tokenizer, heldout, heldout, config, output_dir, ref_model=reference)
        if method == "iav":
            return iav_metrics(trainer, alphas, per_pair=True)
        return [pair_metrics(method, trainer)]


@contextlib.contextmanager
def feature_cache_in(directory: str) -> Iterator[None]:
    """Point iav-trl's cache (`IAV_TRL_CACHE`, where cached backbone features go) at `directory` inside the block.
    GGUF bases are converted under the same root: load models outside the block to reuse their usual conversion."""
    previous = os.environ.get("IAV_TRL_CACHE")
    os.environ["IAV_TRL_CACHE"] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("IAV_TRL_CACHE")
        else:
            os.environ["IAV_TRL_CACHE"] = previous


Scorer = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _response_logits(
    model: Callable[..., Any], sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int, **kwargs
):
    """`model`'s outputs whose `(B, T, V)` logits predict the `T` response tokens, teacher-forced as in `generate`."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    length = sequences.shape[1] - prompt_length
    return model(input_ids=sequences, attention_mask=mask, position_ids=positions, logits_to_keep=length + 1, **kwargs)


def iav_scorer(model: IAVModel, alpha: float) -> Scorer:
    """
    IAV's and the base model's log-probabilities from one pass: `log_softmax(z_base + alpha * a_t)` and
    `log_softmax(z_base)` (at alpha 0 the head is not applied, so the two are identical).
    """

    def score(sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = _response_logits(model, sequences, mask, prompt_length, alpha=alpha, return_alignment=True)
        return out.logits[:, :-1].float().log_softmax(-1), out.base_logits[:, :-1].float().log_softmax(-1)

    return score


def model_scorer(model: PreTrainedModel, base: PreTrainedModel) -> Scorer:
    """A fine-tuned model's and the base model's log-probabilities."""

    def score(sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, base_logits = (_response_logits(m, sequences, mask, prompt_length).logits for m in (model, base))
        return logits[:, :-1].float().log_softmax(-1), base_logits[:, :-1].float().log_softmax(-1)

    return score


def genarm_scorer(base: PreTrainedModel, reward_model: PreTrainedModel, alpha: float) -> Scorer:
    """GenARM's decoding distribution, `log_softmax(z_base + alpha * log_softmax(z_arm))`, and the base model's."""

    def score(sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        z_base, z_arm = (
            _response_logits(m, sequences, mask, prompt_length).logits[:, :-1].float() for m in (base, reward_model)
        )
        return (z_base + alpha * z_arm.log_softmax(-1)).log_softmax(-1), z_base.log_softmax(-1)

    return score


@torch.no_grad()
def sample_kl(
    decoder: Decoder,
    scorer: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]],
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """
    KL to the base model per completion token. `num_samples` responses per prompt are sampled from `decoder` at
    temperature 1 without truncation (`SAMPLING`; batch `i` after `torch.manual_seed(seed + i)`), up to and
    including EOS; `scorer` scores each teacher-forced under the method's decoding distribution (the very logits
    `decoder` samples from) and under the base model, on the same inputs:

        kl_per_token          = sum_y sum_t [log p_method(y_t) - log p_base(y_t)] / sum_y |y|
        stepwise_kl_per_token = sum_y sum_t KL(p_method(. | x, y_<t) || p_base(. | x, y_<t)) / sum_y |y|

    Both estimate the same KL (the second, exact per step along the sampled prefixes, has the lower variance);
    `kl_per_token_stderr` is the ratio estimator's standard error. A method identical to the base model (IAV at
    alpha 0) scores exactly 0.
    """
    rows = [prompt for prompt in prompts for _ in range(num_samples)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    logratios, stepwise, lengths = [], [], []
    for index, start in enumerate(range(0, len(rows), batch_size)):
        inputs = encode_prompts(tokenizer, rows[start : start + batch_size])
        torch.manual_seed(seed + index)
        sequences = decoder(**inputs, **SAMPLING, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        prompt_length = inputs["input_ids"].shape[1]
        new = sequences[:, prompt_length:]
        mask = completion_mask(new, eos)
        logp, ref = scorer(sequences, torch.cat([inputs["attention_mask"], mask], dim=1), prompt_length)
        log_ratio, steps = sequence_kl_terms(logp, ref, new, mask)
        logratios.append(log_ratio)
        stepwise.append(steps)
        lengths.append(mask.float().sum(-1))
    return kl_per_token(torch.cat(logratios), torch.cat(stepwise), torch.cat(lengths))


@torch.no_grad()
def greedy_completions(
    decoder: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int,
) -> list[str]:
    """Greedy responses of `decoder` to `prompts` (one batch), up to EOS or `max_new_tokens`."""
    inputs = encode_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    sequences = decoder(**inputs, **GREEDY, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    new = sequences[:, inputs["input_ids"].shape[1] :]
    return decode_completions(tokenizer, new, completion_mask(new, eos))


def generations(
    decoders: dict[str, Decoder],
    tokenizer,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    quote_prompts: bool = True,
) -> list[dict[str, Any]]:
    """
    Greedy responses of every decoder to `prompts`: one entry per prompt, its `index` in `prompts`, the `prompt`
    (None unless `quote_prompts`: a CC BY-NC dataset's text is never written into the repository) and
    `{setting: response}`.
    """
    responses = {
        name: greedy_completions(decoder, tokenizer, prompts, max_new_tokens) for name, decoder in decoders.items()
    }
    return [
        {
            "index": i,
            "prompt": prompt if quote_prompts else None,
            "responses": {name: texts[i] for name, texts in responses.items()},
        }
        for i, prompt in enumerate(prompts)
    ]


def decoding_settings(
    config, method: str, model: IAVModel | PeftModel, base: PreTrainedModel | None
) -> dict[str, tuple[Decoder, Scorer]]:
    """
    The decoding distributions of a trained `model` that the report samples and scores, by setting name: IAV at
    each of `config.iav_alphas` (its own pass gives the base logits); DPO + LoRA, merged, scored against `base`;
    GenARM at `config.genarm_alpha`, guiding `base`.
    """
    if method == "iav":
        return {f"IAV alpha={a:g}": (iav_decoder(model, a), iav_scorer(model, a)) for a in config.iav_alphas}
    merged = model.merge_and_unload().eval()
    if method == "dpo_lora":
        return {"DPO + LoRA": (merged.generate, model_scorer(merged, base))}
    alpha = config.genarm_alpha
    return {f"GenARM alpha={alpha:g}": (genarm_decoder(base, merged, alpha), genarm_scorer(base, merged, alpha))}


# The settings whose KL and generations are also reported on UltraFeedback's prompts for the HH-RLHF-trained models.
CROSS_DATASET_KL = ("IAV alpha=1", "DPO + LoRA")
# The methods whose answers to the safety prompts are recorded: IAV at every alpha, and DPO + LoRA as one point.
SAFETY_METHODS = ("iav", "dpo_lora")


def report_figures(
    config,
    method: str,
    model: IAVModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Dataset,
    prompt_sets: dict[str, Any] | None = None,
    quote_prompts: bool = True,
) -> dict[str, Any]:
    """
    Every figure of the report that needs a trained run's weights, so that the run need not be kept (the held-out
    prompts of the generations are quoted only with `quote_prompts`):

    - `heldout`: the held-out implicit-reward rows with every pair's `margins` (`heldout_metrics`; IAV one row per
      alpha), DPO's against a fresh base model as reference;
    - `kl`: KL per token to the base model of each decoding setting (`decoding_settings`), sampled on the first
      `config.kl_prompts` held-out prompts (`sample_kl`);
    - `generations`: greedy responses of each setting to the first `config.num_generation_prompts` held-out prompts;
    - with `prompt_sets["ultrafeedback"]` (UltraFeedback's held-out prompts, for the HH-RLHF-trained models), the
      same KL for the settings of `CROSS_DATASET_KL` and the same generations on those prompts;
    - with `prompt_sets["safety"]` (`{source: prompts}`, harmful and harmless requests held out from every
      training split) and a method of `SAFETY_METHODS`: `safety_answers`, every setting's greedy answer to each
      prompt (`config.safety_new_tokens` tokens at most), by source, in the order of the prompts (never quoted).

    A DPO or GenARM `model` is merged into its base weights for decoding: do not use it afterwards.
    """
    reference = load_model(config.model) if method == "dpo_lora" else None  # DPOTrainer patches its forward
    rows = heldout_metrics(method, model, tokenizer, heldout, config, config.iav_alphas, base=reference)
    del reference
    base = None if method == "iav" else load_model(config.model)
    settings = decoding_settings(config, method, model, base)
    prompts = [row["prompt"] for row in heldout]

    def kl(setting: str, prompt_list: Sequence[list[dict[str, str]]]) -> dict[str, Any]:
        decoder, scorer = settings[setting]
        figures = sample_kl(
            decoder, scorer, tokenizer, prompt_list[: config.kl_prompts], config.kl_samples,
            config.kl_new_tokens, config.sample_batch_size, config.seed,
        )  # fmt: skip
        return {"setting": setting, **figures}

    decoders = {setting: decoder for setting, (decoder, _) in settings.items()}
    count, new_tokens = config.num_generation_prompts, config.generation_new_tokens
    figures = {
        "heldout": rows if method == "iav" else rows[0],
        "kl": [kl(setting, prompts) for setting in settings],
        "generations": generations(decoders, tokenizer, prompts[:count], new_tokens, quote_prompts),
    }
    prompt_sets = prompt_sets or {}
    if "ultrafeedback" in prompt_sets:
        other = prompt_sets["ultrafeedback"]
        figures["kl_on_ultrafeedback_prompts"] = [kl(s, other) for s in settings if s in CROSS_DATASET_KL]
        figures["generations_on_ultrafeedback_prompts"] = generations(decoders, tokenizer, other[:count], new_tokens)
    if "safety" in prompt_sets and method in SAFETY_METHODS:
        figures["safety_answers"] = {
            source: {
                setting: greedy_completions(decoder, tokenizer, requests, config.safety_new_tokens)
                for setting, decoder in decoders.items()
            }
            for source, requests in prompt_sets["safety"].items()
        }
    return figures
