"""Held-out preference scores at several alphas from one backbone pass per batch (`IAVTrainer.evaluate_alphas`).

For a pair `(x, y_w, y_l)` and strength `alpha`, DPO's implicit reward of the aligned policy against the reference,

    r_alpha(x, y) = beta * (log p_alpha(y | x) - log p_ref(y | x)),     p_alpha = softmax(z_base + alpha a_t),
    margin_alpha  = r_alpha(x, y_w) - r_alpha(x, y_l),

with `log p(y | x)` summed over the completion tokens as `DPOTrainer.compute_ref_log_probs` sums them (its `ld_alpha`
weighting included). The reference is `z_base` of the same pass (a frozen backbone: every reward is exactly 0 at
alpha 0), or the trainer's `ref_model` (a fully fine-tuned backbone). Per alpha, over the pairs:

    accuracy = mean [margin > 0]                      (TRL's `rewards/accuracies`: a tie counts as a loss)
    ties     = mean [margin == 0]
    win_rate = mean [margin > 0] + ties / 2           (0.5 at alpha 0, where every pair is a tie)
    margin, chosen_reward, rejected_reward            (means of margin_alpha, r_alpha(x, y_w), r_alpha(x, y_l))
    loss     = mean -log sigmoid(margin)              (DPO's sigmoid loss of the margins, whatever `loss_type` trained)
    kl       = sum_t KL(p_alpha || p_base) / tokens   (per completion token, teacher-forced)

Means run over pairs, where TRL's `evaluate` averages batch means: the two agree when every batch is full.
`preference_scores` turns any method's per-pair rewards into these figures (the benchmarks score DPO + LoRA with
it), and `per_pair=True` adds each pair's margin, in the order of the evaluation dataset, for paired comparisons.

With a frozen backbone the backbone runs once per batch (or not at all, from `precompute_backbone_features`'s cache)
and each alpha costs only the readout; a trained backbone (LoRA, full fine-tuning) runs once per batch and alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from iav_trl.tuners.iav.model import is_peft_model

if TYPE_CHECKING:
    from iav_trl.trainer.iav_trainer import IAVTrainer

# What the tokenized preference batch holds besides the model's inputs.
_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


def _per_token(log_probs: torch.Tensor):
    """A stand-in model for `DPOTrainer.compute_ref_log_probs`, returning per-token log-probs already computed, so that
    TRL's own summation (completion tokens, `ld_alpha`) turns them into sequence log-probs."""
    return lambda **kwargs: SimpleNamespace(log_probs=log_probs)


def preference_scores(chosen: torch.Tensor, rejected: torch.Tensor, per_pair: bool = False) -> dict[str, Any]:
    """The figures of the module docstring (but `kl`) from per-pair implicit rewards `r(x, y_w)` and `r(x, y_l)`;
    with `per_pair`, also `margins`, the list of `r(x, y_w) - r(x, y_l)`."""
    chosen, rejected = chosen.float(), rejected.float()
    margins = chosen - rejected
    ties = (margins == 0).float().mean().item()
    wins = (margins > 0).float().mean().item()
    scores = {
        "accuracy": wins,
        "margin": margins.mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "loss": -F.logsigmoid(margins).mean().item(),
        "ties": ties,
        "win_rate": wins + ties / 2,
        "num_pairs": int(margins.numel()),
    }
    return scores | ({"margins": margins.tolist()} if per_pair else {})


def evaluate_alphas(
    trainer: IAVTrainer, alphas: Sequence[float], eval_dataset: Any = None, per_pair: bool = False
) -> list[dict[str, Any]]:
    """The scores of the module docstring, one row per alpha (in the order given), each with its `alpha` and
    `num_pairs` (and, with `per_pair`, `margins`: one per pair, in the dataset's order). `eval_dataset` is what
    `trainer.get_eval_dataloader` takes (`None`: the trainer's own)."""
    alphas = [float(alpha) for alpha in alphas]
    if not alphas or len(set(alphas)) != len(alphas):
        raise ValueError(f"`alphas` must be distinct numbers, e.g. [0.0, 0.5, 1.0, 1.5, 2.0]; got {alphas}.")
    model = trainer.accelerator.unwrap_model(trainer.model)
    backbone_trained = is_peft_model(model.base_model) or any(p.requires_grad for p in model.base_model.parameters())
    one_pass = trainer.ref_model is None and not backbone_trained
    gather = trainer.accelerator.gather_for_metrics
    scores: dict[float, dict[str, list[torch.Tensor]]] = {a: {"chosen": [], "rejected": [], "kl": []} for a in alphas}
    tokens = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(eval_dataset):
                inputs = {key: batch[key] for key in _BATCH_KEYS}
                labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
                features = batch.get("backbone_features")
                if features is None and one_pass:
                    features = model.scored_hidden_states(inputs["input_ids"], inputs["attention_mask"], labels)
                reference = None
                for alpha in alphas:
                    out = model(
                        input_ids=inputs["input_ids"],
                        attention_mask=inputs["attention_mask"],
                        labels=labels,
                        fused_lm_head=True,
                        alpha=alpha,
                        backbone_features=features,
                    )
                    if reference is None:
                        same_pass = _per_token(out.ref_log_probs)
                        reference_model = same_pass if trainer.ref_model is None else trainer.ref_model
                        reference = trainer.compute_ref_log_probs(reference_model, inputs)
                        tokens.append(gather(out.label_mask.sum().reshape(1)))
                    chosen, rejected = trainer.compute_ref_log_probs(_per_token(out.log_probs), inputs)
                    row = scores[alpha]
                    row["chosen"].append(gather(trainer.beta * (chosen - reference[0])).float().cpu())
                    row["rejected"].append(gather(trainer.beta * (rejected - reference[1])).float().cpu())
                    row["kl"].append(gather((out.kl * out.label_mask).sum().reshape(1)).float().cpu())
    finally:
        model.train(was_training)
    num_tokens = float(torch.cat(tokens).sum().clamp(min=1)) if tokens else 1.0
    return [
        {
            "alpha": alpha,
            **preference_scores(*(torch.cat(scores[alpha][key]) for key in ("chosen", "rejected")), per_pair),
            "kl": torch.cat(scores[alpha]["kl"]).sum().item() / num_tokens,
        }
        for alpha in alphas
    ]
