"""
QLoRA-style training on CPU: a 4-bit (nf4, bitsandbytes) backbone with a trainable alignment head.

bitsandbytes' CPU backend has a trap: on CPUs with AVX512-BF16, the first forward of a `Linear4bit` in eval mode with
an input that needs no gradient repacks its weights in place into a CPU inference layout, for good. Every later forward
then runs another kernel (logits move by ~1e-3) which has no autograd formula, so gradients through those layers are
wrong, silently. A model fresh from `from_pretrained` is in eval mode: call `.train()` before any forward (the
trainer's own steps run in train mode).
"""

import pytest
import torch
from peft import LoraConfig
from testing_utils import preference_data
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from iav_trl import IAVConfig, IAVTrainer
from iav_trl.models.tiny import tiny_causal_lm

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[quantization])")
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose widths (64) are multiples of the nf4 block size, as in real models."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_4bit(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=NF4, device_map="cpu")


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def is_repacked(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def dequantized_reference(model_dir, model_4bit):
    """The float model with each 4-bit layer's weight replaced by its dequantized value (plain nn.Linear math)."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir).train()
    with torch.no_grad():
        for name, layer in quantized_layers(model_4bit).items():
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            reference.get_submodule(name).weight.copy_(weight)
    return reference


def logits_and_input_grad(model, input_ids):
    """Logits, and the gradient of sum(logits^2) with respect to the input embeddings (through every layer)."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.pow(2).sum().backward()
    return logits.detach(), embeds.grad


def test_4bit_backbone_in_train_mode_computes_with_its_dequantized_weights(model_dir):
    model = load_4bit(model_dir).train()  # before any forward
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4" for layer in layers.values())
    reference = dequantized_reference(model_dir, model)
    input_ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])

    logits, grad = logits_and_input_grad(model, input_ids)
    ref_logits, ref_grad = logits_and_input_grad(reference, input_ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
    assert not any(is_repacked(layer) for layer in layers.values())


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
@pytest.mark.filterwarnings("ignore:bitsandbytes.*gemv_4bit")  # torch: the repacked kernel has no autograd formula
def test_eval_mode_forward_repacks_4bit_weights_and_breaks_their_gradients(model_dir):
    model = load_4bit(model_dir)
    assert not model.training  # what `from_pretrained` returns
    reference = dequantized_reference(model_dir, model)
    input_ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        model(input_ids)
    assert all(is_repacked(layer) for layer in quantized_layers(model).values())

    _, grad = logits_and_input_grad(model.train(), input_ids)  # too late: the layout change is permanent
    _, ref_grad = logits_and_input_grad(reference, input_ids)
    assert not torch.allclose(grad, ref_grad, rtol=1e-2, atol=1e-2)


def train_on_4bit(model_dir, tokenizer, tmp_path, **trainer_kwargs) -> tuple[IAVTrainer, set[str]]:
    """A few IAVTrainer steps on the 4-bit model; returns the trainer and the names of the parameters that changed."""
    model = load_4bit(model_dir).train()  # before any forward, see the module docstring
    args = IAVConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        max_steps=3,
        learning_rate=1e-2,
        num_interventions=3,
        intervention_dim=8,
        report_to=[],
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        seed=0,
    )
    trainer = IAVTrainer(
        model, args=args, train_dataset=preference_data(6), processing_class=tokenizer, **trainer_kwargs
    )
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(before[name], param)}
    return trainer, changed


def assert_4bit_weights_intact(model):
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7
    assert all(layer.weight.dtype == torch.uint8 and not is_repacked(layer) for layer in layers.values())


def test_qlora_head_trains_on_4bit_backbone_which_stays_unchanged_and_alpha_zero_is_the_4bit_base(
    model_dir, tokenizer, tmp_path
):
    trainer, changed = train_on_4bit(model_dir, tokenizer, tmp_path)
    iav = trainer.model
    head_params = {name for name, _ in iav.named_parameters() if name.startswith("alignment_heads.")}
    assert changed == head_params  # every head parameter, and nothing else
    assert_4bit_weights_intact(iav.get_base_model())

    input_ids = torch.tensor([tokenizer("Human: how do I bake bread? Assistant: Sure!")["input_ids"]])
    iav.train()  # stay in train mode: an eval-mode forward would repack the 4-bit weights
    with torch.no_grad():
        base_logits = iav.get_base_model()(input_ids).logits  # the 4-bit model on its own
        aligned = iav(input_ids, alpha=0.0, return_alignment=True)
        standard = iav(input_ids, alpha=1.0).logits
    assert torch.equal(aligned.logits, base_logits)
    assert torch.equal(aligned.base_logits, base_logits)
    assert (standard - base_logits).abs().max() > 1e-4  # the trained head does change the output


def test_lora_on_4bit_backbone_trains_lora_and_head_and_leaves_4bit_weights_unchanged(model_dir, tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, changed = train_on_4bit(model_dir, tokenizer, tmp_path, peft_config=lora)
    names = [name for name, _ in trainer.model.named_parameters()]
    trained = {name for name in names if name.startswith("alignment_heads.") or "lora_B" in name}
    assert trained <= changed  # lora_B starts at zero, so lora_A may not move in the first step
    assert all(name.startswith("alignment_heads.") or "lora_" in name for name in changed)
    assert_4bit_weights_intact(trainer.model.get_base_model())


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking trap needs a CPU with AVX512-BF16")
def test_evaluating_during_training_does_not_repack_4bit_weights(model_dir, tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, _ = train_on_4bit(model_dir, tokenizer, tmp_path, peft_config=lora)
    trainer.model.eval()
    with torch.no_grad():  # exactly the forward that repacks weights when nothing prevents it
        trainer.model(torch.tensor([[5, 6, 7, 8]]))
    assert not any(is_repacked(layer) for layer in quantized_layers(trainer.model.get_base_model()).values())
