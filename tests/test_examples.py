"""The examples run as written (with smaller settings), so they never rot."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_trains_saves_reloads_and_generates_at_each_alpha(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--output-dir", str(tmp_path), "--pairs", "48"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("alpha=")]
    assert [line.split()[0] for line in lines] == ["alpha=0.0", "alpha=0.5", "alpha=1.0", "alpha=1.5", "alpha=2.0"]
    assert "held-out reward accuracy" in result.stdout
    assert sorted(os.listdir(tmp_path / "adapter")) >= ["README.md", "alignment_head.safetensors"]
    assert not any(name.startswith("model") for name in os.listdir(tmp_path / "adapter"))


def readme_install_extras() -> set[str]:
    """The extras of the README's first command (the one that runs the quickstart)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        first_command = readme.read().split("```bash\n", 1)[1].split("```", 1)[0]
    return {extra for group in re.findall(r'-e "\.\[([^\]]*)\]"', first_command) for extra in group.split(",")}


def test_readme_install_command_pulls_the_extras_the_examples_name():
    needed = set()
    for name in os.listdir(os.path.join(ROOT, "examples")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "examples", name), encoding="utf-8") as example:
                needed |= set(re.findall(r"\.\[(\w+)\]", example.read()))
    assert "eval" in needed  # examples/evaluate.py plots with matplotlib
    assert needed <= readme_install_extras()


def test_evaluate_example_without_matplotlib_stops_at_start_naming_the_extra(monkeypatch):
    spec = importlib.util.spec_from_file_location("evaluate_example", os.path.join(ROOT, "examples", "evaluate.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    monkeypatch.setattr(example, "load_preference_dataset", lambda *a, **k: pytest.fail("ran before the check"))
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[eval\]"'):
        example.main()
