"""`NonFiniteGuard`: stop training at the first NaN/inf loss, gradient or alignment statistic, before it is saved."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from iav_trl.trainer.checkpoints import last_complete_checkpoint

# Logged values the guard watches: the training loss and gradient norm, the IAV loss terms and the alignment norm
# (`iav/pref_loss`, `iav/kl`, `iav/l2`, `iav/alignment_norm`), in training and evaluation logs.
_WATCHED = ("loss", "grad_norm", "eval_loss")


def _watched(key: str) -> bool:
    return key in _WATCHED or key.startswith(("iav/", "eval_iav/"))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds (a DTensor's local shard, a DeepSpeed ZeRO-3 partition)."""
    tensor = getattr(tensor, "ds_tensor", tensor)
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """
    Names of the tensors whose L2 norm is NaN or inf, agreed on by every process.

    A norm is non-finite when an entry is NaN or inf, or when entries are so large that their squares overflow
    (|x| > ~1e19 in float32): a diverged run either way. One fused norm over all tensors and, in a distributed run,
    one all-reduce of the verdict, so that every process stops at the same step; names are looked up only on failure.
    """
    named = [(name, _local(t).detach()) for name, t in named]
    tensors = [t for _, t in named if t.numel()]
    state = PartialState()
    total = torch.nn.utils.get_total_norm(tensors) if tensors else torch.zeros(())
    bad = (~torch.isfinite(total)).to(device=state.device, dtype=torch.float32).reshape(1)
    if state.num_processes > 1:
        bad = reduce(bad, reduction="max")
    if not bad.item():
        return []
    names = [name for name, t in named if t.numel() and not torch.isfinite(torch.linalg.vector_norm(t))]
    return names or ["(on another process)"]


class NonFiniteGuard(TrainerCallback):
    """
    Stops training with a `FloatingPointError` at the first non-finite value, naming the step and what to try.

    - Before every optimizer step, the gradients of the trainable parameters (the alignment heads, and LoRA or the
      backbone when they train) must be finite: a NaN/inf loss or alignment vector makes them NaN, and the step that
      would write NaN into the weights is not taken.
    - After every step, the trainable parameters must be finite (this also covers optimizers that keep their own
      gradients, such as DeepSpeed's).
    - Every log (before the checkpoint of that step is written) must have a finite loss, gradient norm and IAV
      statistics (`iav/*`, including the alignment norm), also in evaluation.

    So no checkpoint with NaN weights is written, and the last checkpoint stays loadable. `IAVTrainer` adds the guard
    itself; remove it with `trainer.remove_callback(NonFiniteGuard)`. Under `fp16` mixed precision, inf gradients are
    expected now and then (the loss scaler skips those steps), so the gradients are not checked there.
    """

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ):
        if args.fp16 or model is None:
            return
        grads = [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        bad = _non_finite(grads)
        if bad:
            self._stop(
                args,
                f"the gradients of {_some(bad)} are NaN or inf. The optimizer step was not taken, so the weights are "
                f"those after step {state.global_step}",
                state.global_step + 1,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ):
        if model is None:
            return
        bad = _non_finite((name, p) for name, p in model.named_parameters() if p.requires_grad)
        if bad:
            self._stop(args, f"the parameters {_some(bad)} became NaN or inf", state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, float] | None = None,
        **kwargs,
    ):
        bad = {
            key: value
            for key, value in (logs or {}).items()
            if _watched(key) and isinstance(value, (int, float)) and not math.isfinite(value)
        }
        if bad:
            values = ", ".join(f"{key}={value}" for key, value in bad.items())
            self._stop(
                args, f"logged values are NaN or inf ({values}; means since the previous log)", state.global_step
            )

    @staticmethod
    def _stop(args: TrainingArguments, problem: str, step: int) -> None:
        checkpoint = last_complete_checkpoint(args.output_dir, optimizer_state=not args.save_only_model)
        kept = (
            f"The last complete checkpoint, {checkpoint}, is intact: resume from it with "
            f"`trainer.train(resume_from_checkpoint={checkpoint!r})` once the settings are changed."
            if checkpoint
            else "No checkpoint was saved before this step."
        )
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        raise FloatingPointError(
            f"Training stopped at step {step}: {problem}. {kept} What to try: a lower `learning_rate` (now "
            f"{args.learning_rate:g}); gradient clipping (`max_grad_norm`, now {args.max_grad_norm}); full precision "
            f"(`bf16=False, fp16=False`; this run uses {precision}), or bf16 rather than fp16; and a look at the "
            "batch of that step for empty or extreme rows."
        )


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{shown} and {len(names) - 3} more" if len(names) > 3 else shown
