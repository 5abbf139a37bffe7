"""Shared fixtures: tiny models of every supported family, a tokenizer trained locally, offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from testing_utils import CORPUS, HH, ULTRAFEEDBACK  # noqa: E402

from iav_trl import load_preference_dataset  # noqa: E402
from iav_trl.models.tiny import (  # noqa: E402
    TINY_ARCHITECTURES,
    preference_texts,
    save_tiny_checkpoint,
    tiny_causal_lm,
    train_tokenizer,
)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ARCHITECTURES = sorted(TINY_ARCHITECTURES)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(params=ARCHITECTURES)
def architecture(request):
    return request.param


@pytest.fixture
def base_model(architecture):
    return tiny_causal_lm(architecture, vocab_size=400).eval()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama with a BPE tokenizer trained on the fixtures' texts, saved as a checkpoint directory."""
    datasets.disable_progress_bars()
    texts = [text for path in (HH, ULTRAFEEDBACK) for text in preference_texts(load_preference_dataset(path))]
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), texts, vocab_size=1024, hidden_size=32)
