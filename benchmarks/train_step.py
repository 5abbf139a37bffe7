"""Training step time and peak memory of IAV against DPO with LoRA and full DPO, side by side in one run.

Three variants train the same model shape on the same batches, each with its own real `trainer.train()`:

- `iav`: `IAVTrainer`, frozen backbone, default alignment head (`num_interventions=8`, `intervention_dim=256`); the
  reference is `z_base` of the policy's own forward pass;
- `dpo_lora`: `trl.DPOTrainer` with `LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")`; the reference
  is a second, gradient-free pass with the adapters disabled;
- `dpo_full`: `trl.DPOTrainer` full fine-tuning; the reference is a frozen copy of the model.

Model: a Llama of hidden 512 / 8 layers / 8 heads / intermediate 1376 / vocab 32000 (~58M parameters, random weights
from `LlamaConfig`: speed and memory do not depend on them). Data: 4 preference pairs per step, each sequence a
64-token prompt plus a 64-token completion (the last completion token is EOS), from a tokenizer built locally with
`iav_trl.models.tiny.train_tokenizer`; the lengths are checked on the trainer's tokenized dataset and collated batch.
All variants use `per_device_train_batch_size=4`, `gradient_accumulation_steps=1`, fp32 (`bf16=False`),
`gradient_checkpointing=False`, the same learning rate, AdamW, no logging and no saving.

How it is measured:

- step time: a `TrainerCallback` times `on_step_begin` -> `on_step_end` (forward, backward, gradient clipping,
  optimizer step; the batch is fetched before `on_step_begin`). `max_steps = warmup + steps`; the first `warmup`
  steps are dropped and the median of the rest is the variant's step time in that round;
- memory: each variant runs in its own subprocess. Right before `trainer.train()` (model, reference and trainer
  built, `gc.collect()` and `malloc_trim(0)` done) the current RSS is read and the kernel's peak-RSS mark is reset
  (`/proc/self/clear_refs`), so the peak RSS (`VmHWM`) after training is the peak during training. "train peak" is
  that peak minus the RSS before training: activations, gradients, optimizer state and the step's temporaries, but
  not the weights (nor `dpo_full`'s reference copy), which "abs peak" (the process's overall peak RSS) includes;
- rounds: the whole set of variants runs `--rounds` times, interleaved; ratios are the median over rounds of the
  per-round ratio, so load on a shared machine that drifts between rounds cancels out.

Usage: OMP_NUM_THREADS=2 python -m benchmarks.train_step [--rounds 2] [--steps 6] [--json out.json]
       (smoke test: --hidden 64 --layers 2 --heads 4 --intermediate 128 --vocab 1024 --steps 2 --warmup 1 --rounds 1)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "iav": "IAVTrainer (frozen backbone, head K=8 r=256)",
    "dpo_lora": "DPOTrainer + LoRA r=16 all-linear",
    "dpo_full": "DPOTrainer full fine-tuning",
}
SHAPE_FLAGS = ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "prompt_tokens", "completion_tokens")
TRAIN_FLAGS = ("steps", "warmup", "lr")


# ---------------------------------------------------------------------------------------------------------------------
# Data: sequences of pseudo-words that are one token each, so a prompt of n words is exactly n tokens.


def build_data(args, out_dir: str) -> None:
    """Train the tokenizer and write `(batch * (warmup + steps))` preference pairs of the exact token lengths."""
    from iav_trl.models.tiny import train_tokenizer

    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(120)})
    corpus = [" ".join(rng.choice(words) for _ in range(32)) for _ in range(2000)]
    tokenizer = train_tokenizer(corpus, vocab_size=min(1024, args.vocab))
    # Keep the words that are a single token after a space (the byte-level pre-tokenizer splits before each space).
    single = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(single) < 16:
        raise RuntimeError(f"Only {len(single)} single-token words; raise the tokenizer's vocab_size.")

    def text(n: int) -> str:
        return "".join(" " + rng.choice(single) for _ in range(n))

    eos = tokenizer.eos_token
    n_pairs = args.batch * (args.warmup + args.steps)
    pairs = [
        {
            "prompt": text(args.prompt_tokens),
            # TRL appends EOS to a completion that lacks it; it is part of the completion's token count here.
            "chosen": text(args.completion_tokens - 1) + eos,
            "rejected": text(args.completion_tokens - 1) + eos,
        }
        for _ in range(n_pairs)
    ]
    for pair in pairs[:2]:
        for key, n in (("prompt", args.prompt_tokens), ("chosen", args.completion_tokens)):
            got = len(tokenizer(pair[key], add_special_tokens=False)["input_ids"])
            assert got == n, f"{key} tokenizes to {got} tokens, expected {n}"
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    with open(os.path.join(out_dir, "pairs.json"), "w") as fh:
        json.dump(pairs, fh)


# ---------------------------------------------------------------------------------------------------------------------
# One variant, in its own process.


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """
    The process's peak RSS (MB): `VmHWM` of `/proc/self/status`, the high-water mark of this process's own memory.
    Not `getrusage`'s `ru_maxrss`: in a process started by fork + exec (a spawned worker, a subprocess), that is at
    least the parent's RSS at the fork, because the kernel keeps the pre-exec copy's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def release_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS, so the baseline RSS holds only what is alive
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (`VmHWM`) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_variant(name: str, args, data_dir: str) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from iav_trl import IAVConfig, IAVTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    with open(os.path.join(data_dir, "pairs.json")) as fh:
        dataset = Dataset.from_list(json.load(fh))
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    seq_len = args.prompt_tokens + args.completion_tokens
    output_dir = tempfile.mkdtemp(prefix=f"train_step_{name}_")
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        bf16=False,
        gradient_checkpointing=False,
        max_length=seq_len,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    timer = StepTimer()
    if name == "iav":
        trainer = IAVTrainer(
            model, args=IAVConfig(**common), train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
    elif name == "dpo_lora":
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = DPOTrainer(
            model,
            args=DPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
    elif name == "dpo_full":
        # A model built from a config has no path DPOTrainer could reload its reference from, so the reference is
        # passed in: the same frozen copy DPOTrainer would otherwise load.
        ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        trainer = DPOTrainer(
            model,
            ref_model=ref_model,
            args=DPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        del ref_model
    else:
        raise ValueError(f"Unknown variant {name!r}; choose from {sorted(VARIANTS)}.")

    # The batches every variant sees: exactly `prompt_tokens` + `completion_tokens`, nothing truncated or padded.
    first = trainer.train_dataset[0]
    lengths = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
    assert lengths == (args.prompt_tokens, args.completion_tokens, args.completion_tokens), lengths
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    assert tuple(batch["input_ids"].shape) == (2 * args.batch, seq_len), tuple(batch["input_ids"].shape)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    construction_peak = maxrss_mb()
    release_memory()
    before = rss_mb()
    peak_reset = reset_peak_rss()
    trainer.train()
    train_peak = maxrss_mb()
    measured = timer.times[args.warmup :]
    return {
        "variant": name,
        "params": n_params,
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
        "step_times_s": timer.times,
        "median_step_s": statistics.median(measured),
        "rss_before_train_mb": before,
        "peak_reset": peak_reset,
        "train_peak_mb": train_peak - before,
        "abs_peak_mb": max(construction_peak, train_peak),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Driver: rounds of subprocesses, then the table.


def flags(args, names) -> list[str]:
    out = []
    for name in names:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lr", type=float, default=5e-5, help="the same for every variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_variant(args.worker, args, args.data_dir)
        with open(args.worker_out, "w") as fh:
            json.dump(result, fh)
        return

    runs = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="train_step_") as data_dir:
        build_data(args, data_dir)
        for round_ in range(args.rounds):
            for name in args.variants:
                out = os.path.join(data_dir, f"{name}_{round_}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data-dir", data_dir]
                cmd += ["--worker-out", out] + flags(args, SHAPE_FLAGS + TRAIN_FLAGS)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:  # show the worker's traceback, not just its exit status
                    print(proc.stdout[-4000:] + proc.stderr[-8000:], file=sys.stderr)
                    raise SystemExit(f"variant {name} failed (exit status {proc.returncode}) in round {round_ + 1}")
                with open(out) as fh:
                    runs[name].append(json.load(fh))
                row = runs[name][-1]
                print(
                    f"round {round_ + 1}/{args.rounds} {name}: {row['median_step_s']:.3f} s/step, "
                    f"train peak {row['train_peak_mb']:.0f} MB, abs peak {row['abs_peak_mb']:.0f} MB",
                    file=sys.stderr,
                )

    def ratio(name: str, base: str, key: str) -> float | None:
        if base not in runs:
            return None
        return statistics.median(v[key] / b[key] for v, b in zip(runs[name], runs[base]))

    first = next(iter(runs.values()))[0]
    results = {
        "threads": first["threads"],
        "params": first["params"],
        "shape": {name: getattr(args, name) for name in SHAPE_FLAGS},
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "lr": args.lr,
        "gradient_checkpointing": False,
        "dtype": "float32",
        "variants": {},
    }
    for name, rs in runs.items():
        results["variants"][name] = {
            "description": VARIANTS[name],
            "trainable_params": rs[0]["trainable_params"],
            "median_step_s": statistics.median(r["median_step_s"] for r in rs),
            "train_peak_mb": statistics.median(r["train_peak_mb"] for r in rs),
            "abs_peak_mb": statistics.median(r["abs_peak_mb"] for r in rs),
            "step_ratio_vs_dpo_lora": ratio(name, "dpo_lora", "median_step_s"),
            "memory_ratio_vs_dpo_lora": ratio(name, "dpo_lora", "train_peak_mb"),
            "step_ratio_vs_dpo_full": ratio(name, "dpo_full", "median_step_s"),
            "memory_ratio_vs_dpo_full": ratio(name, "dpo_full", "train_peak_mb"),
            "peak_reset": all(r["peak_reset"] for r in rs),
            "runs": rs,
        }

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}x"

    print(
        f"| variant | trainable params | median step s | step vs DPO+LoRA | step vs full DPO | train peak MB "
        f"| mem vs DPO+LoRA | mem vs full DPO | abs peak MB |  (cpu, {first['threads']} threads, fp32, "
        f"{first['params'] / 1e6:.1f}M params, {args.batch} pairs x {args.prompt_tokens}+{args.completion_tokens} "
        f"tokens, {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds)"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in results["variants"].values():
        print(
            f"| {row['description']} | {row['trainable_params'] / 1e6:.2f}M | {row['median_step_s']:.3f} "
            f"| {fmt(row['step_ratio_vs_dpo_lora'])} | {fmt(row['step_ratio_vs_dpo_full'])} "
            f"| {row['train_peak_mb']:.0f} | {fmt(row['memory_ratio_vs_dpo_lora'])} "
            f"| {fmt(row['memory_ratio_vs_dpo_full'])} | {row['abs_peak_mb']:.0f} |"
        )
    if not all(row["peak_reset"] for row in results["variants"].values()):
        print(
            "note: the peak-RSS mark could not be reset; train peak may include the construction peak.",
            file=sys.stderr,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
