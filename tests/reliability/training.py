"""A tiny, deterministic IAV training run, shared by the reliability tests and by the script they kill."""

from datasets import Dataset

from iav_trl import IAVConfig, IAVTrainer
from iav_trl.tiny import tiny_causal_lm

HEAD = dict(num_interventions=3, intervention_dim=8)


def preference_data(n: int, offset: int = 0) -> Dataset:
    """Pairs with a clear signal: the chosen answer helps, the rejected one refuses."""
    return Dataset.from_list(
        [
            {
                "prompt": f"Human: question number {i + offset}, how do I bake bread? Assistant:",
                "chosen": " Sure! Mix flour, water, salt and yeast.",
                "rejected": " I am sorry, but I cannot help.",
            }
            for i in range(n)
        ]
    )


def make_trainer(
    output_dir,
    tokenizer,
    *,
    train_dataset=None,
    eval_dataset=None,
    model=None,
    trainer_class=IAVTrainer,
    trainer_kwargs=None,
    **config,
):
    """An `IAVTrainer` on a tiny Llama (the same weights in every process), logging every step, on CPU in fp32."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **HEAD,
    )
    settings.update(config)
    return trainer_class(
        model if model is not None else tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=IAVConfig(**settings),
        train_dataset=train_dataset if train_dataset is not None else preference_data(12),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )


def logged(trainer, key: str = "loss") -> list[tuple[int, float]]:
    """`(step, value)` of every training log holding `key`."""
    return [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]


def checkpoints(output_dir) -> list[str]:
    return sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint-"))
