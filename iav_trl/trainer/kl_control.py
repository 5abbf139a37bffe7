"""`AdaptiveKLController`: `lambda_kl` adapted during training so that alpha 1 lands at a KL the user chose."""

from __future__ import annotations

import math

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState


class AdaptiveKLController(TrainerCallback, ExportableState):
    r"""
    An adaptive KL coefficient in the manner of PPO's (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", as TRL's former `AdaptiveKLController`), applied to IAV's `lambda_kl` and taken in log space: after
    every optimizer step, with `KL` the mean over the step's micro-batches (and processes) of `L_KL`, the KL per
    completion token at the training alpha,

        e         = clip(log(KL / target), -1, 1)
        lambda_kl <- lambda_kl * exp(e / horizon)

    so `lambda_kl` rises while the head moves further than `target` from the base model and falls while it stays
    closer, by at most a factor `exp(1 / horizon)` per step (1.22 at the default horizon of 5: ten times larger or
    smaller in 12 steps). PPO's rule, `lambda_kl * (1 + clip(KL / target - 1, -0.2, 0.2) / horizon)`, moves at most
    `0.2 / horizon` per step, linearly in the error; a head trains within a few steps, so at any useful horizon that
    rule cannot reach a value several times its start within a short run. Here the error is the log-ratio, which is
    symmetric (twice the target pulls as hard as half of it) and makes the rule a step in `log lambda_kl`; a KL of 0
    (the untrained head) counts as far below. The value is saved in checkpoints (`trainer_state.json`, as
    `Trainer`'s stateful callbacks are) and restored on resume.
    """

    CLIP = 1.0

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
        error = math.log(kl / self.target) if kl > 0 else -self.CLIP
        self.value *= math.exp(min(max(error, -self.CLIP), self.CLIP) / self.horizon)

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
