"""Where `trl.DPOTrainer` (TRL 1.x) assumes a reference model that IAV does not have, and how `IAVTrainer` steps
around it. IAV's reference policy is `z_base` from the policy's own forward pass (the frozen backbone without the
heads), so there is no second model to load and no second pass to run. Each helper names the TRL behaviour it works
around; `tests/test_trl_workarounds.py` pins the behaviour of TRL each one relies on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from trl.trainer import dpo_trainer as dpo_trainer_module

REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@contextlib.contextmanager
def reference_model_load_skipped(skip: bool = True) -> Iterator[None]:
    """
    While `DPOTrainer.__init__` runs: make its `create_model_from_path` return `None`.

    Works around: `DPOTrainer.__init__` loads a second copy of the model from its name as the reference when it gets
    no `ref_model` and the model is not a PEFT model. IAV's reference is computed in the policy's pass, so that copy
    would only cost memory. The patch is scoped to the block and undone even if `__init__` raises;
    `args.precompute_ref_log_probs` stays the user's, validated by the parent as usual.
    """
    original = dpo_trainer_module.create_model_from_path
    if skip:
        dpo_trainer_module.create_model_from_path = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dpo_trainer_module.create_model_from_path = original


def remove_trl_fused_forward(model: nn.Module) -> None:
    """
    Drop the `forward` that `DPOTrainer.__init__` sets on the model instance.

    Works around: `DPOTrainer` replaces the model's `forward` with TRL's fused LM head (log-probs without logits),
    which knows nothing of the alignment heads. `IAVModel.forward(..., fused_lm_head=True)` is IAV's own fused
    readout, with the same output fields plus the reference log-probs and the regularisers; removing the instance
    attribute brings it back.
    """
    vars(model).pop("forward", None)


class LazyReferenceBatch(dict):
    """
    A batch whose `ref_chosen_logps` / `ref_rejected_logps` are computed by `compute()` on first access.

    `DPOTrainer._compute_loss` runs the policy forward first and reads the reference log-probs from the batch after
    it (with `precompute_ref_logps` set); by then the policy's pass has produced them, so `compute` only reads them
    from that pass's output.
    """

    def __init__(self, inputs: dict, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(inputs)
        self._compute = compute

    def __missing__(self, key: str) -> torch.Tensor:
        if key not in REFERENCE_KEYS:
            raise KeyError(key)
        self["ref_chosen_logps"], self["ref_rejected_logps"] = self._compute()
        return self[key]


@contextlib.contextmanager
def reference_from_policy_pass(trainer: Any, inputs: dict, policy_outputs: list) -> Iterator[LazyReferenceBatch]:
    """
    For one `DPOTrainer.compute_loss` call: a batch whose reference log-probs are those of the policy's own pass.

    Works around: `DPOTrainer._compute_loss` takes the reference log-probs from the batch only when
    `precompute_ref_logps` is set, and otherwise runs `compute_ref_log_probs` with a second forward through a
    reference model. Inside the block `precompute_ref_logps` is on, and the batch computes its reference entries on
    first access with `trainer.compute_ref_log_probs` (TRL's own summation over the completion tokens) applied to a
    stand-in model that returns `policy_outputs[-1].ref_log_probs`, the `log softmax(z_base)` of the pass just made.
    That relies on the call order TRL has: the policy forward, then the reference read.
    """

    reference = reference_of_policy_pass(policy_outputs)
    batch = LazyReferenceBatch(inputs, lambda: trainer.compute_ref_log_probs(reference, inputs))
    trainer.precompute_ref_logps = True
    try:
        yield batch
    finally:
        trainer.precompute_ref_logps = False


def reference_of_policy_pass(policy_outputs: list) -> Callable[..., Any]:
    """A stand-in reference model for `DPOTrainer.compute_ref_log_probs`: called with a batch, it returns the
    `ref_log_probs` (`log softmax(z_base)` per token) of the last fused IAV pass appended to `policy_outputs`, in the
    `log_probs` field that TRL reads from a model's output."""

    def reference(**kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(log_probs=policy_outputs[-1].ref_log_probs)

    return reference
