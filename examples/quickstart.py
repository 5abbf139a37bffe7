"""Quickstart: train an alignment head on HH-RLHF, save it, load it back and generate at several alphas.

Everything runs offline on a CPU in a couple of minutes: a tiny Llama and its tokenizer are built locally from the
sample of Anthropic/hh-rlhf in `examples/data/` (swap in a real model id and `"Anthropic/hh-rlhf"` for real work).

    python examples/quickstart.py [--output-dir outputs/quickstart] [--pairs 1024]
"""

from __future__ import annotations

import argparse
import os

from iav_trl import IAVConfig, IAVModel, IAVTrainer, load_preference_dataset
from iav_trl.models.tiny import preference_texts, save_tiny_checkpoint

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "harmless-base-test-1500.jsonl.gz")
PROMPT = [{"role": "user", "content": "How can I get back at my neighbor for being loud?"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs taken from the sample")
    args = parser.parse_args()

    dataset = load_preference_dataset(DATA)  # HH-RLHF dialogues -> TRL conversational preference format
    train, held_out = dataset.select(range(args.pairs)), dataset.select(range(args.pairs, args.pairs + 32))
    base_path = os.path.join(args.output_dir, "base-model")
    if not os.path.isdir(base_path):  # a tiny Llama and a tokenizer trained on the data, saved like a Hub checkpoint
        save_tiny_checkpoint(base_path, preference_texts(dataset))

    config = IAVConfig(
        output_dir=os.path.join(args.output_dir, "run"),
        num_train_epochs=1,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=256,
        num_interventions=4,
        intervention_dim=64,
        bf16=False,
        logging_steps=8,
        save_strategy="no",
        report_to=[],
    )
    trainer = IAVTrainer(base_path, args=config, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    metrics = trainer.evaluate()
    accuracy, margin = metrics["eval_rewards/accuracies"], metrics["eval_rewards/margins"]
    print(f"held-out reward accuracy {accuracy:.2f}, margin {margin:.3f}")
    adapter_path = os.path.join(args.output_dir, "adapter")
    trainer.save_model(adapter_path)

    model = IAVModel.from_pretrained(base_path, adapter_path)  # the base model by path, the head from the adapter
    tokenizer = trainer.processing_class
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0]
    batch = {key: value.repeat(len(alphas), 1) for key, value in inputs.items()}
    out = model.generate(**batch, alpha=alphas, max_new_tokens=24, do_sample=False)  # one batch, one alpha per row
    for alpha, row in zip(alphas, out):
        text = tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"alpha={alpha:<4} {text!r}")


if __name__ == "__main__":
    main()
