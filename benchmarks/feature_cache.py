"""Training at the floor: cached backbone features and the target KL, on the real model of the real-data benchmark.

The real-data benchmark's model and HH-RLHF train split (`benchmarks/real_data/benchmark.py`), 3 epochs, batch 8, beta
0.1, each run in its own spawned process, its clock running from the trainer's construction (tokenization, and for the
cached runs the backbone pass that fills the cache, into an empty cache directory) to the end of `train()`:

- `iav`: IAVTrainer, frozen backbone, the default head, the backbone run every step;
- `iav_cached`: the same with `precompute_backbone_features=True` (one backbone pass, then 3 epochs from the cache);
- `dpo_lora`: DPOTrainer + LoRA r=16 on all linear layers, for 3 epochs (about 40 minutes; `--variants` without it
  skips it);
- `iav_target_kl`: `iav_cached` with `target_kl` set: the KL per token at alpha 1 it reaches on the held-out
  prompts, sampled (`benchmarks.real_data.methods.sample_kl`, exact decoding distributions) and teacher-forced on the
  held-out pairs, against the target;
- `iav_sweep4`: `iav_cached` with a 4-value `lambda_kl_sweep` (4 heads from the one pass), against `iav_cached`;
- `iav_sweep4_uncached`: `iav` with the same sweep (4 heads from one backbone pass per step), against `iav`.

Writes `feature_cache.json` and `feature_cache.md` into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.feature_cache [--variants iav_target_kl ...]
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import Dataset

from benchmarks.alignment.benchmark import iav_decoder
from benchmarks.real_data.benchmark import RealDataConfig, load_pairs, report_main, split_pairs
from benchmarks.real_data.methods import (
    build_trainer,
    feature_cache_in,
    heldout_metrics,
    iav_scorer,
    load_model,
    load_trained,
    quiet,
    sample_kl,
)
from iav_trl.models.base_models import load_base_tokenizer

VARIANTS = ("iav", "iav_cached", "dpo_lora", "iav_target_kl", "iav_sweep4", "iav_sweep4_uncached")
TIME_VS_UNCACHED, TIME_VS_DPO, KL_TOLERANCE, SWEEP_VS_SINGLE = 0.6, 0.12, 0.2, 1.5  # the bars
SWEEP = [0.1, 0.3, 1.0, 3.0]


@dataclass
class FeatureCacheConfig(RealDataConfig):
    """The real-data benchmark's model, its first edition's data and split sizes (the HH-RLHF harmless sample:
    128 / 64 / 256 pairs); 3 epochs."""

    hh_rlhf: list[str] = field(
        default_factory=lambda: ["examples/data/harmless-base-test-1500.jsonl.gz"],
        metadata={"help": "HH-RLHF data files (Anthropic/hh-rlhf schema); a relative path is from the repo root."},
    )
    num_train: int = field(default=128, metadata={"help": "Training pairs."})
    num_validation: int = field(default=64, metadata={"help": "Validation pairs."})
    num_heldout: int = field(default=256, metadata={"help": "Held-out pairs."})

    epochs: float = field(default=3.0, metadata={"help": "Epochs over the training pairs."})
    iav_learning_rate: float = field(default=3e-3, metadata={"help": "IAV's learning rate (the design study's)."})
    dpo_learning_rate: float = field(default=1e-3, metadata={"help": "DPO + LoRA's learning rate."})
    target_kl: float = field(default=0.05, metadata={"help": "`target_kl` of the `iav_target_kl` run."})
    kl_prompts: int = field(
        default=32,
        metadata={"help": "Held-out prompts of the target-KL check (8 prompts put the estimate within about 25%)."},
    )
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS),
        metadata={"help": f"Runs to make, among {VARIANTS} (`iav` and `iav_cached` always run)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose among {VARIANTS}.")
        self.variants = [v for v in VARIANTS if v in {"iav", "iav_cached", *self.variants}]


def timed_run(config: FeatureCacheConfig, variant: str, train: Dataset, save_dir: str) -> dict:
    """One variant's training (no evaluation set), timed from the trainer's construction to the end of `train()`;
    saves the result."""
    quiet()
    tokenizer = load_base_tokenizer(config.model)
    method = "dpo_lora" if variant == "dpo_lora" else "iav"
    settings = {}
    if variant in ("iav_cached", "iav_target_kl", "iav_sweep4"):
        settings["precompute_backbone_features"] = True
    if variant == "iav_target_kl":
        settings["target_kl"] = config.target_kl
    if variant in ("iav_sweep4", "iav_sweep4_uncached"):
        settings["lambda_kl_sweep"] = SWEEP
    learning_rate = config.dpo_learning_rate if method == "dpo_lora" else config.iav_learning_rate
    model = load_model(config.model)
    with tempfile.TemporaryDirectory(prefix="feature-cache-") as work, feature_cache_in(os.path.join(work, "cache")):
        start = time.perf_counter()  # into an empty cache: the pass is timed
        trainer = build_trainer(
            method, model, tokenizer, train, None, config, os.path.join(work, "out"), learning_rate,
            iav_settings=settings,
        )  # fmt: skip
        construction = time.perf_counter() - start
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(save_dir)
    run = {
        "variant": variant,
        "learning_rate": learning_rate,
        "steps": trainer.state.global_step,
        "construction_seconds": construction,
        "total_seconds": seconds,
    }
    if trainer.__dict__.get("kl_controller") is not None:
        run["final_lambda_kl"] = trainer.kl_controller.value
        # logging_strategy "no": the one log entry, at the end of `train()`, averages the whole run
        (run["train_kl_mean"],) = [e["iav/kl"] for e in trainer.state.log_history if "iav/kl" in e]
    return run


def isolated(*args: Any) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(timed_run, *args).result()


def target_kl_check(config: FeatureCacheConfig, save_dir: str, heldout: Dataset) -> dict:
    """The head trained with `target_kl`: KL per token at alpha 1 on held-out prompts (sampled) and pairs."""
    tokenizer = load_base_tokenizer(config.model)
    model = load_trained("iav", save_dir, load_model(config.model))
    prompts = [row["prompt"] for row in heldout.select(range(min(config.kl_prompts, len(heldout))))]
    sampled = sample_kl(
        iav_decoder(model, 1.0), iav_scorer(model, 1.0), tokenizer, prompts,
        config.kl_samples, config.kl_new_tokens, config.sample_batch_size, config.seed,
    )  # fmt: skip
    (pairs,) = heldout_metrics("iav", model, tokenizer, heldout, config, (1.0,))
    return {
        "target_kl": config.target_kl,
        "sampled": sampled,
        "teacher_forced_on_heldout_pairs": pairs["completion_kl"],
        "sampled_within_tolerance": abs(sampled["kl_per_token"] / config.target_kl - 1) <= KL_TOLERANCE,
        "teacher_forced_within_tolerance": abs(pairs["completion_kl"] / config.target_kl - 1) <= KL_TOLERANCE,
    }


def benchmark(config: FeatureCacheConfig) -> dict:
    start = time.perf_counter()
    tokenizer = load_base_tokenizer(config.model)
    pairs, _ = load_pairs(config.data_paths("hh_rlhf"), tokenizer, config.max_length)
    splits = split_pairs(pairs, config)
    run = isolated if config.isolate_training else timed_run
    runs = {}
    with tempfile.TemporaryDirectory(prefix="feature-cache-results-") as work:
        for variant in config.variants:
            save_dir = os.path.join(work, variant)
            runs[variant] = run(config, variant, splits["train"], save_dir)
            seconds = runs[variant]["total_seconds"]
            print(f"[{time.perf_counter() - start:6.0f}s] {variant}: {seconds:.0f}s", flush=True)
        kl = None
        if "iav_target_kl" in runs:
            kl = target_kl_check(config, os.path.join(work, "iav_target_kl"), splits["heldout"])
    cached, plain = runs["iav_cached"]["total_seconds"], runs["iav"]["total_seconds"]
    bar = {"cached_vs_uncached": {"ratio": cached / plain, "passed": cached / plain <= TIME_VS_UNCACHED}}
    if "dpo_lora" in runs:
        ratio = cached / runs["dpo_lora"]["total_seconds"]
        bar["cached_vs_dpo_lora"] = {"ratio": ratio, "passed": ratio <= TIME_VS_DPO}
    if kl is not None:
        bar["target_kl_sampled_within_20_percent"] = {"passed": kl["sampled_within_tolerance"]}
    if "iav_sweep4" in runs:
        sweep = runs["iav_sweep4"]["total_seconds"] / cached
        bar["sweep4_vs_single_head"] = {"ratio": sweep, "passed": sweep <= SWEEP_VS_SINGLE}
    if "iav_sweep4_uncached" in runs:
        sweep = runs["iav_sweep4_uncached"]["total_seconds"] / plain
        bar["sweep4_uncached_vs_single_head_uncached"] = {"ratio": sweep, "passed": sweep <= SWEEP_VS_SINGLE}
    return {
        "config": asdict(config),
        "environment": {"threads": torch.get_num_threads(), "python": platform.python_version()},
        "pairs": {"train": len(splits["train"]), "heldout": len(splits["heldout"])},
        "runs": runs,
        "target_kl": kl,
        "bar": bar,
        "wall_time_s": time.perf_counter() - start,
    }


def markdown(results: dict) -> str:
    runs, config = results["runs"], results["config"]
    plain = runs["iav"]["total_seconds"]
    lines = [
        f"## Cached backbone features: {config['model']}, HH-RLHF, {config['epochs']:g} epochs",
        "",
        f"{results['pairs']['train']} training pairs, batch {config['batch_size']}; CPU, "
        f"{results['environment']['threads']} threads, fp32; {results['wall_time_s'] / 60:.0f} minutes in all. Time: "
        "from the trainer's construction (tokenization, the feature pass into an empty cache) to the end of "
        "`train()`, each run in its own process.",
        "",
        "| run | steps | construction (s) | total (s) | vs IAV without cache | vs DPO + LoRA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    dpo = runs.get("dpo_lora", {}).get("total_seconds")
    for variant, run in runs.items():
        versus_dpo = f"{run['total_seconds'] / dpo:.3f}x" if dpo else "-"
        lines.append(
            f"| {variant} | {run['steps']} | {run['construction_seconds']:.0f} | {run['total_seconds']:.0f} "
            f"| {run['total_seconds'] / plain:.3f}x | {versus_dpo} |"
        )
    kl = results["target_kl"]
    if kl is not None:
        lines += [
            "",
            f"Target KL {kl['target_kl']:g} per token: sampled at alpha 1 ({kl['sampled']['responses']} responses to "
            f"{config['kl_prompts']} held-out prompts) "
            f"{kl['sampled']['kl_per_token']:.4f} ± {kl['sampled']['kl_per_token_stderr']:.4f} (stepwise "
            f"{kl['sampled']['stepwise_kl_per_token']:.4f}); teacher-forced on the held-out pairs "
            f"{kl['teacher_forced_on_heldout_pairs']:.4f}; final lambda_kl "
            f"{runs['iav_target_kl']['final_lambda_kl']:.4g}.",
        ]
    lines += ["", "| bar | figure | passed |", "| --- | --- | --- |"]
    for name, check in results["bar"].items():
        figure = f"{check['ratio']:.3f}x" if "ratio" in check else f"{kl['sampled']['kl_per_token']:.4f}"
        lines.append(f"| {name} | {figure} | {check['passed']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(FeatureCacheConfig, benchmark, markdown, "feature_cache")


if __name__ == "__main__":
    main()
