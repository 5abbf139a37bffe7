"""Compiled decoding serves every alpha, per-row alphas and head mixes with one graph (no Dynamo recompiles)."""

import random

import pytest
import torch
from testing_utils import randomize_heads
from torch._dynamo.utils import counters
from transformers import CompileConfig

from iav_trl import AlignmentHeadConfig, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm

NEW_TOKENS = 6


def compile_config() -> CompileConfig:
    """transformers' own decoding-step compilation (inductor), which it otherwise turns on only on accelerators."""
    config = CompileConfig(fullgraph=False, mode=None)
    config._compile_all_devices = True  # the documented switch for compiling on CPU
    return config


@pytest.fixture(scope="module")
def two_heads():
    torch.manual_seed(0)
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400).eval(), AlignmentHeadConfig(4, 16), "harmless")
    model.add_adapter("helpful", AlignmentHeadConfig(4, 16))
    randomize_heads(model, std=0.3)
    return model


def decode(model, ids, alpha, compiled: bool):
    kwargs = dict(cache_implementation="static", compile_config=compile_config()) if compiled else {}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        alpha=alpha,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        disable_compile=not compiled,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, dim=1)


def test_one_compiled_graph_serves_every_alpha_row_alphas_and_head_mix(two_heads):
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(1))
    for warm_up in (1.0, 0.0):  # the aligned graph and the base model's (every strength 0: no head runs)
        decode(two_heads, ids, warm_up, compiled=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2, "generate did not compile the decoding step: the test would prove nothing"

    rng = random.Random(0)
    alphas = [round(rng.uniform(-0.5, 2.5), 3) for _ in range(20)]
    alphas += [[0.3, 1.7], [2.0, 0.0], {"harmless": 1.0, "helpful": 0.5}, {"helpful": 1.5}, {"harmless": 0.0}]
    changed = 0
    for alpha in alphas:
        tokens, scores = decode(two_heads, ids, alpha, compiled=True)
        eager_tokens, eager_scores = decode(two_heads, ids, alpha, compiled=False)
        assert torch.equal(tokens, eager_tokens), alpha
        torch.testing.assert_close(scores, eager_scores, rtol=1e-4, atol=1e-4)
        changed += not torch.equal(tokens, decode(two_heads, ids, 1.0, compiled=False)[0])
    assert counters["stats"]["unique_graphs"] == graphs, "a new alpha, row alphas or head mix recompiled"
    assert changed >= 10, "the alphas hardly change the output: the test would not see a stale strength"
