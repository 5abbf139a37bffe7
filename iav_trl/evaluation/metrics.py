"""The statistics `IAVEvaluator` reports, each written out so that it can be checked on its own: sequence-level KL,
win rate, Spearman correlation, the singular-value spectrum of alignment vectors, and memory accounting."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from iav_trl.tuners.iav.model import IAVModel


def sequence_kl_terms(
    logp: torch.Tensor, ref_logp: torch.Tensor, tokens: torch.LongTensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The two KL estimates of responses scored under a method and a reference, summed over each response's tokens.
    `logp`, `ref_logp`: `(N, T, V)` log-probabilities of the method and the reference at the `T` response positions
    (teacher-forced on the same inputs), `tokens`: `(N, T)` the response, `mask`: `(N, T)` 1 on its scored tokens.

        log_ratio   = sum_t m_t [log p(y_t) - log p_ref(y_t)]                  (N,)  unbiased for samples of p
        stepwise_kl = sum_t m_t KL(p(. | x, y_<t) || p_ref(. | x, y_<t))       (N,)  exact per step, lower variance
    """
    mask = mask.float()
    log_ratio = (logp - ref_logp).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    stepwise = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (log_ratio * mask).sum(-1), (stepwise * mask).sum(-1)


def kl_per_token(log_ratio: torch.Tensor, stepwise_kl: torch.Tensor, length: torch.Tensor) -> dict[str, float]:
    """
    KL per response token over `N` sampled responses (`sequence_kl_terms`' sums and each response's `length`):
    `kl_per_token = sum log_ratio / sum length` (a ratio estimator) with its standard error from the
    linearisation `log_ratio - kl * length`, `stepwise_kl_per_token` likewise, the mean per response and length.
    """
    log_ratio, stepwise_kl, length = log_ratio.double(), stepwise_kl.double(), length.double()
    kl = (log_ratio.sum() / length.sum()).item()
    n = len(length)
    residual = log_ratio - kl * length
    stderr = math.sqrt((residual**2).sum().item() / (n * (n - 1))) / length.mean().item() if n > 1 else 0.0
    return {
        "kl_per_token": kl,
        "kl_per_token_stderr": stderr,
        "stepwise_kl_per_token": (stepwise_kl.sum() / length.sum()).item(),
        "kl_per_response": log_ratio.mean().item(),
        "response_tokens": length.mean().item(),
        "responses": n,
    }


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
    terms = [
        sequence_kl_terms(
            torch.log_softmax(out.logits[row : row + 1, :-1].float() / temperature, dim=-1),  # (1, T, V)
            torch.log_softmax(out.base_logits[row : row + 1, :-1].float() / temperature, dim=-1),
            targets[row : row + 1],
            mask[row : row + 1],
        )
        for row in range(sequences.shape[0])
    ]
    log_ratio, stepwise = (torch.cat(parts) for parts in zip(*terms))
    return {"log_ratio": log_ratio, "stepwise_kl": stepwise, "length": mask.sum(-1)}


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
