"""Design study of the alignment head on a real model: what wins on the validation split of the real-data benchmark.

The real-data benchmark (`benchmarks/real_data/benchmark.py`) trains the default head at a few learning rates. This
study asks what the head's other settings do on the same model and pairs, so that the winner can become the default:
for each variant (learning rate, `lambda_kl`, capacity `num_interventions` x `intervention_dim`, each changed alone
from the seed's head, `BASELINE`), one `IAVTrainer` run on the benchmark's HH-RLHF train split, then on its validation
split, at each of `alphas`:

- implicit-reward accuracy (ties as half) and mean margin, `trainer.evaluate` as `iav-trl eval` runs it;
- `completion_kl`: the mean over the pairs' completion tokens of KL(p_final || p_base), teacher-forced (how far
  that strength moves the model, token by token, on text like the training data).

The held-out split is never read: the same seed and sizes as the benchmark split the pairs, and only `train` and
`validation` are used. Writes `head_design_study.json` and `head_design_study.md` into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.head_design_study [--seed 0] [--model ...]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from typing import Any

from benchmarks.real_data.benchmark import RealDataConfig, load_pairs, report_main, split_pairs
from benchmarks.real_data.methods import heldout_metrics, load_model, load_trained, quiet, train_run
from iav_trl.models.base_models import load_base_tokenizer

STUDY_ALPHAS = [0.5, 1.0, 2.0]
# The starting point: the IAV seed's head and loss (8 interventions of dimension 256, lambda_kl 0.1).
BASELINE = {"lambda_kl": 0.1, "num_interventions": 8, "intervention_dim": 256}
# (learning rate, changes to BASELINE): the baseline at the benchmark's grid, then one change at a time.
VARIANTS = [
    (1e-3, {}),
    (3e-3, {}),
    (1e-2, {}),
    (3e-3, {"lambda_kl": 0.3}),
    (3e-3, {"lambda_kl": 1.0}),
    (1e-2, {"lambda_kl": 1.0}),
    (3e-3, {"num_interventions": 4, "intervention_dim": 64}),
    (1e-2, {"num_interventions": 4, "intervention_dim": 64}),
]


def variant_name(learning_rate: float, changes: dict[str, Any]) -> str:
    described = ", ".join(f"{key}={value:g}" for key, value in changes.items()) or "baseline"
    return f"lr {learning_rate:g}, {described}"


def study(config: RealDataConfig, variants=VARIANTS, alphas=STUDY_ALPHAS) -> dict[str, Any]:
    """Every variant trained on HH-RLHF's train split and evaluated on its validation split at each of `alphas`."""
    quiet()
    start = time.perf_counter()
    tokenizer = load_base_tokenizer(config.model)
    pairs, _ = load_pairs(config.data_path("hh_rlhf"), tokenizer, config.max_length)
    splits = split_pairs(pairs, config)
    rows = []
    for learning_rate, changes in variants:
        settings = {**BASELINE, **changes}
        with tempfile.TemporaryDirectory(prefix="head-study-") as save_dir:
            run = train_run(config, "iav", learning_rate, splits["train"], splits["validation"], save_dir, settings)
            model = load_trained("iav", save_dir, load_model(config.model))
            evaluated = heldout_metrics("iav", model, tokenizer, splits["validation"], config, alphas)
        rows.append(
            {
                "variant": variant_name(learning_rate, changes),
                "learning_rate": learning_rate,
                "settings": settings,
                "steps": run["steps"],
                "trainable_parameters": run["trainable_parameters"],
                "train_seconds": run["train_seconds"],
                "validation": evaluated,
            }
        )
        print(f"[{time.perf_counter() - start:6.0f}s] {rows[-1]['variant']}: {_summary(evaluated)}", flush=True)
    return {
        "config": asdict(config),
        "pairs": {name: len(split) for name, split in splits.items() if name != "heldout"},
        "alphas": list(alphas),
        "variants": rows,
        "wall_time_s": time.perf_counter() - start,
    }


def _summary(rows: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"alpha {row['alpha']:g}: win {row['win_rate']:.3f} margin {row['margin']:.3f} KL {row['completion_kl']:.3f}"
        for row in rows
    )


def report(results: dict[str, Any]) -> str:
    """The study as a markdown table: one row per variant, win rate / margin / completion KL at each alpha."""
    alphas = results["alphas"]
    header = ["variant", "trainable", *(f"alpha {a:g}: win rate / margin / KL" for a in alphas)]
    lines = [
        f"## Head design study: {results['config']['model']} on the HH-RLHF validation split",
        "",
        f"{results['pairs']['train']} training pairs, {results['pairs']['validation']} validation pairs; "
        f"{results['wall_time_s'] / 60:.0f} minutes in all. KL: mean over the completion tokens of "
        "KL(p_final || p_base), teacher-forced.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for row in results["variants"]:
        cells = [f"{v['win_rate']:.3f} / {v['margin']:.3f} / {v['completion_kl']:.3f}" for v in row["validation"]]
        lines.append(f"| {row['variant']} | {row['trainable_parameters'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(RealDataConfig, study, report, "head_design_study")


if __name__ == "__main__":
    main()
