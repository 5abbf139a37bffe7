"""The benchmarks, run as modules from the repository root: `python -m benchmarks.<name>` (the Makefile's `bench-*`
targets). Offline settings are set here, before any benchmark imports the Hub or tokenizers libraries."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repository root and the folder of the committed reference results, whichever module (or sub-package) asks.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
