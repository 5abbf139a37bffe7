"""Decoding with the alignment knob: `IAVInference` (prompts in, completions at several alphas out), the GenARM
baseline, and the OpenAI-compatible server (`iav_trl.inference.serving`, needs the
`serving` extra)."""

from iav_trl.inference.genarm import GenARMLogitsProcessor, genarm_generate
from iav_trl.inference.iav_inference import (
    DEFAULT_MAX_NEW_TOKENS,
    IAVInference,
    as_prompt_list,
    completion_mask,
    decode_completions,
    encode_prompts,
    format_prompt,
    is_conversation,
    sampling_kwargs,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GenARMLogitsProcessor",
    "IAVInference",
    "as_prompt_list",
    "completion_mask",
    "decode_completions",
    "encode_prompts",
    "format_prompt",
    "genarm_generate",
    "is_conversation",
    "sampling_kwargs",
]
