"""Arguments of the `iav-trl` commands (dataclasses, as TRL's scripts have) and their defaults.

Each command parses a tuple of dataclasses (`COMMAND_DATACLASSES`) with `iav_trl.cli.recipe.RecipeParser`:

    train     (IAVScriptArguments, IAVConfig, IAVModelConfig)
    generate  (GenerateArguments, IAVModelConfig)
    eval      (IAVScriptArguments, EvalArguments, IAVConfig, IAVModelConfig)

`IAVConfig` is `trl.DPOConfig` plus the IAV fields, `IAVModelConfig` is `trl.ModelConfig` plus the base model's
expected sizes; `ScriptArguments` is TRL's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments

from iav_trl.data import SCHEMAS
from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.tuners.iav.alpha import ALPHA_GUIDE

DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass
class IAVScriptArguments(ScriptArguments):
    """
    `trl.ScriptArguments` (`dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`, ...), read
    with `iav_trl.load_preference_dataset`, plus:

    dataset_mixture (`dict` or JSON `str`, *optional*):
        Several datasets mixed with `iav_trl.build_dataset_mixture`, in alignment-handbook's layout:
        `{"datasets": [{"id", "config", "split", "columns", "weight", "schema"}, ...], "seed", "test_split_size"}`.
        `test_split_size` (a fraction or a row count) holds out the test split that `eval_strategy` and
        `iav-trl eval` use. Replaces `dataset_name`.
    dataset_schema (`str`, *optional*, defaults to `"auto"`):
        Source schema of `dataset_name`: `"auto"` (detected), `"hh-rlhf"`, `"ultrafeedback"` or `"trl"`.
    """

    dataset_mixture: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "A mixture of datasets (alignment-handbook layout, JSON on the command line): "
            '{"datasets": [{"id": ..., "split": ..., "weight": ...}], "seed": 0, "test_split_size": 0.05}.'
        },
    )
    dataset_schema: str = field(
        default="auto",
        metadata={"help": "Source schema of `dataset_name`.", "choices": ["auto", *SCHEMAS]},
    )

    def __post_init__(self) -> None:
        if isinstance(self.dataset_mixture, str):
            try:
                self.dataset_mixture = json.loads(self.dataset_mixture)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f'--dataset_mixture must be JSON, e.g. \'{{"datasets": [{{"id": "Anthropic/hh-rlhf"}}]}}\' '
                    f"({err})."
                ) from err
        if self.dataset_streaming:
            raise ValueError(
                "`dataset_streaming` is not supported: iav-trl converts the preference data before training. Drop "
                "it, or cut a large dataset with a split slice such as `--dataset_train_split 'train[:10%]'`."
            )


@dataclass
class IAVModelConfig(ModelConfig):
    """
    `trl.ModelConfig` plus the sizes the IAV seed's recipes state for the base model (`model.vocab_size`,
    `model.hidden_size`). Each one that is set is checked against the loaded model's config when the model is loaded
    (`iav_trl.scripts.models.check_model_sizes`), so that a recipe written for another model fails before training
    instead of training a head for the wrong model.

    vocab_size (`int`, *optional*): the base model's vocabulary size (its `config.vocab_size`).
    hidden_size (`int`, *optional*): the base model's hidden size (its `config.hidden_size`).
    """

    vocab_size: int | None = field(
        default=None, metadata={"help": "Expected vocabulary size of the base model; checked when it is loaded."}
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "Expected hidden size of the base model; checked when it is loaded."}
    )


@dataclass
class AdapterArguments:
    """The adapter to load and the strengths to use (`generate` and `eval`)."""

    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Adapter directory or Hub repo id (the `output_dir` of `iav-trl train`). With --config, the "
            "recipe's `output_dir`."
        },
    )
    alphas: list[float] = field(
        default_factory=lambda: list(DEFAULT_ALPHAS),
        metadata={"help": f"Alignment strengths to compare: {ALPHA_GUIDE}."},
    )

    def __post_init__(self) -> None:
        if self.adapter is None:
            raise ValueError("No adapter: pass --adapter DIR_OR_REPO, or --config RECIPE to use its output_dir.")
        if not self.alphas or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"--alphas must be distinct numbers, e.g. 0 0.5 1 1.5; got {self.alphas}.")


@dataclass
class GenerateArguments(AdapterArguments):
    """
    Arguments of `iav-trl generate`: every prompt at every alpha, in one batched `generate`.

    prompt (`list[str]`): the prompts (`--prompt "..." --prompt "..."`), each one user turn of the chat template
        when the tokenizer has one.
    max_new_tokens (`int`, defaults to `128`), generation_max_length (`int`, *optional*: the total length, prompt
        included, as `transformers`' `max_length`; replaces max_new_tokens; the seed recipe's `inference.max_length`),
        temperature (`float`, defaults to `0.0`: greedy decoding; a positive
        value samples), top_p (`float`, defaults to `1.0`), seed (`int`, defaults to `42`, for sampling).
    output_file (`str`, *optional*): also write the completions as JSON (`[{"prompt", "alpha", "completion"}]`).
    trust_remote_code (`bool`, defaults to `False`): allow models whose code lives on the Hub.
    """

    prompt: list[str] = field(
        default_factory=list,
        metadata={"help": "A prompt; repeat the flag for several.", "action": "extend"},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate per completion."})
    generation_max_length: int | None = field(
        default=None,
        metadata={"help": "Total length, prompt included (transformers' max_length); replaces max_new_tokens."},
    )
    temperature: float = field(default=0.0, metadata={"help": "0 decodes greedily; a positive value samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (with temperature > 0)."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the completions to this JSON file."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models whose code lives on the Hub."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 (0: greedy) and top_p in (0, 1] (1: no truncation); got temperature "
                f"{self.temperature} and top_p {self.top_p}."
            )
        if not self.prompt:
            raise ValueError('No prompt: pass --prompt "..." (repeat the flag for several prompts).')


@dataclass
class EvalArguments(AdapterArguments):
    """
    Arguments of `iav-trl eval`: held-out preference accuracy and margin of the adapter at each alpha.

    results_file (`str`, *optional*): where the JSON results go; defaults to `eval_results.json` in the adapter
        directory (in the working directory for a Hub adapter).
    """

    results_file: str | None = field(
        default=None,
        metadata={"help": "JSON results file (default: eval_results.json in the adapter directory)."},
    )


@dataclass
class ServeArguments:
    """
    Arguments of `iav-trl serve`: an OpenAI-compatible server for an adapter (and more heads), see
    `iav_trl.inference.serving`.

    adapter (`str`): the adapter directory or Hub repo id whose base model is served (with --config, the recipe's
        `output_dir`). add_adapter (`list[str]`): more heads on the same base, `NAME=DIR_OR_REPO` (repeat the flag).
    served_model_name (`str`, *optional*): the model name clients send (default: the adapter's directory name).
    host (`str`, defaults to `"127.0.0.1"`), port (`int`, defaults to `8000`).
    num_blocks (`int`, defaults to `256`), page_size (`int`, defaults to `32`), max_batch_tokens (`int`, defaults
        to `512`): the continuous-batching engine's KV cache (`num_blocks * page_size` tokens in all) and the tokens
        one forward packs.
    trust_remote_code (`bool`, defaults to `False`): allow models whose code lives on the Hub.
    """

    adapter: str | None = field(
        default=None,
        metadata={"help": "Adapter directory or Hub repo id; with --config, the recipe's `output_dir`."},
    )
    add_adapter: list[str] = field(
        default_factory=list,
        metadata={"help": "Another head on the same base, NAME=DIR_OR_REPO; repeat the flag.", "action": "extend"},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model name clients send (default: the adapter's directory name)."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    num_blocks: int = field(default=256, metadata={"help": "KV-cache pages of the batching engine."})
    page_size: int = field(default=32, metadata={"help": "Tokens per KV-cache page."})
    max_batch_tokens: int = field(default=512, metadata={"help": "Tokens one forward of the engine packs."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models whose code lives on the Hub."})

    def __post_init__(self) -> None:
        if self.adapter is None:
            raise ValueError("No adapter: pass --adapter DIR_OR_REPO, or --config RECIPE to use its output_dir.")
        for entry in self.add_adapter:
            name, _, path = entry.partition("=")
            if not name or not path:
                raise ValueError(f"--add_adapter takes NAME=DIR_OR_REPO, got {entry!r}.")
        if min(self.num_blocks, self.page_size, self.max_batch_tokens) < 1 or not 0 < self.port < 65536:
            raise ValueError(
                "num_blocks, page_size and max_batch_tokens must be positive and port in 1..65535; got "
                f"{self.num_blocks}, {self.page_size}, {self.max_batch_tokens} and {self.port}."
            )

    def extra_adapters(self) -> dict[str, str]:
        """`{name: directory or repo}` of `add_adapter`."""
        return dict(entry.split("=", 1) for entry in self.add_adapter)


COMMAND_DATACLASSES: dict[str, tuple[type, ...]] = {
    "train": (IAVScriptArguments, IAVConfig, IAVModelConfig),
    "generate": (GenerateArguments, IAVModelConfig),
    "eval": (IAVScriptArguments, EvalArguments, IAVConfig, IAVModelConfig),
    "serve": (ServeArguments, IAVModelConfig),
}

# Flags that a recipe cannot set: `--prompt` extends a list, so a recipe's prompts could never be replaced.
CLI_ONLY_FIELDS = frozenset({"prompt", "add_adapter"})


def default_output_dir(model_name_or_path: str) -> str:
    """`outputs/<model name>-IAV`, the default output directory (`tiny:llama` -> `outputs/tiny-llama-IAV`)."""
    name = model_name_or_path.rstrip("/").split("/")[-1].replace(":", "-")
    return os.path.join("outputs", f"{name}-IAV")
