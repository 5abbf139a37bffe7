"""iav-trl: Inherent Alignment Vectors for Hugging Face TRL.

A small alignment head on a frozen causal LM, decoded as `z_final = z_base + alpha * a_t` with `alpha` chosen at
test time.
"""

from .alpha import ALPHA_GUIDE
from .config import AlignmentHeadConfig
from .layer import AlignmentHead
from .model import IAVFusedOutput, IAVModel, get_iav_model
from .readout import LogitReadout

__version__ = "0.1.0"

__all__ = [
    "ALPHA_GUIDE",
    "AlignmentHead",
    "AlignmentHeadConfig",
    "IAVFusedOutput",
    "IAVModel",
    "LogitReadout",
    "__version__",
    "get_iav_model",
]
