"""
Train an alignment head for a few steps on every process of an `accelerate launch` run, and record what this process
saw. Launched by `tests/test_distributed.py`:

    accelerate launch --config_file accelerate_configs/<x>.yaml tests/scripts/train_head.py \
        --model_dir <tiny model + tokenizer> --output_dir <adapter dir> --facts_dir <dir> \
        [--precompute_backbone_features]

Each rank writes `<facts_dir>/rank<i>.json` (world size, the wrapper around the model, the distributed type, the
decoded rows its backbone ran on, the files it wrote under `output_dir`, ...) and `<facts_dir>/rank<i>.safetensors`
(its head parameters after training, gathered first under ZeRO-3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from iav_trl import IAVConfig, IAVTrainer

NUM_PROMPTS = 8  # per_device_train_batch_size 2 x 2 processes x 2 steps: one epoch, every prompt seen once


def preference_rows(n: int) -> Dataset:
    """Prompts numbered 0..n-1, so that each row a process sees names the prompt it came from."""
    return Dataset.from_list(
        [
            {
                "prompt": f"Human: question number {i}, how do I bake bread? Assistant:",
                "chosen": " Sure! Mix flour, water, salt and yeast.",
                "rejected": " I am sorry, but I cannot help.",
            }
            for i in range(n)
        ]
    )


def record_writes(root: str, written: list[str]) -> None:
    """Append to `written` every file under `root` this process opens for writing or renames into place."""
    root = os.path.realpath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR)
            )
        elif event == "os.rename":
            path, writing = args[1], True
        else:
            return
        path = os.path.realpath(os.fsdecode(path))
        if writing and path.startswith(root + os.sep):
            written.append(os.path.relpath(path, root))

    sys.addaudithook(hook)


def gathered(params: list[torch.nn.Parameter]):
    """Under DeepSpeed ZeRO-3 each process holds a slice of every parameter: gather the full tensors."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--facts_dir", required=True)
    parser.add_argument("--precompute_backbone_features", action="store_true")
    cli = parser.parse_args()

    # The config comes first: under ZeRO-3 with `zero3_init_flag` it makes `from_pretrained` partition the weights.
    args = IAVConfig(
        output_dir=cli.output_dir,
        per_device_train_batch_size=2,
        max_steps=NUM_PROMPTS // 4,
        learning_rate=1e-2,
        num_interventions=3,
        intervention_dim=8,
        ddp_backend="gloo",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        seed=0,
        bf16=False,
        precompute_backbone_features=cli.precompute_backbone_features,
    )
    plugin = args.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        # ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` (1e5 elements) whole on every process,
        # which is every parameter of a tiny model: partition them all, as a real model's large weights are.
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        plugin.set_deepspeed_weakref()
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir)
    loaded_partitioned = hasattr(model.get_output_embeddings().weight, "ds_id")
    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    trainer = IAVTrainer(model, args=args, train_dataset=preference_rows(NUM_PROMPTS), processing_class=tokenizer)

    rows: list[str] = []

    def record_rows(module, positional, kwargs):
        input_ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
        rows.extend(tokenizer.decode(ids[keep]) for ids, keep in zip(input_ids, mask))

    trainer.model.get_base_model().base_model.register_forward_pre_hook(record_rows, with_kwargs=True)
    written: list[str] = []
    record_writes(cli.output_dir, written)
    trainer.train()
    trainer.save_model()

    head_params = dict(trainer.model.alignment_heads["default"].named_parameters())
    partitioned = [name for name, p in head_params.items() if p.numel() != getattr(p, "ds_numel", p.numel())]
    with gathered(list(head_params.values())):
        head = {name: p.detach().to("cpu").clone() for name, p in head_params.items()}
    rank = dist.get_rank()
    os.makedirs(cli.facts_dir, exist_ok=True)
    try:  # outside a gather, a ZeRO-3 process holds only slices of the head: saving them must fail loudly
        trainer.model.save_pretrained(os.path.join(cli.facts_dir, f"direct-save-rank{rank}"))
        direct_save_error = None
    except ValueError as err:
        direct_save_error = str(err)
    facts = {
        "world_size": dist.get_world_size(),
        "rank": rank,
        "backend": dist.get_backend(),
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "wrapper": f"{type(trainer.model_wrapped).__module__}.{type(trainer.model_wrapped).__name__}",
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "loaded_partitioned": loaded_partitioned,
        "head_partitioned": partitioned,
        "rows": rows,
        "global_step": trainer.state.global_step,
        "written": written,
        "direct_save_error": direct_save_error,
    }
    save_file(head, os.path.join(cli.facts_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(cli.facts_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(facts, fh, indent=1)
    # Tear the process group down on every rank once all are done: a process that exits with its gloo group (and
    # DeepSpeed's communicator) still alive can abort in C++ at interpreter shutdown ("terminate called without an
    # active exception"), which made the ZeRO-3 launch fail about once in four runs.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
