"""Per-token training statistics of `z_final = z_base + alpha * a_t`, computed in chunks of tokens.

For the `N` scored positions (next-token label not -100), with hidden states `h` `(N, d)`, the applied hidden-space
offset `delta = sum_i alpha_i delta_i` `(N, d)` and optional reference hidden states `h_ref` `(N, d)`:

    z_base  = softcap(s * (W_U h + b))                  (N, V)
    a       = s * W_U delta                             (N, V)   the applied alignment logits, alpha * a_t
    z_final = z_base + a
    z_ref   = z_base, or softcap(s * (W_U h_ref + b)) when reference hidden states are given

and per token (y = label, lse = logsumexp over the vocabulary, p = softmax(z_final)):

    log_probs     = z_final,y - lse(z_final)                                    (grad)
    ref_log_probs = log softmax(z_ref)_y                                        (no grad)
    kl            = KL(p || softmax(z_base)) = sum_v p_v a_v - lse(z_final) + lse(z_base)   (grad)
    l2            = (1/V) sum_v a_v^2                   squared RMS of the applied alignment logits   (grad)
    alignment_norm = ||a||_2, entropy of p, mean_v z_final,v, [argmax z_final == y],
    log_sum_sq_probs = log sum_v p_v^2                                          (no grad)

Two ways to differentiate, chosen per call:

- frozen readout (`h`, `W_U` and `b` need no gradient: the frozen-backbone training step). Only `delta` gets a
  gradient, and each statistic's gradient with respect to `delta` is known in closed form, `d/d delta = s W_U^T d/da`:

      d log_probs / da = onehot(y) - p
      d kl / da        = p * (a - sum_v p_v a_v)
      d l2 / da        = 2 a / V

  so the forward pass projects the first two `(tokens, V)` blocks back to `(tokens, d)` right away, and the third
  through the Gram matrix of the frozen unembedding, `s W_U^T a = s^2 (W_U^T W_U) delta` (`(d, d)`, computed once
  and cached while `W_U` is unchanged): four vocabulary matmuls per token in all (`z_base`, `a`, and the two
  projections), no recomputation. Only the three `(N, d)` Jacobian rows are kept for the backward pass, which is
  their weighted sum. No `(tokens x V)` block outlives its chunk.
- trainable readout (a LoRA or fully trained backbone, or a trained LM head): plain autograd through each chunk
  under activation checkpointing, which keeps the chunk's inputs and recomputes its blocks in the backward pass.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from iav_trl.tuners.iav.readout import LogitReadout

# Tokens per chunk are chosen so that one (tokens x V) float32 block holds about 2**22 values (16 MiB): a handful
# of such blocks are alive at once, and small blocks stay in cache for the elementwise passes.
CHUNK_ELEMENTS = 2**22

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
# The statistics with a gradient, in `STAT_NAMES` order.
DIFFERENTIABLE = ("log_probs", "kl", "l2")


def _gathered(weight: torch.Tensor, bias: torch.Tensor | None):
    """Gather the LM head's parameters when DeepSpeed ZeRO-3 has partitioned them; a no-op otherwise."""
    # Inside a forward pass ZeRO-3 gathers a parameter on first access and keeps it for the module that runs; gather
    # (and re-partition) only those it has not, or it would free a parameter that module still holds.
    params = [p for p in (weight, bias) if p is not None and getattr(p, "ds_status", None) is not None]
    params = [p for p in params if p.ds_status.name == "NOT_AVAILABLE"]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class GramCache:
    """`W_U^T W_U` in float32, `(d, d)`, recomputed only when the unembedding changes.

    A change is seen through the tensor's storage, shape, dtype, device and autograd version counter (bumped by
    in-place updates such as `load_state_dict` or an optimizer step), and a float64 checksum of a strided sample of
    its values, which also catches writes through `.data` that bypass the version counter.
    """

    SAMPLE = 4096

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._gram: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // self.SAMPLE)].double()
        key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device, sample.sum().item())
        if key != self._key:
            gram = torch.zeros(weight.shape[1], weight.shape[1], device=weight.device, dtype=torch.float32)
            rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
            for start in range(0, weight.shape[0], rows):  # in float32 without a float32 copy of the whole matrix
                block = weight[start : start + rows].detach().float()
                gram += block.T @ block
            self._key, self._gram = key, gram
        return self._gram


def _logits(readout, weight, bias, hidden, delta, ref_hidden):
    """`z_base`, `a` and `z_ref` (or `None`) of one chunk, computed in float32."""
    weight = weight.float()  # a no-op but for a ZeRO-3 partitioned half-precision W_U, cast here once gathered
    bias = None if bias is None else bias.float()
    z_base = readout.base_logits(hidden, weight, bias).float()
    a = readout.alignment_logits(delta.to(weight.dtype), weight).float()
    z_ref = None
    if ref_hidden is not None:
        with torch.no_grad():
            z_ref = readout.base_logits(ref_hidden, weight, bias).float()
    return z_base, a, z_ref


def _logit_stats(z_base, a, z_ref, labels):
    """The statistics of the module docstring from the logits, plus `p` and `sum_v p_v a_v` for the Jacobians."""
    z_final = z_base + a
    index = labels.unsqueeze(-1)
    lse_final = torch.logsumexp(z_final, dim=-1)
    lse_base = torch.logsumexp(z_base, dim=-1)
    log_probs = z_final.gather(-1, index).squeeze(-1) - lse_final
    p = torch.exp(z_final - lse_final.unsqueeze(-1))
    p_dot_a = (p * a).sum(-1)
    kl = p_dot_a - lse_final + lse_base
    l2 = a.square().mean(-1)
    with torch.no_grad():
        if z_ref is None:
            ref_log_probs = z_base.gather(-1, index).squeeze(-1) - lse_base
        else:
            ref_log_probs = z_ref.gather(-1, index).squeeze(-1) - torch.logsumexp(z_ref, dim=-1)
        stats = (
            log_probs,
            ref_log_probs,
            kl,
            l2,
            a.norm(dim=-1),
            lse_final - (p * z_final).sum(-1),
            z_final.mean(-1),
            z_final.argmax(-1) == labels,
            torch.log(p.square().sum(-1)),
        )
    return stats, p, p_dot_a


def _chunk_stats(readout, weight, bias, hidden, delta, ref_hidden, labels):
    """One chunk under autograd (the trainable-readout path, run under activation checkpointing)."""
    with _gathered(weight, bias):
        z_base, a, z_ref = _logits(readout, weight, bias, hidden, delta, ref_hidden)
    return _logit_stats(z_base, a, z_ref, labels)[0]


def _frozen_readout_stats(readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size, gram):
    """All chunks' statistics and, given a `GramCache`, their `(3, N, d)` `delta` Jacobians (no autograd)."""
    pieces, rows = [], []
    with torch.no_grad(), _gathered(weight, bias):
        jacobians = gram is not None
        if jacobians:
            # d l2 / d delta = (2 s / V) W_U^T a = (2 s^2 / V) (W_U^T W_U) delta
            d_l2 = delta.float() @ gram(weight) * (2.0 * readout.scale**2 / weight.shape[0])
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            chunk = slice(start, start + chunk_size)
            ref = None if ref_hidden is None else ref_hidden[chunk]
            z_base, a, z_ref = _logits(readout, weight, bias, hidden[chunk], delta[chunk], ref)
            stats, p, p_dot_a = _logit_stats(z_base, a, z_ref, labels[chunk])
            pieces.append(stats)
            if jacobians:
                # The (2n, V) blocks [p, p * (a - p.a)] projected back to (2n, d) in one matmul.
                blocks = torch.cat([p, p * (a - p_dot_a.unsqueeze(-1))])
                projected = (blocks @ weight.float()) * readout.scale
                n = p.shape[0]
                d_log_probs = readout.scale * weight[labels[chunk]].float() - projected[:n]
                rows.append(torch.stack([d_log_probs, projected[n:], d_l2[chunk]]))
    stats = tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(STAT_NAMES)))
    return stats, (torch.cat(rows, dim=1) if jacobians else None)


class _FrozenReadoutStats(torch.autograd.Function):
    """The statistics as an autograd function of `delta` alone, backward = the saved Jacobians' weighted sum."""

    @staticmethod
    def forward(ctx, delta, readout, weight, bias, hidden, ref_hidden, labels, chunk_size, gram):
        stats, jacobians = _frozen_readout_stats(
            readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size, gram
        )
        ctx.save_for_backward(jacobians)
        ctx.delta_dtype = delta.dtype
        ctx.mark_non_differentiable(*(s for name, s in zip(STAT_NAMES, stats) if name not in DIFFERENTIABLE))
        return stats

    @staticmethod
    def backward(ctx, *grads):
        (jacobians,) = ctx.saved_tensors  # (3, N, d): d log_probs, d kl, d l2 with respect to delta
        grad = torch.zeros_like(jacobians[0])
        for jacobian, name in zip(jacobians, DIFFERENTIABLE):
            g = grads[STAT_NAMES.index(name)]
            if g is not None:
                grad += g.float().unsqueeze(-1) * jacobian
        return grad.to(ctx.delta_dtype), None, None, None, None, None, None, None, None


def fused_token_stats(
    readout: LogitReadout,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    delta: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    chunk_size: int | None = None,
    gram: GramCache | None = None,
) -> dict[str, torch.Tensor]:
    """
    The statistics of the module docstring for `N` tokens: a dict of `(N,)` tensors named as `STAT_NAMES`.

    `gram` caches `W_U^T W_U` across calls for the frozen-readout gradient; pass the same `GramCache` on every
    training step (a fresh one is built per call otherwise).
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_token_stats_float32(readout, weight, bias, hidden, delta, labels, ref_hidden, chunk_size, gram)


def _fused_token_stats_float32(readout, weight, bias, hidden, delta, labels, ref_hidden, chunk_size, gram):
    """`fused_token_stats` outside autocast: every input in float32, so the vocabulary matmuls and all statistics are
    float32 whatever the backbone's dtype (bf16 logits would be off by ~|z| / 256, 0.1 nats at logits of 30).

    A half-precision `W_U` is cast to float32 once per call (a transient `(V, d)` float32 copy, as TRL's
    `cast_lm_head_to_fp32`); one partitioned by DeepSpeed ZeRO-3 is cast per chunk, once gathered. The Gram cache is
    keyed on the original `W_U`, so that the copy does not invalidate it."""
    readout_trainable = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    frozen_path = not readout_trainable and torch.is_grad_enabled() and delta.requires_grad
    hidden, delta = hidden.float(), delta.float()
    ref_hidden = None if ref_hidden is None else ref_hidden.float()
    partitioned = getattr(weight, "ds_status", None) is not None
    if weight.dtype != torch.float32 and not partitioned:
        if frozen_path:
            gram_matrix = (gram if gram is not None else GramCache())(weight)
            gram = lambda _: gram_matrix  # noqa: E731
        weight = weight.float()
        bias = None if bias is None else bias.float()
    if torch.is_grad_enabled() and readout_trainable:
        pieces = []
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            chunk = slice(start, start + chunk_size)
            ref = None if ref_hidden is None else ref_hidden[chunk]
            args = (hidden[chunk], delta[chunk], ref, labels[chunk])
            pieces.append(
                checkpoint(_chunk_stats, readout, weight, bias, *args, use_reentrant=False, preserve_rng_state=False)
            )
        stats = tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(STAT_NAMES)))
    elif frozen_path:
        gram = gram if gram is not None else GramCache()
        stats = _FrozenReadoutStats.apply(delta, readout, weight, bias, hidden, ref_hidden, labels, chunk_size, gram)
    else:
        args = (readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size)
        stats = _frozen_readout_stats(*args, gram=None)[0]
    return dict(zip(STAT_NAMES, stats))
