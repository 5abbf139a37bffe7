"""How a causal LM turns its final hidden state into logits, made explicit.

Every supported model computes

    z = softcap(s * (W_U h + b)),       softcap(x) = c * tanh(x / c)   (identity when the model has no cap)

with `W_U`/`b` its output embeddings, `s` a constant logit scale (1 for most models; Cohere's `logit_scale`,
Granite's `1 / logits_scaling`, ...) and `c` Gemma-2/3's `final_logit_softcapping`. The alignment vector of a
hidden-space offset `delta` is its linear readout `a = s * W_U delta`, so that

    z_final = z_base + alpha * a

holds exactly by definition. Without a soft-cap the readout is linear, and `z_final` is what the model itself
computes from `h + alpha * delta` in one projection (the fast decoding path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig


@dataclass(frozen=True)
class LogitReadout:
    """The constants `s` (scale) and `c` (soft-cap, `None` if absent) of a model's logit computation."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LogitReadout:
        text_config = config.get_text_config()
        scale = 1.0
        # Multipliers (Cohere, Falcon-H1, ...) and divisors (Granite, MiniCPM) of the logits.
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            value = getattr(text_config, name, None)
            if value is not None:
                scale = float(value)
                break
        else:
            divisor = getattr(text_config, "logits_scaling", None)
            if divisor is not None:
                scale = 1.0 / float(divisor)
        softcap = getattr(text_config, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=None if softcap is None else float(softcap))

    @property
    def is_linear(self) -> bool:
        """Whether `z` is affine in `h`, so that an offset of `h` shifts `z` by exactly its readout."""
        return self.softcap is None

    def base_logits(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`z_base = softcap(s * (W_U h + b))`, shape `(..., V)`."""
        logits = F.linear(hidden_states, weight, bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def alignment_logits(self, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`a = s * W_U delta`, shape `(..., V)`: the linear readout of a hidden-space offset (no bias, no cap)."""
        logits = F.linear(delta, weight)
        return logits * self.scale if self.scale != 1.0 else logits
