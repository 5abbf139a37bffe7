"""Evaluation of an adapter at several alphas: `IAVEvaluator` (`evaluator.py`), its config (`config.py`), the
metrics it reports (`metrics.py`) and its plots (`plotting.py`)."""

from iav_trl.evaluation.config import EvaluationConfig
from iav_trl.evaluation.evaluator import DEFAULT_RESULTS_FILE, IAVEvaluator

__all__ = ["DEFAULT_RESULTS_FILE", "EvaluationConfig", "IAVEvaluator"]
