"""Recipes: the YAML files `iav-trl <command> --config recipe.yaml` reads, and the parser that reads them.

Two layouts are accepted, and may be mixed.

Flat (TRL's own): every top-level key is a field name of a command's dataclasses (`iav_trl.scripts.args`), e.g.
`model_name_or_path`, `dataset_name`, `learning_rate`, `lambda_kl`, `alphas`; plus TRL's `env:` (environment
variables).

Nested (the IAV seed's): three sections whose keys are flattened into the top level, through the aliases below:

    section      holds the fields of                                    aliases
    model:       IAVModelConfig (trl.ModelConfig, and the base model's  name, base_model_name -> model_name_or_path,
                 vocab_size and hidden_size, checked when it loads),    revision -> model_revision
                 the head shape (num_interventions, intervention_dim,
                 head_dropout, freeze_backbone), trust_remote_code,
                 model_init_kwargs
    training:    IAVScriptArguments (datasets) and IAVConfig              dataset -> dataset_name,
                 (every DPOConfig / TrainingArguments field)             num_epochs -> num_train_epochs
    inference:   GenerateArguments and EvalArguments (alphas,            default_alpha: a -> alphas: [a],
                 max_new_tokens, temperature, top_p, seed, adapter, ...) max_length -> generation_max_length

so `model: {name: X}` means `model_name_or_path: X`. `inference.max_length` is the total generation length (prompt
included, as `transformers`' `max_length`), not training's `max_length`, which truncates the pairs.

`load_recipe` reads a recipe file before any setting is used, and stops with one `RecipeError` (which `iav-trl` prints
without a traceback) naming the file and: the line and column of a YAML syntax error; the line of a key set twice in
one mapping (YAML itself would keep the last value silently); every key that is not valid where it stands, at once,
with the valid keys there; a key set twice across sections (say `training.seed` and `inference.seed`).

Every command reads the whole recipe and takes the keys it knows: `train` skips `inference:`, `generate` skips the
training fields. `generate` and `eval` take the recipe's `output_dir` (else `outputs/<model name>-IAV`, where
`train` writes by default) as the adapter to load, so the same recipe trains, generates and evaluates.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from argparse import Namespace
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, get_type_hints

import yaml
from trl import TrlParser

from iav_trl.scripts.args import (
    CLI_ONLY_FIELDS,
    COMMAND_DATACLASSES,
    EvalArguments,
    GenerateArguments,
    IAVModelConfig,
    IAVScriptArguments,
    default_output_dir,
)
from iav_trl.trainer.iav_config import IAVConfig


class RecipeError(ValueError):
    """A recipe that cannot be read or holds keys that are not valid: `iav-trl` prints it without a traceback."""


def _names(*classes: type) -> frozenset[str]:
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls))


# Every key a recipe may hold, flat: the fields of all commands' dataclasses but the command-line-only ones.
RECIPE_KEYS = frozenset().union(*(_names(*classes) for classes in COMMAND_DATACLASSES.values())) - CLI_ONLY_FIELDS

# The nested layout: the flat keys each section may hold, and the section's own names for some of them.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "model": _names(IAVModelConfig)
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
    "model": {"name": "model_name_or_path", "base_model_name": "model_name_or_path", "revision": "model_revision"},
    "training": {"dataset": "dataset_name", "num_epochs": "num_train_epochs"},
    # The seed's inference.max_length is the total generation length; training's max_length truncates pairs.
    "inference": {"default_alpha": "alphas", "max_length": "generation_max_length"},
}
# Aliases whose value changes shape: the seed's one `default_alpha` is the one strength generate and eval use.
SECTION_CONVERTERS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("inference", "default_alpha"): lambda value: [value],
}


def flatten_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """
    The flat `{field: value}` settings of a recipe in either layout (see the module docstring).

    Raises:
        RecipeError (a ValueError): listing, all at once, every key that is not valid where it stands (with the
            valid keys of its place), section that is not a mapping, and key set twice.
    """
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    scopes: dict[str, Collection[str]] = {}  # where unknown keys stood -> the keys valid there

    def put(key: str, value: Any, where: str) -> None:
        if key in flat:
            problems.append(f"The recipe sets {key!r} twice, as {origin[key]!r} and as {where!r}: keep one.")
        else:
            flat[key], origin[key] = value, where

    def unknown(where: str, valid: Collection[str], scope: str) -> None:
        close = difflib.get_close_matches(where.split(".")[-1], valid, n=3, cutoff=0.7)
        hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        problems.append(f"Unknown recipe key {where!r}.{hint}")
        scopes[scope] = valid

    for key, value in recipe.items():
        if key in SECTION_KEYS:
            if not isinstance(value, Mapping):
                problems.append(f"The recipe section {key!r} must be a mapping of settings, got {value!r}.")
                continue
            aliases = SECTION_ALIASES[key]
            for name, setting in value.items():
                flat_name = aliases.get(name, name)
                if flat_name not in SECTION_KEYS[key]:
                    unknown(f"{key}.{name}", SECTION_KEYS[key] | aliases.keys(), f"in `{key}:`")
                    continue
                convert = SECTION_CONVERTERS.get((key, name))
                put(flat_name, convert(setting) if convert else setting, f"{key}.{name}")
        elif key in RECIPE_KEYS:
            put(key, value, key)
        else:
            unknown(key, RECIPE_KEYS | SECTION_KEYS.keys(), "at the top level")
    if problems:
        valid = [f"Valid keys {scope}: {', '.join(sorted(keys))}." for scope, keys in scopes.items()]
        raise RecipeError(" ".join([*problems, *valid]))
    return flat


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key set twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    f"{key_node.start_mark.name}, line {line}: the key {key!r} is set twice in one mapping (first "
                    f"on line {seen[key]}); YAML would silently keep the last value. Keep one."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """
    Read and check a recipe file: YAML syntax (an error names the file, line and column), no key set twice in one
    mapping, a mapping at the top, and only valid keys (`flatten_recipe`, every problem at once).

    Raises:
        RecipeError (a ValueError): naming the file and the problem.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            recipe = yaml.load(file, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as err:
        raise RecipeError(f"Recipe {path} not found: pass the path of a YAML recipe, e.g. recipes/*.yaml.") from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        what = "; ".join(part for part in (err.context, err.problem) if part)
        raise RecipeError(
            f"{where}: the recipe is not valid YAML ({what}). Check the indentation, the ': ' after each key and "
            "the quotes around values with ':' or '#'."
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: the recipe is not valid YAML ({err}).") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of settings (`key: value` lines), got {recipe!r}.")
    try:
        flatten_recipe({key: value for key, value in recipe.items() if key != "env"})
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    return recipe


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

    def parse_args_and_config(self, args: Iterable[str] | None = None, *more: Any, **kwargs: Any) -> tuple[Any, ...]:
        """`TrlParser.parse_args_and_config`, with the recipe read and checked first by `load_recipe`."""
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args and args.index("--config") + 1 < len(args):
            load_recipe(args[args.index("--config") + 1])
        return super().parse_args_and_config(args, *more, **kwargs)

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        flat = flatten_recipe(config)
        dests = {action.dest for action in self._actions}
        if "dataset_mixture" in flat:  # replaces the default dataset_name
            flat.setdefault("dataset_name", None)
        if "adapter" in dests and "adapter" not in flat:
            model = flat.get("model_name_or_path")
            flat["adapter"] = flat.get("output_dir") or (default_output_dir(model) if model else None)
        settings = {key: value for key, value in flat.items() if key in dests}
        _check_types(self._actions, settings)
        return super().set_defaults_with_config(**settings)

    def parse_known_args(self, args=None, namespace=None) -> tuple[Namespace, list[str]]:
        namespace, remaining = super().parse_known_args(args, namespace)
        model = getattr(namespace, "model_name_or_path", None)
        if model and getattr(namespace, "output_dir", ...) is None:
            namespace.output_dir = default_output_dir(model)
        return namespace, remaining


def _check_types(actions: Sequence[Any], settings: Mapping[str, Any]) -> None:
    """
    Refuse recipe values of the wrong type, which argparse would take as they are: a number where a list belongs
    (`alphas: 1`), a fraction for an integer (`batch_size: 2.5`), text that is no number. Every problem is reported
    at once.

    A number written as a string is converted in place, as argparse converts string defaults and TRL's own
    `--config` accepts them: YAML 1.1 reads `learning_rate: 5e-5` (no dot in the mantissa) as the string `"5e-5"`.
    """
    problems = []
    for action in actions:
        if action.dest not in settings or settings[action.dest] is None or action.type not in (int, float):
            continue
        value, kind = settings[action.dest], {int: "an int", float: "a float"}[action.type]
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        if many and not isinstance(value, list):
            problems.append(f"{action.dest!r} must be a list (`{action.dest}: [{value}]`), got {value!r}")
            continue
        items = [_number(item, action.type) for item in (value if many else [value])]
        if any(item is None for item in items):
            problems.append(f"{action.dest!r} must be {kind}{' in each entry' if many else ''}, got {value!r}")
            continue
        settings[action.dest] = items if many else items[0]
    if problems:
        raise RecipeError("Wrongly typed recipe values: " + "; ".join(problems) + ".")


def _number(value: Any, kind: type) -> int | float | None:
    """`value` as a number of `kind` (`int` or `float`), a string converted as argparse would; `None` if it is none."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        return None
    return value


def make_parser(command: str, prog: str | None = None) -> RecipeParser:
    """The parser of `command` (`"train"`, `"generate"`, `"eval"` or `"serve"`): its dataclasses' own defaults."""
    if command not in COMMAND_DATACLASSES:
        raise ValueError(f"Unknown command {command!r}; choose from {sorted(COMMAND_DATACLASSES)}.")
    return RecipeParser(COMMAND_DATACLASSES[command], prog=prog or f"iav-trl {command}")


def parse_command_args(command: str, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse flags and `--config RECIPE` into the dataclasses of `command`, in `COMMAND_DATACLASSES` order."""
    return make_parser(command).parse_args_and_config(args)
