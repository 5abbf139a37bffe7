"""Train the run of `testing_utils.make_trainer`, pausing inside the checkpoint of one step until the test kills the
process.

Usage: PYTHONPATH=tests python tests/scripts/train_until_killed.py OUTPUT_DIR TOKENIZER_DIR MAX_STEPS SAVE_STEPS \
    PAUSE_STEP

At `PAUSE_STEP`, the checkpoint directory holds the adapter, tokenizer and training arguments but not yet the
optimizer, scheduler, RNG and trainer states: the file `OUTPUT_DIR/paused` then appears and the process sleeps.
"""

import sys
import time
from pathlib import Path

from testing_utils import make_trainer
from transformers import AutoTokenizer

from iav_trl import IAVTrainer


class PausingTrainer(IAVTrainer):
    pause_step: int = -1

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == self.pause_step:
            Path(self.args.output_dir, "paused").touch()
            time.sleep(600)
        super()._save_optimizer_and_scheduler(output_dir)


if __name__ == "__main__":
    output_dir, tokenizer_dir, max_steps, save_steps, pause_step = sys.argv[1:]
    PausingTrainer.pause_step = int(pause_step)
    trainer = make_trainer(
        output_dir,
        AutoTokenizer.from_pretrained(tokenizer_dir),
        trainer_class=PausingTrainer,
        max_steps=int(max_steps),
        save_strategy="steps",
        save_steps=int(save_steps),
    )
    trainer.train()
