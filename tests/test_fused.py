"""The chunked training statistics against a plain full-vocabulary PyTorch computation, values and gradients."""

from unittest.mock import patch

import pytest
import torch

from iav_trl.tuners.iav.fused import STAT_NAMES, BaseLogitsCache, GramCache, fused_token_stats
from iav_trl.tuners.iav.readout import LogitReadout

N, D, V = 11, 16, 97
READOUTS = [LogitReadout(), LogitReadout(scale=0.5), LogitReadout(softcap=3.0)]
# The frozen readout's two gradients: the logits kept for the backward pass (within the default memory budget), and
# the Jacobians projected in the forward pass (a budget of 0 bytes).
BUDGETS = {"kept": 2**30, "projected": 0}


def reference_stats(readout, weight, bias, hidden, delta, labels, ref_hidden=None):
    """Every statistic from whole (N, V) tensors with torch's own log_softmax, in float64."""
    weight, bias, hidden, delta = (t.double() for t in (weight, bias, hidden, delta))
    z_base = readout.scale * (hidden @ weight.T + bias)
    if readout.softcap is not None:
        z_base = readout.softcap * torch.tanh(z_base / readout.softcap)
    a = readout.scale * delta @ weight.T
    z_final = z_base + a
    logp_final, logp_base = z_final.log_softmax(-1), z_base.log_softmax(-1)
    if ref_hidden is None:
        logp_ref = logp_base
    else:
        z_ref = readout.scale * (ref_hidden.double() @ weight.T + bias)
        if readout.softcap is not None:
            z_ref = readout.softcap * torch.tanh(z_ref / readout.softcap)
        logp_ref = z_ref.log_softmax(-1)
    p = logp_final.exp()
    pick = labels.unsqueeze(-1)
    return {
        "log_probs": logp_final.gather(-1, pick).squeeze(-1),
        "ref_log_probs": logp_ref.gather(-1, pick).squeeze(-1),
        "kl": (p * (logp_final - logp_base)).sum(-1),
        "l2": (a**2).sum(-1) / V,
        "alignment_norm": a.pow(2).sum(-1).sqrt(),
        "entropy": -(p * logp_final).sum(-1),
        "mean_logits": z_final.mean(-1),
        "is_top1": z_final.argmax(-1) == labels,
        "log_sum_sq_probs": (p**2).sum(-1).log(),
    }


def make_inputs(seed, n=N):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=generator)
    bias = torch.randn(V, generator=generator)
    hidden = torch.randn(n, D, generator=generator)
    delta = 0.3 * torch.randn(n, D, generator=generator)
    labels = torch.randint(0, V, (n,), generator=generator)
    return weight, bias, hidden, delta, labels


def weighted_sum(stats, weights):
    return sum((weights[i] * stats[name].double()).sum() for i, name in enumerate(("log_probs", "kl", "l2")))


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("readout", READOUTS, ids=["plain", "scale", "softcap"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_frozen_readout_values_and_delta_gradient_match_full_vocabulary_autograd(readout, chunk_size, budget):
    weight, bias, hidden, delta, labels = make_inputs(0)
    weights = torch.rand(3, N, dtype=torch.float64)
    delta_ours = delta.clone().requires_grad_(True)
    base = BaseLogitsCache(budget)
    ours = fused_token_stats(readout, weight, bias, hidden, delta_ours, labels, chunk_size=chunk_size, base=base)
    weighted_sum(ours, weights).backward()

    delta_ref = delta.double().requires_grad_(True)
    ref = reference_stats(readout, weight, bias, hidden, delta_ref, labels)
    weighted_sum(ref, weights).backward()

    for name in STAT_NAMES:
        torch.testing.assert_close(ours[name].double(), ref[name].to(torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta_ours.grad.double(), delta_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("readout", READOUTS, ids=["plain", "scale", "softcap"])
def test_trainable_readout_gradients_match_full_vocabulary_autograd(readout):
    tensors = [t.clone().requires_grad_(True) for t in make_inputs(1)[:4]]
    labels = make_inputs(1)[4]
    weights = torch.rand(3, N, dtype=torch.float64)
    ours = fused_token_stats(readout, *tensors, labels, chunk_size=4)
    weighted_sum(ours, weights).backward()

    reference = [t.detach().double().requires_grad_(True) for t in tensors]
    weighted_sum(reference_stats(readout, *reference, labels), weights).backward()
    for mine, theirs in zip(tensors, reference):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_reference_hidden_states_give_the_reference_log_probs(requires_grad):
    weight, bias, hidden, delta, labels = make_inputs(2)
    ref_hidden = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    delta.requires_grad_(requires_grad)
    ours = fused_token_stats(LogitReadout(), weight, bias, hidden, delta, labels, ref_hidden=ref_hidden, chunk_size=5)
    ref = reference_stats(LogitReadout(), weight, bias, hidden, delta.detach(), labels, ref_hidden=ref_hidden)
    torch.testing.assert_close(ours["ref_log_probs"].double(), ref["ref_log_probs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["kl"].double(), ref["kl"], rtol=1e-5, atol=1e-5)


def test_no_grad_statistics_equal_the_training_statistics():
    weight, bias, hidden, delta, labels = make_inputs(4)
    with torch.no_grad():
        evaluated = fused_token_stats(LogitReadout(), weight, bias, hidden, delta, labels, chunk_size=3)
    trained = fused_token_stats(LogitReadout(), weight, bias, hidden, delta.requires_grad_(True), labels, chunk_size=3)
    for name in STAT_NAMES:
        assert torch.equal(evaluated[name], trained[name].detach()), name


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
def test_no_scored_token_gives_empty_statistics_and_a_zero_gradient(budget):
    weight, bias, hidden, delta, labels = make_inputs(5, n=0)
    delta.requires_grad_(True)
    stats = fused_token_stats(LogitReadout(), weight, bias, hidden, delta, labels, base=BaseLogitsCache(budget))
    assert all(stats[name].shape == (0,) for name in STAT_NAMES)
    (stats["log_probs"].sum() + stats["kl"].sum()).backward()
    assert delta.grad is not None and delta.grad.shape == (0, D)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
def test_only_the_log_probs_gradient_flows_when_the_other_terms_are_unused(budget):
    weight, bias, hidden, delta, labels = make_inputs(6)
    delta_ours = delta.clone().requires_grad_(True)
    stats = fused_token_stats(LogitReadout(), weight, bias, hidden, delta_ours, labels, base=BaseLogitsCache(budget))
    stats["log_probs"].sum().backward()
    delta_ref = delta.double().requires_grad_(True)
    reference_stats(LogitReadout(), weight, bias, hidden, delta_ref, labels)["log_probs"].sum().backward()
    torch.testing.assert_close(delta_ours.grad.double(), delta_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["in_place", "through_data", "new_tensor"])
def test_a_shared_gram_cache_follows_changes_of_the_unembedding(change):
    weight, bias, hidden, delta, labels = make_inputs(7)
    gram = GramCache()
    weights = torch.rand(3, N, dtype=torch.float64)

    def delta_gradient(w):
        d = delta.clone().requires_grad_(True)
        stats = fused_token_stats(LogitReadout(), w, bias, hidden, d, labels, gram=gram, base=BaseLogitsCache(0))
        weighted_sum(stats, weights).backward()
        return d.grad

    delta_gradient(weight)  # fills the cache
    if change == "in_place":
        with torch.no_grad():
            weight.mul_(1.5)
    elif change == "through_data":
        weight.data.mul_(1.5)  # bypasses the autograd version counter
    else:
        weight = weight * 1.5
    ours = delta_gradient(weight)
    reference_delta = delta.double().requires_grad_(True)
    weighted_sum(reference_stats(LogitReadout(), weight, bias, hidden, reference_delta, labels), weights).backward()
    torch.testing.assert_close(ours.double(), reference_delta.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram(weight).double(), weight.double().T @ weight.double(), rtol=1e-5, atol=1e-4)


def test_heads_sharing_a_base_logits_cache_get_their_own_statistics_and_gradients_from_one_z_base():
    """A `lambda_kl_sweep`'s heads score the same tokens: `z_base` is computed once for all of them, each head's
    statistics and gradient are those of the full-vocabulary reference, and other tokens recompute `z_base`."""
    weight, bias, hidden, _, labels = make_inputs(9)
    deltas = [0.3 * torch.randn(N, D, generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    weights = torch.rand(3, N, dtype=torch.float64)
    base = BaseLogitsCache()
    with patch.object(LogitReadout, "base_logits", autospec=True, side_effect=LogitReadout.base_logits) as counted:
        for delta in deltas:
            ours_delta = delta.clone().requires_grad_(True)
            ours = fused_token_stats(LogitReadout(), weight, bias, hidden, ours_delta, labels, chunk_size=4, base=base)
            weighted_sum(ours, weights).backward()
            ref_delta = delta.double().requires_grad_(True)
            ref = reference_stats(LogitReadout(), weight, bias, hidden, ref_delta, labels)
            weighted_sum(ref, weights).backward()
            for name in STAT_NAMES:
                torch.testing.assert_close(ours[name].double(), ref[name].to(torch.float64), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours_delta.grad.double(), ref_delta.grad, rtol=1e-5, atol=1e-5)
        assert counted.call_count == 3  # the 3 chunks of 4 tokens, once for the 3 heads
        other = hidden + 1.0
        stats = fused_token_stats(LogitReadout(), weight, bias, other, deltas[0], labels, chunk_size=4, base=base)
        assert counted.call_count == 6
    expected = reference_stats(LogitReadout(), weight, bias, other, deltas[0], labels)
    torch.testing.assert_close(stats["log_probs"].double(), expected["log_probs"], rtol=1e-5, atol=1e-5)


def test_a_negative_memory_budget_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        BaseLogitsCache(-1)


@pytest.mark.parametrize("mode", ["no_grad", "frozen_readout", "trainable_readout"])
def test_statistics_are_float32_and_exact_under_bf16_autocast_with_a_bf16_backbone(mode):
    from testing_utils import randomize_heads

    from iav_trl import AlignmentHeadConfig, get_iav_model
    from iav_trl.models.tiny import tiny_causal_lm

    base = tiny_causal_lm("llama", vocab_size=V * 4).to(torch.bfloat16)
    with torch.no_grad():
        base.lm_head.weight.mul_(40.0)  # logits of tens of nats: bf16 rounding of them would show (~0.1)
    model = get_iav_model(base, AlignmentHeadConfig(num_interventions=3, intervention_dim=8))
    randomize_heads(model, std=0.2)
    if mode == "trainable_readout":
        base.lm_head.weight.requires_grad_(True)
    ids = torch.randint(7, V * 4, (2, 9), generator=torch.Generator().manual_seed(8))
    alpha = 1.5
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode != "no_grad"):
        out = model(ids, labels=ids, alpha=alpha, fused_lm_head=True)
        # The inputs the statistics are computed from, taken on their own: the bf16 hidden states and the offset.
        with torch.no_grad():
            hidden = base.model(ids).last_hidden_state[:, :-1].reshape(-1, base.config.hidden_size)
            delta = alpha * model.alignment_heads["default"](hidden.float())
    weight = base.lm_head.weight.detach()
    ref = reference_stats(LogitReadout(), weight, torch.zeros(weight.shape[0]), hidden, delta, ids[:, 1:].reshape(-1))
    ref["l2"] = ref["l2"] * V / weight.shape[0]  # `reference_stats` averages over this file's V, not 4 V
    for name in ("log_probs", "ref_log_probs", "kl", "l2"):
        ours = getattr(out, name)
        assert ours.dtype == torch.float32, name
        torch.testing.assert_close(ours.reshape(-1).double(), ref[name], rtol=1e-4, atol=2e-3, msg=name)
    assert out.loss.dtype == torch.float32
    if mode != "no_grad":
        out.loss.backward()
        assert all(p.grad is not None for p in model.alignment_heads.parameters())
