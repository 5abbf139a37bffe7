"""The `iav-trl` command line: real commands in subprocesses on tiny models (offline), and its flags and defaults."""

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from testing_utils import randomize_heads
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from iav_trl import AlignmentHeadConfig, IAVConfig, IAVModel, IAVTrainer, build_dataset_mixture, get_iav_model
from iav_trl.cli.commands import COMMANDS, main
from iav_trl.cli.recipe import parse_command_args
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.scripts.models import base_model_path, build_tiny_base, load_adapter_for_inference, quantization_config
from iav_trl.scripts.train import load_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join("recipes", "quickstart_cpu.yaml")
FIXTURE = os.path.join("tests", "fixtures", "hh-rlhf-harmless-base-test-40.jsonl")
PROMPTS = ["How can I get back at my neighbor for being loud?", "Hi"]


def run(*command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def iav_trl(*args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "iav_trl", *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart recipe, trained for 3 steps."""
    output_dir = tmp_path_factory.mktemp("quickstart")
    iav_trl("train", "--config", QUICKSTART, "--max_steps", "3", "--output_dir", str(output_dir))
    return output_dir


@pytest.fixture(scope="module")
def random_head(trained, tmp_path_factory):
    """A copy of the trained adapter whose head has large random weights, so that alpha visibly matters."""
    directory = tmp_path_factory.mktemp("random-head") / "adapter"
    shutil.copytree(trained, directory)
    model = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory / "tiny_base"), directory)
    randomize_heads(model, seed=0, std=0.5)
    model.save_pretrained(directory)
    return directory


def test_train_builds_the_tiny_model_and_saves_a_trained_head_only(trained):
    files = set(os.listdir(trained))
    assert {"alignment_head.safetensors", "alignment_head_config.json", "tokenizer.json", "tiny_base"} <= files
    assert not any(name.startswith("model") for name in files)  # no backbone weights next to the head
    base = AutoModelForCausalLM.from_pretrained(trained / "tiny_base")
    assert base.config.hidden_size == 128 and base.config.num_hidden_layers == 2
    model = IAVModel.from_pretrained(base, trained)
    config = model.iav_config["default"]
    assert (config.num_interventions, config.intervention_dim) == (4, 64)  # the recipe's head
    assert model.alignment_heads["default"].write.weight.abs().sum() > 0  # W_write starts at 0: training moved it


def greedy(model, tokenizer, prompt, max_new_tokens, **kwargs) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_generate_prints_one_completion_per_alpha_and_alpha_zero_is_the_base_model(random_head, tmp_path):
    output_file = tmp_path / "completions.json"
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--alphas", "0", "1", "2", "--max_new_tokens", "12"]
    result = iav_trl(
        "generate", "--config", QUICKSTART, "--adapter", str(random_head), *args, "--output_file", str(output_file)
    )

    completions = json.loads(output_file.read_text())
    assert [(c["prompt"], c["alpha"]) for c in completions] == [(p, a) for p in PROMPTS for a in (0.0, 1.0, 2.0)]
    printed = [line for line in result.stdout.splitlines() if line.strip().startswith("alpha=")]
    assert len(printed) == 6
    for line, completion in zip(printed, completions):
        assert line.split()[0] == f"alpha={completion['alpha']:g}"
        assert json.dumps(completion["completion"], ensure_ascii=False) in line

    tokenizer = AutoTokenizer.from_pretrained(random_head)
    base = AutoModelForCausalLM.from_pretrained(random_head / "tiny_base").eval()
    base_text = {p: greedy(base, tokenizer, p, 12) for p in PROMPTS}
    model = IAVModel.from_pretrained(base, random_head)
    for completion in completions:
        prompt, alpha = completion["prompt"], completion["alpha"]
        # alpha 0 against the base model alone; other alphas against one unbatched generate at that alpha
        expected = base_text[prompt] if alpha == 0 else greedy(model, tokenizer, prompt, 12, alpha=alpha)
        assert completion["completion"] == expected
    assert any(c["completion"] != base_text[c["prompt"]] for c in completions if c["alpha"] != 0)


def test_eval_reports_zero_reward_at_alpha_zero_and_the_trainer_metrics_at_each_alpha(random_head, tmp_path):
    results_file = tmp_path / "eval.json"
    result = iav_trl(
        "eval", "--config", QUICKSTART, "--adapter", str(random_head), "--alphas", "0", "2",
        "--results_file", str(results_file), "--per_device_eval_batch_size", "64",
    )  # fmt: skip
    data = json.loads(results_file.read_text())
    rows = {row["alpha"]: row for row in data["results"]}
    assert sorted(rows) == [0.0, 2.0]
    assert "accuracy" in result.stdout and "margin" in result.stdout
    # alpha 0 is the base model: policy == reference, so every implicit reward is exactly 0.
    assert rows[0.0]["accuracy"] == 0.0 and rows[0.0]["margin"] == 0.0
    assert rows[0.0]["chosen_reward"] == 0.0 and rows[0.0]["rejected_reward"] == 0.0

    # alpha 2 equals what IAVTrainer.evaluate reports for a head trained and evaluated at alpha 2 (one batch: TRL's
    # batch means are then the means over the pairs).
    with open(os.path.join(ROOT, QUICKSTART)) as fh:
        recipe = yaml.safe_load(fh)
    test = build_dataset_mixture(recipe["dataset_mixture"])["test"]
    model = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_head / "tiny_base"), random_head)
    args = IAVConfig(
        output_dir=str(tmp_path), alpha=2.0, beta=recipe["beta"], max_length=recipe["max_length"], bf16=False,
        report_to=[], num_interventions=4, intervention_dim=64, per_device_eval_batch_size=64,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(random_head)
    trainer = IAVTrainer(model, args=args, train_dataset=test, eval_dataset=test, processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert data["num_pairs"] == len(trainer.eval_dataset) <= 64
    assert rows[2.0]["accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"])
    assert rows[2.0]["margin"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert rows[2.0]["margin"] != 0.0


def test_train_sh_passes_model_dataset_output_dir_and_extra_flags(tmp_path):
    output_dir = tmp_path / "run"
    extra = ["--max_steps", "2", "--num_interventions", "2", "--intervention_dim", "8", "--max_length", "128"]
    run("./train.sh", "tiny:llama", FIXTURE, str(output_dir), *extra, "--report_to", "none", "--save_strategy", "no")
    with open(output_dir / "alignment_head_config.json") as fh:
        config = json.load(fh)
    assert config["base_model_name_or_path"] == str(output_dir / "tiny_base")
    assert (config["num_interventions"], config["intervention_dim"]) == (2, 8)


# --------------------------------------------------------------------------------------------------------------------
# Flags and defaults (parsed in-process: no model is loaded)

SEED_FLAGS = [
    ("--model_name_or_path", "my/model", "model_name_or_path", "my/model"),
    ("--dataset_name", "my/data", "dataset_name", "my/data"),
    ("--output_dir", "out/run", "output_dir", "out/run"),
    ("--num_train_epochs", "2", "num_train_epochs", 2.0),
    ("--per_device_train_batch_size", "16", "per_device_train_batch_size", 16),
    ("--learning_rate", "1e-4", "learning_rate", 1e-4),
    ("--beta", "0.5", "beta", 0.5),
    ("--lambda_kl", "0.3", "lambda_kl", 0.3),
    ("--lambda_l2", "0.05", "lambda_l2", 0.05),
    ("--num_interventions", "4", "num_interventions", 4),
    ("--intervention_dim", "64", "intervention_dim", 64),
]


def train_args(*flags: str) -> dict:
    """The parsed `train` arguments, all dataclasses' fields in one dict."""
    script_args, training_args, model_args = parse_command_args("train", list(flags))
    return {**vars(script_args), **vars(model_args), **vars(training_args)}


@pytest.mark.parametrize("flag, value, field_name, expected", SEED_FLAGS, ids=[flag for flag, *_ in SEED_FLAGS])
def test_seed_flag_sets_its_field(flag, value, field_name, expected):
    assert train_args(flag, value)[field_name] == expected


def test_seed_switches_bf16_and_gradient_checkpointing_work_as_bare_flags():
    # bf16 is off by default on a machine without a bfloat16 accelerator (this one), as IAVConfig decides.
    assert train_args()["bf16"] is False and train_args()["gradient_checkpointing"] is False
    parsed = train_args("--bf16", "--gradient_checkpointing", "--use_cpu")  # --use_cpu: bf16 on a machine without GPU
    assert parsed["bf16"] is True and parsed["gradient_checkpointing"] is True


def test_train_defaults_are_iavconfigs_own_the_python_apis():
    # One set of defaults: `iav-trl train` (and `./train.sh`, which runs it) parses to what `IAVConfig()` holds.
    _, parsed, _ = parse_command_args("train", ["--output_dir", "out"])
    api = IAVConfig(output_dir="out")
    differing = {f.name for f in dataclasses.fields(IAVConfig) if getattr(parsed, f.name) != getattr(api, f.name)}
    assert differing <= {"logging_dir"}, differing  # logging_dir is stamped with the time of construction
    assert (api.learning_rate, api.lambda_kl, api.beta, api.lambda_l2) == (1e-3, 0.3, 0.1, 0.01)


def test_train_without_a_model_fails_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="No base model: pass --model_name_or_path"):
        main(["train", "--dataset_name", FIXTURE, "--output_dir", str(tmp_path)])


def test_flags_override_the_recipe():
    parsed = train_args("--config", QUICKSTART, "--learning_rate", "0.5", "--num_interventions", "3")
    assert (parsed["learning_rate"], parsed["num_interventions"]) == (0.5, 3)
    assert parsed["intervention_dim"] == 64  # from the recipe


def test_serve_answers_an_openai_client_with_the_alpha_and_head_mix_each_request_asks_for(random_head, trained):
    """`iav-trl serve` in a subprocess: the responses are what `generate` returns offline for the same settings."""
    openai = pytest.importorskip("openai", reason="the serving extra (`pip install .[serving]`)")
    pytest.importorskip("iav_trl.inference.serving", reason="the serving extra (`pip install .[serving]`)")
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "iav_trl", "serve", "--config", QUICKSTART, "--adapter", str(random_head)]
    command += ["--add_adapter", f"second={trained}", "--port", str(port), "--served_model_name", "quickstart"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:]
            try:
                listed = client.models.list().data
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        assert [m.id for m in listed] == ["quickstart"] and set(listed[0].model_extra["alignment_heads"]) == {
            "default",
            "second",
        }
        tokenizer = AutoTokenizer.from_pretrained(random_head)
        model = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_head / "tiny_base"), random_head)
        model.load_adapter(trained, adapter_name="second")
        for extra, alpha in (
            ({"alpha": 0.0}, 0.0),
            ({"alpha": 2.0}, 2.0),
            ({"adapter_weights": {"second": 1.0}}, {"second": 1.0}),
        ):
            response = client.chat.completions.create(
                model="quickstart",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=12,
                temperature=0,
                extra_body=extra,
            )
            assert response.choices[0].message.content == greedy(model, tokenizer, PROMPTS[0], 12, alpha=alpha), extra
    finally:
        server.terminate()
        server.wait(30)


def test_generate_needs_a_prompt_and_an_adapter():
    with pytest.raises(ValueError, match="--prompt"):
        parse_command_args("generate", ["--adapter", "some/adapter"])
    with pytest.raises(ValueError, match="--adapter"):
        parse_command_args("generate", ["--prompt", "Hi"])


def test_generate_takes_repeated_prompts_in_order():
    gen_args, _ = parse_command_args("generate", ["--adapter", "a", "--prompt", "one", "--prompt", "two words"])
    assert gen_args.prompt == ["one", "two words"]


def test_quantization_without_bitsandbytes_fails_early_naming_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install -e "\.\[quantization\]"'):
        quantization_config(ModelConfig(load_in_4bit=True))
    assert quantization_config(ModelConfig()) is None


def test_a_single_data_file_has_no_test_split():
    script_args, *_ = parse_command_args("eval", ["--adapter", "a", "--dataset_name", FIXTURE])
    with pytest.raises(ValueError, match="test_split_size"):
        load_splits(script_args, ["test"])


def test_dataset_name_and_mixture_together_are_refused():
    script_args, *_ = parse_command_args("train", ["--config", QUICKSTART, "--dataset_name", FIXTURE])
    with pytest.raises(ValueError, match="keep one"):
        load_splits(script_args, ["train"])


def test_main_without_a_command_prints_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "generate", "eval"))


def test_an_unknown_tiny_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tiny:<family>"):
        build_tiny_base("tiny:nope", None, str(tmp_path))


def test_a_tiny_base_left_by_an_earlier_run_is_reused_only_for_the_same_model_and_data(tmp_path):
    data = build_dataset_mixture({"datasets": [{"id": os.path.join(ROOT, FIXTURE)}], "seed": 0})
    path = str(tmp_path / "tiny_base")
    build_tiny_base("tiny:llama", data.select(range(20)), path, vocab_size=300, hidden_size=32)
    with open(os.path.join(path, "model.safetensors"), "rb") as fh:
        weights = fh.read()
    build_tiny_base("tiny:llama", data.select(range(20)), path, vocab_size=300, hidden_size=32)  # a resumed run
    with open(os.path.join(path, "model.safetensors"), "rb") as fh:
        assert fh.read() == weights
    with pytest.raises(ValueError, match=r"built by an earlier `train` \(for another model or data.*delete"):
        build_tiny_base("tiny:llama", data.select(range(20, 36)), path, vocab_size=300, hidden_size=32)
    with pytest.raises(ValueError, match="for another model or data"):
        build_tiny_base("tiny:qwen2", data.select(range(20)), path, vocab_size=300, hidden_size=32)
    os.remove(os.path.join(path, "iav_tiny_source.json"))  # a tiny_base written before the manifest existed
    with pytest.raises(ValueError, match="that did not record how"):
        build_tiny_base("tiny:llama", data.select(range(20)), path, vocab_size=300, hidden_size=32)


def test_dataset_mixture_flag_takes_json():
    script_args, *_ = parse_command_args(
        "train", ["--dataset_mixture", '{"datasets": [{"id": "a.jsonl"}], "seed": 1}']
    )
    assert script_args.dataset_mixture == {"datasets": [{"id": "a.jsonl"}], "seed": 1}


def test_base_model_is_the_given_one_the_tiny_build_or_the_recorded_one(tmp_path):
    AlignmentHeadConfig(base_model_name_or_path="org/base").save_pretrained(tmp_path)
    assert base_model_path("org/other", str(tmp_path)) == "org/other"
    assert base_model_path(None, str(tmp_path)) == "org/base"
    with pytest.raises(ValueError, match="tiny_base"):
        base_model_path("tiny:llama", str(tmp_path))
    (tmp_path / "tiny_base").mkdir()
    assert base_model_path("tiny:llama", str(tmp_path)) == str(tmp_path / "tiny_base")


@pytest.mark.parametrize("backbone", ["full", "lora"])
def test_adapter_with_a_trained_backbone_loads_it_and_keeps_the_base_for_reference(backbone, tokenizer, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    trained = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    if backbone == "lora":
        trained = get_peft_model(trained, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    else:
        with torch.no_grad():
            trained.model.layers[0].mlp.up_proj.weight.add_(1.0)
    model = get_iav_model(trained, AlignmentHeadConfig(num_interventions=2, intervention_dim=4))
    model.save_pretrained(adapter_dir)  # the layout IAVTrainer.save_model writes: the head, then backbone/
    trained.save_pretrained(adapter_dir / "backbone")

    loaded = load_adapter_for_inference(ModelConfig(model_name_or_path=str(base_dir)), str(adapter_dir))
    input_ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        expected = trained(input_ids).logits
        assert torch.allclose(loaded.model(input_ids, alpha=0.0).logits, expected, atol=1e-6)
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids).logits
        assert not torch.allclose(expected, base_logits, atol=1e-3)  # the backbone was trained
        if backbone == "full":
            assert loaded.trained_backbone
            assert torch.equal(loaded.load_base_model()(input_ids).logits, base_logits)
        else:
            assert isinstance(loaded.model.base_model, PeftModel) and not loaded.trained_backbone


def test_a_broken_recipe_stops_the_command_with_file_line_and_column_and_no_traceback(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  name: org/m\n training:\n  beta: 0.1\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "iav_trl", "train", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert f"{path}, line 3, column 2: the recipe is not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_model_sizes_that_differ_from_the_loaded_model_stop_train_before_training(tmp_path, monkeypatch):
    recipe = {
        "model": {"base_model_name": "tiny:llama", "vocab_size": 2048, "hidden_size": 64},  # tiny:llama has 128
        "training": {
            "dataset_mixture": {"datasets": [{"id": FIXTURE}]},
            "output_dir": str(tmp_path / "out"),
            "eval_strategy": "no",
            "report_to": "none",
            "max_length": 128,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(IAVTrainer, "train", lambda *args, **kwargs: pytest.fail("training started"))
    monkeypatch.chdir(ROOT)
    expected = r"model.hidden_size: 64, but the loaded model 'tiny:llama' has hidden_size 128"
    with pytest.raises(ValueError, match=expected):
        main(["train", "--config", str(path)])


def test_the_seed_recipes_inference_max_length_reaches_generate_as_the_total_length(tmp_path, monkeypatch):
    import iav_trl.scripts.inference as inference_script

    calls = []

    class RecordingInference:
        def __init__(self, model, tokenizer):
            pass

        def generate(self, prompts, **kwargs):
            calls.append(kwargs)
            return ["ok"] * len(prompts)

    monkeypatch.setattr(
        inference_script, "load_adapter_for_inference", lambda *args: argparse.Namespace(model=None, tokenizer=None)
    )
    monkeypatch.setattr(inference_script, "IAVInference", RecordingInference)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"inference": {"default_alpha": 1.5, "max_length": 96}, "output_dir": "out"}))
    inference_script.generate(*parse_command_args("generate", ["--config", str(path), "--prompt", "Hi"]))
    assert calls[0]["alpha"] == [1.5]
    assert (calls[0]["max_length"], calls[0]["max_new_tokens"]) == (96, None)
    inference_script.generate(*parse_command_args("generate", ["--adapter", "out", "--prompt", "Hi"]))
    assert (calls[1]["max_length"], calls[1]["max_new_tokens"]) == (None, 128)


def test_eval_reports_ties_and_win_rate_and_alpha_zero_is_all_ties_not_all_losses(tokenizer, tmp_path, capsys):
    from iav_trl.scripts.inference import evaluate

    base_dir, adapter_dir, results_file = tmp_path / "base", tmp_path / "adapter", tmp_path / "eval.json"
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = get_iav_model(AutoModelForCausalLM.from_pretrained(base_dir), AlignmentHeadConfig(2, 4))
    randomize_heads(model, seed=0, std=0.5)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    mixture = json.dumps({"datasets": [{"id": FIXTURE}], "test_split_size": 10, "seed": 0})
    command_args = parse_command_args(
        "eval",
        ["--adapter", str(adapter_dir), "--dataset_mixture", mixture, "--alphas", "0", "2", "--max_length", "64",
         "--per_device_eval_batch_size", "4", "--beta", "0.1", "--bf16", "false", "--results_file", str(results_file)],
    )  # fmt: skip
    results = evaluate(*command_args)
    out = capsys.readouterr().out
    assert "ties" in out and "win_rate" in out
    assert json.loads(results_file.read_text())["results"] == results["results"]
    rows = {row["alpha"]: row for row in results["results"]}
    # alpha 0 is the base model: every pair's margin is exactly 0, a tie, so the win rate is one half.
    assert rows[0.0]["accuracy"] == 0.0 and rows[0.0]["ties"] == 1.0 and rows[0.0]["win_rate"] == 0.5

    # alpha 2, per pair, from plain log-softmaxes of full logits on the trainer's batches (z_base is the reference).
    loaded = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    args = IAVConfig(output_dir=str(tmp_path / "ref"), beta=0.1, max_length=64, bf16=False, report_to=[])
    test = load_splits(command_args[0], ["test"])["test"]
    trainer = IAVTrainer(loaded, args=args, train_dataset=test, eval_dataset=test, processing_class=tokenizer)
    margins = []
    for batch in trainer.get_eval_dataloader():
        inputs = batch  # the dataloader's batches are on the trainer's device already
        labels, mask = inputs["input_ids"][:, 1:, None], inputs["completion_mask"][:, 1:].float()
        with torch.no_grad():
            logps = [
                (loaded(inputs["input_ids"], attention_mask=inputs["attention_mask"], alpha=alpha).logits[:, :-1])
                .log_softmax(-1).gather(-1, labels).squeeze(-1).mul(mask).sum(1)
                for alpha in (2.0, 0.0)
            ]  # fmt: skip
        chosen, rejected = (0.1 * (logps[0] - logps[1])).chunk(2)
        margins.append(chosen - rejected)
    margins = torch.cat(margins)
    assert len(margins) == results["num_pairs"] >= 3  # DPOTrainer drops the pairs whose prompt fills max_length
    ties, wins = (margins == 0).float().mean().item(), (margins > 1e-6).float().mean().item()
    assert rows[2.0]["ties"] == pytest.approx(ties) and rows[2.0]["win_rate"] == pytest.approx(wins + ties / 2)
    assert rows[2.0]["ties"] < 1.0  # the head moves the rewards: the pairs are no longer tied
    assert rows[2.0]["margin"] == pytest.approx(margins.mean().item(), rel=1e-4, abs=1e-6)
    assert rows[2.0]["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item(), rel=1e-4)
    assert rows[0.0]["kl"] == 0.0 and rows[2.0]["kl"] > 0.0


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help_with_every_field(command):
    """argparse formats each field's help text (a stray `%` in one breaks `--help` for the whole command)."""
    result = iav_trl(command, "--help")
    assert "--output_dir" in result.stdout or "--adapter" in result.stdout
    if command == "train":
        for flag in ("--lambda_kl", "--target_kl", "--precompute_backbone_features", "--backbone_features_dtype"):
            assert flag in result.stdout


def test_serve_refuses_a_malformed_extra_head_or_port():
    for args, message in (
        (["--add_adapter", "no-equals-sign"], "NAME=DIR_OR_REPO"),
        (["--add_adapter", "=path"], "NAME=DIR_OR_REPO"),
        (["--port", "0"], "port"),
        (["--max_batch_tokens", "0"], "max_batch_tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_command_args("serve", ["--adapter", "some/adapter", *args])
    with pytest.raises(ValueError, match="--adapter"):
        parse_command_args("serve", [])
    serve_args, _ = parse_command_args(
        "serve", ["--adapter", "a", "--add_adapter", "x=dir/one", "--add_adapter", "y=two"]
    )
    assert serve_args.extra_adapters() == {"x": "dir/one", "y": "two"}
