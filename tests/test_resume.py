"""Exact resume: a training process killed (SIGKILL) while writing a checkpoint resumes from the last complete one and
ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testing_utils import SCRIPTS, TESTS, checkpoints, logged, make_trainer

SCRIPT = Path(SCRIPTS) / "train_until_killed.py"
RUN = dict(max_steps=8, save_strategy="steps", save_steps=2)


def train_until_killed(output_dir: Path, tokenizer_dir: Path, pause_step: int) -> None:
    """Run the training script in a new process and SIGKILL it inside the checkpoint of `pause_step`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, env.get("PYTHONPATH")]))  # for `testing_utils`
    args = [str(output_dir), str(tokenizer_dir), str(RUN["max_steps"]), str(RUN["save_steps"]), str(pause_step)]
    output_dir.mkdir()
    with open(output_dir.parent / "train.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not (output_dir / "paused").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the training process did not reach step {pause_step}:\n{Path(log.name).read_text()}")
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_run_killed_inside_a_checkpoint_resumes_from_the_last_complete_one_exactly(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    killed = tmp_path / "killed"
    train_until_killed(killed, tmp_path / "tokenizer", pause_step=6)
    # The kill left checkpoint-6 half-written: the adapter is there, the optimizer and trainer states are not.
    assert checkpoints(killed) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (killed / "checkpoint-6" / "alignment_head.safetensors").exists()
    assert not (killed / "checkpoint-6" / "trainer_state.json").exists()

    with pytest.raises(ValueError, match=r"checkpoint-6: it has no trainer_state\.json") as error:
        make_trainer(killed, tokenizer, **RUN).train(resume_from_checkpoint=True)
    assert f"resume from {killed / 'checkpoint-4'}" in str(error.value)

    resumed = make_trainer(killed, tokenizer, **RUN)
    resumed.train(resume_from_checkpoint=str(killed / "checkpoint-4"))
    straight = make_trainer(tmp_path / "straight", tokenizer, **RUN)
    straight.train()

    for key in ("loss", "iav/alignment_norm", "rewards/margins"):
        expected = logged(straight, key)
        assert [step for step, _ in logged(resumed, key)] == [step for step, _ in expected] == list(range(1, 9))
        assert [value for _, value in logged(resumed, key)] == pytest.approx([v for _, v in expected], abs=1e-6)
    for key, value in straight.model.alignment_heads.state_dict().items():
        torch.testing.assert_close(resumed.model.alignment_heads.state_dict()[key], value, rtol=0, atol=1e-6)
    assert straight.model.alignment_heads["default"].write.weight.abs().sum() > 0  # trained away from zero
