"""Does the head fail to fit its training pairs, or fit them and not generalize? Evidence for issue 11's gap.

IAV at alpha 1 trails DPO + LoRA on held-out pairs (the held-out seeds study). This study separates the two reasons a
head can be behind, by scoring each trained head on its own training pairs as well as on validation pairs:

- under-fitting (low win rate on the training pairs): the head cannot represent, or does not reach in its steps,
  what separates chosen from rejected, and capacity, steps or a wider read should help;
- over-fitting (high on the training pairs, low on validation): it represents them, but what it learns from 128
  pairs does not carry over, and regularization or more data should help.

Each variant changes one setting of the layer-read study's default row (learning rate 1e-3, `lambda_kl` 0.3, one
epoch), and is trained and scored by that study's plain PyTorch loop (`benchmarks/layer_read_study.py`, which
reproduces `IAVTrainer`'s runs) on the same splits; the held-out split is never read. A variant is `""` (the default)
or `setting=value`, with `setting` one of

    epochs          whole epochs over the training pairs (the benchmark allows one: same steps for every method)
    head_dropout    dropout on the head's subspace read, in training
    weight_decay    AdamW's decoupled weight decay of the head
    lambda_l2       weight of the alignment logits' squared RMS
    reads           a context summary the head reads besides `h_t` (`layer_read_study.context_reads`): the mean of
                    the prompt's final hidden states, or the running mean of all of them up to `t`. The head sees
                    the context only through `h_t` otherwise; decoding with it would need per-sequence state.

Reported per variant and alpha, means over seeds: the win rate (ties as half) ± the seeds' standard error, margin
and KL per completion token, on the training pairs and on the validation pairs. Writes `fit_study.json` and `.md`
into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.fit_study
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.kl_default_study import seed_table, summarize
from benchmarks.layer_read_study import (
    CONTEXT_READS,
    LayerReadConfig,
    backbone_features,
    score,
    study_inputs,
    train_head,
)
from benchmarks.real_data.benchmark import report_main

SETTINGS = {"epochs": int, "head_dropout": float, "weight_decay": float, "lambda_l2": float, "reads": str}
KINDS = {int: "a whole number", float: "a number", str: "a name"}


@dataclass
class FitStudyConfig(LayerReadConfig):
    """The layer-read study's model, data, splits and default row, and the variants to train."""

    variants: list[str] = field(
        default_factory=lambda: [
            "",
            "epochs=3",
            "head_dropout=0.3",
            "weight_decay=1.0",
            "lambda_l2=0.3",
            "reads=prompt_mean",
            "reads=running_mean",
        ],
        metadata={"help": f"'' (the default row) or `setting=value`, setting one of {sorted(SETTINGS)}."},
    )
    alphas: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={"help": "Alphas to score."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for spec in self.variants:
            parse_variant(spec)


def parse_variant(spec: str) -> tuple[str, Any] | None:
    """`None` for the default row, else `(setting, value)`; a clear error for anything else."""
    if not spec.strip():
        return None
    setting, _, value = spec.partition("=")
    setting = setting.strip()
    if setting not in SETTINGS or not value.strip():
        raise ValueError(
            f"`variants` entries are '' or `setting=value` with setting in {sorted(SETTINGS)}; got {spec!r}."
        )
    try:
        parsed = SETTINGS[setting](value.strip())
    except ValueError:
        raise ValueError(f"`{setting}` in variant {spec!r} must be {KINDS[SETTINGS[setting]]}.") from None
    if setting == "reads" and parsed not in CONTEXT_READS:
        raise ValueError(f"`reads` must be one of {CONTEXT_READS}, got {parsed!r}.")
    return setting, parsed


def study(config: FitStudyConfig) -> dict[str, Any]:
    start = time.perf_counter()
    model, tokenizer, splits = study_inputs(config)
    features = {name: backbone_features(model, tokenizer, split, (), CONTEXT_READS) for name, split in splits.items()}
    unembedding = model.get_output_embeddings().weight.detach().float()
    runs = []
    for spec in config.variants:
        variant, settings, columns = parse_variant(spec), config, []
        if variant is not None and variant[0] == "reads":
            columns = [CONTEXT_READS.index(variant[1])]
        elif variant is not None:
            settings = dataclasses.replace(config, **{variant[0]: variant[1]})
        name = spec.strip() or "default (1 epoch, no regularizer, reads h_t)"
        for seed in config.seeds:
            head = train_head(features["train"], settings, columns, seed, unembedding, None)
            runs.append(
                {
                    "variant": name,
                    "seed": seed,
                    "trainable": sum(p.numel() for p in head.parameters()),
                    "train": score(head, features["train"], config, columns, unembedding),
                    "validation": score(head, features["validation"], config, columns, unembedding),
                }
            )
            print(f"[{time.perf_counter() - start:6.0f}s] {name}, seed {seed}", flush=True)
    on_train = [{**run, "validation": run["train"]} for run in runs]  # `summarize` reads the "validation" rows
    return {
        "config": asdict(config),
        "pairs": {name: len(split) for name, split in splits.items()},
        "runs": runs,
        "summary": {"train": summarize(on_train, config.alphas), "validation": summarize(runs, config.alphas)},
        "wall_time_s": time.perf_counter() - start,
    }


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    columns = {"variant": lambda row: row["variant"]}
    lines = [
        f"## Fit study: {config['model']} on HH-RLHF",
        "",
        f"{results['pairs']['train']} training pairs (batch {config['batch_size']}, learning rate "
        f"{config['learning_rate']:g}, lambda_kl {config['lambda_kl']:g}, lambda_l2 {config['lambda_l2']:g}, "
        f"one epoch unless the variant says otherwise), {results['pairs']['validation']} validation pairs; seeds "
        f"{config['seeds']}, means over seeds (± the seeds' standard error of the win rate). KL: mean over the "
        "completion tokens of KL(p_final || p_base), teacher-forced.",
    ]
    for split in ("train", "validation"):
        pairs = results["pairs"][split]
        lines += ["", f"### Scored on the {pairs} {split} pairs", ""]
        lines += seed_table(results["summary"][split], config["alphas"], columns)
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(FitStudyConfig, study, report, "fit_study")


if __name__ == "__main__":
    main()
