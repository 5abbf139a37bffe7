"""`IAVConfig`: `trl.DPOConfig` plus the alignment head and the IAV loss."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from iav_trl.trainer.features import FEATURES_DTYPES
from iav_trl.trainer.kl_control import AdaptiveKLController
from iav_trl.tuners.iav.config import HEAD_FIELDS, AlignmentHeadConfig, head_field


def bf16_supported() -> bool:
    """Whether this machine has an accelerator that computes in bfloat16 (`IAVConfig`'s default for `bf16`)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@dataclass
class IAVConfig(DPOConfig):
    r"""
    Configuration for `IAVTrainer`: every `DPOConfig` field, plus the fields below.

    The loss is `L = L_pref + lambda_kl * L_KL + lambda_l2 * L_L2` over the completion tokens (see
    `IAVTrainer.compute_loss`).

    > Parameters that control the alignment head (used when the trainer attaches the head itself; an
    > `AlignmentHeadConfig` passed as `peft_config` takes precedence)

    num_interventions, intervention_dim, head_dropout:
        The head's shape: `AlignmentHeadConfig`'s `num_interventions`, `intervention_dim` and `dropout`, with their
        defaults and meaning (declared once, there). Unlike backbone dropout, `head_dropout` is kept when
        `disable_dropout=True`.

    > Parameters that control the IAV loss

    alpha (`float`, *optional*, defaults to `1.0`):
        Alignment strength during training: the policy is `z_base + alpha * a_t`. 1.0 is the standard strength the
        test-time knob is calibrated against; any other non-zero finite value rescales it.
    lambda_kl (`float`, *optional*, defaults to `0.3`):
        Weight of `L_KL`, the mean over completion tokens of `KL(softmax(z_final) || softmax(z_base))`. Raise it to
        keep the aligned model closer to the base model's distribution. It sets where the standard strength `alpha = 1`
        lands: the preference loss alone keeps widening the margins, this term gives the head a finite resting point
        (in the ground-truth benchmark, `benchmarks/alignment/`, alpha 1 spent 1.12 / 0.76 / 0.28 nats per response at
        0.1 / 0.3 / 1.0, against DPO's 0.98). 0.3 puts alpha 1 near the distance DPO reaches with the same beta on the
        same data: on SmolLM2-135M-Instruct and HH-RLHF (the default `lambda_kl` study in `research/`, 3 seeds, 256
        validation pairs, learning rate 3e-3) alpha 1 moved the model 0.133 nats per token against DPO + LoRA's 0.170
        (1.0: 0.064), at the same validation accuracy within the seeds' spread, and alpha 2 still gained on alpha 1.
        The distance also grows with the learning rate and the steps (0.023 at 1e-3), so set `target_kl` to choose it.
        The real-data benchmark trains at 0.3 (`benchmarks/real_data/`); the IAV seed recipe used 0.1.
    lambda_l2 (`float`, *optional*, defaults to `0.01`):
        Weight of `L_L2`, the mean over completion tokens of `(1/V) ||z_final - z_base||_2^2`, the squared RMS of the
        applied alignment logits (`||a_t||^2 / V` at `alpha = 1`). Raise it to keep alignment vectors small.
    lambda_kl_sweep (`list[float]` or `None`, *optional*, defaults to `None`):
        Train one head per value in this one run, every head from the same backbone pass per batch (or the same
        cache, see `precompute_backbone_features`): heads `lambda_kl_0`, `lambda_kl_1`, ... with that `lambda_kl`,
        saved as named adapters, their metrics logged as `<head>/<metric>`, each head's gradient clipped on its own
        (so each trains as its own run would). With an `eval_dataset`, every evaluation chooses the head with the
        highest reward accuracy, ties broken by the lowest preference loss (`IAVTrainer.choose_best_head`); it
        becomes the active adapter and `sweep.json` records all of them. Replaces `lambda_kl`.
    target_kl (`float` or `None`, *optional*, defaults to `None`):
        The KL per completion token, `L_KL` at the training alpha, that the standard strength should land at. When
        set, `lambda_kl` is only the starting value: after every optimizer step it is scaled up while `L_KL` is above
        the target and down while below (PPO's adaptive KL coefficient in log space, see
        `iav_trl.trainer.kl_control`), and logged as `iav/lambda_kl`. `None` keeps `lambda_kl` fixed.
    kl_horizon (`float`, *optional*, defaults to `5.0`):
        How fast an adaptive `lambda_kl` moves: at most a factor `exp(1 / kl_horizon)` per optimizer step (1.22 at
        5), so at most a factor `e` over `kl_horizon` steps. Raise it if `iav/lambda_kl` swings around the target.
    freeze_backbone (`bool`, *optional*, defaults to `True`):
        Train only the head. The reference policy is then `z_base` of the same forward pass: no reference model, no
        second forward, no backward through the backbone. Set to `False` to also fine-tune the backbone (full
        fine-tuning, or pass a `peft.LoraConfig` as `peft_config` for LoRA on the backbone); the reference is then the
        untouched base model and a step costs what a DPO step costs.

    readout_memory_gb (`float`, *optional*, defaults to `2.0`):
        GiB of float32 vocabulary-sized blocks the frozen-backbone training step may keep per head from its forward
        pass for its backward pass: `z_base` and the head's `p_final` and `a_t`, `3 x scored tokens x V x 4` bytes
        per batch. Within it a head costs two vocabulary matmuls per scored token (`a_t`, and one projection of its
        whole gradient back through `W_U` in the backward pass), and the heads of a `lambda_kl_sweep` compute
        `z_base` once for all. Beyond it (or at 0) nothing vocabulary-sized is kept and a head costs four (see
        `iav_trl.tuners.iav.fused`). It changes speed and memory only, never the gradients.

    > Parameters that control cached backbone features

    precompute_backbone_features (`bool`, *optional*, defaults to `False`):
        Run the frozen backbone ONCE over the training and evaluation datasets before training, keep the hidden
        states of the scored (completion) positions, and train every epoch and evaluate from them: the backbone's
        share of a step is then paid once per example, however many epochs (and, as the cache is kept on disk keyed
        by the dataset and the backbone, however many runs over the same data). The IAV counterpart of
        `precompute_ref_log_probs`. A pair needs `(completion tokens) x hidden_size x bytes` (see
        `iav_trl.trainer.features.feature_cache_bytes`; logged before the pass). Needs a frozen backbone without
        dropout and map-style datasets; refused otherwise, with what to do instead.
    backbone_features_dtype (`str`, *optional*, defaults to `"float32"`):
        dtype of the cached features: `"float32"`, or `"auto"` for the backbone's own (bf16 halves the cache; the
        head then trains on exactly what a bf16 backbone's pass would give it).

    > Defaults that differ from `DPOConfig`

    These are the defaults everywhere: the Python API, `iav-trl train` and `./train.sh` (recipes state what they
    change, and why).

    - `learning_rate`: `1e-3` instead of `1e-6`. Only the small head is trained, from zero; 1e-3 is the rate the
      real-data benchmark chose on its validation split on SmolLM2-135M-Instruct (grid 1e-3 / 3e-3 / 1e-2), and
      every real-model run since chose it too. The IAV seed recipe's 5e-5 barely moves a head in a few hundred steps.
    - `num_train_epochs`: `3`.
    - `gradient_checkpointing` (`activation_checkpointing`, as transformers now names it): off instead of on (a frozen
      backbone keeps no activations to recompute).
    - `dataloader_pin_memory`: on where a CUDA device is (pinned memory speeds host-to-device copies), off
      otherwise, instead of always on (PyTorch warns about it on a CPU).
    - `bf16`: on where the accelerator supports bfloat16 (a CUDA device with compute capability 8.0 or more, or an
      XPU), off otherwise, instead of always on: TRL's default fails on a CPU without `use_cpu=True`.
    - `use_cpu`: turned on under a multi-process launch (`WORLD_SIZE` > 1, e.g. `accelerate launch --config_file
      accelerate_configs/ddp_cpu.yaml`) on a machine without an accelerator. Left off there, transformers opens the
      gloo process group but leaves every process training alone on the whole dataset, each saving its own adapter.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "The initial learning rate for AdamW."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Total number of training epochs to perform."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute backbone activations in the backward pass (only useful with a trained backbone); "
            "transformers' deprecated name of activation_checkpointing. Default: off."
        },
    )

    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin the data loader's memory (default: where a CUDA device is)."},
    )

    num_interventions: int = head_field("num_interventions")
    intervention_dim: int = head_field("intervention_dim")
    head_dropout: float = head_field("dropout")
    alpha: float = field(default=1.0, metadata={"help": "Alignment strength during training (z_base + alpha a_t)."})
    lambda_kl: float = field(default=0.3, metadata={"help": "Weight of KL(p_final || p_base)."})
    lambda_l2: float = field(default=0.01, metadata={"help": "Weight of the squared RMS of the alignment logits."})
    lambda_kl_sweep: list[float] | None = field(
        default=None,
        metadata={"help": "Train one head per lambda_kl value in this one run, from the same backbone pass."},
    )
    target_kl: float | None = field(
        default=None,
        metadata={"help": "KL per completion token at the training alpha to aim for; lambda_kl then adapts."},
    )
    kl_horizon: float = field(
        default=5.0,
        metadata={"help": "Optimizer steps over which an adaptive lambda_kl moves by up to a factor e."},
    )
    freeze_backbone: bool = field(
        default=True, metadata={"help": "Train only the alignment head (the reference is z_base of the same pass)."}
    )
    readout_memory_gb: float = field(
        default=2.0,
        metadata={"help": "GiB of vocabulary-sized logits a frozen-backbone step may keep per head (0: none)."},
    )
    precompute_backbone_features: bool = field(
        default=False,
        metadata={"help": "Run the frozen backbone once over the datasets and train every epoch from its features."},
    )
    backbone_features_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the cached features: 'float32' or 'auto' (the backbone's).",
            "choices": ["float32", "auto"],
        },
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            # Off, under transformers' current name: setting the deprecated one (as DPOConfig does) warns.
            self.activation_checkpointing = False
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.cuda.is_available()
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            self.use_cpu = True  # one MULTI_CPU group (see the class docstring), before DPOConfig sets up devices
        for name in ("lambda_kl", "lambda_l2", "beta", "readout_memory_gb"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(
                f"`alpha` must be finite and non-zero during training (the head gets no gradient at 0), got "
                f"{self.alpha}. Use 1.0, the standard strength."
            )
        if self.target_kl is not None:
            AdaptiveKLController(self.lambda_kl, self.target_kl, self.kl_horizon)  # validates the three
        if self.lambda_kl_sweep is not None:
            values = self.lambda_kl_sweep
            if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in values):
                raise ValueError(f"`lambda_kl_sweep` must be a non-empty list of finite numbers >= 0, got {values}.")
            if self.target_kl is not None:
                raise ValueError(
                    "`lambda_kl_sweep` and `target_kl` both set `lambda_kl`: a sweep tries fixed values, `target_kl` "
                    "adapts one. Choose one."
                )
            if not self.freeze_backbone:
                raise ValueError(
                    "`lambda_kl_sweep` trains independent heads over one frozen backbone pass, but "
                    "`freeze_backbone=False` would train the backbone with all of them. Keep `freeze_backbone=True`."
                )
        if self.backbone_features_dtype not in FEATURES_DTYPES:
            raise ValueError(
                f"`backbone_features_dtype` must be one of {FEATURES_DTYPES}, got {self.backbone_features_dtype!r}."
            )
        if self.precompute_backbone_features and not self.freeze_backbone:
            raise ValueError(
                "`precompute_backbone_features=True` caches a frozen backbone's pass, but `freeze_backbone=False` "
                "trains the backbone. Keep `freeze_backbone=True`, or set `precompute_backbone_features=False`."
            )
        self.alignment_head_config()  # validates num_interventions, intervention_dim and head_dropout
        super().__post_init__()

    def alignment_head_config(self) -> AlignmentHeadConfig:
        """The `AlignmentHeadConfig` these fields describe."""
        return AlignmentHeadConfig(**{name: getattr(self, field) for field, name in HEAD_FIELDS.items()})
