"""Models for the command line: `tiny:<family>` base models built locally, quantised loading, and an adapter loaded
with its base model, backbone and tokenizer for inference.

`model_name_or_path: tiny:<family>` (`tiny:llama`, `tiny:qwen2`, ... any of `iav_trl.models.tiny.TINY_ARCHITECTURES`)
names a randomly initialised tiny model that `iav-trl train` builds on the spot, so that a recipe runs offline: a BPE
tokenizer is trained on the training split's text and saved with the model to `<output_dir>/tiny_base/`, which is
then trained on like any checkpoint. `generate` and `eval` load that checkpoint from the adapter directory. Its
weights are random, so its text is noise: it shows the workflow, not alignment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, get_quantization_config

from iav_trl.models.base_models import load_base_model, load_base_tokenizer
from iav_trl.models.tiny import TINY_ARCHITECTURES, preference_texts, save_tiny_checkpoint
from iav_trl.tuners.iav.config import CONFIG_NAME, AlignmentHeadConfig
from iav_trl.tuners.iav.model import IAVModel
from iav_trl.tuners.iav.save_and_load import backbone_dir
from iav_trl.utils.files import atomic_write_text
from iav_trl.utils.hub import resolve_adapter_file

TINY_SCHEME = "tiny:"
TINY_BASE_DIR = "tiny_base"
TINY_MANIFEST = "iav_tiny_source.json"  # in tiny_base/: what it was built from, checked when it is reused
QUANTIZATION_INSTALL = 'pip install -e ".[quantization]"'


def is_tiny(model_name_or_path: str | None) -> bool:
    """Whether `model_name_or_path` names a tiny model built locally (`tiny:<family>`)."""
    return isinstance(model_name_or_path, str) and model_name_or_path.startswith(TINY_SCHEME)


def build_tiny_base(
    model_name_or_path: str,
    dataset: Dataset,
    path: str,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
) -> str:
    """
    Build `tiny:<family>`, a random `tiny_causal_lm` with a BPE tokenizer of `vocab_size` tokens trained on the text
    of `dataset`, and save both to `path` like a Hub checkpoint, with a manifest of what it was built from (model,
    sizes, a digest of the texts). A checkpoint already at `path` is reused when its manifest matches, so that a
    resumed run trains the same model; one built for other settings or data is refused. Returns `path`.
    """
    family = model_name_or_path[len(TINY_SCHEME) :]
    if family not in TINY_ARCHITECTURES:
        raise ValueError(
            f"Unknown tiny model {model_name_or_path!r}; use {TINY_SCHEME}<family> with a family among "
            f"{sorted(TINY_ARCHITECTURES)}."
        )
    texts = list(preference_texts(dataset))
    recipe = {
        "model": model_name_or_path,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "data_sha256": hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest(),
    }
    manifest = os.path.join(path, TINY_MANIFEST)
    if os.path.isfile(os.path.join(path, "config.json")):
        recorded = None
        if os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as fh:
                recorded = json.load(fh)
        if recorded != recipe:
            raise ValueError(
                f"{path} holds a tiny model built by an earlier `train` "
                f"({'for another model or data: ' + str(recorded) if recorded else 'that did not record how'}), "
                f"not for this run ({recipe}). A new run on it would silently train on the old model: delete {path}, "
                "or choose another output_dir (resuming a run with its own settings reuses its model)."
            )
        return path
    save_tiny_checkpoint(path, texts, family, vocab_size, hidden_size, num_layers)
    atomic_write_text(manifest, json.dumps(recipe, indent=2) + "\n")
    return path


def quantization_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    """TRL's `BitsAndBytesConfig` for `load_in_4bit` / `load_in_8bit` (compute dtype `dtype`), or `None`."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"load_in_4bit / load_in_8bit quantise the backbone with bitsandbytes, which is not installed: run "
            f"`{QUANTIZATION_INSTALL}`, or drop the flag."
        )
    return get_quantization_config(model_args)


def model_init_kwargs(model_args: ModelConfig, quantization: BitsAndBytesConfig | None = None) -> dict[str, Any]:
    """`from_pretrained` keywords from a `ModelConfig`, as TRL's scripts build them. A quantised model is placed
    whole on this process's GPU (each data-parallel process holds its own copy)."""
    kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if quantization is not None and torch.cuda.is_available():
        kwargs["device_map"] = {"": PartialState().local_process_index}
    return kwargs


def check_model_sizes(model: PreTrainedModel, model_args: ModelConfig) -> None:
    """
    Refuse a loaded model whose vocabulary or hidden size differs from the one `model_args` states
    (`IAVModelConfig.vocab_size` / `hidden_size`, the seed recipe's `model.vocab_size` / `model.hidden_size`).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("vocab_size", "hidden_size"):
        expected, actual = getattr(model_args, name, None), getattr(config, name, None)
        if expected is not None and expected != actual:
            raise ValueError(
                f"The recipe states model.{name}: {expected}, but the loaded model {model_args.model_name_or_path!r} "
                f"has {name} {actual} (its config). Set model.{name} to {actual}, drop it (the model's own size is "
                "used), or load the model the recipe was written for."
            )


@dataclass
class LoadedAdapter:
    """An adapter ready for inference, and where its parts came from."""

    model: IAVModel
    tokenizer: PreTrainedTokenizerBase
    base_model_name_or_path: str
    trained_backbone: bool  # the adapter directory holds a fully fine-tuned backbone (`backbone/`)
    init_kwargs: dict[str, Any]  # how the base model was loaded, for loading it again

    def load_base_model(self) -> PreTrainedModel:
        """The untouched base model, loaded as the adapter's was (the reference of a fully fine-tuned backbone)."""
        return load_base_model(self.base_model_name_or_path, **self.init_kwargs)


def adapter_directory(adapter: str) -> str:
    """A local adapter directory, or the snapshot of a Hub adapter repo (every file, `backbone/` included)."""
    if os.path.isdir(adapter):
        return adapter
    resolve_adapter_file(adapter, CONFIG_NAME)  # a clear error for something that is neither
    return snapshot_download(adapter)


def base_model_path(model_name_or_path: str | None, directory: str) -> str:
    """The base model of the adapter in `directory`: the one given, the `tiny_base/` that `train` built for a
    `tiny:` model, or, when none is given, the one the adapter records."""
    if is_tiny(model_name_or_path):
        path = os.path.join(directory, TINY_BASE_DIR)
        if not os.path.isdir(path):
            raise ValueError(
                f"{model_name_or_path!r} is built by `iav-trl train` into <output_dir>/{TINY_BASE_DIR}/, and the "
                f"adapter {directory} has none: pass the output_dir that train wrote, or --model_name_or_path."
            )
        return path
    if model_name_or_path is not None:
        return model_name_or_path
    recorded = AlignmentHeadConfig.from_pretrained(directory).base_model_name_or_path
    if not recorded:
        raise ValueError(f"The adapter {directory} does not record its base model: pass --model_name_or_path.")
    return recorded


def load_adapter_for_inference(
    model_args: ModelConfig, adapter: str, trust_remote_code: bool = False
) -> LoadedAdapter:
    """
    Load `adapter` (a directory or Hub repo written by `iav-trl train` / `IAVTrainer.save_model`) onto its base model,
    frozen, in eval mode. A `backbone/` in the adapter is used: a fully fine-tuned backbone replaces the base model,
    LoRA weights are loaded onto it. The adapter's tokenizer is used when it has one, else the base model's.
    """
    directory = adapter_directory(adapter)
    base = base_model_path(model_args.model_name_or_path, directory)
    quantization = quantization_config(model_args)
    init_kwargs = model_init_kwargs(model_args, quantization)
    init_kwargs.update(quantization_config=quantization, trust_remote_code=trust_remote_code)
    backbone = backbone_dir(directory)
    lora_backbone = os.path.isfile(os.path.join(backbone, "adapter_config.json"))
    trained_backbone = os.path.isdir(backbone) and not lora_backbone
    model = load_base_model(backbone if trained_backbone else base, **init_kwargs)
    if lora_backbone:
        model = PeftModel.from_pretrained(model, backbone)
    has_tokenizer = os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    tokenizer = (
        AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        if has_tokenizer
        else load_base_tokenizer(base, trust_remote_code=trust_remote_code)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The base the adapter records must be the one it trained on; a base the user names is their choice (a warning).
    strict = model_args.model_name_or_path is None or is_tiny(model_args.model_name_or_path)
    check_model_sizes(model, model_args)
    return LoadedAdapter(
        model=IAVModel.from_pretrained(model, directory, strict=strict).eval(),
        tokenizer=tokenizer,
        base_model_name_or_path=base,
        trained_backbone=trained_backbone,
        init_kwargs=init_kwargs,
    )
