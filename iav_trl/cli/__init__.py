"""The `iav-trl` command line, built on `trl.TrlParser` as TRL's own: the dispatcher (`commands.py`) and recipe files
(`recipe.py`). What each command runs is in `iav_trl.scripts`."""

from iav_trl.cli.commands import COMMANDS, main

__all__ = ["COMMANDS", "main"]
