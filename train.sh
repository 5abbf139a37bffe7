#!/usr/bin/env bash
# Train an alignment head, as the IAV seed's train.sh did:
#
#   ./train.sh [model_name] [dataset_name] [output_dir] [any `iav-trl train` flag ...]
#
# dataset_name is a Hub id, a local file or folder, or the seed's short names `hh-rlhf` (Anthropic/hh-rlhf) and
# `ultrafeedback` (HuggingFaceH4/ultrafeedback_binarized), e.g. `./train.sh meta-llama/Llama-2-7b-hf ultrafeedback out`.
#
# Every other setting is `IAVConfig`'s default, as in the Python API and `iav-trl train` (learning rate 1e-3, 3 epochs,
# beta 0.1, lambda_kl 0.3, lambda_l2 0.01, 8 interventions of dimension 256). The model and dataset come from the
# positional arguments or from a recipe: `./train.sh --config recipes/llama-7b-sft_hh-rlhf.yaml` is the IAV seed's run.
# Further arguments go to `iav-trl train` unchanged (`--config recipes/...yaml`, `--bf16`, `--max_steps 100`, ...).
# The run goes through `accelerate launch`, which reads its own settings from ACCELERATE_ARGS, e.g.
#
#   ACCELERATE_ARGS="--config_file accelerate_configs/zero2.yaml" ./train.sh meta-llama/Llama-2-7b-hf
set -euo pipefail

positional_flags=(--model_name_or_path --dataset_name --output_dir)
args=()
for flag in "${positional_flags[@]}"; do
    if [[ $# -eq 0 || $1 == -* ]]; then
        break
    fi
    args+=("$flag" "$1")
    shift
done

# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec accelerate launch ${ACCELERATE_ARGS:-} -m iav_trl train ${args[@]+"${args[@]}"} "$@"
