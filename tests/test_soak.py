"""A long run of tiny steps with evaluation and checkpoint rotation: memory stays flat, the checkpoints left are the
newest and complete. 300 steps take about 10 s on one CPU core, so it runs with the other tests."""

import gc
import os

import torch
from testing_utils import checkpoints, logged, make_trainer, preference_data
from transformers import TrainerCallback

from iav_trl import IAVModel
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.trainer.checkpoints import checkpoint_problem

STEPS, EVERY = 300, 50


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


class MemoryProbe(TrainerCallback):
    """Resident memory and live tensor count after every checkpoint (after evaluation and rotation too)."""

    def __init__(self):
        self.samples: dict[int, tuple[int, int]] = {}

    def on_save(self, args, state, control, **kwargs):
        self.samples[state.global_step] = (resident_bytes(), live_tensors())


def test_hundreds_of_steps_with_evaluation_and_rotation_keep_memory_flat(tokenizer, tmp_path):
    probe = MemoryProbe()
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        train_dataset=preference_data(64),
        eval_dataset=preference_data(8, offset=1000),
        trainer_kwargs=dict(callbacks=[probe]),
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=EVERY,
        save_strategy="steps",
        save_steps=EVERY,
        save_total_limit=2,
    )
    trainer.train()

    assert [step for step, _ in logged(trainer)] == list(range(10, STEPS + 1, 10))
    assert [step for step, _ in logged(trainer, "eval_loss")] == list(range(EVERY, STEPS + 1, EVERY))
    assert checkpoints(tmp_path) == [f"checkpoint-{STEPS - EVERY}", f"checkpoint-{STEPS}"]
    for name in checkpoints(tmp_path):
        assert checkpoint_problem(tmp_path / name) is None
    final = IAVModel.from_pretrained(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / f"checkpoint-{STEPS}"
    )
    for key, value in trainer.model.alignment_heads["default"].state_dict().items():
        assert torch.equal(final.alignment_heads["default"].state_dict()[key], value)

    # From the second checkpoint on (allocator pools and caches are warm), memory does not grow with the steps.
    assert sorted(probe.samples) == list(range(EVERY, STEPS + 1, EVERY))
    (first_bytes, first_tensors), *later = [probe.samples[step] for step in sorted(probe.samples)[1:]]
    assert max(rss for rss, _ in later) - first_bytes < 32 * 2**20, probe.samples
    assert all(tensors == first_tensors for _, tensors in later), probe.samples
