"""`iav-trl generate` and `iav-trl eval`: a trained adapter at several alignment strengths.

`generate` decodes every prompt at every alpha in one batched `generate` (one alpha per row, see
`iav_trl.inference.iav_inference.IAVInference`), greedy unless `temperature > 0`.

`eval` measures, on the held-out split, DPO's implicit reward of the aligned policy against the base model,

    r(x, y) = beta * (log p_final(y | x) - log p_base(y | x)),    z_final = z_base + alpha * a_t,

at each alpha: reward accuracy (the fraction of pairs with r(x, y_chosen) > r(x, y_rejected)) and mean margin
(r(x, y_chosen) - r(x, y_rejected)). These are `IAVTrainer.evaluate`'s `eval_rewards/accuracies` and
`eval_rewards/margins`, with the head applied at strength alpha; alpha 0 is the base model, so both are 0 there.
For a fully fine-tuned backbone, `log p_base` is the original base model's, so alpha 0 measures the fine-tuning alone.

TRL's accuracy counts a tie (margin exactly 0) as a loss, so the base model at alpha 0 scores 0.0. Next to it, from
the per-pair rewards (one more pass over the split per alpha, with DPOTrainer's own per-pair log-probs):

    ties     = mean_pairs [margin == 0]
    win_rate = mean_pairs [margin > 0] + ties / 2        (0.5 at alpha 0: every pair is a tie)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from transformers import set_seed
from trl import ModelConfig

from iav_trl.inference.iav_inference import IAVInference
from iav_trl.scripts.args import EvalArguments, GenerateArguments, IAVScriptArguments, ServeArguments
from iav_trl.scripts.models import load_adapter_for_inference
from iav_trl.scripts.train import load_splits
from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.trainer.iav_trainer import IAVTrainer
from iav_trl.trainer.trl_workarounds import reference_of_policy_pass
from iav_trl.utils.files import atomic_write_text

EVAL_RESULTS_NAME = "eval_results.json"
# Reported metric -> the `IAVTrainer.evaluate` metric it is.
EVAL_METRICS = {
    "accuracy": "eval_rewards/accuracies",
    "margin": "eval_rewards/margins",
    "chosen_reward": "eval_rewards/chosen",
    "rejected_reward": "eval_rewards/rejected",
    "loss": "eval_loss",
}
# Reported metrics computed from the per-pair rewards (`pair_margins`).
PAIR_METRICS = ("ties", "win_rate")


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
        raise ImportError(f'`iav-trl serve` needs the serving extra: pip install "iav-trl[serving]" ({err}).') from err
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
    header = ["alpha", *EVAL_METRICS, *PAIR_METRICS]
    lines = ["  ".join(f"{name:>15}" for name in header)]
    lines += ["  ".join(f"{row[name]:>15.4f}" for name in header) for row in rows]
    return "\n".join(lines)


def pair_margins(trainer: IAVTrainer) -> torch.Tensor:
    """
    `r(x, y_chosen) - r(x, y_rejected)` of every pair of the eval split, `(num_pairs,)`, at the model's current
    alpha, with DPOTrainer's own per-pair log-probs (`compute_ref_log_probs`: completion tokens only, its `ld_alpha`
    weighting) for the policy and for the reference, the one `evaluate` uses: the base model's `z_base` from the
    same pass, or `trainer.ref_model`.
    """
    model, margins, outputs = trainer.model, [], []
    model.eval()

    def policy(**kwargs):
        outputs[:] = [model(**kwargs, alpha=trainer.training_alpha)]  # the last pass only
        return outputs[0]

    for batch in trainer.get_eval_dataloader():
        inputs = trainer._prepare_inputs(batch)
        chosen, rejected = trainer.compute_ref_log_probs(policy, inputs)
        if trainer.ref_model is None:  # the reference of the same pass, as IAVTrainer.compute_loss takes it
            reference = reference_of_policy_pass(outputs)
        else:
            reference = trainer.ref_model
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, inputs)
        margin = trainer.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        margins.append(trainer.accelerator.gather_for_metrics(margin).float().cpu())
    return torch.cat(margins) if margins else torch.zeros(0)


def evaluate(
    script_args: IAVScriptArguments, eval_args: EvalArguments, training_args: IAVConfig, model_args: ModelConfig
) -> dict[str, Any]:
    """Evaluate the adapter on the test split at each alpha (see the module docstring); print and save the results."""
    loaded = load_adapter_for_inference(model_args, eval_args.adapter, training_args.trust_remote_code)
    test = load_splits(script_args, ["test"])["test"]
    model = loaded.model
    rows = []
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
        adapter_name = model.active_adapter
        for alpha in eval_args.alphas:
            # The trainer applies the head at its `alpha` times the adapter weight: weight alpha / args.alpha is alpha.
            model.set_adapter({adapter_name: alpha / training_args.alpha})
            metrics = trainer.evaluate()
            margins = pair_margins(trainer)
            ties = (margins == 0).float().mean().item()
            win_rate = (margins > 0).float().mean().item() + ties / 2
            rows.append(
                {
                    "alpha": float(alpha),
                    **{name: metrics[key] for name, key in EVAL_METRICS.items()},
                    "ties": ties,
                    "win_rate": win_rate,
                }
            )
    results = {
        "adapter": eval_args.adapter,
        "base_model": loaded.base_model_name_or_path,
        "dataset": script_args.dataset_name or script_args.dataset_mixture,
        "split": script_args.dataset_test_split,
        "num_pairs": len(trainer.eval_dataset),  # after DPOTrainer drops prompts that fill max_length
        "beta": training_args.beta,
        "results": rows,
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
