"""Per-token training statistics of `z_final = z_base + alpha * a_t`, computed in chunks of tokens.

For the `N` scored positions (next-token label not -100), with hidden states `h` `(N, d)`, the applied hidden-space
offset `delta = sum_i alpha_i delta_i` `(N, d)` and optional reference hidden states `h_ref` `(N, d)`:

    z_base  = softcap(s * (W_U h + b))                  (N, V)
    a       = s * W_U delta                             (N, V)   the applied alignment logits, alpha * a_t
    z_final = z_base + a
    z_ref   = z_base, or softcap(s * (W_U h_ref + b)) when reference hidden states are given

and per token (y = label):

    log_probs     = log softmax(z_final)_y              (grad)
    ref_log_probs = log softmax(z_ref)_y                (no grad)
    kl            = sum_v p_final,v (log p_final,v - log p_base,v) = KL(p_final || p_base)   (grad)
    l2            = (1/V) sum_v a_v^2                   (grad)   squared RMS of the applied alignment logits
    alignment_norm = ||a||_2, entropy of p_final, mean_v z_final,v, [argmax z_final == y],
    log_sum_sq_probs = log sum_v p_final,v^2            (no grad)

Each chunk runs under activation checkpointing, so the backward pass keeps only the chunk's inputs and recomputes
its `(tokens x V)` blocks: at most one chunk of vocabulary-sized tensors is alive at any time.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from .readout import LogitReadout

# Tokens per chunk are chosen so that one (tokens x V) float32 block holds about 2**24 values (64 MiB).
CHUNK_ELEMENTS = 2**24

STAT_NAMES = (
    "log_probs",
    "ref_log_probs",
    "kl",
    "l2",
    "alignment_norm",
    "entropy",
    "mean_logits",
    "is_top1",
    "log_sum_sq_probs",
)


def _gathered(weight: torch.Tensor, bias: torch.Tensor | None):
    """Gather the LM head's parameters when DeepSpeed ZeRO-3 has partitioned them; a no-op otherwise."""
    if not hasattr(weight, "ds_id"):
        return nullcontext()
    import deepspeed

    params = [weight] if bias is None else [weight, bias]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _chunk_stats(
    readout: LogitReadout,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    delta: torch.Tensor,
    ref_hidden: torch.Tensor | None,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    with _gathered(weight, bias):
        z_base = readout.base_logits(hidden, weight, bias).float()
        a = readout.alignment_logits(delta.to(weight.dtype), weight).float()
        if ref_hidden is not None:
            with torch.no_grad():
                z_ref = readout.base_logits(ref_hidden, weight, bias).float()
    z_final = z_base + a
    logp_final = torch.log_softmax(z_final, dim=-1)
    logp_base = torch.log_softmax(z_base, dim=-1)
    index = labels.unsqueeze(-1)
    log_probs = logp_final.gather(-1, index).squeeze(-1)
    kl = (logp_final.exp() * (logp_final - logp_base)).sum(-1)
    l2 = a.pow(2).mean(-1)
    with torch.no_grad():
        logp_ref = logp_base if ref_hidden is None else torch.log_softmax(z_ref, dim=-1)
        ref_log_probs = logp_ref.gather(-1, index).squeeze(-1)
        p_final = logp_final.exp()
        entropy = -(p_final * logp_final).sum(-1)
        alignment_norm = a.norm(dim=-1)
        mean_logits = z_final.mean(-1)
        is_top1 = z_final.argmax(-1) == labels
        log_sum_sq_probs = torch.logsumexp(2 * logp_final, dim=-1)
    return log_probs, ref_log_probs, kl, l2, alignment_norm, entropy, mean_logits, is_top1, log_sum_sq_probs


def fused_token_stats(
    readout: LogitReadout,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    delta: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The statistics of the module docstring for `N` tokens: a dict of `(N,)` tensors named as `STAT_NAMES`."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or delta.requires_grad)
    pieces = []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        stop = start + chunk_size
        args = (
            hidden[start:stop],
            delta[start:stop],
            None if ref_hidden is None else ref_hidden[start:stop],
            labels[start:stop],
        )
        if needs_grad:
            pieces.append(
                checkpoint(_chunk_stats, readout, weight, bias, *args, use_reentrant=False, preserve_rng_state=False)
            )
        else:
            pieces.append(_chunk_stats(readout, weight, bias, *args))
    return {name: torch.cat([piece[i] for piece in pieces]) for i, name in enumerate(STAT_NAMES)}
