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
    alignment_norm = ||a||_2, entropy of p, mean_v z_final,v, [z_final,y == max_v z_final,v] (the label is a top-1),
    log_sum_sq_probs = log sum_v p_v^2                                          (no grad)

Two ways to differentiate, chosen per call (the first in two variants):

- frozen readout (`h`, `W_U` and `b` need no gradient: the frozen-backbone training step). Only `delta` gets a
  gradient, and each statistic's gradient with respect to `delta` is known in closed form, `d/d delta = s W_U^T d/da`:

      d log_probs / da = onehot(y) - p
      d kl / da        = p * (a - sum_v p_v a_v)
      d l2 / da        = 2 a / V

  so with the upstream gradients `g` of the three statistics (per token), the whole `delta` gradient is

      s W_U^T G + s g_log_probs W_U[y],   G = p * (g_kl (a - p.a) - g_log_probs) + (2 g_l2 / V) a     (N, V)

  Two variants, by memory (`BaseLogitsCache.max_bytes`):
  - kept logits (within the budget): the forward pass keeps `p` and `a` of every token, and the backward pass forms
    `G` and projects it in ONE matmul. Two vocabulary matmuls per head and token (`a`, and `G W_U`), plus `z_base`,
    which a `BaseLogitsCache` computes once for every head that scores the same batch (a `lambda_kl_sweep`).
    It keeps `(z_base, p, a)`, `3 x N x V x 4` bytes.
  - projected in the forward pass (beyond the budget, or with a ZeRO-3 partitioned `W_U`): the upstream gradients
    are not known yet, so the forward pass projects the first two `(tokens, V)` blocks back to `(tokens, d)` right
    away, and the third through the Gram matrix of the frozen unembedding, `s W_U^T a = s^2 (W_U^T W_U) delta`
    (`(d, d)`, computed once and cached while `W_U` is unchanged): four vocabulary matmuls per token in all
    (`z_base`, `a`, and the two projections). Only the three `(N, d)` Jacobian rows are kept for the backward pass,
    which is their weighted sum. No `(tokens x V)` block outlives its chunk.
- trainable readout (a LoRA or fully trained backbone, or a trained LM head): plain autograd through each chunk
  under activation checkpointing, which keeps the chunk's inputs and recomputes its blocks in the backward pass.

The per-token statistics take one pass over each `(tokens, V)` block apiece: the row dot products `p.a`, `p.z_base`,
`a.a` and `p.p` give `kl`, the entropy `lse(z_final) - p.z_base - p.a`, `l2`, `alignment_norm` and
`log_sum_sq_probs`; `z_base`'s own statistics (`lse(z_base)`, its mean, the reference log-probs) come with it.
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


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`sum_v x_v y_v` per row (on CPU three times faster than `einsum`, which makes it a batch of matrix products,
    and closer to the float64 value)."""
    return torch.linalg.vecdot(x, y)


def _chunks(count: int, chunk_size: int) -> list[slice]:
    """The token chunks of `count` scored positions (one empty chunk when there are none)."""
    return [slice(start, start + chunk_size) for start in range(0, max(count, 1), chunk_size)]


def _joined(pieces: list[tuple]) -> tuple:
    """The chunks' statistics, each concatenated over the chunks."""
    return tuple(torch.cat([piece[i] for piece in pieces]) for i in range(len(STAT_NAMES)))


def _base_logits(readout, weight, bias, hidden, ref_hidden, labels):
    """`z_base` of one chunk in float32 and its per-token statistics `(lse(z_base), ref_log_probs, mean_v z_base)`."""
    weight = weight.float()  # a no-op but for a ZeRO-3 partitioned half-precision W_U, cast here once gathered
    bias = None if bias is None else bias.float()
    z_base = readout.base_logits(hidden, weight, bias).float()
    lse_base = torch.logsumexp(z_base, dim=-1)
    with torch.no_grad():
        if ref_hidden is None:
            ref_log_probs = z_base.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse_base
        else:
            z_ref = readout.base_logits(ref_hidden, weight, bias).float()
            ref_log_probs = z_ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z_ref, dim=-1)
        mean_base = z_base.mean(-1)
    return z_base, (lse_base, ref_log_probs.detach(), mean_base)


def _head_stats(z_base, a, base, labels):
    """The statistics of the module docstring for one head's applied alignment logits `a` over `z_base` (with
    `base = (lse(z_base), ref_log_probs, mean_v z_base)`), plus `p = softmax(z_final)` and `p.a` for the gradient.
    Differentiable through autograd when grad mode is on; without it `z_final`'s buffer becomes `p` in place, its
    maximum (not its index: `max` with indices costs several times `amax`) taken in one pass."""
    lse_base, ref_log_probs, mean_base = base
    z_final = z_base + a
    picked = z_final.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if torch.is_grad_enabled():
        lse_final = torch.logsumexp(z_final, dim=-1)
        p = torch.exp(z_final - lse_final.unsqueeze(-1))
        with torch.no_grad():
            is_top1 = picked >= z_final.amax(-1)
    else:
        top = z_final.amax(-1)
        is_top1 = picked >= top
        p = z_final.sub_(top.unsqueeze(-1)).exp_()
        total = p.sum(-1)
        p.div_(total.unsqueeze(-1))
        lse_final = top + total.log()
    p_dot_a = _rowdot(p, a)
    sum_sq_a = _rowdot(a, a)
    log_probs = picked - lse_final
    kl = p_dot_a - lse_final + lse_base
    l2 = sum_sq_a / a.shape[-1]
    with torch.no_grad():
        stats = (
            log_probs,
            ref_log_probs,
            kl,
            l2,
            sum_sq_a.sqrt(),
            lse_final - _rowdot(p, z_base) - p_dot_a,
            mean_base + a.mean(-1),
            is_top1,
            torch.log(_rowdot(p, p)),
        )
    return stats, p, p_dot_a


class BaseLogitsCache:
    """
    `z_base` of one batch's scored tokens and its statistics, computed once and read by every head that scores the
    batch (the heads of a `lambda_kl_sweep`, one call each), and the memory budget of the frozen-readout gradient.

    `max_bytes` bounds the float32 vocabulary-sized blocks a call keeps: `z_base` here and the head's `p` and `a` for
    its backward pass, `3 x N x V x 4` bytes. Within it a call takes the kept-logits gradient (see the module
    docstring); beyond it nothing vocabulary-sized is kept. A call on other tokens, labels or unembedding than the
    kept ones recomputes `z_base`.
    """

    def __init__(self, max_bytes: int = 2 * 2**30):
        if max_bytes < 0:
            raise ValueError(f"`max_bytes` must be >= 0, got {max_bytes}.")
        self.max_bytes = max_bytes
        self._inputs: tuple | None = None
        self._chunks: list | None = None

    def fits(self, tokens: int, vocab_size: int) -> bool:
        return 3 * tokens * vocab_size * 4 <= self.max_bytes

    def chunks(self, readout, weight, bias, hidden, ref_hidden, labels, chunk_size) -> list:
        """Per chunk of `chunk_size` tokens, `(z_base, (lse(z_base), ref_log_probs, mean_v z_base))`."""
        key = (readout, weight.data_ptr(), weight._version, chunk_size)
        given = (hidden, ref_hidden, labels)
        if self._inputs is not None and self._inputs[0] == key and _same(self._inputs[1:], given):
            return self._chunks
        self.clear()
        with torch.no_grad():
            weight, bias = weight.float(), None if bias is None else bias.float()
            self._chunks = []
            for c in _chunks(hidden.shape[0], chunk_size):
                ref = None if ref_hidden is None else ref_hidden[c]
                self._chunks.append(_base_logits(readout, weight, bias, hidden[c], ref, labels[c]))
        self._inputs = (key, *given)
        return self._chunks

    def clear(self) -> None:
        """Free the kept `z_base`."""
        self._inputs = self._chunks = None


def _same(kept: tuple, given: tuple) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
        for x, y in zip(kept, given)
    )


def _chunk_stats(readout, weight, bias, hidden, delta, ref_hidden, labels):
    """One chunk under autograd (the trainable-readout path, run under activation checkpointing)."""
    with _gathered(weight, bias):
        z_base, base = _base_logits(readout, weight, bias, hidden, ref_hidden, labels)
        a = readout.alignment_logits(delta.to(weight.dtype), weight.float()).float()
    return _head_stats(z_base, a, base, labels)[0]


def _projected_stats(readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size, gram, kept=None):
    """All chunks' statistics and, given a `GramCache`, their `(3, N, d)` `delta` Jacobians projected in the forward
    pass (no autograd); each chunk's `z_base` from `kept` (`BaseLogitsCache.chunks`) when given, else computed."""
    pieces, rows = [], []
    with torch.no_grad(), _gathered(weight, bias):
        jacobians = gram is not None
        if jacobians:
            # d l2 / d delta = (2 s / V) W_U^T a = (2 s^2 / V) (W_U^T W_U) delta
            d_l2 = delta.float() @ gram(weight) * (2.0 * readout.scale**2 / weight.shape[0])
        for i, chunk in enumerate(_chunks(hidden.shape[0], chunk_size)):
            ref = None if ref_hidden is None else ref_hidden[chunk]
            z_base, base_stats = (
                kept[i] if kept is not None else _base_logits(readout, weight, bias, hidden[chunk], ref, labels[chunk])
            )
            a = readout.alignment_logits(delta[chunk], weight.float()).float()
            stats, p, p_dot_a = _head_stats(z_base, a, base_stats, labels[chunk])
            pieces.append(stats)
            if jacobians:
                # The (2n, V) blocks [p, p * (a - p.a)] projected back to (2n, d) in one matmul.
                blocks = torch.cat([p, p * (a - p_dot_a.unsqueeze(-1))])
                projected = (blocks @ weight.float()) * readout.scale
                n = p.shape[0]
                d_log_probs = readout.scale * weight[labels[chunk]].float() - projected[:n]
                rows.append(torch.stack([d_log_probs, projected[n:], d_l2[chunk]]))
    stats = _joined(pieces)
    return stats, (torch.cat(rows, dim=1) if jacobians else None)


class _ProjectedReadoutStats(torch.autograd.Function):
    """The statistics as an autograd function of `delta` alone, backward = the saved Jacobians' weighted sum."""

    @staticmethod
    def forward(ctx, delta, readout, weight, bias, hidden, ref_hidden, labels, chunk_size, gram):
        stats, jacobians = _projected_stats(readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size, gram)
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


class _KeptReadoutStats(torch.autograd.Function):
    """The statistics as an autograd function of `delta` alone; the forward pass keeps `p` and `a` per chunk, the
    backward pass forms the whole gradient block `G` (module docstring) and projects it once."""

    @staticmethod
    def forward(ctx, delta, readout, weight, bias, hidden, ref_hidden, labels, chunk_size, base):
        pieces, kept = [], []
        with torch.no_grad():
            kept_base = base.chunks(readout, weight, bias, hidden, ref_hidden, labels, chunk_size)
            unembedding = weight.float()
            for chunk, (z_base, base_stats) in zip(_chunks(hidden.shape[0], chunk_size), kept_base):
                a = readout.alignment_logits(delta[chunk], unembedding).float()
                stats, p, p_dot_a = _head_stats(z_base, a, base_stats, labels[chunk])
                pieces.append(stats)
                kept += [p, a, p_dot_a]
        ctx.save_for_backward(weight, labels, *kept)
        ctx.scale, ctx.chunk_size, ctx.delta_dtype = readout.scale, chunk_size, delta.dtype
        stats = _joined(pieces)
        ctx.mark_non_differentiable(*(s for name, s in zip(STAT_NAMES, stats) if name not in DIFFERENTIABLE))
        return stats

    @staticmethod
    def backward(ctx, *grads):
        weight, labels, *kept = ctx.saved_tensors
        unembedding = weight.float()
        count, vocab_size = labels.shape[0], weight.shape[0]
        g_log_probs, g_kl, g_l2 = (
            torch.zeros(count, device=labels.device) if g is None else g.float()
            for g in (grads[STAT_NAMES.index(name)] for name in DIFFERENTIABLE)
        )
        rows = []
        for i, chunk in enumerate(_chunks(count, ctx.chunk_size)):
            p, a, p_dot_a = kept[3 * i : 3 * i + 3]
            g, g_k = g_log_probs[chunk].unsqueeze(-1), g_kl[chunk].unsqueeze(-1)
            block = torch.addcmul(-(g_k * p_dot_a.unsqueeze(-1)) - g, a, g_k)  # g_kl (a - p.a) - g_log_probs
            block.mul_(p).addcmul_(a, (2.0 / vocab_size) * g_l2[chunk].unsqueeze(-1))
            rows.append((block @ unembedding + g * unembedding[labels[chunk]]) * ctx.scale)
        grad = torch.cat(rows)
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
    base: BaseLogitsCache | None = None,
) -> dict[str, torch.Tensor]:
    """
    The statistics of the module docstring for `N` tokens: a dict of `(N,)` tensors named as `STAT_NAMES`.

    `gram` caches `W_U^T W_U` across calls for the frozen-readout gradient beyond the memory budget; pass the same
    `GramCache` on every training step (a fresh one is built per call otherwise). `base` shares `z_base` between
    calls on the same tokens and sets the memory budget (a fresh `BaseLogitsCache` with the default budget
    otherwise).
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_token_stats_float32(
            readout, weight, bias, hidden, delta, labels, ref_hidden, chunk_size, gram, base
        )


def _fused_token_stats_float32(readout, weight, bias, hidden, delta, labels, ref_hidden, chunk_size, gram, base):
    """`fused_token_stats` outside autocast: every input in float32, so the vocabulary matmuls and all statistics are
    float32 whatever the backbone's dtype (bf16 logits would be off by ~|z| / 256, 0.1 nats at logits of 30).

    A half-precision `W_U` is cast to float32 once per call (a transient `(V, d)` float32 copy, as TRL's
    `cast_lm_head_to_fp32`; the kept-logits backward casts it again rather than keep the copy); one partitioned by
    DeepSpeed ZeRO-3 is cast per chunk, once gathered. The Gram and `z_base` caches are keyed on the original `W_U`,
    so that the copy does not invalidate them."""
    readout_trainable = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    frozen_path = not readout_trainable and torch.is_grad_enabled() and delta.requires_grad
    hidden, delta = hidden.float(), delta.float()
    ref_hidden = None if ref_hidden is None else ref_hidden.float()
    partitioned = getattr(weight, "ds_status", None) is not None
    shared = base is not None  # a caller's cache, read by the next head's call
    base = base if shared else BaseLogitsCache()
    keep = not partitioned and base.fits(hidden.shape[0], weight.shape[0])
    if frozen_path and keep:
        args = (readout, weight, bias, hidden, ref_hidden, labels, chunk_size, base)
        return dict(zip(STAT_NAMES, _KeptReadoutStats.apply(delta, *args)))
    original = weight
    if weight.dtype != torch.float32 and not partitioned:
        if frozen_path:
            gram_matrix = (gram if gram is not None else GramCache())(weight)
            gram = lambda _: gram_matrix  # noqa: E731
        weight = weight.float()
        bias = None if bias is None else bias.float()
    if torch.is_grad_enabled() and readout_trainable:
        pieces = []
        for chunk in _chunks(hidden.shape[0], chunk_size):
            ref = None if ref_hidden is None else ref_hidden[chunk]
            args = (hidden[chunk], delta[chunk], ref, labels[chunk])
            pieces.append(
                checkpoint(_chunk_stats, readout, weight, bias, *args, use_reentrant=False, preserve_rng_state=False)
            )
        stats = _joined(pieces)
    elif frozen_path:
        gram = gram if gram is not None else GramCache()
        args = (readout, weight, bias, hidden, ref_hidden, labels, chunk_size, gram)
        stats = _ProjectedReadoutStats.apply(delta, *args)
    else:
        kept = (
            base.chunks(readout, original, bias, hidden, ref_hidden, labels, chunk_size) if keep and shared else None
        )
        stats = _projected_stats(readout, weight, bias, hidden, delta, ref_hidden, labels, chunk_size, None, kept)[0]
    return dict(zip(STAT_NAMES, stats))
