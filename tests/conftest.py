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


# The test tiers (`make test-fast` leaves out `slow`): modules whose tests run real models, several processes, servers
# or benchmarks end to end. A test elsewhere can carry the markers itself.
SLOW_MODULES = {
    "test_alignment_benchmark",
    "test_compiled_decoding",
    "test_distributed",
    "test_examples",
    "test_feature_cache_benchmark",
    "test_real_data_benchmark",
    "test_real_model",
    "test_serving",
    "test_soak",
}
MULTIPROCESS_MODULES = {"test_distributed"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in MULTIPROCESS_MODULES:
            item.add_marker(pytest.mark.multiprocess)
