"""`AlignmentHeadConfig`: what an alignment head is, and which base model it belongs to.

The config plays the role `LoraConfig` plays for LoRA: build one, pass it to `get_iav_model`, and it is saved next to
the head's weights as `alignment_head_config.json`, so an adapter can always be matched against the model it is
loaded onto.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from iav_trl.tuners.iav.alpha import ALPHA_LIMIT
from iav_trl.utils.files import atomic_write_text
from iav_trl.utils.hub import resolve_adapter_file

CONFIG_NAME = "alignment_head_config.json"
WEIGHTS_DIGEST_KEY = "weights_sha256"  # in the JSON, next to the config fields


# The fields that shape the head, as `IAVConfig` names them (it holds trainer settings too, hence `head_dropout`) ->
# as `AlignmentHeadConfig` names them. `IAVConfig` takes each field's default and help from here (`head_field`).
HEAD_FIELDS = {
    "num_interventions": "num_interventions",
    "intervention_dim": "intervention_dim",
    "head_dropout": "dropout",
}


@dataclass
class AlignmentHeadConfig:
    """
    Configuration of an alignment head (see `iav_trl.tuners.iav.head.AlignmentHead` for the math).

    Parameters that shape the head:
        num_interventions (`int`, defaults to `8`):
            Number of intervention heads `K`. Each proposes an update in the alignment subspace and a softmax
            router mixes them per token. More heads let the head switch behaviour by context (e.g. refuse vs.
            help); 4-16 is the useful range.
        intervention_dim (`int`, defaults to `256`):
            Dimension `r` of the alignment subspace each intervention head works in. It sets the capacity:
            the head has `2*d*r + K*(r+1)**2` parameters for hidden size `d` (2.6M for a 7B Llama,
            0.04% of it). Lower it for very small models.
        dropout (`float`, defaults to `0.0`):
            Dropout on the subspace projection during training. Leave it at 0: on SmolLM2-135M-Instruct and
            HH-RLHF, dropout 0.3 lowered validation accuracy from 0.592 to 0.561 at alpha 1 (`research/`, the fit
            study); the KL term already keeps the head close to the base model.
        default_alpha (`float`, defaults to `1.0`):
            Strength used when `forward`/`generate` get `alpha=None`. 1.0 is what training targets; ship another
            value if you want users to get a lighter or stronger default.

    Parameters that record the base model (filled in by `get_iav_model`, checked on load):
        base_model_name_or_path (`str`, *optional*):
            Hub id, path, GGUF file or `package:` name of the base model the head was built for
            (`iav_trl.models.base_models`): `iav-trl generate/eval` load the base from it.
        hidden_size (`int`, *optional*):
            Hidden size `d` of the base model. Loading onto a model of another hidden size is refused.
        vocab_size (`int`, *optional*):
            Vocabulary size of the base model's output embeddings. Loading onto another vocabulary is refused.
        model_type (`str`, *optional*):
            `config.model_type` of the base model, for the model card and diagnostics.
        base_model_fingerprint (`dict`, *optional*):
            A sample of the base model's weights (`iav_trl.models.fingerprint`). Loading onto a base whose weights
            differ (same shapes, other model) warns, or raises with `strict=True`.
        inference_mode (`bool`, defaults to `False`):
            Set when the head is loaded for inference (`is_trainable=False`): its parameters are frozen.
    """

    num_interventions: int = field(default=8, metadata={"help": "Number of intervention heads K."})
    intervention_dim: int = field(default=256, metadata={"help": "Dimension r of the alignment subspace."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the subspace projection during training."})
    default_alpha: float = field(default=1.0, metadata={"help": "Alignment strength used when alpha is None."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model id or path."})
    hidden_size: int | None = field(default=None, metadata={"help": "Hidden size of the base model."})
    vocab_size: int | None = field(default=None, metadata={"help": "Vocabulary size of the base model."})
    model_type: str | None = field(default=None, metadata={"help": "`model_type` of the base model."})
    base_model_fingerprint: dict | None = field(
        default=None, metadata={"help": "A sample of the base model's weights, checked on load."}
    )
    inference_mode: bool = field(default=False, metadata={"help": "Whether the head is frozen for inference."})

    # The JSON types each field accepts (`None` where the field is optional), checked before any value check: a config
    # file edited by hand (`"hidden_size": "32"`) fails naming the field, not later with a misleading message.
    FIELD_TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {
        "num_interventions": ((int,), False),
        "intervention_dim": ((int,), False),
        "dropout": ((float, int), False),
        "default_alpha": ((float, int), False),
        "base_model_name_or_path": ((str,), True),
        "hidden_size": ((int,), True),
        "vocab_size": ((int,), True),
        "model_type": ((str,), True),
        "base_model_fingerprint": ((dict,), True),
        "inference_mode": ((bool,), False),
    }

    def _check_types(self) -> None:
        for name, (types, optional) in self.FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            is_bool = isinstance(value, bool)
            if not isinstance(value, types) or (is_bool and bool not in types):
                expected = " or ".join(t.__name__ for t in types) + (" (or null)" if optional else "")
                raise TypeError(
                    f"`{name}` must be {expected}, got {type(value).__name__} {value!r}. Pass a {types[0].__name__}"
                    f" (in a saved `{CONFIG_NAME}`, write it without quotes if it is a number)."
                )

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("num_interventions", "intervention_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        if not math.isfinite(self.default_alpha) or abs(self.default_alpha) > ALPHA_LIMIT:
            raise ValueError(
                f"`default_alpha` must be a finite float with |alpha| <= {ALPHA_LIMIT:g} (see "
                f"`iav_trl.tuners.iav.alpha`), got {self.default_alpha!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike, weights_sha256: str | None = None) -> None:
        """
        Write `alignment_head_config.json` into `save_directory` (created if needed), atomically. `weights_sha256`
        (see `iav_trl.utils.files.tensor_digest`) records which weights the config was saved with; loaders check it.
        """
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        if weights_sha256 is not None:
            data[WEIGHTS_DIGEST_KEY] = weights_sha256
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignmentHeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown fields {unknown} in an alignment head config. Known fields: {sorted(known)}. The adapter "
                "was probably written by a newer iav-trl: upgrade with `pip install -U iav-trl`."
            )
        return cls(**data)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
    ) -> AlignmentHeadConfig:
        """Read the config from a local directory or a Hub repo id (`revision`, `token`, ... go to the Hub)."""
        path = resolve_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        return read_config_file(path)[0]


def read_config_file(path: str | os.PathLike) -> tuple[AlignmentHeadConfig, str | None]:
    """The config in an `alignment_head_config.json`, and the digest of the weights it was saved with (if recorded)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the adapter config is corrupt. Re-save the adapter."
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    digest = data.pop(WEIGHTS_DIGEST_KEY, None)
    try:
        return AlignmentHeadConfig.from_dict(data), digest
    except TypeError as err:
        raise TypeError(f"{path}: {err}") from err


def head_field(name: str) -> Any:
    """A dataclass field with the default and help of `AlignmentHeadConfig`'s field `name`: how a config that
    describes a head among other settings (`IAVConfig`) declares it without restating it."""
    source = AlignmentHeadConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata=dict(source.metadata))
