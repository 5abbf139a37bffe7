"""
Real 2-process runs through `accelerate launch` on CPU (gloo), with the configs in `accelerate_configs/`: DDP,
DeepSpeed ZeRO-2 and ZeRO-3. Each process runs `tests/scripts/train_head.py` and reports what it saw; the tests
check that the run really was distributed and that the adapter is saved once, whole, and reloads as the trained head.

`fsdp2.yaml` is not run here: on a machine without accelerators accelerate's state is `MULTI_CPU`, which never
switches to FSDP, so the run would silently be plain DDP.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from iav_trl import IAVModel
from iav_trl.models.tiny import tiny_causal_lm
from iav_trl.tuners.iav.head import AlignmentHead

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
SCRIPT = ROOT / "tests" / "scripts" / "train_head.py"
NUM_PROMPTS = 8  # as in train_head.py: 2 processes x 2 pairs x 2 steps, one epoch
HEAD_SHAPES = {name: tuple(p.shape) for name, p in AlignmentHead(32, 3, 8).state_dict().items()}  # tiny: d=32

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e .[deepspeed])"
)
# On CPU the GPU configs run with 2 processes, in float32, on a free port.
CPU_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
RUNS = {
    "ddp": ("ddp_cpu.yaml", [], "DistributedType.MULTI_CPU", "DistributedDataParallel", None),
    "zero2": ("zero2.yaml", CPU_OVERRIDES, "DistributedType.DEEPSPEED", "DeepSpeedEngine", 2),
    "zero3": ("zero3.yaml", CPU_OVERRIDES, "DistributedType.DEEPSPEED", "DeepSpeedEngine", 3),
    # Without `zero3_save_16bit_model` the trainer hands no head weights to `_save`, which gathers them itself.
    "zero3-no-16bit-save": (
        "zero3.yaml",
        [*CPU_OVERRIDES, "--zero3_save_16bit_model", "false"],
        "DistributedType.DEEPSPEED",
        "DeepSpeedEngine",
        3,
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The tiny model and tokenizer every process loads by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def launch_env(request, tmp_path_factory):
    """Offline, one thread per process; DeepSpeed's JIT-compiled CPU comm op is built once per machine and cached."""
    cache = request.config.cache
    extensions = cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.mktemp("torch_extensions")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def launch(
    config: str, overrides: list[str], model_dir: Path, tmp_path: Path, env: dict, script_args: tuple = ()
) -> tuple[list, list]:
    """Run `train_head.py` under `accelerate launch`; return each rank's facts and head tensors, by rank."""
    facts_dir = tmp_path / "facts"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += [*overrides, str(SCRIPT), "--model_dir", str(model_dir)]
    command += ["--output_dir", str(tmp_path / "adapter"), "--facts_dir", str(facts_dir), *script_args]
    # A session of its own, so that a hung run is killed with every process torchrun started.
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-5000:]
    reports = sorted(facts_dir.glob("rank*.json"))
    assert [path.name for path in reports] == ["rank0.json", "rank1.json"], "one report per process"
    facts = [json.loads(path.read_text()) for path in reports]
    heads = [load_file(facts_dir / f"rank{rank}.safetensors") for rank in range(2)]
    return facts, heads


def prompts_seen(rows: list[str]) -> list[int]:
    return [int(re.search(r"question number (\d+),", row).group(1)) for row in rows]


@pytest.mark.parametrize(
    "run",
    [
        "ddp",
        pytest.param("zero2", marks=needs_deepspeed),
        pytest.param("zero3", marks=needs_deepspeed),
        pytest.param("zero3-no-16bit-save", marks=needs_deepspeed),
    ],
)
def test_two_process_run_is_distributed_and_saves_the_whole_head_once(run, model_dir, launch_env, tmp_path):
    config, overrides, distributed_type, wrapper, zero_stage = RUNS[run]
    facts, heads = launch(config, overrides, model_dir, tmp_path, launch_env)

    # Two processes in one gloo group, each training through the engine's wrapper.
    assert [f["rank"] for f in facts] == [0, 1]
    for rank_facts in facts:
        assert rank_facts["world_size"] == 2
        assert rank_facts["backend"] == "gloo"
        assert rank_facts["distributed_type"] == distributed_type
        assert rank_facts["wrapper"].rsplit(".", 1)[-1] == wrapper
        assert rank_facts["zero_stage"] == zero_stage
        assert rank_facts["global_step"] == 2

    # The data was sharded: each prompt (its chosen and its rejected row) went to exactly one process.
    seen = [prompts_seen(rank_facts["rows"]) for rank_facts in facts]
    for prompts in seen:  # 2 steps x 2 pairs, each pair a chosen and a rejected row
        assert len(prompts) == 2 * 2 * 2 and all(prompts.count(i) == 2 for i in prompts)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(NUM_PROMPTS))

    if zero_stage == 3:
        assert all(f["loaded_partitioned"] for f in facts), "zero3_init_flag: from_pretrained loads partitioned"
        assert all(sorted(f["head_partitioned"]) == sorted(HEAD_SHAPES) for f in facts), "the head is partitioned"
        assert all("partitioned by DeepSpeed ZeRO-3" in f["direct_save_error"] for f in facts)
    else:
        assert all(f["direct_save_error"] is None for f in facts)

    # The processes end with the same head, and training moved it (W_write starts at zero).
    assert {k: tuple(v.shape) for k, v in heads[0].items()} == HEAD_SHAPES
    for name in HEAD_SHAPES:
        assert heads[0][name].equal(heads[1][name]), name
    assert heads[0]["write.weight"].abs().sum() > 0

    # Rank 0 wrote the adapter once, rank 1 wrote nothing; it holds the full head and loads as the trained one.
    written = facts[0]["written"]
    assert written.count("alignment_head.safetensors") == 1
    assert written.count("alignment_head_config.json") == 1
    assert facts[1]["written"] == []
    adapter = tmp_path / "adapter"
    saved = load_file(adapter / "alignment_head.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == HEAD_SHAPES
    loaded = IAVModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    for name, param in loaded.alignment_heads["default"].state_dict().items():
        assert param.equal(heads[0][name]), name


def test_ddp_trains_from_cached_backbone_features_as_from_the_backbone(model_dir, launch_env, tmp_path):
    """Each process caches its own shard of the pairs; training then never runs the backbone, and ends with the head
    a run without the cache trains."""
    config, overrides = RUNS["ddp"][:2]
    env = dict(launch_env, IAV_TRL_CACHE=str(tmp_path / "cache"))
    _, plain = launch(config, overrides, model_dir, tmp_path / "plain", env)
    facts, cached = launch(config, overrides, model_dir, tmp_path / "cached", env, ("--precompute_backbone_features",))
    assert [f["rows"] for f in facts] == [[], []]  # no backbone pass in training
    assert [f["global_step"] for f in facts] == [2, 2]
    shards = [name for name in os.listdir(tmp_path / "cache" / "features") if name.startswith("iav-backbone-features")]
    assert len(shards) == 2  # one shard per process
    for name, value in plain[0].items():
        torch.testing.assert_close(cached[0][name], value, rtol=1e-5, atol=1e-6)
        assert cached[1][name].equal(cached[0][name])


def test_the_cli_under_ddp_cpu_trains_one_distributed_run(launch_env, tmp_path):
    """`iav-trl train` with no `use_cpu` flag, as docs/distributing_training.md launches it: the two processes form
    one group, so the 199 training rows are split (13 steps of 2 x 8 rows per epoch, not 25 of 8) and one process,
    the main one, reports the save."""
    output_dir = tmp_path / "ddp-smoke"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp_cpu.yaml")]
    command += ["-m", "iav_trl", "train", "--config", "recipes/quickstart_cpu.yaml", "--max_steps", "2"]
    command += ["--logging_steps", "2", "--output_dir", str(output_dir)]
    process = subprocess.run(command, cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-5000:]
    output = process.stdout + process.stderr
    assert "Dropped 37 of 236 rows" in output  # 199 rows are trained on
    assert set(re.findall(r"'epoch': '([0-9.]+)'", output)) == {"0.1538"}  # 2 of ceil(199 / 16) = 13 steps
    assert output.count(f"Alignment head saved to {output_dir}.") == 1
    assert (output_dir / "alignment_head.safetensors").is_file()


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_accelerate_configs_load_with_the_promised_engine_settings(config):
    parsed = load_config_from_file(str(CONFIGS / config))
    raw = yaml.safe_load((CONFIGS / config).read_text())
    expected = {
        "ddp.yaml": ("MULTI_GPU", False),
        "ddp_cpu.yaml": ("MULTI_GPU", True),  # torchrun starts the processes; they run on CPU
        "zero2.yaml": ("DEEPSPEED", False),
        "zero3.yaml": ("DEEPSPEED", False),
        "fsdp2.yaml": ("FSDP", False),
    }
    distributed_type, use_cpu = expected[config]
    assert parsed.distributed_type == distributed_type
    assert parsed.use_cpu is use_cpu
    if config.startswith("zero"):
        assert raw["deepspeed_config"]["zero_stage"] == int(config[4])
        assert raw["deepspeed_config"]["zero3_init_flag"] is (config == "zero3.yaml")
    if config == "fsdp2.yaml":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes nothing otherwise
