"""`AdaptiveKLController`: `lambda_kl` adapted during training so that alpha 1 lands at a KL the user chose."""

from __future__ import annotations

import math

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState


class AdaptiveKLController(TrainerCallback, ExportableState):
    r"""
    PPO's adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", as
    TRL's former `AdaptiveKLController`), applied to IAV's `lambda_kl`: after every optimizer step, with `KL` the
    mean over the step's micro-batches (and processes) of `L_KL`, the KL per completion token at the training alpha,

        e         = clip(KL / target - 1, -0.2, 0.2)
        lambda_kl <- lambda_kl * (1 + e / horizon)

    so `lambda_kl` rises while the head moves further than `target` from the base model and falls while it stays
    closer; `horizon` (in optimizer steps) sets how fast, at most a factor `1 +- 0.2 / horizon` per step. The value
    is saved in checkpoints (`trainer_state.json`, as `Trainer`'s stateful callbacks are) and restored on resume.
    """

    CLIP = 0.2

    def __init__(self, value: float, target: float, horizon: float):
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"`target_kl` must be a finite number > 0, got {target}.")
        if not (math.isfinite(horizon) and horizon >= 1):
            raise ValueError(f"`kl_horizon` must be a finite number >= 1 (optimizer steps), got {horizon}.")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"An adaptive `lambda_kl` starts from `lambda_kl`, which must then be > 0 (it is scaled), got {value}."
            )
        self.value = value
        self.target = target
        self.horizon = horizon
        self._observed: list[float] = []

    def observe(self, kl: float) -> None:
        """Record one micro-batch's `L_KL` (the same value on every process)."""
        self._observed.append(kl)

    def update(self) -> None:
        """One controller step from the KL observed since the last one (nothing observed: no change)."""
        if not self._observed:
            return
        kl = sum(self._observed) / len(self._observed)
        self._observed = []
        error = min(max(kl / self.target - 1.0, -self.CLIP), self.CLIP)
        self.value *= 1.0 + error / self.horizon

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        self.update()
        return control

    def state(self) -> dict:
        return {
            "args": {"value": self.value, "target": self.target, "horizon": self.horizon},
            "attributes": {"value": self.value},
        }
