"""The alignment head (`head.py`), its readout to logits (`readout.py`, `fused.py`), how alpha mixes heads
(`alpha.py`), its config (`config.py`), how it attaches to a causal LM (`model.py`), and how it is saved and loaded
(`save_and_load.py`, `model_card.py`)."""

from iav_trl.tuners.iav.config import AlignmentHeadConfig
from iav_trl.tuners.iav.head import AlignmentHead
from iav_trl.tuners.iav.model import IAVFusedOutput, IAVModel, get_iav_model
from iav_trl.tuners.iav.readout import LogitReadout

__all__ = ["AlignmentHead", "AlignmentHeadConfig", "IAVFusedOutput", "IAVModel", "LogitReadout", "get_iav_model"]
