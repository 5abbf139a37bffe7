"""The ground-truth alignment benchmark: a synthetic language whose preferences are known exactly (`task.py`), the
methods trained on it (`methods.py`), rollouts and their exact KL (`rollouts.py`), the report (`report.py`) and the
benchmark itself (`benchmark.py`, `python -m benchmarks.alignment.benchmark`)."""
