"""iav-trl: Inherent Alignment Vectors for Hugging Face TRL.

A small alignment head on a frozen causal LM, decoded as `z_final = z_base + alpha * a_t` with `alpha` chosen at
test time.
"""

from .alpha import ALPHA_GUIDE
from .base_models import load_base_model, load_base_tokenizer, resolve_base_model
from .config import AlignmentHeadConfig
from .data import build_dataset_mixture, detect_schema, load_preference_dataset, parse_hh_dialogue
from .evaluation import EvaluationConfig, IAVEvaluator
from .genarm import GenARMLogitsProcessor, genarm_generate
from .iav_config import IAVConfig
from .iav_trainer import IAVTrainer
from .inference import IAVInference
from .layer import AlignmentHead
from .model import IAVFusedOutput, IAVModel, get_iav_model
from .readout import LogitReadout

__version__ = "0.1.0"

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
