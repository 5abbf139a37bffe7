"""Decoding with the alignment knob: `IAVInference` (prompts in, completions at several alphas out), the GenARM
baseline, and the OpenAI-compatible server (`iav_trl.inference.serving`, needs the `serving` extra)."""

from iav_trl.inference.genarm import GenARMLogitsProcessor, genarm_generate
from iav_trl.inference.iav_inference import IAVInference, completion_mask, decode_completions, encode_prompts

__all__ = [
    "GenARMLogitsProcessor",
    "IAVInference",
    "completion_mask",
    "decode_completions",
    "encode_prompts",
    "genarm_generate",
]
