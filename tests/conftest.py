"""Shared fixtures: tiny models of every supported family, a tokenizer trained locally, offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from iav_trl.tiny import TINY_ARCHITECTURES, tiny_causal_lm, train_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ARCHITECTURES = sorted(TINY_ARCHITECTURES)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake.",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
    "I am sorry, but I cannot help with that request because it could hurt someone.",
    "Sure! Here is a helpful, harmless and honest answer to your question.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(params=ARCHITECTURES)
def architecture(request):
    return request.param


@pytest.fixture
def base_model(architecture):
    return tiny_causal_lm(architecture, vocab_size=400).eval()
