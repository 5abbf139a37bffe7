"""`IAVConfig`: `trl.DPOConfig` plus the alignment head and the IAV loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import DPOConfig

from .config import AlignmentHeadConfig


@dataclass
class IAVConfig(DPOConfig):
    r"""
    Configuration for `IAVTrainer`: every `DPOConfig` field, plus the fields below.

    The loss is `L = L_pref + lambda_kl * L_KL + lambda_l2 * L_L2` over the completion tokens (see
    `IAVTrainer.compute_loss`).

    > Parameters that control the alignment head (used when the trainer attaches the head itself; an
    > `AlignmentHeadConfig` passed as `peft_config` takes precedence)

    num_interventions (`int`, *optional*, defaults to `8`):
        Number of intervention heads `K` of the alignment head.
    intervention_dim (`int`, *optional*, defaults to `256`):
        Dimension `r` of the head's alignment subspace. Lower it for very small models.
    head_dropout (`float`, *optional*, defaults to `0.0`):
        Dropout inside the head during training. Unlike backbone dropout it is kept when `disable_dropout=True`.

    > Parameters that control the IAV loss

    alpha (`float`, *optional*, defaults to `1.0`):
        Alignment strength during training: the policy is `z_base + alpha * a_t`. 1.0 is the standard strength the
        test-time knob is calibrated against; any other non-zero finite value rescales it.
    lambda_kl (`float`, *optional*, defaults to `1.0`):
        Weight of `L_KL`, the mean over completion tokens of `KL(softmax(z_final) || softmax(z_base))`. Raise it to
        keep the aligned model closer to the base model's distribution. It sets where the standard strength
        `alpha = 1` lands: the preference loss alone keeps widening the margins, this term gives the head a finite
        resting point (in the README's ground-truth benchmark, alpha 1 spent 1.12 / 0.76 / 0.28 nats per response
        at 0.1 / 0.3 / 1.0). 1.0 won the head design study on a real model (`benchmarks/head_design_study.py`,
        SmolLM2-135M-Instruct on HH-RLHF: the best validation accuracy at alpha 0.5 and 1, at about half the KL of
        0.1 and 0.3); the IAV seed recipe used 0.1, which `iav-trl train` without a recipe keeps.
    lambda_l2 (`float`, *optional*, defaults to `0.01`):
        Weight of `L_L2`, the mean over completion tokens of `(1/V) ||z_final - z_base||_2^2`, the squared RMS of the
        applied alignment logits (`||a_t||^2 / V` at `alpha = 1`). Raise it to keep alignment vectors small.
    freeze_backbone (`bool`, *optional*, defaults to `True`):
        Train only the head. The reference policy is then `z_base` of the same forward pass: no reference model, no
        second forward, no backward through the backbone. Set to `False` to also fine-tune the backbone (full
        fine-tuning, or pass a `peft.LoraConfig` as `peft_config` for LoRA on the backbone); the reference is then the
        untouched base model and a step costs what a DPO step costs.

    > Defaults that differ from `DPOConfig` (those of the IAV paper's seed recipe)

    - `learning_rate`: `5e-5` instead of `1e-6` (only the small head is trained).
    - `num_train_epochs`: `3`.
    - `gradient_checkpointing`: `False` instead of `True` (a frozen backbone keeps no activations to recompute).
    """

    learning_rate: float = field(default=5e-5, metadata={"help": "The initial learning rate for AdamW."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Total number of training epochs to perform."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute backbone activations in the backward pass (only useful with a trained backbone)."
        },
    )

    num_interventions: int = field(default=8, metadata={"help": "Number of intervention heads K."})
    intervention_dim: int = field(default=256, metadata={"help": "Dimension r of the alignment subspace."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the alignment head."})
    alpha: float = field(default=1.0, metadata={"help": "Alignment strength during training (z_base + alpha a_t)."})
    lambda_kl: float = field(default=1.0, metadata={"help": "Weight of KL(p_final || p_base)."})
    lambda_l2: float = field(default=0.01, metadata={"help": "Weight of the squared RMS of the alignment logits."})
    freeze_backbone: bool = field(
        default=True, metadata={"help": "Train only the alignment head (the reference is z_base of the same pass)."}
    )

    def __post_init__(self):
        for name in ("lambda_kl", "lambda_l2", "beta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(
                f"`alpha` must be finite and non-zero during training (the head gets no gradient at 0), got "
                f"{self.alpha}. Use 1.0, the standard strength."
            )
        self.alignment_head_config()  # validates num_interventions, intervention_dim and head_dropout
        super().__post_init__()

    def alignment_head_config(self) -> AlignmentHeadConfig:
        """The `AlignmentHeadConfig` these fields describe."""
        return AlignmentHeadConfig(
            num_interventions=self.num_interventions,
            intervention_dim=self.intervention_dim,
            dropout=self.head_dropout,
        )
