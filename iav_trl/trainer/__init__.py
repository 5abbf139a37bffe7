"""`IAVTrainer` and its config `IAVConfig` side by side (as `trl.trainer` holds `DPOTrainer` and `DPOConfig`), with
what training needs: the cached backbone features, the adaptive `lambda_kl`, callbacks, input checks, checkpoints and
the workarounds for `DPOTrainer` behaviour that does not fit a reference computed in the policy's own pass."""

from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.trainer.iav_trainer import IAVTrainer

__all__ = ["IAVConfig", "IAVTrainer"]
