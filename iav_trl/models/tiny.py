"""Tiny causal LMs and tokenizers built locally, for the quickstart, examples and tests (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]

# A minimal chat template in the style of Zephyr/TRL tests: role markers, an end marker per turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message.get('tool_calls') %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "{{ (message['content'] or '') + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Shapes of each architecture family at tiny size; `tie_word_embeddings` and soft-capping/scaling are what differ.
TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": dict(model_type="llama", intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_head=4, tie_word_embeddings=True),
    "gemma2": dict(
        model_type="gemma2",
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
    ),
    "cohere": dict(model_type="cohere", intermediate_size=64, num_attention_heads=4, logit_scale=0.5),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with pad/bos/eos tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_causal_lm(
    architecture: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given family (see `TINY_ARCHITECTURES`)."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}.")
    kwargs = dict(TINY_ARCHITECTURES[architecture])
    model_type = kwargs.pop("model_type")
    if model_type == "gpt2":
        kwargs.update(n_embd=hidden_size, n_layer=num_layers, n_positions=512)
    else:
        kwargs.update(hidden_size=hidden_size, num_hidden_layers=num_layers, max_position_embeddings=512)
    kwargs.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=6)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    return model


def preference_texts(dataset: Iterable[dict]) -> Iterator[str]:
    """Every text of a preference dataset's `prompt`, `chosen` and `rejected` columns (message contents or strings)."""
    for row in dataset:
        for column in ("prompt", "chosen", "rejected"):
            value = row[column]
            if isinstance(value, str):
                yield value
            else:
                yield from (message["content"] for message in value)


def save_tiny_checkpoint(
    path: str,
    texts: Iterable[str],
    architecture: str = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
) -> str:
    """A random `tiny_causal_lm` and a BPE tokenizer trained on `texts`, saved to `path` like a Hub checkpoint."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_causal_lm(architecture, vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
