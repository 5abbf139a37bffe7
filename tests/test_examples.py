"""The examples run as written (with smaller settings), so they never rot."""

import os
import subprocess
import sys

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
