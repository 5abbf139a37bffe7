"""Which `lambda_kl` should be the default: where alpha 1 lands, and how accuracy moves with alpha, over seeds.

The head design study (`head_design_study.py`) chose `lambda_kl` 1.0 from one seed on 64 validation pairs, where one
standard error of a win rate is about 0.06. This study repeats its two leading settings (`lambda_kl` 0.3 and 1.0, at
learning rates 1e-3 and 3e-3) with `seeds` training seeds each, on 4x the validation pairs, so that a default can
be chosen on figures that resolve the differences:

- the same model, HH-RLHF training split, batch, steps and beta as the real-data benchmark;
- validation: the benchmark's validation split plus the last `extra_validation` pairs of its shuffled pool, which
  the benchmark never uses (its train, validation and held-out splits come first; checked). The held-out split is
  never read;
- at each of `alphas`: the implicit-reward win rate (ties as half) and mean margin (`trainer.evaluate`, as `iav-trl
  eval` runs it), and `completion_kl`, the mean over the completion tokens of KL(p_final || p_base), teacher-forced.

The frozen backbone runs once over the training pairs and once over the validation pairs for the whole study
(`precompute_backbone_features`, shared cache); every run then trains and evaluates from the cached features, whose
losses and metrics equal those of the backbone pass (`tests/test_features.py`). Writes `kl_default_study.json` and
`kl_default_study.md` into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.kl_default_study
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from datasets import Dataset, concatenate_datasets

from benchmarks.head_design_study import variant_name
from benchmarks.real_data.benchmark import RealDataConfig, load_pairs, report_main, split_pairs
from benchmarks.real_data.methods import feature_cache_in, heldout_metrics, load_model, load_trained, quiet, train_run
from iav_trl.models.base_models import load_base_tokenizer


@dataclass
class KLDefaultConfig(RealDataConfig):
    """The real-data benchmark's model, data and splits, plus the study's grid."""

    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3], metadata={"help": "IAV learning rates."})
    lambda_kls: list[float] = field(default_factory=lambda: [0.3, 1.0], metadata={"help": "`lambda_kl` values."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds (head, order)."})
    extra_validation: int = field(
        default=192, metadata={"help": "Pairs from the end of the shuffled pool added to the validation split."}
    )
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0], metadata={"help": "Alphas to score."})


def study_splits(pairs: Dataset, config: KLDefaultConfig) -> dict[str, Dataset]:
    """The benchmark's training split, and its validation split plus the pool's last `extra_validation` pairs."""
    splits = split_pairs(pairs, config)
    used = sum(len(split) for split in splits.values())
    shuffled = pairs.shuffle(seed=config.seed).flatten_indices()
    extra = min(config.extra_validation, len(shuffled) - used)
    tail = shuffled.select(range(len(shuffled) - extra, len(shuffled)))
    return {"train": splits["train"], "validation": concatenate_datasets([splits["validation"], tail])}


def study(config: KLDefaultConfig) -> dict[str, Any]:
    quiet()
    start = time.perf_counter()
    tokenizer = load_base_tokenizer(config.model)
    pairs, _ = load_pairs(config.data_path("hh_rlhf"), tokenizer, config.max_length)
    splits = study_splits(pairs, config)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kl-default-study-") as work:
        features = os.path.join(work, "features")
        for learning_rate in config.learning_rates:
            for lambda_kl in config.lambda_kls:
                for seed in config.seeds:
                    settings = {"lambda_kl": lambda_kl, "seed": seed, "precompute_backbone_features": True}
                    save_dir = os.path.join(work, "head")
                    with feature_cache_in(features):
                        run = train_run(
                            config, "iav", learning_rate, splits["train"], splits["validation"], save_dir, settings
                        )
                    model = load_trained("iav", save_dir, load_model(config.model))
                    rows = heldout_metrics(
                        "iav", model, tokenizer, splits["validation"], config, config.alphas, features_dir=features
                    )
                    runs.append(
                        {
                            "variant": variant_name(learning_rate, {"lambda_kl": lambda_kl}),
                            "learning_rate": learning_rate,
                            "lambda_kl": lambda_kl,
                            "seed": seed,
                            "train_seconds": run["train_seconds"],
                            "validation": rows,
                        }
                    )
                    print(f"[{time.perf_counter() - start:6.0f}s] {runs[-1]['variant']}, seed {seed}", flush=True)
    return {
        "config": asdict(config),
        "pairs": {name: len(split) for name, split in splits.items()},
        "runs": runs,
        "summary": summarize(runs, config.alphas),
        "wall_time_s": time.perf_counter() - start,
    }


def seed_se(values: list[float]) -> float:
    """The standard error of the mean of `values` over seeds: their standard deviation over the square root of their
    number (0 for one seed)."""
    return (statistics.stdev(values) if len(values) > 1 else 0.0) / math.sqrt(len(values))


def summarize(runs: list[dict[str, Any]], alphas: list[float]) -> list[dict[str, Any]]:
    """Per variant and alpha: the mean over seeds of win rate, margin and completion KL, and the standard error of
    the mean win rate over the seeds (their standard deviation over the square root of their number)."""
    variants = {}
    for run in runs:
        variants.setdefault(run["variant"], []).append(run)
    summary = []
    for name, group in variants.items():
        cells = {}
        for index, alpha in enumerate(alphas):
            rows = [run["validation"][index] for run in group]
            cells[alpha] = {
                key: statistics.fmean(row[key] for row in rows) for key in ("win_rate", "margin", "completion_kl")
            }
            cells[alpha]["win_rate_seed_se"] = seed_se([row["win_rate"] for row in rows])
        summary.append({"variant": name, "seeds": len(group), "alphas": cells})
    return summary


def seed_table(summary: list[dict[str, Any]], alphas: list[float], leading: dict[str, Callable]) -> list[str]:
    """`summarize`'s rows as markdown table lines: the `leading` columns (header -> cell of a row), then per alpha the
    mean win rate ± the seeds' standard error / mean margin / mean completion KL."""
    header = [*leading, *(f"alpha {a:g}: win rate / margin / KL" for a in alphas)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in summary:
        cells = [
            f"{c['win_rate']:.3f} ± {c['win_rate_seed_se']:.3f} / {c['margin']:.3f} / {c['completion_kl']:.3f}"
            for c in (row["alphas"][a] for a in alphas)
        ]
        lines.append("| " + " | ".join([*(cell(row) for cell in leading.values()), *cells]) + " |")
    return lines


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        f"## Default `lambda_kl` study: {config['model']} on HH-RLHF",
        "",
        f"{results['pairs']['train']} training pairs (one epoch, batch {config['batch_size']}), "
        f"{results['pairs']['validation']} validation pairs; seeds {config['seeds']}, means over seeds "
        f"(± the seeds' standard error of the win rate); {results['wall_time_s'] / 60:.0f} minutes in all. KL: mean "
        "over the completion tokens of KL(p_final || p_base), teacher-forced.",
        "",
        *seed_table(results["summary"], config["alphas"], {"variant": lambda row: row["variant"]}),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(KLDefaultConfig, study, report, "kl_default_study")


if __name__ == "__main__":
    main()
