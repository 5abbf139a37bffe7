"""`python -m iav_trl <command> ...` runs the `iav-trl` command line (see `iav_trl.cli.commands`)."""

from iav_trl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
