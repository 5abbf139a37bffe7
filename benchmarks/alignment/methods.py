"""The models of the ground-truth alignment benchmark: the SFT model pretrained from scratch, and the three aligners.

- `pretrain`: a tiny Llama trained from scratch (next-token loss on whole dialogues) on the synthetic corpus; it
  is the SFT model every method starts from and is measured against.
- IAV (`train_iav`): `iav_trl.IAVTrainer` on the frozen SFT model: only the alignment head trains, decoded as
  `z_sft + alpha * a_t`.
- DPO (`train_dpo`): `trl.DPOTrainer` with a `peft.LoraConfig` on a copy of the SFT model (reference: the SFT model,
  LoRA disabled); the adapter is merged for decoding.
- GenARM's autoregressive reward model (`train_arm`): a second LM of the same size, initialised from the SFT model
  and trained with LoRA through `ReferenceFreeDPOTrainer`, i.e. GenARM's loss

      L = -log sigmoid(beta_r * (log pi_r(y_c | x) - log pi_r(y_r | x)))

  (the DPO loss with `log pi_ref := 0`: no reference model), so that `r(x, y) = beta_r * sum_t log pi_r(y_t | x,
  y_<t)`. It is decoded by `iav_trl.inference.genarm` as `z_sft + alpha * log_softmax(z_arm)`.

All three see the same pairs, batch size, number of epochs (hence optimizer steps), LoRA/head settings and schedule;
only the learning rate (and IAV's KL weight `lambda_kl`) is each method's own (see `benchmark.py` for how
it is chosen).
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback
from trl import DPOConfig, DPOTrainer

from benchmarks.alignment.task import Prompt
from iav_trl import IAVConfig, IAVModel, IAVTrainer


@dataclass
class TrainingSettings:
    """What every preference method shares (the learning rate, beta and IAV's `lambda_kl` differ between runs)."""

    epochs: int = field(default=2, metadata={"help": "Epochs over the preference pairs (same for every method)."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per optimizer step (same for every method)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up fraction, then linear decay."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps instead of epochs when > 0 (smoke tests)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank of DPO and of the GenARM reward model."})
    num_interventions: int = field(default=4, metadata={"help": "K of IAV's alignment head."})
    intervention_dim: int = field(default=32, metadata={"help": "r of IAV's alignment head."})
    lambda_l2: float = field(default=0.01, metadata={"help": "IAV's L2 weight (IAVConfig default)."})


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: list[tuple[Prompt, str]],
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[float]:
    """
    Train `model` in place with the next-token loss on every token of the chat-formatted dialogues, one pass in
    batches of `batch_size` (AdamW, 5% warm-up, cosine decay). Returns the loss of each step.
    """
    texts = [
        tokenizer.apply_chat_template(prompt.messages() + [{"role": "assistant", "content": response}], tokenize=False)
        for prompt, response in dialogues
    ]
    steps = len(texts) // batch_size
    warmup = max(1, steps // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        batch = tokenizer(
            texts[step * batch_size : (step + 1) * batch_size],
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


class ReferenceFreeDPOTrainer(DPOTrainer):
    """
    `DPOTrainer` with `log pi_ref := 0`: the sigmoid loss becomes GenARM's reward-model loss
    `-log sigmoid(beta * (log pi(y_c | x) - log pi(y_r | x)))`. It rides on DPOTrainer's precomputed-reference path
    (`precompute_ref_log_probs=True`): instead of a reference model's log-probs, every pair gets zeros.
    """

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        zeros = [0.0] * len(dataset)
        return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)


def _common_args(settings: TrainingSettings, output_dir: str, seed: int, learning_rate: float, beta: float) -> dict:
    return dict(
        output_dir=output_dir,
        beta=beta,
        learning_rate=learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_ratio,
        gradient_checkpointing=False,
        bf16=False,
        max_length=128,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _lora(settings: TrainingSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0, target_modules="all-linear"
    )


@dataclass
class Trained:
    """A trained method: its model for decoding, its own loss on the validation pairs, its optimizer steps and
    trainable parameters (the alignment head, or the LoRA adapter before it was merged)."""

    model: PreTrainedModel | IAVModel
    validation_loss: float
    steps: int
    trainable_parameters: int


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_iav(
    sft_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    validation_pairs: Dataset,
    settings: TrainingSettings,
    seed: int,
    learning_rate: float,
    beta: float,
    lambda_kl: float,
) -> Trained:
    """`IAVTrainer` on a copy of the SFT model (frozen): the IAV loss at alpha 1, with KL weight `lambda_kl`."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = IAVConfig(
            **_common_args(settings, output_dir, seed, learning_rate, beta),
            alpha=1.0,
            lambda_kl=lambda_kl,
            lambda_l2=settings.lambda_l2,
            num_interventions=settings.num_interventions,
            intervention_dim=settings.intervention_dim,
        )
        trainer = IAVTrainer(
            copy.deepcopy(sft_model),
            args=args,
            train_dataset=pairs,
            eval_dataset=validation_pairs,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
    return Trained(trainer.model.eval(), loss, trainer.state.global_step, _trainable(trainer.model))


def _train_lora(
    trainer_class: type[DPOTrainer],
    sft_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    validation_pairs: Dataset,
    settings: TrainingSettings,
    seed: int,
    learning_rate: float,
    beta: float,
) -> Trained:
    # GenARM's reference-free loss rides on DPOTrainer's precomputed-reference path (see `ReferenceFreeDPOTrainer`).
    reference_free = issubclass(trainer_class, ReferenceFreeDPOTrainer)
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            **_common_args(settings, output_dir, seed, learning_rate, beta), precompute_ref_log_probs=reference_free
        )
        trainer = trainer_class(
            copy.deepcopy(sft_model),
            args=args,
            train_dataset=pairs,
            eval_dataset=validation_pairs,
            processing_class=tokenizer,
            peft_config=_lora(settings),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
    trainable = _trainable(trainer.model)
    return Trained(trainer.model.merge_and_unload().eval(), loss, trainer.state.global_step, trainable)


def train_dpo(
    sft_model, tokenizer, pairs, validation_pairs, settings, seed, learning_rate: float, beta: float
) -> Trained:
    """`trl.DPOTrainer` + LoRA on a copy of the SFT model; the adapter merged into it for decoding."""
    args = (sft_model, tokenizer, pairs, validation_pairs, settings, seed, learning_rate, beta)
    return _train_lora(DPOTrainer, *args)


def train_arm(
    sft_model, tokenizer, pairs, validation_pairs, settings, seed, learning_rate: float, beta: float
) -> Trained:
    """GenARM's autoregressive reward model: a LoRA-trained copy of the SFT model, reference-free loss."""
    args = (sft_model, tokenizer, pairs, validation_pairs, settings, seed, learning_rate, beta)
    return _train_lora(ReferenceFreeDPOTrainer, *args)
