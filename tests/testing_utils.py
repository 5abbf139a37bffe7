"""Helpers shared by the tests (TRL keeps its own in `tests/testing_utils.py`): plain-PyTorch references written
from the documented formulas, independent of iav_trl's code; tiny deterministic training runs and their data; the
fixture files and the benchmarks' miniature settings. Fixtures are in `conftest.py`; scripts the tests run as
subprocesses are in `tests/scripts/`."""

import os

import torch
import torch.nn.functional as F
from datasets import Dataset

from iav_trl import IAVConfig, IAVTrainer
from iav_trl.models.tiny import tiny_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
SCRIPTS = os.path.join(TESTS, "scripts")
FIXTURES = os.path.join(TESTS, "fixtures")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake.",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
    "I am sorry, but I cannot help with that request because it could hurt someone.",
    "Sure! Here is a helpful, harmless and honest answer to your question.",
] * 20

COMMIT = "0123456789abcdef0123456789abcdef01234567"

HH = os.path.join(FIXTURES, "hh-rlhf-harmless-base-test-40.jsonl")
ULTRAFEEDBACK = os.path.join(FIXTURES, "ultrafeedback-binarized-train_prefs-40.jsonl")
ALPHAS = [0.0, 0.5, 1.0, 1.5, 2.0]
# 13 HH-RLHF and 19 UltraFeedback fixture pairs fit 128 tokens: fewer than the 24 asked, so both splits are scaled.
MINIATURE = dict(
    max_length=128,
    num_train=16,
    num_validation=4,
    num_heldout=4,
    batch_size=4,
    warmup_ratio=0.0,
    iav_learning_rates=[1e-2, 3e-2],
    dpo_learning_rates=[1e-2],
    genarm_learning_rates=[1e-2],
    isolate_training=False,
    eval_batch_size=4,
    kl_prompts=2,
    kl_samples=2,
    kl_new_tokens=6,
    sample_batch_size=4,
    speed_prompts=2,
    speed_new_tokens=3,
    speed_rounds=1,
    num_generation_prompts=2,
    generation_new_tokens=4,
    safety_prompts=2,
    safety_new_tokens=3,
)


# Plain-PyTorch references


def randomize_heads(model, seed: int = 0, std: float = 0.5) -> None:
    """Give every alignment head non-zero weights (a fresh head has W_write = 0, so a_t = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.alignment_heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def reference_alignment(head, hidden, unembedding, scale=1.0):
    """a_t = s * W_U W_write sum_k softmax(W_route u + b)_k SiLU(A_k u + b_k), u = W_read h."""
    u = hidden @ head.read.weight.T
    routing = torch.softmax(u @ head.route.weight.T + head.route.bias, dim=-1)
    proposals = F.silu(u @ head.propose.weight.T + head.propose.bias)
    proposals = proposals.view(*u.shape[:-1], head.num_interventions, head.intervention_dim)
    mixed = (routing.unsqueeze(-1) * proposals).sum(-2)
    return scale * (mixed @ head.write.weight.T) @ unembedding.T


# Tiny deterministic training runs

HEAD = dict(num_interventions=3, intervention_dim=8)


def preference_data(n: int, offset: int = 0) -> Dataset:
    """Pairs with a clear signal: the chosen answer helps, the rejected one refuses."""
    return Dataset.from_list(
        [
            {
                "prompt": f"Human: question number {i + offset}, how do I bake bread? Assistant:",
                "chosen": " Sure! Mix flour, water, salt and yeast.",
                "rejected": " I am sorry, but I cannot help.",
            }
            for i in range(n)
        ]
    )


def make_trainer(
    output_dir,
    tokenizer,
    *,
    train_dataset=None,
    eval_dataset=None,
    model=None,
    trainer_class=IAVTrainer,
    trainer_kwargs=None,
    **config,
):
    """An `IAVTrainer` on a tiny Llama (the same weights in every process), logging every step, on CPU in fp32."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **HEAD,
    )
    settings.update(config)
    return trainer_class(
        model if model is not None else tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=IAVConfig(**settings),
        train_dataset=train_dataset if train_dataset is not None else preference_data(12),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )


def logged(trainer, key: str = "loss") -> list[tuple[int, float]]:
    """`(step, value)` of every training log holding `key`."""
    return [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]


def checkpoints(output_dir) -> list[str]:
    return sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint-"))


def pairs(n: int, offset: int = 0) -> Dataset:
    """Pairs of different lengths, so that padding, truncation and the order of the scored positions matter."""
    words = "mix flour water salt and yeast then knead bake slowly until golden".split()
    return Dataset.from_list(
        [
            {
                "prompt": f"Human: question {i + offset}{' again' * (i % 3)}, how do I bake bread? Assistant:",
                "chosen": " " + " ".join(words[: 3 + (i * 5) % 9]),
                "rejected": " I am sorry" + ", no" * (i % 4) + ".",
            }
            for i in range(n)
        ]
    )
