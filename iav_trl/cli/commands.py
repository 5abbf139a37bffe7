"""The `iav-trl` command line (also `python -m iav_trl`), built on `trl.TrlParser` like TRL's own scripts.

    iav-trl train    --config recipes/quickstart_cpu.yaml [--any_field value ...]
    iav-trl generate --config recipes/quickstart_cpu.yaml --prompt "..." [--prompt "..."] [--alphas 0 0.5 1 1.5]
    iav-trl eval     --config recipes/quickstart_cpu.yaml [--alphas 0 0.5 1 1.5]
    iav-trl serve    --config recipes/quickstart_cpu.yaml [--port 8000] [--add_adapter NAME=DIR ...]

Every field of the command's dataclasses is a flag (`iav-trl <command> --help` lists them); a recipe
(`--config`, flat TRL layout or the nested `model:` / `training:` / `inference:` layout, see `iav_trl.cli.recipe`)
sets defaults, and flags override the recipe. The defaults are the dataclasses' own, the same as the Python API's
(`IAVConfig`: learning rate 1e-3, 3 epochs, beta 0.1, lambda_kl 0.3, lambda_l2 0.01, 8 interventions of dimension
256); `train` needs `--model_name_or_path` and `--dataset_name` (or a recipe that names them). For several GPUs,
launch with accelerate: `accelerate launch -m iav_trl train ...` (or `train.sh`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from iav_trl import __version__
from iav_trl.cli.recipe import RecipeError, parse_command_args
from iav_trl.scripts.inference import evaluate, generate, serve
from iav_trl.scripts.train import train

COMMANDS: dict[str, tuple[str, Callable[..., Any]]] = {
    "train": ("Train an alignment head with IAVTrainer and save it to output_dir.", train),
    "generate": ("Complete prompts at several alphas, side by side, in one batch.", generate),
    "eval": ("Held-out reward accuracy and margin of an adapter at several alphas.", evaluate),
    "serve": ("Serve an adapter as an OpenAI-compatible server, alpha and head mix per request.", serve),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `iav-trl <command> [flags]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="iav-trl", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"iav-trl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_text, _) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    command = parser.parse_known_args(argv)[0].command
    if command is None:
        parser.print_help()
        return 0
    try:
        command_args = parse_command_args(command, argv[argv.index(command) + 1 :])
    except RecipeError as err:  # the message names the file, the place and the fix: a traceback adds nothing
        print(f"iav-trl {command}: error: {err}", file=sys.stderr)
        return 2
    COMMANDS[command][1](*command_args)
    return 0
