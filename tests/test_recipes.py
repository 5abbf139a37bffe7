"""Every recipe in recipes/ parses into valid configs for every command, and both recipe layouts mean the same."""

import dataclasses
import glob
import os

import pytest
import torch
import yaml
from trl import get_quantization_config

from iav_trl import IAVConfig
from iav_trl.cli.recipe import flatten_recipe, parse_command_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
SEED_RECIPE = os.path.join(ROOT, "recipes", "llama-7b-sft_hh-rlhf.yaml")
# bf16 recipes target GPUs; on a machine without one, TrainingArguments accepts bf16 only with use_cpu.
CPU = ["--use_cpu"]


def as_dicts(parsed) -> list[dict]:
    return [args.to_dict() if isinstance(args, IAVConfig) else dataclasses.asdict(args) for args in parsed]


def test_the_four_recipes_are_there():
    names = {os.path.basename(path) for path in RECIPES}
    assert {"llama-7b-sft_hh-rlhf.yaml", "zephyr-7b-sft_ultrafeedback.yaml", "quickstart_cpu.yaml"} <= names
    assert "llama-7b-sft_hh-rlhf_qlora.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_parses_into_valid_configs_for_every_command(recipe):
    script_args, training_args, model_args = parse_command_args("train", ["--config", recipe, *CPU])
    assert isinstance(training_args, IAVConfig)
    assert model_args.model_name_or_path
    assert (script_args.dataset_name is None) != (script_args.dataset_mixture is None)
    for entry in (script_args.dataset_mixture or {}).get("datasets", []):
        assert os.path.exists(os.path.join(ROOT, entry["id"])), entry["id"]  # local data ships with the repository
    head = training_args.alignment_head_config()
    assert head.num_interventions >= 1 and head.intervention_dim >= 1

    gen_args, _ = parse_command_args("generate", ["--config", recipe, "--prompt", "Hi"])
    _, eval_args, eval_training_args, _ = parse_command_args("eval", ["--config", recipe, *CPU])
    # generate and eval load the adapter that train writes
    assert gen_args.adapter == eval_args.adapter == training_args.output_dir
    assert eval_training_args.beta == training_args.beta
    assert gen_args.alphas[0] == 0.0 and len(gen_args.alphas) > 1


def test_qlora_recipe_quantizes_the_backbone_to_nf4_and_trains_only_the_head():
    recipe = os.path.join(ROOT, "recipes", "llama-7b-sft_hh-rlhf_qlora.yaml")
    _, training_args, model_args = parse_command_args("train", ["--config", recipe, *CPU])
    quantization = get_quantization_config(model_args)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
    assert training_args.freeze_backbone and not model_args.use_peft


def test_quickstart_recipe_builds_its_model_locally_and_runs_offline():
    quickstart = os.path.join(ROOT, "recipes", "quickstart_cpu.yaml")
    _, training_args, model_args = parse_command_args("train", ["--config", quickstart])
    assert model_args.model_name_or_path.startswith("tiny:")
    assert not training_args.bf16 and training_args.report_to == []


def test_seed_recipe_trains_with_its_values_as_written():
    # `learning_rate: 5e-5` is a string to YAML 1.1; it parses as a float, as TRL's own --config takes it.
    with open(SEED_RECIPE) as fh:
        assert yaml.safe_load(fh)["training"]["learning_rate"] == "5e-5"
    _, training_args, model_args = parse_command_args("train", ["--config", SEED_RECIPE, *CPU])
    assert training_args.learning_rate == 5e-5 and isinstance(training_args.learning_rate, float)
    assert (training_args.lambda_kl, training_args.per_device_train_batch_size) == (0.1, 4)
    assert model_args.model_name_or_path == "argsearch/llama-7b-sft-float32"


def test_numbers_written_as_strings_are_converted_and_text_that_is_no_number_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("learning_rate: 1e-4\nalphas: ['0', '1.5']\nper_device_train_batch_size: '2'\n")
    _, training_args, _ = parse_command_args("train", ["--config", str(path)])
    assert (training_args.learning_rate, training_args.per_device_train_batch_size) == (1e-4, 2)
    _, eval_args, _, _ = parse_command_args("eval", ["--config", str(path), "--adapter", "x"])
    assert eval_args.alphas == [0.0, 1.5]
    path.write_text("learning_rate: fast\n")
    with pytest.raises(ValueError, match="'learning_rate' must be a float, got 'fast'"):
        parse_command_args("train", ["--config", str(path)])


NESTED = """
model:
  name: org/base-model
  revision: v2
  dtype: bfloat16
  num_interventions: 4
  intervention_dim: 32
training:
  dataset: org/preferences
  dataset_test_split: test[:100]
  output_dir: out/nested
  learning_rate: 1.0e-4
  per_device_train_batch_size: 2
  lambda_kl: 0.2
  gradient_checkpointing: true
inference:
  alphas: [0.0, 1.0]
  max_new_tokens: 16
  temperature: 0.7
"""

FLAT = """
model_name_or_path: org/base-model
model_revision: v2
dtype: bfloat16
num_interventions: 4
intervention_dim: 32
dataset_name: org/preferences
dataset_test_split: test[:100]
output_dir: out/nested
learning_rate: 1.0e-4
per_device_train_batch_size: 2
lambda_kl: 0.2
gradient_checkpointing: true
alphas: [0.0, 1.0]
max_new_tokens: 16
temperature: 0.7
"""


def test_nested_seed_layout_parses_like_the_flat_layout(tmp_path):
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text(NESTED)
    flat.write_text(FLAT)
    for command, extra in (("train", CPU), ("eval", CPU), ("generate", ["--prompt", "Hi"])):
        from_nested = as_dicts(parse_command_args(command, ["--config", str(nested), *extra]))
        from_flat = as_dicts(parse_command_args(command, ["--config", str(flat), *extra]))
        assert from_nested == from_flat, command
    _, training_args, model_args = parse_command_args("train", ["--config", str(nested), *CPU])
    assert (model_args.model_name_or_path, model_args.model_revision) == ("org/base-model", "v2")
    assert (training_args.learning_rate, training_args.num_interventions, training_args.lambda_kl) == (1e-4, 4, 0.2)
    gen_args, _ = parse_command_args("generate", ["--config", str(nested), "--prompt", "Hi"])
    assert (gen_args.alphas, gen_args.max_new_tokens, gen_args.adapter) == ([0.0, 1.0], 16, "out/nested")


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            {"training": {"lerning_rate": 1e-4}},
            r"'training.lerning_rate'. Did you mean 'learning_rate'\?.*Valid keys in `training:`",
        ),
        ({"lerning_rate": 1e-4}, r"Unknown recipe key 'lerning_rate'.*Valid keys at the top level: .*learning_rate"),
        ({"model": {"learning_rate": 1e-4}}, r"'model.learning_rate'.*Valid keys in `model:`: .*model_name_or_path"),
        ({"inference": {"prompt": "Hi"}}, r"'inference.prompt'"),  # prompts are command-line only
        ({"seed": 1, "training": {"seed": 2}}, r"sets 'seed' twice"),
        ({"model": "org/base-model"}, r"section 'model' must be a mapping"),
    ],
    ids=["misspelt", "misspelt-flat", "wrong-section", "cli-only", "twice", "not-a-mapping"],
)
def test_invalid_recipe_key_is_an_error_listing_the_valid_keys(recipe, message):
    with pytest.raises(ValueError, match=message):
        flatten_recipe(recipe)


def test_unknown_key_in_a_recipe_file_stops_every_command(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "org/m", "lambda_k1": 0.1}))
    for command in ("train", "generate", "eval"):
        with pytest.raises(ValueError, match="Did you mean 'lambda_kl'"):
            parse_command_args(command, ["--config", str(path)])


# The IAV seed document's recipe, verbatim in its keys.
SEED_DOCUMENT_YAML = """\
model:
  base_model_name: argsearch/llama-7b-sft-float32
  vocab_size: 32000
  hidden_size: 4096
  num_interventions: 8
  intervention_dim: 256
training:
  dataset: Anthropic/hh-rlhf
  num_epochs: 2
  learning_rate: 5.0e-5
  max_length: 1024
  output_dir: out/seed
inference:
  default_alpha: 1.5
  max_length: 96
"""


def test_the_seed_documents_recipe_keys_parse_into_the_fields_train_generate_and_eval_use(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_DOCUMENT_YAML)
    _, training_args, model_args = parse_command_args("train", ["--config", str(path)])
    assert (model_args.model_name_or_path, model_args.vocab_size, model_args.hidden_size) == (
        "argsearch/llama-7b-sft-float32",
        32000,
        4096,
    )
    assert (training_args.num_train_epochs, training_args.max_length) == (2, 1024)  # training's max_length untouched
    gen_args, _ = parse_command_args("generate", ["--config", str(path), "--prompt", "Hi"])
    assert (gen_args.alphas, gen_args.generation_max_length) == ([1.5], 96)
    _, eval_args, eval_training_args, _ = parse_command_args("eval", ["--config", str(path)])
    assert (eval_args.alphas, eval_training_args.max_length) == ([1.5], 1024)


def test_every_unknown_recipe_key_is_reported_at_once_with_the_valid_keys():
    recipe = {"lerning_rate": 1e-4, "training": {"num_epoch": 3, "beta": 0.1}, "model": {"nmae": "org/m"}}
    with pytest.raises(ValueError) as raised:
        flatten_recipe(recipe)
    message = str(raised.value)
    for key in ("'lerning_rate'", "'training.num_epoch'", "'model.nmae'"):
        assert f"Unknown recipe key {key}" in message
    assert "Did you mean 'num_epochs'" in message and "Did you mean 'name'" in message
    for scope in ("at the top level", "in `training:`", "in `model:`"):
        assert message.count(f"Valid keys {scope}:") == 1


def test_a_key_set_twice_in_one_yaml_mapping_is_an_error_naming_the_key_and_its_lines(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("training:\n  learning_rate: 1.0e-4\n  beta: 0.1\n  learning_rate: 5.0e-5\n")
    expected = r"recipe.yaml, line 4: the key 'learning_rate' is set twice.*first on line 2"
    with pytest.raises(ValueError, match=expected):
        parse_command_args("train", ["--config", str(path)])


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  name: org/m\n training:\n  beta: 0.1\n")  # line 3 is indented by one space
    with pytest.raises(ValueError, match=r"recipe.yaml, line 3, column 2: the recipe is not valid YAML"):
        parse_command_args("train", ["--config", str(path)])


@pytest.mark.parametrize(
    ("command", "recipe", "message"),
    [
        ("generate", {"alphas": 1}, r"'alphas' must be a list \(`alphas: \[1\]`\), got 1"),
        ("train", {"per_device_train_batch_size": 2.5}, "'per_device_train_batch_size' must be an int, got 2.5"),
        ("train", {"learning_rate": "fast"}, "'learning_rate' must be a float, got 'fast'"),
        ("generate", {"top_p": 5}, r"top_p in \(0, 1\] \(1: no truncation\); got temperature 0.0 and top_p 5"),
    ],
)
def test_recipe_values_of_the_wrong_type_or_range_are_refused_naming_the_key(tmp_path, command, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "out", "dataset_name": "data.jsonl", **recipe}))
    extra = ["--prompt", "Hi"] if command == "generate" else []
    with pytest.raises(ValueError, match=message):
        parse_command_args(command, ["--config", str(path), *extra])
