"""Recipes: the YAML files `iav-trl <command> --config recipe.yaml` reads, and the parser that reads them.

Two layouts are accepted, and may be mixed.

Flat (TRL's own): every top-level key is a field name of a command's dataclasses (`iav_trl.cli_args`), e.g.
`model_name_or_path`, `dataset_name`, `learning_rate`, `lambda_kl`, `alphas`; plus TRL's `env:` (environment
variables).

Nested (the IAV seed's): three sections whose keys are flattened into the top level, through the aliases below:

    section      holds the fields of                                    aliases
    model:       trl.ModelConfig, the head shape (num_interventions,      name -> model_name_or_path,
                 intervention_dim, head_dropout, freeze_backbone),        revision -> model_revision
                 trust_remote_code, model_init_kwargs
    training:    IAVScriptArguments (datasets) and IAVConfig              dataset -> dataset_name
                 (every DPOConfig / TrainingArguments field)
    inference:   GenerateArguments and EvalArguments (alphas,
                 max_new_tokens, temperature, top_p, seed, adapter, ...)

so `model: {name: X}` means `model_name_or_path: X`. A key that is not valid where it stands is an error that lists
the valid keys; a key set twice (say `training.seed` and `inference.seed`) is an error too.

Every command reads the whole recipe and takes the keys it knows: `train` skips `inference:`, `generate` skips the
training fields. `generate` and `eval` take the recipe's `output_dir` (else `outputs/<model name>-IAV`, where
`train` writes by default) as the adapter to load, so the same recipe trains, generates and evaluates.
"""

from __future__ import annotations

import dataclasses
import difflib
from argparse import Namespace
from collections.abc import Collection, Mapping, Sequence
from typing import Any, get_type_hints

from trl import ModelConfig, TrlParser

from .cli_args import (
    CLI_ONLY_FIELDS,
    COMMAND_DATACLASSES,
    COMMAND_DEFAULTS,
    EvalArguments,
    GenerateArguments,
    IAVScriptArguments,
    default_output_dir,
)
from .iav_config import IAVConfig


def _names(*classes: type) -> frozenset[str]:
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls))


# Every key a recipe may hold, flat: the fields of all commands' dataclasses but the command-line-only ones.
RECIPE_KEYS = frozenset().union(*(_names(*classes) for classes in COMMAND_DATACLASSES.values())) - CLI_ONLY_FIELDS

# The nested layout: the flat keys each section may hold, and the section's own names for some of them.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "model": _names(ModelConfig)
    | {
        "num_interventions",
        "intervention_dim",
        "head_dropout",
        "freeze_backbone",
        "trust_remote_code",
        "model_init_kwargs",
    },
    "training": _names(IAVScriptArguments, IAVConfig),
    "inference": _names(GenerateArguments, EvalArguments) - CLI_ONLY_FIELDS,
}
SECTION_ALIASES: dict[str, dict[str, str]] = {
    "model": {"name": "model_name_or_path", "revision": "model_revision"},
    "training": {"dataset": "dataset_name"},
    "inference": {},
}


def _unknown_key(where: str, valid: Collection[str], scope: str) -> ValueError:
    close = difflib.get_close_matches(where.split(".")[-1], valid, n=3, cutoff=0.7)
    hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    return ValueError(f"Unknown recipe key {where!r}.{hint} Valid keys {scope}: {', '.join(sorted(valid))}.")


def flatten_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """
    The flat `{field: value}` settings of a recipe in either layout (see the module docstring).

    Raises:
        ValueError: for a key that is not valid where it stands (the message lists the valid ones), a section that
            is not a mapping, or a key set twice.
    """
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def put(key: str, value: Any, where: str) -> None:
        if key in flat:
            raise ValueError(f"The recipe sets {key!r} twice, as {origin[key]!r} and as {where!r}: keep one.")
        flat[key], origin[key] = value, where

    for key, value in recipe.items():
        if key in SECTION_KEYS:
            if not isinstance(value, Mapping):
                raise ValueError(f"The recipe section {key!r} must be a mapping of settings, got {value!r}.")
            aliases = SECTION_ALIASES[key]
            for name, setting in value.items():
                flat_name = aliases.get(name, name)
                if flat_name not in SECTION_KEYS[key]:
                    raise _unknown_key(f"{key}.{name}", SECTION_KEYS[key] | aliases.keys(), f"in `{key}:`")
                put(flat_name, setting, f"{key}.{name}")
        elif key in RECIPE_KEYS:
            put(key, value, key)
        else:
            raise _unknown_key(key, RECIPE_KEYS | SECTION_KEYS.keys(), "at the top level")
    return flat


class RecipeParser(TrlParser):
    """
    `trl.TrlParser` that reads both recipe layouts, takes only its command's keys from a recipe, and fills the
    defaults that depend on other settings: `adapter` (the recipe's `output_dir`), `output_dir`
    (`outputs/<model name>-IAV`), and no default `dataset_name` when the recipe has a `dataset_mixture`.

    Optional booleans whose `None` means "decide for me" (`bf16`, `tf32`, ...) also work as bare flags (`--bf16`).
    """

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any):
        super().__init__(dataclass_types, **kwargs)
        optional_bools = {
            name for cls in dataclass_types for name, hint in get_type_hints(cls).items() if hint == (bool | None)
        }
        for action in self._actions:
            if action.dest in optional_bools and action.nargs is None:
                action.nargs, action.const = "?", True

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        flat = flatten_recipe(config)
        dests = {action.dest for action in self._actions}
        if "dataset_mixture" in flat:  # replaces the default dataset_name
            flat.setdefault("dataset_name", None)
        if "adapter" in dests and "adapter" not in flat:
            model = flat.get("model_name_or_path", COMMAND_DEFAULTS["train"]["model_name_or_path"])
            flat["adapter"] = flat.get("output_dir") or default_output_dir(model)
        return super().set_defaults_with_config(**{key: value for key, value in flat.items() if key in dests})

    def parse_known_args(self, args=None, namespace=None) -> tuple[Namespace, list[str]]:
        namespace, remaining = super().parse_known_args(args, namespace)
        model = getattr(namespace, "model_name_or_path", None)
        if model and getattr(namespace, "output_dir", ...) is None:
            namespace.output_dir = default_output_dir(model)
        return namespace, remaining


def make_parser(command: str, prog: str | None = None) -> RecipeParser:
    """The parser of `command` (`"train"`, `"generate"` or `"eval"`), with its defaults (`COMMAND_DEFAULTS`)."""
    if command not in COMMAND_DATACLASSES:
        raise ValueError(f"Unknown command {command!r}; choose from {sorted(COMMAND_DATACLASSES)}.")
    parser = RecipeParser(COMMAND_DATACLASSES[command], prog=prog or f"iav-trl {command}")
    parser.set_defaults(**COMMAND_DEFAULTS[command])
    return parser


def parse_command_args(command: str, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse flags and `--config RECIPE` into the dataclasses of `command`, in `COMMAND_DATACLASSES` order."""
    return make_parser(command).parse_args_and_config(args)
