"""What the `iav-trl` commands run, kept apart from the command line as TRL keeps `trl/scripts/` apart from
`trl/cli/`: `train.py` (`iav-trl train`), `inference.py` (`iav-trl generate`, `eval` and `serve`), their argument
dataclasses (`args.py`) and how they find base models and adapters (`models.py`)."""
