"""Whether a `Trainer` checkpoint is complete enough to resume from, and the last one that is."""

from __future__ import annotations

import glob
import json
import os
import re

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# What `transformers.Trainer._save_checkpoint` writes besides the model, in the order it writes them: the optimizer
# and scheduler, the RNG states, then `trainer_state.json` last.
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
RNG_STATE_PATTERN = "rng_state*.pth"


def checkpoint_problem(checkpoint: str | os.PathLike, optimizer_state: bool = True) -> str | None:
    """
    Why a `Trainer` checkpoint directory cannot be resumed from, or `None` if it is complete.

    `Trainer` writes `trainer_state.json` last, so a checkpoint whose run was killed while saving lacks it (or holds
    a truncated one); with `optimizer_state`, the optimizer, scheduler and RNG states must be there too, or the run
    would silently restart them. The heads are checked when they are loaded (their digests, see `IAVModel`).
    """
    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
        return f"{checkpoint} is not a directory"
    state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"it has no {TRAINER_STATE_NAME}, which Trainer writes last: the run was stopped while saving it"
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"its {TRAINER_STATE_NAME} is truncated or corrupt ({err})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"its {TRAINER_STATE_NAME} holds no `global_step`"
    if optimizer_state:
        missing = [name for name in OPTIMIZER_FILES if not os.path.isfile(os.path.join(checkpoint, name))]
        if not glob.glob(os.path.join(glob.escape(checkpoint), RNG_STATE_PATTERN)):
            missing.append(RNG_STATE_PATTERN)
        if missing:
            return (
                f"it lacks {', '.join(missing)} (saved with `save_only_model=True`, or partly deleted), so the "
                "optimizer, scheduler or random state would restart from scratch"
            )
    return None


def last_complete_checkpoint(directory: str | os.PathLike, optimizer_state: bool = True) -> str | None:
    """The `checkpoint-N` directory in `directory` with the highest `N` that `checkpoint_problem` accepts."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = sorted(
        ((int(match.group(1)), name) for name in os.listdir(directory) if (match := _CHECKPOINT.match(name))),
        reverse=True,
    )
    for _, name in steps:
        path = os.path.join(directory, name)
        if checkpoint_problem(path, optimizer_state) is None:
            return path
    return None
