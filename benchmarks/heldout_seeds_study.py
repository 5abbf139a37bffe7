"""Held-out accuracy over training seeds: is IAV behind DPO + LoRA, or was the real-data benchmark's seed unlucky?

The real-data benchmark (`benchmarks/real_data/benchmark.py`) trains each method once, with one seed. On the same
128 training pairs the training seed alone moves IAV's validation accuracy by up to 0.11 (the default-`lambda_kl`
study: 0.516 to 0.629 for one setting), more than the gap the bar reads. This study re-trains IAV and DPO + LoRA with
more training seeds and scores every run on the benchmark's held-out pairs:

- the benchmark's model, data, splits (its `seed`), batch, steps, beta, maximum length and alphas; the settings are
  read from its results JSON (`benchmark_results`) and a study run whose settings differ is refused;
- each method at the learning rate the benchmark's validation split chose for it, read from the same JSON: nothing
  here is chosen, and nothing is chosen on the held-out pairs;
- `seeds`: the trainer's seed (`TrainingArguments.seed`: the data order and what the trainer initializes under it),
  each run trained as the benchmark trains it (`methods.train_run`, in its own process when `isolate_training`);
- seed `seed` is the benchmark's own run: its rows are read from the JSON, not re-trained (so `seeds` must not list
  it; `tests/test_heldout_seeds_study.py` re-trains it and gets the JSON's figures back);
- held-out figures as the benchmark scores them (`methods.heldout_metrics`): `trainer.evaluate`'s implicit-reward
  win rate (ties as half) and mean margin, IAV at every alpha from one backbone pass per dataset (cached features,
  exact), DPO + LoRA against an untouched base model.

Reported per dataset: every seed's row, and over the seeds the mean win rate ± its standard error (the seeds'
standard deviation over the square root of their number) and the mean margin; then the bar's two accuracy checks
on the means: IAV at alpha 1 >= DPO + LoRA, and the win rate and margin rising with alpha from 0 to 1. Writes
`heldout_seeds_study.json` and `.md` into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.heldout_seeds_study   # 57 min on 2 cores
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.kl_default_study import seed_se
from benchmarks.real_data.benchmark import (
    DATASETS,
    RESULTS_DIR,
    RealDataConfig,
    accuracy_checks,
    load_pairs,
    report_main,
    split_pairs,
)
from benchmarks.real_data.methods import (
    heldout_metrics,
    load_model,
    load_trained,
    quiet,
    train_isolated,
    train_run,
)
from iav_trl.models.base_models import load_base_tokenizer

METHODS = ("iav", "dpo_lora")
# The benchmark's settings a re-trained seed must share with it to be comparable.
SHARED_SETTINGS = (
    "model",
    "seed",
    "max_length",
    "num_train",
    "num_validation",
    "num_heldout",
    "batch_size",
    "epochs",
    "max_steps",
    "warmup_ratio",
    "beta",
    "iav_alphas",
)


@dataclass
class HeldoutSeedsConfig(RealDataConfig):
    """The real-data benchmark's settings (checked against its results), plus the results and the seeds to add."""

    benchmark_results: str = field(
        default=os.path.join(RESULTS_DIR, "real_data_benchmark.json"),
        metadata={"help": "The real-data benchmark's JSON: its settings, chosen learning rates and seed's figures."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [1, 2],
        metadata={"help": "Training seeds to add to the benchmark's own (`seed`, read from `benchmark_results`)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.seeds or self.seed in self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"`seeds` must list distinct training seeds other than `seed` ({self.seed}), whose run is the "
                f"benchmark's own and is read from `benchmark_results`; got {self.seeds}."
            )


def read_results(path: str, config: RealDataConfig, run: str, missing: str) -> dict[str, Any]:
    """The results JSON at `path` of an earlier `run` (e.g. "the benchmark"), refused with the differing settings
    named when one of `SHARED_SETTINGS` differs from `config`'s (its figures would not be on the same pairs);
    `missing` says what to do when there is no such file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {missing}")
    with open(path) as fh:
        results = json.load(fh)
    theirs = results["config"]
    differing = [name for name in SHARED_SETTINGS if theirs.get(name) != getattr(config, name)]
    if differing:
        detail = ", ".join(f"{name}: {getattr(config, name)!r} here, {theirs.get(name)!r} there" for name in differing)
        raise ValueError(
            f"The study's settings differ from those of {path} ({detail}). Pass {run}'s settings, or re-run {run} "
            "with these."
        )
    return results


def read_benchmark(config: HeldoutSeedsConfig) -> dict[str, Any]:
    """The real-data benchmark's results (`config.benchmark_results`), checked by `read_results`."""
    return read_results(
        config.benchmark_results,
        config,
        "the benchmark",
        "the study builds on the real-data benchmark's results. Run the benchmark first (`make bench-real-data`), "
        "or pass its JSON with `--benchmark_results`.",
    )


def benchmark_run(figures: dict[str, Any], rates: dict[str, float], seed: int) -> dict[str, Any]:
    """The benchmark's own run (`seed`) as a study row: validation accuracy at the chosen rates, held-out rows."""
    validation = {
        method: next(
            run["validation"]["accuracy"]
            for run in figures["tuning"][method]["runs"]
            if run["learning_rate"] == rates[method]
        )
        for method in METHODS
    }
    heldout = {"iav": figures["heldout"]["iav"], "dpo_lora": figures["heldout"]["dpo_lora"]}
    return {"seed": seed, "source": "benchmark", "validation_accuracy": validation, "heldout": heldout}


def seed_run(
    config: HeldoutSeedsConfig,
    splits: dict[str, Any],
    rates: dict[str, float],
    seed: int,
    work_dir: str,
    features_dir: str,
    tokenizer,
) -> dict[str, Any]:
    """IAV and DPO + LoRA trained with training seed `seed` and scored on the held-out pairs, as the benchmark does."""
    # The benchmark's settings with the trainer's seed (the splits were made before, with the benchmark's).
    seeded = RealDataConfig(
        **{**{f.name: getattr(config, f.name) for f in dataclasses.fields(RealDataConfig)}, "seed": seed}
    )
    train = train_isolated if config.isolate_training else train_run
    validation, heldout = {}, {}
    for method in METHODS:
        save_dir = os.path.join(work_dir, f"{method}-seed{seed}")
        run = train(seeded, method, rates[method], splits["train"], splits["validation"], save_dir)
        validation[method] = run["validation"]["accuracy"]
        model = load_trained(method, save_dir, load_model(config.model))
        if method == "iav":
            heldout[method] = heldout_metrics(
                "iav", model, tokenizer, splits["heldout"], config, config.iav_alphas, features_dir=features_dir
            )
        else:
            reference = load_model(config.model)
            heldout[method] = heldout_metrics(method, model, tokenizer, splits["heldout"], config, base=reference)[0]
        del model
    return {"seed": seed, "source": "trained here", "validation_accuracy": validation, "heldout": heldout}


def summarize(runs: list[dict[str, Any]], alphas: list[float]) -> dict[str, Any]:
    """Over the seeds: IAV's (per alpha) and DPO + LoRA's mean win rate ± standard error and mean margin; the bar's
    accuracy checks (`accuracy_checks`) on the means."""

    def cell(rows: list[dict[str, Any]]) -> dict[str, float]:
        win_rates = [row["win_rate"] for row in rows]
        return {
            "win_rate": statistics.fmean(win_rates),
            "win_rate_seed_se": seed_se(win_rates),
            "margin": statistics.fmean(row["margin"] for row in rows),
        }

    iav = [{"alpha": alpha, **cell([run["heldout"]["iav"][i] for run in runs])} for i, alpha in enumerate(alphas)]
    dpo = cell([run["heldout"]["dpo_lora"] for run in runs])
    return {
        "seeds": [run["seed"] for run in runs],
        "iav": {str(row["alpha"]): row for row in iav},
        "dpo_lora": dpo,
        "bar": accuracy_checks(iav, dpo),
    }


def study(config: HeldoutSeedsConfig) -> dict[str, Any]:
    quiet()
    start = time.perf_counter()
    benchmark = read_benchmark(config)
    tokenizer = load_base_tokenizer(config.model)
    datasets = {}
    with tempfile.TemporaryDirectory(prefix="heldout-seeds-study-") as work:
        for dataset, label in DATASETS.items():
            pairs, _ = load_pairs(config.data_path(dataset), tokenizer, config.max_length)
            splits = split_pairs(pairs, config)
            sizes = {name: len(split) for name, split in splits.items()}
            recorded = {name: benchmark["data"][dataset][name] for name in sizes}
            if sizes != recorded:
                raise ValueError(
                    f"{label}: the splits here have {sizes} pairs, the benchmark's {recorded}: not the same data file "
                    f"({config.data_path(dataset)} against {benchmark['data'][dataset]['path']})."
                )
            figures = benchmark["datasets"][dataset]
            rates = {method: figures["tuning"][method]["chosen_learning_rate"] for method in METHODS}
            runs = [benchmark_run(figures, rates, config.seed)]
            features = os.path.join(work, dataset, "features")
            for seed in config.seeds:
                runs.append(seed_run(config, splits, rates, seed, os.path.join(work, dataset), features, tokenizer))
                print(f"[{time.perf_counter() - start:6.0f}s] {label}: seed {seed}", flush=True)
            datasets[dataset] = {
                "pairs": sizes,
                "learning_rates": rates,
                "runs": runs,
                "summary": summarize(runs, config.iav_alphas),
            }
    return {"config": asdict(config), "datasets": datasets, "wall_time_s": time.perf_counter() - start}


def _cell(row: dict[str, Any], se: bool = False) -> str:
    spread = f" ± {row['win_rate_seed_se']:.3f}" if se else ""
    return f"{row['win_rate']:.3f}{spread} / {row['margin']:.4f}"


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    alphas = [alpha for alpha in config["iav_alphas"] if alpha > 0]
    lines = [
        f"## Held-out seeds study: {config['model']}",
        "",
        f"The real-data benchmark's pairs and settings; each method at the learning rate the benchmark's validation "
        f"split chose; training seeds {config['seed']} (the benchmark's own run) and {config['seeds']} (trained "
        f"here); {results['wall_time_s'] / 60:.0f} minutes. Cells: held-out win rate (ties as half) / mean margin of "
        "the implicit reward; means over the seeds ± the seeds' standard error.",
    ]
    header = ["seed", *(f"IAV alpha {a:g}" for a in alphas), "DPO + LoRA", "validation accuracy (IAV / DPO)"]
    for dataset, label in DATASETS.items():
        figures = results["datasets"][dataset]
        rates = figures["learning_rates"]
        lines += [
            "",
            f"### {label}",
            "",
            f"{figures['pairs']['train']} training, {figures['pairs']['heldout']} held-out pairs; learning rates: "
            f"IAV {rates['iav']:g}, DPO + LoRA {rates['dpo_lora']:g}.",
            "",
            "| " + " | ".join(header) + " |",
            "| " + " | ".join("---" for _ in header) + " |",
        ]
        for run in figures["runs"]:
            rows = {row["alpha"]: row for row in run["heldout"]["iav"]}
            accuracy = run["validation_accuracy"]
            seed = f"{run['seed']}" + (" (benchmark)" if run["source"] == "benchmark" else "")
            cells = [seed, *(_cell(rows[a]) for a in alphas), _cell(run["heldout"]["dpo_lora"])]
            lines.append("| " + " | ".join([*cells, f"{accuracy['iav']:.3f} / {accuracy['dpo_lora']:.3f}"]) + " |")
        summary = figures["summary"]
        means = [_cell(summary["iav"][str(a)], se=True) for a in alphas]
        lines.append("| " + " | ".join(["**mean**", *means, _cell(summary["dpo_lora"], se=True), ""]) + " |")
        bar = summary["bar"]
        accuracy, rise = (
            bar["iav_alpha_1_accuracy_at_least_dpo_lora"],
            bar["accuracy_and_margin_rise_with_alpha_0_to_1"],
        )
        lines += [
            "",
            f"- IAV at alpha 1 >= DPO + LoRA, on the means: {accuracy['iav']:.3f} against {accuracy['dpo_lora']:.3f}: "
            f"{'PASS' if accuracy['passed'] else 'FAIL'}.",
            "- Win rate and margin rise from alpha 0 to 1, on the means: win rates "
            f"{', '.join(f'{v:.3f}' for v in rise['win_rates'])}; margins "
            f"{', '.join(f'{v:.4f}' for v in rise['margins'])}: {'PASS' if rise['passed'] else 'FAIL'}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(HeldoutSeedsConfig, study, report, "heldout_seeds_study")


if __name__ == "__main__":
    main()
