"""`IAVTrainer.evaluate_alphas`: held-out preference scores at every alpha, against a full-vocabulary reference."""

import pytest
import torch
import torch.nn.functional as F
from testing_utils import make_trainer, pairs, randomize_heads


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IAV_TRL_CACHE", str(tmp_path / "iav_cache"))


def reference_rows(trainer, alphas):
    """Per alpha: each pair's margin, from log-softmaxes of the model's full logits on the trainer's own batches, and
    the KL per completion token, computed independently of the fused readout."""
    model, beta = trainer.model, trainer.beta
    margins, kl = {alpha: [] for alpha in alphas}, {alpha: [0.0, 0.0] for alpha in alphas}
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            labels, mask = batch["input_ids"][:, 1:, None], batch["completion_mask"][:, 1:].float()
            ids, attention = batch["input_ids"], batch["attention_mask"]
            base = model(ids, attention_mask=attention, alpha=0.0).logits[:, :-1].log_softmax(-1)
            for alpha in alphas:
                logp = model(ids, attention_mask=attention, alpha=alpha).logits[:, :-1].log_softmax(-1)
                ratio = ((logp - base).gather(-1, labels).squeeze(-1) * mask).sum(1)
                chosen, rejected = (beta * ratio).chunk(2)
                margins[alpha].append(chosen - rejected)
                kl[alpha][0] += float(((logp.exp() * (logp - base)).sum(-1) * mask).sum())
                kl[alpha][1] += float(mask.sum())
    return {alpha: (torch.cat(margins[alpha]), kl[alpha][0] / kl[alpha][1]) for alpha in alphas}


@pytest.mark.parametrize("cached", [False, True], ids=["backbone", "cached-features"])
def test_every_alpha_scores_as_a_plain_log_softmax_reference(tokenizer, tmp_path, cached):
    trainer = make_trainer(
        tmp_path, tokenizer, train_dataset=pairs(6), eval_dataset=pairs(10, offset=50), max_length=40,
        precompute_backbone_features=cached, per_device_eval_batch_size=4,
    )  # fmt: skip
    randomize_heads(trainer.model, seed=0, std=0.3)
    alphas = [0.0, 1.0, 2.5]
    rows = {row["alpha"]: row for row in trainer.evaluate_alphas(alphas, per_pair=True)}
    expected = reference_rows(trainer, alphas)
    assert rows[0.0]["ties"] == 1.0 and rows[0.0]["win_rate"] == 0.5 and rows[0.0]["accuracy"] == 0.0
    assert rows[0.0]["margin"] == 0.0 and rows[0.0]["kl"] == 0.0
    for alpha in alphas[1:]:
        margins, kl = expected[alpha]
        row = rows[alpha]
        assert row["num_pairs"] == len(margins) == len(row["margins"]) == 10
        assert row["margins"] == pytest.approx(margins.tolist(), rel=1e-4, abs=1e-5)  # each pair, in order
        assert row["margin"] == pytest.approx(margins.mean().item(), rel=1e-4, abs=1e-6)
        assert row["accuracy"] == pytest.approx((margins > 1e-6).float().mean().item())
        assert row["loss"] == pytest.approx(-F.logsigmoid(margins).mean().item(), rel=1e-4)
        assert row["kl"] == pytest.approx(kl, rel=1e-3)
    assert rows[2.5]["kl"] > rows[1.0]["kl"] > 0
    assert "margins" not in trainer.evaluate_alphas([1.0])[0]  # per-pair margins only when asked for


def test_alphas_that_are_not_distinct_numbers_are_refused(tokenizer, tmp_path):
    trainer = make_trainer(tmp_path, tokenizer, eval_dataset=pairs(4))
    with pytest.raises(ValueError, match="`alphas` must be distinct numbers"):
        trainer.evaluate_alphas([1.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        trainer.evaluate_alphas([float("nan")])
