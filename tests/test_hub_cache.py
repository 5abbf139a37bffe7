"""Loading a base model and adapters by Hub repo id, offline, from a local Hugging Face cache (as after a download)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from testing_utils import COMMIT, randomize_heads

from iav_trl import AlignmentHeadConfig, get_iav_model
from iav_trl.models.base_models import file_sha256
from iav_trl.models.tiny import tiny_causal_lm


def add_to_cache(cache, repo_id, folder):
    """Lay `folder` out as huggingface_hub caches a download of `repo_id` at `main`: refs/main -> snapshots/<sha>."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    shutil.copytree(folder, os.path.join(repo, "snapshots", COMMIT))


def test_base_and_adapters_load_by_repo_id_from_the_local_hub_cache(tokenizer, tmp_path):
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = get_iav_model(base, AlignmentHeadConfig(num_interventions=2, intervention_dim=8))
    model.add_adapter("harmless", AlignmentHeadConfig(num_interventions=3, intervention_dim=4))
    randomize_heads(model)
    model.save_pretrained(tmp_path / "adapter")  # "harmless" goes to the subfolder harmless/
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = model(input_ids, alpha={"default": 1.0, "harmless": 0.5}).logits

    cache = tmp_path / "hub-cache"
    add_to_cache(cache, "me/tiny-base", tmp_path / "base")
    add_to_cache(cache, "me/iav-head", tmp_path / "adapter")
    script = textwrap.dedent(
        """
        import json, sys, torch
        from iav_trl import IAVModel
        model = IAVModel.from_pretrained("me/tiny-base", "me/iav-head")  # both by repo id
        model.load_adapter("me/iav-head", adapter_name="harmless", subfolder="harmless")
        with torch.no_grad():
            logits = model(torch.tensor([[5, 6, 7, 8, 9]]), alpha={"default": 1.0, "harmless": 0.5}).logits
        json.dump(logits.tolist(), sys.stdout)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout)), expected, rtol=1e-5, atol=1e-6)
    saved = load_file(tmp_path / "adapter" / "alignment_head.safetensors")
    assert any(value.abs().sum() > 0 for value in saved.values())  # the heads are not the zero-initialised ones


def test_a_repo_id_missing_from_the_offline_cache_fails_with_a_clear_error(tokenizer, tmp_path):
    script = "from iav_trl import IAVModel, AlignmentHeadConfig; AlignmentHeadConfig.from_pretrained('me/absent')"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "me/absent" in out.stderr.splitlines()[-1]


def test_a_gguf_digest_is_read_once_and_again_when_the_file_changes(tmp_path):
    """The digest that keys a GGUF conversion is remembered per process, but never outlives the file's contents."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"first" * 1000)
    assert file_sha256(str(path)) == hashlib.sha256(b"first" * 1000).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(b"first" * 1000).hexdigest()
    path.write_bytes(b"second" * 1000)
    assert file_sha256(str(path)) == hashlib.sha256(b"second" * 1000).hexdigest()
    link = tmp_path / "link.gguf"
    os.symlink(path, link)
    assert file_sha256(str(link)) == hashlib.sha256(b"second" * 1000).hexdigest()
