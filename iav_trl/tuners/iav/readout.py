"""How a causal LM turns its final hidden state into logits, made explicit.

Every supported model computes

    z = softcap(s * (W_U h + b)),       softcap(x) = c * tanh(x / c)   (identity when the model has no cap)

with `W_U`/`b` its output embeddings, `s` a constant logit scale and `c` Gemma-2/3's `final_logit_softcapping`.
`h` is what the output embeddings receive; each family's own forward sets `s` (as TRL's fused LM head reads it):

    family                          s                       config attribute
    Cohere, Cohere2                 logit_scale             `logit_scale` (multiplies)
    Muse Glimmer                    output_multiplier       `output_multiplier` (multiplies, before the soft-cap)
    Falcon-H1                       lm_head_multiplier      `lm_head_multiplier` (multiplies)
    HyperCLOVA X                    logits_scaling          `logits_scaling` (multiplies)
    Granite, GraniteMoE, ...        1 / logits_scaling      `logits_scaling` (divides)
    MiniCPM3                        1                       `logits_scaling` divides the hidden state before the LM
                                                            head: `input_scale = 1 / logits_scaling`, `s = 1`
    any other                       1

`input_scale` maps the backbone's last hidden state to what the output embeddings receive (`h = input_scale *
last_hidden_state`), so that the head reads and offsets the same `h` on every path. The alignment vector of a
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
    """The constants `s` (scale), `c` (soft-cap, `None` if absent) and `input_scale` of a model's logit computation
    (see the module docstring for which family sets which)."""

    scale: float = 1.0
    softcap: float | None = None
    input_scale: float = 1.0

    # `logits_scaling` multiplies the logits of these families; it divides them (or the hidden state) elsewhere.
    MULTIPLY_LOGITS_SCALING = ("hyperclovax",)
    # ... and divides the hidden state before the LM head in these.
    DIVIDE_HIDDEN_BY_LOGITS_SCALING = ("minicpm3",)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LogitReadout:
        text_config = config.get_text_config()
        scale, input_scale = 1.0, 1.0
        # Multipliers of the logits first (Cohere, Muse Glimmer, Falcon-H1), then `logits_scaling`, in TRL's order.
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            value = getattr(text_config, name, None)
            if value is not None:
                scale = float(value)
                break
        else:
            logits_scaling = getattr(text_config, "logits_scaling", None)
            if logits_scaling is not None:
                model_type = getattr(text_config, "model_type", None)
                if model_type in cls.MULTIPLY_LOGITS_SCALING:
                    scale = float(logits_scaling)
                elif model_type in cls.DIVIDE_HIDDEN_BY_LOGITS_SCALING:
                    input_scale = 1.0 / float(logits_scaling)
                else:
                    scale = 1.0 / float(logits_scaling)
        softcap = getattr(text_config, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=None if softcap is None else float(softcap), input_scale=input_scale)

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
