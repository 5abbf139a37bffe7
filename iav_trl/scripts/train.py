"""`iav-trl train`: TRL's `dpo.py` script with `IAVTrainer`, and the datasets every command reads."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from trl import ModelConfig, get_peft_config

from iav_trl.data import build_dataset_mixture, load_preference_dataset
from iav_trl.scripts.args import IAVScriptArguments
from iav_trl.scripts.models import (
    TINY_BASE_DIR,
    build_tiny_base,
    check_model_sizes,
    is_tiny,
    model_init_kwargs,
    quantization_config,
)
from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.trainer.iav_trainer import IAVTrainer


def load_splits(script_args: IAVScriptArguments, splits: Sequence[str]) -> dict[str, Dataset]:
    """
    The `splits` (`"train"`, `"test"`) of the script's dataset, in TRL's preference format.

    `dataset_mixture` is built with `build_dataset_mixture`: its `test_split_size` holds out the test split, or,
    without one, the mixture is built a second time from `dataset_test_split`. `dataset_name` is read with
    `load_preference_dataset` from `dataset_train_split` / `dataset_test_split`.
    """
    names = {"train": script_args.dataset_train_split, "test": script_args.dataset_test_split}
    mixture = script_args.dataset_mixture
    if mixture is not None:
        if script_args.dataset_name is not None:
            raise ValueError(
                f"Both dataset_name ({script_args.dataset_name!r}) and dataset_mixture are set: keep one (add the "
                "dataset to the mixture's `datasets`)."
            )
        if isinstance(mixture, dict) and mixture.get("test_split_size") is not None:
            held_out: DatasetDict = build_dataset_mixture(mixture, split=names["train"])
            return {split: held_out[split] for split in splits}
        return {split: build_dataset_mixture(mixture, split=names[split]) for split in splits}
    name = script_args.dataset_name
    if name is None:
        raise ValueError("No dataset: pass --dataset_name (a Hub id or a local file), or a dataset_mixture.")
    if "test" in splits and os.path.isfile(name):
        raise ValueError(
            f"{name} is a single file, which has no test split. Hold one out with a dataset_mixture "
            f"({{'datasets': [{{'id': '{name}'}}], 'test_split_size': 0.05}}), or use a directory with train and test "
            "files."
        )
    return {
        split: load_preference_dataset(
            name, split=names[split], config=script_args.dataset_config, schema=script_args.dataset_schema
        )
        for split in splits
    }


def train(script_args: IAVScriptArguments, training_args: IAVConfig, model_args: ModelConfig) -> IAVTrainer:
    """Train an alignment head as the arguments say and save it (and push it) to `training_args.output_dir`."""
    if model_args.model_name_or_path is None:
        raise ValueError(
            "No base model: pass --model_name_or_path (a Hub id, a local folder, a GGUF file or `tiny:llama`), or "
            "--config with a recipe from recipes/."
        )
    quantization = quantization_config(model_args)  # fails early without bitsandbytes
    needs_test = training_args.eval_strategy != "no"
    datasets = load_splits(script_args, ["train", "test"] if needs_test else ["train"])
    model_id = model_args.model_name_or_path
    if is_tiny(model_id):
        with PartialState().main_process_first():  # one process builds it, the others load it
            path = os.path.abspath(os.path.join(training_args.output_dir, TINY_BASE_DIR))
            model_id = build_tiny_base(model_id, datasets["train"], path)
    training_args.model_init_kwargs = {
        **model_init_kwargs(model_args, quantization),
        **(training_args.model_init_kwargs or {}),
    }

    trainer = IAVTrainer(
        model_id,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("test"),
        quantization_config=quantization,
        peft_config=get_peft_config(model_args),
    )
    check_model_sizes(trainer.model, model_args)  # the recipe's model.vocab_size / hidden_size, before training
    if script_args.ignore_bias_buffers:  # TRL's DDP workaround for boolean buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Alignment head saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Alignment head pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # Under `accelerate launch`, end the process group on every rank once all are done (trackers too): a process
    # exiting with a live gloo/NCCL group (or DeepSpeed communicator) can abort in C++ at interpreter shutdown.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer
