"""IAVModel against independent computations: the base model's own logits and generations, and a plain-PyTorch
evaluation of the documented head formula."""

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import randomize_heads, reference_alignment
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from iav_trl import AlignmentHeadConfig, IAVModel, get_iav_model
from iav_trl.models.tiny import tiny_causal_lm

SMALL_HEAD = AlignmentHeadConfig(num_interventions=3, intervention_dim=8)
# Logit scale / soft-cap of the tiny families, written out here (not read through iav_trl.tuners.iav.readout).
SCALE = {"cohere": 0.5}
SOFTCAP = {"gemma2": 3.0}


def final_hidden(base, input_ids):
    return base(input_ids, output_hidden_states=True).hidden_states[-1]


@pytest.fixture
def input_ids():
    return torch.randint(7, 400, (4, 9), generator=torch.Generator().manual_seed(1))


def test_fresh_head_reproduces_base_logits_bit_exactly(base_model, input_ids):
    expected = base_model(input_ids).logits
    model = get_iav_model(base_model, SMALL_HEAD)
    for alpha in (None, 1.0, 2.0, [0.0, 0.5, 1.0, 2.0]):
        assert torch.equal(model(input_ids, alpha=alpha).logits, expected)


def test_alpha_zero_and_disabled_alignment_reproduce_base_logits(base_model, input_ids):
    expected = base_model(input_ids).logits
    model = get_iav_model(base_model, SMALL_HEAD)
    randomize_heads(model)
    assert not torch.equal(model(input_ids, alpha=1.0).logits, expected)
    assert torch.equal(model(input_ids, alpha=0.0).logits, expected)
    with model.disable_alignment():
        assert torch.equal(model(input_ids, alpha=1.5).logits, expected)
    assert torch.equal(model.get_base_model()(input_ids).logits, expected)


def test_alpha_zero_reproduces_base_greedy_and_sampled_generation(base_model, input_ids):
    mask = torch.ones_like(input_ids)
    greedy = base_model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.manual_seed(3)
    sampled = base_model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0)
    model = get_iav_model(base_model, SMALL_HEAD)
    randomize_heads(model)
    assert torch.equal(model.generate(input_ids, attention_mask=mask, alpha=0.0, max_new_tokens=8), greedy)
    torch.manual_seed(3)
    ours = model.generate(input_ids, attention_mask=mask, alpha=0.0, max_new_tokens=8, do_sample=True, top_k=0)
    assert torch.equal(ours, sampled)
    with model.disable_alignment():
        assert torch.equal(model.generate(input_ids, attention_mask=mask, max_new_tokens=8), greedy)
    # A fresh head at the standard strength generates exactly what the base model does.
    fresh = get_iav_model(tiny_causal_lm(base_model.config.model_type, vocab_size=400).eval(), SMALL_HEAD)
    assert torch.equal(fresh.generate(input_ids, attention_mask=mask, alpha=1.0, max_new_tokens=8), greedy)


def test_logit_shift_equals_alpha_times_reference_alignment_vector(base_model, architecture, input_ids):
    expected_base = base_model(input_ids).logits
    hidden = final_hidden(base_model, input_ids)
    model = get_iav_model(base_model, SMALL_HEAD)
    randomize_heads(model)
    head = model.alignment_heads["default"]
    a_t = reference_alignment(head, hidden, base_model.get_output_embeddings().weight, SCALE.get(architecture, 1.0))
    for alpha in (-1.0, 0.5, 1.0, 1.5, 2.0):
        out = model(input_ids, alpha=alpha, return_alignment=True)
        torch.testing.assert_close(out.logits - expected_base, alpha * a_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.base_logits, expected_base, rtol=0, atol=0)
        torch.testing.assert_close(out.alignment_logits, alpha * a_t, rtol=1e-4, atol=1e-5)
        # The decoding path (no decomposition) gives the same logits.
        torch.testing.assert_close(model(input_ids, alpha=alpha).logits, out.logits, rtol=1e-4, atol=1e-5)
    if architecture in SOFTCAP:  # z_base is capped; the alignment is added after the cap
        assert expected_base.abs().max() <= SOFTCAP[architecture]


def test_per_row_alpha_matches_separate_single_alpha_calls(base_model, input_ids):
    model = get_iav_model(base_model, SMALL_HEAD)
    randomize_heads(model)
    alphas = [0.0, 0.5, 1.0, 2.0]
    mixed = model(input_ids, alpha=alphas).logits
    for row, alpha in enumerate(alphas):
        assert torch.equal(mixed[row], model(input_ids, alpha=alpha).logits[row])
        torch.testing.assert_close(mixed[row], model(input_ids[row : row + 1], alpha=alpha).logits[0])
    mask = torch.ones_like(input_ids)
    generated = model.generate(input_ids, attention_mask=mask, alpha=torch.tensor(alphas), max_new_tokens=6)
    for row, alpha in enumerate(alphas):
        single = model.generate(input_ids, attention_mask=mask, alpha=alpha, max_new_tokens=6)
        assert torch.equal(generated[row], single[row])


def test_two_heads_combine_linearly(base_model, input_ids):
    expected_base = base_model(input_ids).logits
    hidden = final_hidden(base_model, input_ids)
    scale = SCALE.get(base_model.config.model_type, 1.0)
    unembedding = base_model.get_output_embeddings().weight
    model = get_iav_model(base_model, SMALL_HEAD, adapter_name="helpful")
    model.add_adapter("harmless", AlignmentHeadConfig(num_interventions=2, intervention_dim=4))
    randomize_heads(model)
    a_help = reference_alignment(model.alignment_heads["helpful"], hidden, unembedding, scale)
    a_harm = reference_alignment(model.alignment_heads["harmless"], hidden, unembedding, scale)
    out = model(input_ids, alpha={"helpful": 1.0, "harmless": 0.5}).logits
    torch.testing.assert_close(out - expected_base, a_help + 0.5 * a_harm, rtol=1e-4, atol=1e-5)
    model.set_adapter({"helpful": 0.5, "harmless": 1.0})
    out = model(input_ids, alpha=2.0).logits
    torch.testing.assert_close(out - expected_base, a_help + 2.0 * a_harm, rtol=1e-4, atol=1e-5)
    model.set_adapter("harmless")
    torch.testing.assert_close(model(input_ids).logits - expected_base, a_harm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ([1.0, 2.0], "has 2 values but the batch has 4 rows"),
        ([1.0, float("nan"), 1.0, 1.0], "finite"),
        ({"nope": 1.0}, "Unknown adapter"),
        ([[1.0]], "1-D"),
        ("strong", "number"),
        (True, "finite number"),
    ],
)
def test_bad_alpha_raises_value_error_naming_what_was_expected(alpha, message, input_ids):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    with pytest.raises(ValueError, match=message):
        model(input_ids, alpha=alpha)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, alpha=alpha, max_new_tokens=2)


def test_set_adapter_rejects_unknown_names_and_bad_weights():
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['x'\]; loaded adapters are \['default'\]"):
        model.set_adapter("x")
    with pytest.raises(ValueError, match="finite"):
        model.set_adapter({"default": float("nan")})
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter("../escape", SMALL_HEAD)


def test_backbone_is_frozen_and_only_heads_train(base_model):
    model = get_iav_model(base_model, SMALL_HEAD)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("alignment_heads.default.") for name in trainable)
    head_params = sum(p.numel() for p in model.alignment_heads.parameters())
    assert model.get_nb_trainable_parameters() == (head_params, head_params + base_model.num_parameters())


def test_generate_supports_beams_streamers_stopping_criteria_and_chat_templates(tokenizer):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)).eval(), SMALL_HEAD)
    randomize_heads(model)
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    beams = model.generate(**inputs, alpha=1.0, num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert beams.shape[0] == 2
    # Per-row alpha with beams: each row is expanded to its beams.
    batch = tokenizer(["Hello there", "The quick brown"], return_tensors="pt", padding=True, padding_side="left")
    per_row = model.generate(**batch, alpha=[0.0, 2.0], num_beams=2, max_new_tokens=4)
    base_beams = model.get_base_model().generate(**batch, num_beams=2, max_new_tokens=4)
    assert torch.equal(per_row[0], base_beams[0])

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= inputs["input_ids"].shape[1] + 3)

    stopped = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([StopAfter()]), max_new_tokens=20)
    assert stopped.shape[1] == inputs["input_ids"].shape[1] + 3
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = model.generate(**inputs, streamer=streamer, max_new_tokens=5, alpha=1.5)
    streamed = "".join(streamer)
    assert streamed == tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_to_dtype_and_device_moves_heads_too(input_ids):
    model = get_iav_model(tiny_causal_lm("qwen2", vocab_size=400).eval(), SMALL_HEAD)
    randomize_heads(model)
    model.to(torch.float64)
    assert model.alignment_heads["default"].read.weight.dtype == torch.float64
    base = model.get_base_model()(input_ids).logits
    assert model(input_ids, alpha=1.0).logits.dtype == torch.float64
    assert torch.equal(model(input_ids, alpha=0.0).logits, base)
    half = get_iav_model(tiny_causal_lm("qwen2", vocab_size=400).to(torch.bfloat16).eval(), SMALL_HEAD)
    assert half.alignment_heads["default"].read.weight.dtype == torch.float32  # full-precision head
    assert half(input_ids, alpha=1.0).logits.dtype == torch.bfloat16


def test_save_and_load_round_trip_bit_exactly(tmp_path, base_model, input_ids):
    model = get_iav_model(base_model, SMALL_HEAD)
    randomize_heads(model)
    model.add_adapter("second", AlignmentHeadConfig(num_interventions=2, intervention_dim=4, default_alpha=0.5))
    randomize_heads(model, seed=1)
    expected = model(input_ids, alpha=1.0).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "alignment_head.safetensors",
        "alignment_head_config.json",
        "second",
    ]
    saved = load_file(tmp_path / "alignment_head.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.alignment_heads["default"].state_dict().items())
    assert set(saved) == set(model.alignment_heads["default"].state_dict())  # heads only, no backbone tensor
    config = json.loads((tmp_path / "alignment_head_config.json").read_text())
    assert config["hidden_size"] == 32 and config["vocab_size"] == 400
    assert config["model_type"] == base_model.config.model_type
    card = (tmp_path / "README.md").read_text()
    assert "library_name: iav-trl" in card and "alpha" in card

    fresh_base = copy.deepcopy(base_model)
    loaded = IAVModel.from_pretrained(fresh_base, tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        for key, value in model.alignment_heads[name].state_dict().items():
            assert torch.equal(loaded.alignment_heads[name].state_dict()[key], value)
    assert torch.equal(loaded(input_ids, alpha=1.0).logits, expected)
    assert loaded.iav_config["second"].default_alpha == 0.5
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = IAVModel.from_pretrained(copy.deepcopy(base_model), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.alignment_heads.parameters())


def test_loading_onto_a_base_with_other_shapes_fails_naming_both(tmp_path):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400, hidden_size=32), SMALL_HEAD)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_size=32 .* hidden_size=48"):
        IAVModel.from_pretrained(tiny_causal_lm("llama", vocab_size=400, hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size=400 .* vocab_size=512"):
        IAVModel.from_pretrained(tiny_causal_lm("llama", vocab_size=512, hidden_size=32), tmp_path)


def test_loading_onto_a_differently_named_base_warns(tmp_path, caplog):
    source = tiny_causal_lm("llama", vocab_size=400)
    source.config._name_or_path = "org/base-a"
    get_iav_model(source, SMALL_HEAD).save_pretrained(tmp_path)
    target = tiny_causal_lm("llama", vocab_size=400)
    target.config._name_or_path = "org/base-b"
    with caplog.at_level("WARNING"):
        IAVModel.from_pretrained(target, tmp_path)
    assert "'org/base-a' but is loaded onto 'org/base-b'" in caplog.text


def test_a_head_loaded_onto_other_weights_is_caught_whatever_the_names(tmp_path, caplog):
    def unnamed_base(shift: float = 0.0):
        model = tiny_causal_lm("llama", vocab_size=400)  # seeded: the same weights each time
        model.config._name_or_path = ""  # built in memory: no name to compare
        with torch.no_grad():
            model.get_input_embeddings().weight.add_(shift)  # the first weight: always sampled
        return model

    get_iav_model(unnamed_base(), SMALL_HEAD).save_pretrained(tmp_path)
    IAVModel.from_pretrained(unnamed_base(), tmp_path, strict=True)  # the same weights: loads
    with caplog.at_level("WARNING"):
        IAVModel.from_pretrained(unnamed_base(shift=0.1), tmp_path)
    assert "has other weights" in caplog.text and "strict=True" in caplog.text
    with pytest.raises(ValueError, match="has other weights.*Load it onto the base it was trained on"):
        IAVModel.from_pretrained(unnamed_base(shift=0.1), tmp_path, strict=True)


def test_one_base_directory_named_by_relative_and_absolute_paths_does_not_warn(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_causal_lm("llama", vocab_size=400).save_pretrained(tmp_path / "base")
    tiny_causal_lm("llama", vocab_size=400).save_pretrained(tmp_path / "other")
    trained_on = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))  # recorded as the absolute path
    get_iav_model(trained_on, SMALL_HEAD).save_pretrained(tmp_path / "head")
    with caplog.at_level("WARNING"):
        IAVModel.from_pretrained("base", tmp_path / "head")  # the same directory, relative
    assert "but is loaded onto" not in caplog.text
    with caplog.at_level("WARNING"):
        IAVModel.from_pretrained("other", tmp_path / "head")
    assert "but is loaded onto 'other'" in caplog.text


def test_default_adapter_is_at_most_three_percent_of_a_llama_shaped_model(tmp_path):
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8
    )
    with torch.device("meta"):
        base_params = LlamaForCausalLM(config).num_parameters()
    base = tiny_causal_lm("llama", vocab_size=32000, hidden_size=512, num_layers=1)
    model = get_iav_model(base, AlignmentHeadConfig())
    model.save_pretrained(tmp_path)
    head_params = sum(p.numel() for p in model.alignment_heads.parameters())
    assert head_params / base_params <= 0.03
    assert os.path.getsize(tmp_path / "alignment_head.safetensors") <= 0.03 * base_params * 4


def test_config_round_trips_and_validates(tmp_path):
    config = AlignmentHeadConfig(num_interventions=4, intervention_dim=16, dropout=0.1, default_alpha=1.5)
    config.save_pretrained(tmp_path)
    assert AlignmentHeadConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="num_interventions"):
        AlignmentHeadConfig(num_interventions=0)
    with pytest.raises(ValueError, match="default_alpha"):
        AlignmentHeadConfig(default_alpha=float("nan"))
    (tmp_path / "alignment_head_config.json").write_text('{"num_interventions": 2, "rank": 3}')
    with pytest.raises(ValueError, match=r"Unknown fields \['rank'\]"):
        AlignmentHeadConfig.from_pretrained(tmp_path)


def test_push_to_hub_uploads_the_saved_adapter(monkeypatch, input_ids):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["card"] = open(os.path.join(folder_path, "README.md")).read()
            calls["weights"] = load_file(os.path.join(folder_path, "alignment_head.safetensors"))
            return "https://hub/commit"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    randomize_heads(model)
    assert model.push_to_hub("me/my-head", private=True, token="t") == "https://hub/commit"
    assert calls["create"] == ("me/my-head", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "alignment_head.safetensors", "alignment_head_config.json"]
    assert 'IAVModel.from_pretrained(base, "me/my-head")' in calls["card"]
    assert torch.equal(calls["weights"]["read.weight"], model.alignment_heads["default"].read.weight)
    with pytest.raises(Exception, match="repo"):
        model.push_to_hub("../../etc/passwd")


# Families whose logit readout has a constant factor, each built tiny from its own transformers config, with the
# factor the model's own forward applies written out here: `(config overrides, factor on W_U x, where)`. Granite
# divides the logits by `logits_scaling`, HyperCLOVA X multiplies them by it, Cohere by `logit_scale`, Falcon-H1 by
# `lm_head_multiplier`; MiniCPM3 divides the hidden state by `logits_scaling = hidden_size / dim_model_base` before
# the LM head (so the head sees, and offsets, that scaled hidden state).
SCALED_FAMILIES = {
    "granite": (dict(logits_scaling=4.0, num_key_value_heads=2), 0.25),
    "granitemoe": (dict(logits_scaling=4.0, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), 0.25),
    "hyperclovax": (dict(logits_scaling=4.0, num_key_value_heads=2), 4.0),
    "cohere": (dict(logit_scale=0.5), 0.5),
    "cohere2": (dict(logit_scale=0.5, num_key_value_heads=2), 0.5),
    "falcon_h1": (dict(lm_head_multiplier=0.3, num_key_value_heads=2), 0.3),
    "minicpm3": (dict(dim_model_base=8, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4), 1.0),
}


@pytest.mark.parametrize("family", sorted(SCALED_FAMILIES))
def test_scaled_readout_families_follow_the_models_own_logits_in_forward_and_fused_statistics(family):
    from transformers import AutoConfig

    overrides, factor = SCALED_FAMILIES[family]
    config = AutoConfig.for_model(
        family,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    lm_head_inputs = []
    hook = base.get_output_embeddings().register_forward_pre_hook(lambda m, args: lm_head_inputs.append(args[0]))
    with torch.no_grad():
        expected = base(input_ids).logits
    hook.remove()
    weight = base.get_output_embeddings().weight
    labels = input_ids[:, 1:].unsqueeze(-1)

    model = get_iav_model(base, SMALL_HEAD)
    randomize_heads(model, std=0.2)
    with torch.no_grad():
        a_t = reference_alignment(model.alignment_heads["default"], lm_head_inputs[0], weight, factor)
        for alpha in (0.0, 1.0):
            logits = model(input_ids, alpha=alpha).logits
            torch.testing.assert_close(logits, expected + alpha * a_t, rtol=1e-4, atol=1e-5)
            decomposed = model(input_ids, alpha=alpha, return_alignment=True)
            torch.testing.assert_close(decomposed.base_logits, expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(decomposed.alignment_logits, alpha * a_t, rtol=1e-4, atol=1e-5)
            fused = model(input_ids, labels=input_ids, alpha=alpha, fused_lm_head=True)
            log_probs = (expected + alpha * a_t)[:, :-1].log_softmax(-1).gather(-1, labels).squeeze(-1)
            ref_log_probs = expected[:, :-1].log_softmax(-1).gather(-1, labels).squeeze(-1)
            torch.testing.assert_close(fused.log_probs, log_probs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fused.ref_log_probs, ref_log_probs, rtol=1e-4, atol=1e-5)
        assert a_t.abs().max() > 1e-3  # the alignment is not trivially zero


def _iav_hooks(base):
    from iav_trl.tuners.iav.model import _IAVHook

    modules = (base, base.get_output_embeddings())
    hooks = [h for m in modules for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return [h for h in hooks if isinstance(h, _IAVHook) or getattr(h, "__self__", None).__class__ is IAVModel]


def test_unload_detaches_every_hook_restores_the_base_and_frees_the_iav_model(input_ids):
    import gc
    import weakref

    base = tiny_causal_lm("llama", vocab_size=400).eval()
    untouched = copy.deepcopy(base)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    model = get_iav_model(base, SMALL_HEAD)
    randomize_heads(model)
    assert not torch.equal(model(input_ids, alpha=1.0).logits, untouched(input_ids).logits)
    assert not any(p.requires_grad for p in base.parameters())  # frozen while attached

    restored = model.unload()
    assert restored is base
    assert _iav_hooks(base) == []
    assert not base._forward_hooks and not base.get_output_embeddings()._forward_pre_hooks
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    assert torch.equal(base(input_ids).logits, untouched(input_ids).logits)
    with pytest.raises(ValueError, match="unload"):
        model(input_ids)
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None


def test_a_second_iav_model_on_one_base_detaches_the_first_and_hooks_never_pile_up(input_ids, tmp_path, caplog):
    import gc
    import weakref

    base = tiny_causal_lm("llama", vocab_size=400).eval()
    untouched = copy.deepcopy(base)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    first = get_iav_model(base, SMALL_HEAD)
    randomize_heads(first)
    with caplog.at_level("WARNING", logger="iav_trl.tuners.iav.model"):
        second = get_iav_model(base, SMALL_HEAD)  # e.g. `IAVModel.from_pretrained(base, path)` after saving
    assert "now detached" in caplog.text and "add_adapter" in caplog.text
    assert len(_iav_hooks(base)) == 2  # the second's two hooks only
    # The base serves the second (a fresh head: exactly the base model), the first refuses to run but still saves.
    assert torch.equal(second(input_ids, alpha=1.0).logits, untouched(input_ids).logits)
    with pytest.raises(ValueError, match="detached.*another IAVModel was attached.*load_adapter"):
        first(input_ids)
    with pytest.raises(ValueError, match="detached"):
        first.generate(input_ids, max_new_tokens=2)
    first.save_pretrained(tmp_path)
    assert second.unload() is base  # with the flags the base had before the first froze it
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    assert IAVModel.from_pretrained(base, tmp_path).alignment_heads["default"].write.weight.abs().sum() > 0
    # A dropped IAVModel is freed (the base holds it only weakly) and takes its hooks with it.
    gc.collect()
    assert _iav_hooks(base) == []
    for _ in range(3):
        get_iav_model(base, SMALL_HEAD)(input_ids, alpha=1.0)
    gc.collect()
    assert _iav_hooks(base) == []
    flags = {name: p.requires_grad for name, p in base.named_parameters()}  # frozen: the dropped ones never unloaded
    third = get_iav_model(base, SMALL_HEAD)
    reference = weakref.ref(third)
    assert third.unload() is base and {n: p.requires_grad for n, p in base.named_parameters()} == flags
    del third
    gc.collect()
    assert reference() is None and _iav_hooks(base) == []


def test_generate_counts_rows_from_inputs_passed_by_keyword(input_ids):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    two_rows = input_ids[:2]
    with pytest.raises(ValueError, match="has 3 values but the batch has 2 rows"):
        model.generate(inputs=two_rows, alpha=[0.0, 1.0, 2.0], max_new_tokens=2)
    # One value per row is accepted however the rows are passed, and equals the positional call.
    expected = model.generate(two_rows, alpha=[0.0, 1.0], max_new_tokens=2, do_sample=False)
    for key in ("inputs", "input_ids"):
        out = model.generate(**{key: two_rows}, alpha=[0.0, 1.0], max_new_tokens=2, do_sample=False)
        assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hidden_size", "32", "int"),
        ("dropout", "0.1", "float"),
        ("num_interventions", 2.0, "int"),
        ("default_alpha", None, "float"),
        ("inference_mode", "yes", "bool"),
        ("base_model_name_or_path", 3, "str"),
        ("base_model_fingerprint", [1], "dict"),
    ],
)
def test_a_wrongly_typed_config_field_is_named_with_the_type_found_and_expected(tmp_path, field, value, expected):
    found = type(value).__name__
    with pytest.raises(TypeError, match=rf"`{field}` must be .*{expected}.*got {found} {re.escape(repr(value))}"):
        AlignmentHeadConfig(**{field: value})
    (tmp_path / "alignment_head_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(TypeError, match=rf"alignment_head_config.json.*`{field}` must be .*{expected}.*got {found}"):
        AlignmentHeadConfig.from_pretrained(tmp_path)


def test_adapter_names_with_a_dot_are_refused_by_the_name_check():
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    with pytest.raises(ValueError, match=r"Invalid adapter name 'v1\.2'.*'\.'"):
        model.add_adapter("v1.2", SMALL_HEAD)
    assert model.adapter_names == ["default"]


def test_saving_a_model_without_adapters_says_there_is_nothing_to_save(tmp_path):
    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="nothing to save.*add_adapter"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="nothing to save"):
        get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD).save_pretrained(tmp_path, [])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("alpha", [1e39, -1e39, 1e5, [1.0, 1e5, 1.0, 1.0], {"default": 2e4}])
def test_alpha_beyond_the_documented_bound_is_refused_naming_the_bound(alpha, input_ids):
    from iav_trl.tuners.iav.alpha import ALPHA_LIMIT

    model = get_iav_model(tiny_causal_lm("llama", vocab_size=400), SMALL_HEAD)
    randomize_heads(model)
    with pytest.raises(ValueError, match=rf"\|alpha\| <= {ALPHA_LIMIT:g}"):
        model(input_ids, alpha=alpha)
    with pytest.raises(ValueError, match=rf"\|alpha\| <= {ALPHA_LIMIT:g}"):
        model.generate(input_ids, alpha=alpha, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"{ALPHA_LIMIT:g}"):
        AlignmentHeadConfig(default_alpha=1e39)
    # At the bound itself the logits stay finite, even for a head with large weights.
    assert torch.isfinite(model(input_ids, alpha=ALPHA_LIMIT).logits).all()
    model.set_adapter({"default": ALPHA_LIMIT})  # alpha times the mixing weight is bounded too
    with pytest.raises(ValueError, match=rf"adapter 'default' \(alpha times its mixing weight\).*<= {ALPHA_LIMIT:g}"):
        model(input_ids, alpha=2.0)


def test_trl_s_checkpointing_probe_reads_the_backbone_without_a_deprecation_warning(base_model):
    """DPOTrainer's `disable_gradient_checkpointing` reads `model.is_gradient_checkpointing` at every evaluation
    step; on an IAVModel that is the backbone's `is_activation_checkpointing`, with no FutureWarning from
    transformers' deprecated alias when checkpointing is off (IAVConfig's default)."""
    import warnings

    from trl.models.utils import disable_gradient_checkpointing

    model = get_iav_model(base_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.is_gradient_checkpointing is False
        with disable_gradient_checkpointing(model):
            assert base_model.is_activation_checkpointing is False
    base_model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL then calls transformers' deprecated toggles itself
        with disable_gradient_checkpointing(model):
            assert base_model.is_activation_checkpointing is False
    assert base_model.is_activation_checkpointing is True
