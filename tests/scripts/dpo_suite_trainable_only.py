"""Write a copy of TRL's DPOTrainer tests whose "every parameter changed" checks look at trainable parameters only.

TRL's `tests/test_dpo_trainer.py` snapshots `trainer.model.named_parameters()` before `train()` and asserts that each
one changed. That assumes full fine-tuning; IAV trains the alignment head (and LoRA adapters, when given) on a frozen
backbone by design, so this copy snapshots only the parameters with `requires_grad`. Nothing else is touched: for the
stock `DPOTrainer` with full fine-tuning every parameter is trainable and the tests are unchanged.

    python tests/scripts/dpo_suite_trainable_only.py TRL_GIT_DIR REV OUT_DIR
    $DPO_SUITE/run_dpo_suite.sh --tests-from OUT_DIR \
        --trainer iav_trl.trainer.iav_trainer:IAVTrainer ...
"""

import argparse
import io
import subprocess
import tarfile
from pathlib import Path

SNAPSHOT = "{n: param.clone() for n, param in trainer.model.named_parameters()}"
TRAINABLE_SNAPSHOT = "{n: param.clone() for n, param in trainer.model.named_parameters() if param.requires_grad}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trl_git_dir", help="a git repository of huggingface/trl (bare or not)")
    parser.add_argument("rev", help="the revision whose tests/ to use, e.g. main or v1.16.0")
    parser.add_argument("out_dir", help="where to write tests/ (a --tests-from DIR for run_dpo_suite.sh)")
    args = parser.parse_args()

    archive = subprocess.run(
        ["git", "-C", args.trl_git_dir, "archive", args.rev, "tests"], check=True, capture_output=True
    ).stdout
    out = Path(args.out_dir)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    test_file = out / "tests" / "test_dpo_trainer.py"
    source = test_file.read_text(encoding="utf-8")
    count = source.count(f"previous_trainable_params = {SNAPSHOT}")
    if count == 0:
        raise SystemExit(f"No `previous_trainable_params = {SNAPSHOT}` in {test_file}: TRL changed its tests.")
    test_file.write_text(
        source.replace(f"previous_trainable_params = {SNAPSHOT}", f"previous_trainable_params = {TRAINABLE_SNAPSHOT}"),
        encoding="utf-8",
    )
    print(f"{test_file}: {count} parameter snapshots restricted to trainable parameters")


if __name__ == "__main__":
    main()
