"""Evaluate an alignment head across alphas: reward, KL, decoding cost against GenARM, controllability, the head's
vectors, plots, and an AlpacaEval export.

By default everything runs offline on a CPU: a tiny Llama and its tokenizer are built locally from the HH-RLHF sample
in `examples/data/`, with a randomly initialised head so that the alphas decode differently (its text is noise).
For real work pass a base model and a trained head:

    python examples/evaluate.py [--output-dir outputs/evaluate] [--prompts 16] [--max-new-tokens 32]
    python examples/evaluate.py --model Qwen/Qwen2.5-0.5B-Instruct --adapter path/to/head

Needs the `eval` extra for its plots (matplotlib): pip install -e ".[eval]".
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iav_trl import (
    AlignmentHeadConfig,
    EvaluationConfig,
    IAVEvaluator,
    IAVModel,
    get_iav_model,
    load_preference_dataset,
)
from iav_trl.models.tiny import tiny_causal_lm, train_tokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "harmless-base-test-1500.jsonl.gz")


def distinct_words(prompts, completions, **kwargs):
    """A programmatic reward (distinct words per word), a stand-in for a reward model."""
    return [len(set(c.split())) / (1 + len(c.split())) for c in completions]


def tiny_model_and_tokenizer(dataset):
    """A tiny Llama with a tokenizer trained on the sample, and a head with random weights."""
    texts = [m["content"] for row in dataset for m in row["prompt"] + row["chosen"]]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = get_iav_model(
        tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64),
        AlignmentHeadConfig(num_interventions=4, intervention_dim=16),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.alignment_heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model, tokenizer


def check_requirements() -> None:
    """Fail at start, not after the evaluation, when the plots' matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "examples/evaluate.py plots its results with matplotlib, which is not installed: run `pip install "
            '-e ".[eval]"` from the repository (or `pip install matplotlib`).'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/evaluate")
    parser.add_argument("--model", default=None, help="base model id or path (default: a tiny local Llama)")
    parser.add_argument("--adapter", default=None, help="trained alignment head (with --model)")
    parser.add_argument("--prompts", type=int, default=16, help="evaluation prompts taken from the sample")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the cost comparison")
    args = parser.parse_args()
    check_requirements()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dataset = load_preference_dataset(DATA)  # HH-RLHF dialogues -> TRL conversational format
    prompts = [row["prompt"] for row in dataset.select(range(args.prompts))]  # conversations ending on a user turn
    if args.model is None:
        model, tokenizer = tiny_model_and_tokenizer(dataset)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), args.adapter)

    config = EvaluationConfig(
        alphas=[0.0, 0.5, 1.0, 1.5, 2.0],
        max_new_tokens=args.max_new_tokens,
        num_samples=2,
        temperature=1.0,
        efficiency_rounds=args.rounds,
    )
    evaluator = IAVEvaluator(model, tokenizer, config)
    evaluator.evaluate_performance(prompts, reward_fn=distinct_words)  # or reward_model=<a sequence classifier>
    evaluator.evaluate_efficiency(prompts[:4])  # base vs IAV vs GenARM (base + a same-size reward LM)
    evaluator.analyze_alignment_vectors(prompts)
    evaluator.evaluate_controllability(prompts, reward_fn=distinct_words)  # or refusal_fn=<a classifier>
    evaluator.save_results(os.path.join(args.output_dir, "results.json"))
    evaluator.plot_results(out_dir=os.path.join(args.output_dir, "plots"))
    evaluator.export_alpaca_eval(os.path.join(args.output_dir, "alpaca_eval", "model_outputs.json"), alpha=1.0)
    print(f"results, plots and AlpacaEval outputs written to {args.output_dir}")


if __name__ == "__main__":
    main()
