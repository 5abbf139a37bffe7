"""`iav-trl generate` and `iav-trl eval`: a trained adapter at several alignment strengths.

`generate` decodes every prompt at every alpha in one batched `generate` (one alpha per row, see
`iav_trl.inference.iav_inference.IAVInference`), greedy unless `temperature > 0`.

`eval` scores the held-out split at each alpha with `IAVTrainer.evaluate_alphas`: DPO's implicit reward of the aligned
policy against the base model, `r(x, y) = beta * (log p_final(y | x) - log p_base(y | x))`, as reward accuracy (ties
count as losses, as TRL's), mean margin, win rate (ties count half: 0.5 at alpha 0, where every pair is a tie) and
the teacher-forced KL per completion token, every alpha from one backbone pass per batch (see
`iav_trl.trainer.preference_eval`). For a fully fine-tuned backbone, `log p_base` is the original base model's, so
alpha 0 measures the fine-tuning alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from transformers import set_seed
from trl import ModelConfig

from iav_trl.inference.iav_inference import IAVInference
from iav_trl.scripts.args import EvalArguments, GenerateArguments, IAVScriptArguments, ServeArguments
from iav_trl.scripts.models import load_adapter_for_inference
from iav_trl.scripts.train import load_splits
from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.trainer.iav_trainer import IAVTrainer
from iav_trl.utils.files import atomic_write_text

EVAL_RESULTS_NAME = "eval_results.json"
# The columns `eval` prints, from `IAVTrainer.evaluate_alphas`'s rows.
EVAL_COLUMNS = ("alpha", "accuracy", "margin", "chosen_reward", "rejected_reward", "loss", "ties", "win_rate", "kl")


def _write_json(path: str, data: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def format_generations(results: list[dict[str, Any]]) -> str:
    """One block per prompt, one line per alpha, the completions as JSON strings (newlines escaped)."""
    blocks: dict[str, list[str]] = {}
    for result in results:
        line = f"  alpha={result['alpha']:<5g} {json.dumps(result['completion'], ensure_ascii=False)}"
        blocks.setdefault(result["prompt"], []).append(line)
    return "\n\n".join(
        "\n".join([f"prompt: {json.dumps(prompt, ensure_ascii=False)}", *lines]) for prompt, lines in blocks.items()
    )


def generate(gen_args: GenerateArguments, model_args: ModelConfig) -> list[dict[str, Any]]:
    """Complete every prompt at every alpha in one batch; print and return `[{"prompt", "alpha", "completion"}]`."""
    loaded = load_adapter_for_inference(model_args, gen_args.adapter, gen_args.trust_remote_code)
    rows = [(prompt, float(alpha)) for prompt in gen_args.prompt for alpha in gen_args.alphas]
    sampling = {"top_p": gen_args.top_p} if gen_args.temperature > 0 else {}
    set_seed(gen_args.seed)
    completions = IAVInference(loaded.model, loaded.tokenizer).generate(
        [prompt for prompt, _ in rows],
        alpha=[alpha for _, alpha in rows],
        max_length=gen_args.generation_max_length,
        max_new_tokens=None if gen_args.generation_max_length else gen_args.max_new_tokens,
        temperature=gen_args.temperature,
        **sampling,
    )
    results = [
        {"prompt": prompt, "alpha": alpha, "completion": completion}
        for (prompt, alpha), completion in zip(rows, completions)
    ]
    print(format_generations(results))
    if gen_args.output_file:
        _write_json(gen_args.output_file, results)
    return results


def serve(serve_args: ServeArguments, model_args: ModelConfig) -> None:
    """
    Serve the adapter's base model with its head (and the `add_adapter` heads) as an OpenAI-compatible server
    (`iav_trl.inference.serving`) until interrupted.
    """
    try:
        from transformers import ContinuousBatchingConfig

        from iav_trl.inference import serving
    except ImportError as err:
        raise ImportError(f'`iav-trl serve` needs the serving extra: pip install -e ".[serving]" ({err}).') from err
    loaded = load_adapter_for_inference(model_args, serve_args.adapter, serve_args.trust_remote_code)
    for name, adapter in serve_args.extra_adapters().items():
        loaded.model.load_adapter(adapter, adapter_name=name, strict=True)  # heads trained on this base only
    name = serve_args.served_model_name or os.path.basename(os.path.normpath(serve_args.adapter))
    config = ContinuousBatchingConfig(
        num_blocks=serve_args.num_blocks,
        page_size=serve_args.page_size,
        max_batch_tokens=serve_args.max_batch_tokens,
    )
    app = serving.build_app(loaded.model, loaded.tokenizer, name, cb_config=config)
    print(
        f"Serving {name!r} (heads: {', '.join(loaded.model.adapter_names)}) on http://{serve_args.host}:{serve_args.port}/v1"
    )
    serving.serve(app, host=serve_args.host, port=serve_args.port)


def format_eval_table(rows: list[dict[str, float]]) -> str:
    """A plain-text table, one row per alpha."""
    lines = ["  ".join(f"{name:>15}" for name in EVAL_COLUMNS)]
    lines += ["  ".join(f"{row[name]:>15.4f}" for name in EVAL_COLUMNS) for row in rows]
    return "\n".join(lines)


def evaluate(
    script_args: IAVScriptArguments, eval_args: EvalArguments, training_args: IAVConfig, model_args: ModelConfig
) -> dict[str, Any]:
    """Evaluate the adapter on the test split at each alpha (see the module docstring); print and save the results."""
    loaded = load_adapter_for_inference(model_args, eval_args.adapter, training_args.trust_remote_code)
    test = load_splits(script_args, ["test"])["test"]
    model = loaded.model
    with tempfile.TemporaryDirectory() as scratch:
        # The trainer only evaluates: it saves, pushes and reports nothing, and leaves the recipe's output_dir alone.
        training_args.output_dir, training_args.push_to_hub, training_args.report_to = scratch, False, []
        trainer = IAVTrainer(
            model,
            ref_model=loaded.load_base_model() if loaded.trained_backbone else None,
            args=training_args,
            train_dataset=test,  # DPOTrainer requires one; nothing is trained
            eval_dataset=test,
            processing_class=loaded.tokenizer,
        )
        rows = trainer.evaluate_alphas(eval_args.alphas)
    results = {
        "adapter": eval_args.adapter,
        "base_model": loaded.base_model_name_or_path,
        "dataset": script_args.dataset_name or script_args.dataset_mixture,
        "split": script_args.dataset_test_split,
        "num_pairs": rows[0]["num_pairs"],  # after DPOTrainer drops prompts that fill max_length
        "beta": training_args.beta,
        "results": [{name: row[name] for name in EVAL_COLUMNS} for row in rows],
    }
    if trainer.is_world_process_zero():
        print(
            f"Held-out preference evaluation on {results['num_pairs']} pairs, implicit reward "
            f"beta * (log p_final - log p_base), beta = {training_args.beta}:"
        )
        print(format_eval_table(rows))
        local = os.path.isdir(eval_args.adapter)
        path = eval_args.results_file or (
            os.path.join(eval_args.adapter, EVAL_RESULTS_NAME) if local else EVAL_RESULTS_NAME
        )
        _write_json(path, results)
        print(f"Results written to {path}.")
    return results
