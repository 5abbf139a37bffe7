"""iav-trl: Inherent Alignment Vectors for Hugging Face TRL.

A small alignment head on a frozen causal LM, decoded as `z_final = z_base + alpha * a_t` with `alpha` chosen at
test time.
"""

__version__ = "0.1.0"

from iav_trl.data import build_dataset_mixture, detect_schema, load_preference_dataset, parse_hh_dialogue
from iav_trl.evaluation import EvaluationConfig, IAVEvaluator
from iav_trl.inference import GenARMLogitsProcessor, IAVInference, genarm_generate
from iav_trl.models import load_base_model, load_base_tokenizer, resolve_base_model
from iav_trl.trainer import IAVConfig, IAVTrainer
from iav_trl.tuners.iav import (
    AlignmentHead,
    AlignmentHeadConfig,
    IAVFusedOutput,
    IAVModel,
    LogitReadout,
    get_iav_model,
)
from iav_trl.tuners.iav.alpha import ALPHA_GUIDE

__all__ = [
    "ALPHA_GUIDE",
    "AlignmentHead",
    "AlignmentHeadConfig",
    "EvaluationConfig",
    "GenARMLogitsProcessor",
    "IAVConfig",
    "IAVFusedOutput",
    "IAVEvaluator",
    "IAVInference",
    "IAVModel",
    "IAVTrainer",
    "LogitReadout",
    "__version__",
    "build_dataset_mixture",
    "detect_schema",
    "genarm_generate",
    "get_iav_model",
    "load_base_model",
    "load_base_tokenizer",
    "load_preference_dataset",
    "parse_hh_dialogue",
    "resolve_base_model",
]
