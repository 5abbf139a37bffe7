"""The statistics `IAVEvaluator` reports, each written out so that it can be checked on its own: sequence-level KL,
win rate, Spearman correlation, the singular-value spectrum of alignment vectors, and memory accounting."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from iav_trl.tuners.iav.model import IAVModel


@torch.no_grad()
def score_sequence_kl(
    model: IAVModel,
    sequences: torch.LongTensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    alpha: float | Sequence[float],
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """
    Per-sequence KL terms of `(N, L + T)` sequences (left-padded prompts of length `L`, then responses), in one
    forward pass. `attention_mask` covers both parts (0 on prompt padding and on response tokens after EOS).

    Returns `(N,)` tensors: `log_ratio = sum_t [log p_alpha(y_t) - log p_base(y_t)]`,
    `stepwise_kl = sum_t KL(p_alpha || p_base)` at each response position, and `length` (scored tokens), with
    `p = softmax(z / temperature)`. Only the response positions' logits are computed (`logits_to_keep`), and the
    float32 statistics one row at a time, so memory stays at two `(N, T + 1, V)` logit tensors.
    """
    response_length = sequences.shape[1] - prompt_length
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        alpha=alpha,
        return_alignment=True,
        logits_to_keep=response_length + 1,
    )
    # The kept positions are L - 1 ... L + T - 1; position L - 1 + t predicts response token t.
    targets = sequences[:, prompt_length:]
    mask = attention_mask[:, prompt_length:].float()
    log_ratio, stepwise = [], []
    for row in range(sequences.shape[0]):
        logp_final = torch.log_softmax(out.logits[row, :-1].float() / temperature, dim=-1)  # (T, V)
        logp_base = torch.log_softmax(out.base_logits[row, :-1].float() / temperature, dim=-1)
        index = targets[row].unsqueeze(-1)
        log_ratio.append((logp_final.gather(-1, index) - logp_base.gather(-1, index)).squeeze(-1))
        stepwise.append((logp_final.exp() * (logp_final - logp_base)).sum(-1))
    log_ratio, stepwise = torch.stack(log_ratio), torch.stack(stepwise)
    return {"log_ratio": (log_ratio * mask).sum(-1), "stepwise_kl": (stepwise * mask).sum(-1), "length": mask.sum(-1)}


def win_rate(scores: Sequence[float], reference: Sequence[float]) -> float:
    """Paired win rate of `scores` over `reference`: mean of 1 (higher), 1/2 (equal) and 0 (lower)."""
    if len(scores) != len(reference) or not scores:
        raise ValueError("win_rate needs two non-empty lists of the same length.")
    return sum(1.0 if s > r else 0.5 if s == r else 0.0 for s, r in zip(scores, reference)) / len(scores)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for i in order[start : stop + 1]:
            ranks[i] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman_correlation needs two lists of the same length, at least 2.")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var > 0 else float("nan")


def singular_spectrum(vectors: torch.Tensor, keep: int = 64) -> dict[str, Any]:
    """
    Energy spectrum of the `(N, V)` matrix of alignment vectors: singular values `s_i`, energies `s_i^2` (their sum
    is `||A||_F^2 = sum_t ||a_t||^2`), the fraction of energy in the top-k directions, the ranks holding 90% / 99%
    of it, and the effective rank `exp(-sum_i e_i log e_i)` of the normalised energies `e_i`.
    """
    singular = torch.linalg.svdvals(vectors.double())
    energy = singular.pow(2)
    total = energy.sum()
    fractions = energy / total if total > 0 else torch.zeros_like(energy)
    cumulative = fractions.cumsum(0)
    nonzero = fractions[fractions > 0]

    def rank_for(level: float) -> int:
        return int((cumulative < level - 1e-12).sum().item()) + 1 if total > 0 else 0

    return {
        "singular_values": singular[:keep].tolist(),
        "energy_fraction": fractions[:keep].tolist(),
        "cumulative_energy": cumulative[:keep].tolist(),
        "total_energy": total.item(),
        "rank_90": rank_for(0.9),
        "rank_99": rank_for(0.99),
        "effective_rank": math.exp(-(nonzero * nonzero.log()).sum().item()) if total > 0 else 0.0,
    }


def cache_bytes(cache: Any) -> int:
    """Bytes held by the tensors of a KV cache (a transformers `Cache`, or nested tuples of tensors)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif hasattr(obj, "layers"):
            for layer in obj.layers:
                for value in vars(layer).values():
                    visit(value)

    visit(cache)
    return total


def parameter_bytes(*modules: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)
