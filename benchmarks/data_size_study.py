"""Held-out accuracy with more training pairs: does IAV's gap to DPO + LoRA close as the data grows? Issue 11.

The real-data benchmark trains on 128 HH-RLHF pairs (16 steps), chosen for CPU time. At that size the held-out seeds
study (`benchmarks/heldout_seeds_study.py`) measured IAV at alpha 1 behind DPO + LoRA over 3 seeds (0.533 against
0.602), and the fit study found the head fitting its training pairs without carrying them over to new ones: a sign
of too little data rather than too little capacity. This study trains both methods on more pairs and scores them on
the same held-out pairs:

- training pairs: the benchmark's 128, plus the next `extra_train` pairs of its shuffled pool after its held-out
  split (`growth_splits`); the validation and held-out splits are the benchmark's own, untouched;
- everything else is the benchmark's (its settings are read from its JSON and a differing run is refused, as in the
  held-out seeds study): batch, one epoch, beta, maximum length, alphas, and each method's learning rate, the one the
  benchmark's validation split chose at 128 pairs; nothing is chosen here, and nothing on the held-out pairs;
- `seeds`: training seeds, each method trained and scored as the held-out seeds study does (`seed_run`);
- the 128-pair rows are the held-out seeds study's, read from its JSON (`heldout_seeds_results`, its settings
  checked against the benchmark's), so both sizes are scored on the same 256 held-out pairs.

HH-RLHF only: of UltraFeedback's pairs, 107 fit the benchmark's 192 tokens and all are in its splits already.
Reported: every run's held-out win rate (ties as half) / mean margin, per size with several seeds their means ±
the seeds' standard error, and the bar's accuracy checks on each size's means. Writes `data_size_study.json` and
`.md`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.data_size_study   # make bench-data-size, 50 min
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from datasets import Dataset, concatenate_datasets

from benchmarks.heldout_seeds_study import METHODS, _cell, read_benchmark, read_results, seed_run, summarize
from benchmarks.real_data.benchmark import RESULTS_DIR, RealDataConfig, load_pairs, report_main, split_pairs
from benchmarks.real_data.methods import quiet
from iav_trl.models.base_models import load_base_tokenizer

DATASET = "hh_rlhf"


@dataclass
class DataSizeConfig(RealDataConfig):
    """The real-data benchmark's settings (checked against its results), plus the added pairs and the seeds."""

    benchmark_results: str = field(
        default=os.path.join(RESULTS_DIR, "real_data_benchmark.json"),
        metadata={"help": "The real-data benchmark's JSON: its settings, splits and chosen learning rates."},
    )
    heldout_seeds_results: str = field(
        default=os.path.join(RESULTS_DIR, "heldout_seeds_study.json"),
        metadata={"help": "The held-out seeds study's JSON: the runs on the benchmark's own training pairs."},
    )
    extra_train: int = field(
        default=320,
        metadata={"help": "Pairs of the shuffled pool after the benchmark's splits added to its training pairs."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Training seeds of the larger size (each adds about 45 minutes on 2 CPU cores)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extra_train < 1:
            raise ValueError(f"`extra_train` must be a positive number of pairs, got {self.extra_train}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must list distinct training seeds, got {self.seeds}.")


def growth_splits(pairs: Dataset, config: DataSizeConfig) -> dict[str, Dataset]:
    """The benchmark's splits, its training split followed by the next `extra_train` pairs of its shuffled pool
    after them (refused when the pool is too small)."""
    splits = split_pairs(pairs, config)
    used = sum(len(split) for split in splits.values())
    shuffled = pairs.shuffle(seed=config.seed).flatten_indices()
    if used + config.extra_train > len(shuffled):
        raise ValueError(
            f"`extra_train` {config.extra_train} needs {used + config.extra_train} pairs; {len(shuffled)} fit "
            f"`max_length` {config.max_length}. Lower `extra_train` to at most {len(shuffled) - used}."
        )
    extra = shuffled.select(range(used, used + config.extra_train))
    return {**splits, "train": concatenate_datasets([splits["train"], extra])}


def read_base_size(config: DataSizeConfig) -> dict[str, Any]:
    """The held-out seeds study's HH-RLHF figures, refused (`read_results`) when its settings differ from ours."""
    results = read_results(
        config.heldout_seeds_results,
        config,
        "the held-out seeds study",
        "the study compares with the held-out seeds study's runs. Run it first (`make bench-heldout-seeds`), or pass "
        "its JSON with `--heldout_seeds_results`.",
    )
    return results["datasets"][DATASET]


def study(config: DataSizeConfig) -> dict[str, Any]:
    quiet()
    start = time.perf_counter()
    benchmark = read_benchmark(config)
    base_size = read_base_size(config)
    tokenizer = load_base_tokenizer(config.model)
    pairs, _ = load_pairs(config.data_path(DATASET), tokenizer, config.max_length)
    splits = growth_splits(pairs, config)
    rates = {method: benchmark["datasets"][DATASET]["tuning"][method]["chosen_learning_rate"] for method in METHODS}
    runs = []
    with tempfile.TemporaryDirectory(prefix="data-size-study-") as work:
        for seed in config.seeds:
            runs.append(seed_run(config, splits, rates, seed, work, os.path.join(work, "features"), tokenizer))
            print(f"[{time.perf_counter() - start:6.0f}s] {len(splits['train'])} pairs: seed {seed}", flush=True)
    sizes = [
        {"train_pairs": base_size["pairs"]["train"], "source": "held-out seeds study", "runs": base_size["runs"]},
        {"train_pairs": len(splits["train"]), "source": "trained here", "runs": runs},
    ]
    for size in sizes:
        size["summary"] = summarize(size["runs"], config.iav_alphas)
    return {
        "config": asdict(config),
        "pairs": {name: len(split) for name, split in splits.items()},
        "learning_rates": rates,
        "sizes": sizes,
        "wall_time_s": time.perf_counter() - start,
    }


def report(results: dict[str, Any]) -> str:
    config, rates = results["config"], results["learning_rates"]
    alphas = [alpha for alpha in config["iav_alphas"] if alpha > 0]
    header = ["training pairs", "seed", *(f"IAV alpha {a:g}" for a in alphas), "DPO + LoRA"]
    lines = [
        f"## Data-size study: {config['model']} on HH-RLHF",
        "",
        f"The real-data benchmark's settings and its {results['pairs']['heldout']} held-out pairs; learning rates "
        f"IAV {rates['iav']:g}, DPO + LoRA {rates['dpo_lora']:g} (the benchmark's choices); one epoch, batch "
        f"{config['batch_size']}; {results['wall_time_s'] / 60:.0f} minutes. Cells: held-out win rate (ties as half) "
        "/ mean margin of the implicit reward; with several seeds, their means ± the seeds' standard error.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for size in results["sizes"]:
        pairs = f"{size['train_pairs']} ({size['source']})"
        for run in size["runs"]:
            rows = {row["alpha"]: row for row in run["heldout"]["iav"]}
            cells = [pairs, str(run["seed"]), *(_cell(rows[a]) for a in alphas), _cell(run["heldout"]["dpo_lora"])]
            lines.append("| " + " | ".join(cells) + " |")
        summary = size["summary"]
        if len(size["runs"]) > 1:  # one seed has no spread to show
            means = [_cell(summary["iav"][str(a)], se=True) for a in alphas]
            lines.append("| " + " | ".join([pairs, "**mean**", *means, _cell(summary["dpo_lora"], se=True)]) + " |")
    lines.append("")
    for size in results["sizes"]:
        bar = size["summary"]["bar"]
        accuracy = bar["iav_alpha_1_accuracy_at_least_dpo_lora"]
        rise = bar["accuracy_and_margin_rise_with_alpha_0_to_1"]
        lines.append(
            f"- {size['train_pairs']} training pairs: IAV at alpha 1 {accuracy['iav']:.3f} against DPO + LoRA "
            f"{accuracy['dpo_lora']:.3f} ({'PASS' if accuracy['passed'] else 'FAIL'}); win rate and margin rise "
            f"from alpha 0 to 1: {'PASS' if rise['passed'] else 'FAIL'}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(DataSizeConfig, study, report, "data_size_study")


if __name__ == "__main__":
    main()
