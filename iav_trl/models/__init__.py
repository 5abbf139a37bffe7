"""Base models: resolving and loading them (Hub ids, paths, GGUF files, package-shipped files), fingerprinting their
weights, and the tiny random models the tests and the offline smoke run build."""

from iav_trl.models.base_models import load_base_model, load_base_tokenizer, resolve_base_model

__all__ = ["load_base_model", "load_base_tokenizer", "resolve_base_model"]
