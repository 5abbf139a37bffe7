"""`IAVInference`: text in, text out, at any alignment strength, and a per-token look at what the head does.

    helper = IAVInference(model, tokenizer)                     # model: an IAVModel
    helper.generate("How do I bake bread?", alpha=1.0)          # -> str (a list of prompts -> list[str])
    helper.generate(prompt="How do I bake bread?", alpha=1.5, max_length=128, temperature=0.7)  # the seed's call
    helper.compare_alphas("How do I bake bread?")               # -> {0.0: ..., 0.5: ..., 1.0: ..., 1.5: ...}
    helper.analyze_alignment_effect("How do I bake bread?", alpha=1.0)

Prompts are strings or conversations (lists of `{"role", "content"}` messages). When the tokenizer has a chat
template, a string becomes one user turn and the template is applied with the generation prompt; otherwise the
string is tokenized as it is. Batches are left-padded. `temperature=0` (the default) decodes greedily; a positive
temperature samples.

Per generated token `t` (prefix `x, y_<t`), `analyze_alignment_effect` reports, from one forward pass over the prompt
and the response with `return_alignment=True`:

    p_base  = softmax(z_base),  p_final = softmax(z_base + alpha * a_t)
    kl             = KL(p_final || p_base) = sum_v p_final,v (log p_final,v - log p_base,v)
    entropy_change = H(p_final) - H(p_base)
    alignment_norm = ||a_t||_2          (a_t at unit strength: the sum of the active heads' vectors, weighted)
    promoted / suppressed = the tokens with the largest / smallest entries of a_t (decoded)

These are the raw softmax distributions (temperature 1), whatever temperature the response was decoded with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from transformers import PreTrainedTokenizerBase

from iav_trl.tuners.iav.model import IAVModel

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]

DEFAULT_MAX_NEW_TOKENS = 128


def is_conversation(prompt: Any) -> bool:
    """Whether `prompt` is a list of chat messages (`{"role", "content"}` dicts)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    )


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """`(list of prompts, whether a single prompt was given)`, refusing anything that is not a prompt."""
    if isinstance(prompts, str) or is_conversation(prompts):
        return [prompts], True
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(
            "Pass a prompt (a string or a list of {'role', 'content'} messages) or a non-empty list of prompts, "
            f"got {type(prompts).__name__}."
        )
    for prompt in prompts:
        if not (isinstance(prompt, str) or is_conversation(prompt)):
            raise ValueError(
                f"Each prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.100}."
            )
    return list(prompts), False


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the model sees: the chat template applied with a generation prompt, when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(
            "This tokenizer has no chat template, so conversations cannot be formatted: pass plain-text prompts, or "
            "set `tokenizer.chat_template`."
        )
    return prompt


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` / `attention_mask` `(B, L)` of the formatted prompts."""
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set one, e.g. `tokenizer.pad_token = tokenizer.eos_token`.")
    texts = [format_prompt(tokenizer, prompt) for prompt in prompts]
    # A chat template writes the special tokens (BOS, ...) itself; plain text gets the tokenizer's usual ones.
    templated = bool(getattr(tokenizer, "chat_template", None))
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=not templated)
    empty = [i for i, length in enumerate(batch["attention_mask"].sum(-1).tolist()) if length == 0]
    if empty:  # nothing to condition on: the model would fail on an empty sequence
        raise ValueError(
            f"Prompt(s) {empty} are empty after formatting, and the tokenizer adds no chat template or BOS token, so "
            "there is nothing to generate from. Pass non-empty prompts."
        )
    return {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}


def decode_completions(
    tokenizer: PreTrainedTokenizerBase, completion_ids: torch.Tensor, mask: torch.Tensor
) -> list[str]:
    """Decode each row's generated tokens where `mask` is 1 (up to and including its first EOS)."""
    return [
        tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
        for row, keep in zip(completion_ids.cpu(), mask.cpu())
    ]


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """`(B, T)` mask of the generated tokens up to and including each row's first EOS (what follows is padding)."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).view(-1)
    is_eos = torch.isin(completion_ids, eos).long()
    after_eos = (is_eos.cumsum(dim=-1) - is_eos) > 0
    return (~after_eos).long()


def sampling_kwargs(temperature: float | None, **generate_kwargs: Any) -> dict[str, Any]:
    """`generate` keywords for `temperature`: 0 (or None) is greedy decoding, a positive value samples."""
    temperature = 0.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy decoding), got {temperature!r}.")
    do_sample = temperature > 0
    if generate_kwargs.get("do_sample", do_sample) != do_sample:
        raise ValueError(
            f"`do_sample={generate_kwargs['do_sample']}` contradicts `temperature={temperature}`: temperature 0 "
            "decodes greedily and a positive temperature samples, so leave `do_sample` out."
        )
    generate_kwargs["do_sample"] = do_sample
    if do_sample:
        generate_kwargs["temperature"] = float(temperature)
    return generate_kwargs


class IAVInference:
    """
    Generation helper around an `IAVModel` and its tokenizer.

    Args:
        model (`IAVModel`): the model with its alignment head(s) (`get_iav_model` / `IAVModel.from_pretrained`).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; needs a pad token.
        default_alpha (`float`, defaults to `1.0`): strength used when a call passes `alpha=None`.
    """

    def __init__(self, model: IAVModel, tokenizer: PreTrainedTokenizerBase, default_alpha: float = 1.0):
        if not isinstance(model, IAVModel):
            raise TypeError(
                f"IAVInference needs an IAVModel, got {type(model).__name__}: wrap the base model with "
                "`get_iav_model(model, config)` or load a head with `IAVModel.from_pretrained(model, path)`."
            )
        if isinstance(default_alpha, bool) or not isinstance(default_alpha, (int, float)):
            raise ValueError(f"`default_alpha` must be a finite float, got {default_alpha!r}.")
        if not math.isfinite(default_alpha):
            raise ValueError(f"`default_alpha` must be finite, got {default_alpha}.")
        self.model = model
        self.tokenizer = tokenizer
        self.default_alpha = float(default_alpha)

    @property
    def device(self) -> torch.device:
        return self.model.output_embeddings.weight.device

    def _eos_token_id(self) -> int | list[int] | None:
        eos = self.model.generation_config.eos_token_id
        return eos if eos is not None else self.tokenizer.eos_token_id

    def _generate_ids(
        self,
        prompts: Sequence[Prompt],
        alpha: Any,
        max_length: int | None,
        max_new_tokens: int | None,
        temperature: float | None,
        **generate_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(prompt inputs, completion ids (B, T), completion mask (B, T))` for a batch of prompts."""
        inputs = encode_prompts(self.tokenizer, prompts, self.device)
        if max_length is None and max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if max_length is not None:
            generate_kwargs["max_length"] = max_length
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        generate_kwargs = sampling_kwargs(temperature, **generate_kwargs)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        sequences = self.model.generate(
            **inputs, alpha=self.default_alpha if alpha is None else alpha, **generate_kwargs
        )
        completion = sequences[:, inputs["input_ids"].shape[1] :]
        eos = generate_kwargs.get("eos_token_id", self._eos_token_id())
        return inputs, completion, completion_mask(completion, eos)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt] | None = None,
        alpha: Any = None,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        *,
        prompt: Prompt | Sequence[Prompt] | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """
        Responses to one prompt (-> `str`) or a list of prompts (-> `list[str]`, one batched `generate`).

        Args:
            prompts (or the keyword `prompt`, as the IAV seed wrote `generate(prompt=..., alpha=1.5)`): a prompt or a
                list of prompts.
            alpha: a float, one float per prompt, or `{adapter: value}` (see `iav_trl.tuners.iav.alpha`); `None` is
                `default_alpha`.
            max_length / max_new_tokens: as in `transformers`' `generate`: `max_length` is the total length, prompt
                tokens included (of the left-padded batch), `max_new_tokens` the generated tokens alone
                (`max_new_tokens=128` if neither is given).
            temperature: 0 decodes greedily; a positive value samples at that temperature.
            generate_kwargs: any other `generate` keyword (`top_p`, `repetition_penalty`, `stopping_criteria`, ...).
        """
        if (prompts is None) == (prompt is None):
            raise TypeError(
                'Pass the prompt(s) once: positionally, `generate("Hi")`, or as `generate(prompt="Hi")`'
                + (", not both." if prompt is not None else ".")
            )
        prompt_list, single = as_prompt_list(prompt if prompts is None else prompts)
        _, completion, mask = self._generate_ids(
            prompt_list, alpha, max_length, max_new_tokens, temperature, **generate_kwargs
        )
        texts = decode_completions(self.tokenizer, completion, mask)
        return texts[0] if single else texts

    def compare_alphas(
        self,
        prompt: Prompt,
        alphas: Sequence[float] = (0.0, 0.5, 1.0, 1.5),
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        **generate_kwargs: Any,
    ) -> dict[float, str]:
        """`{alpha: response}` for one prompt, all alphas decoded in ONE batched `generate` (one alpha per row)."""
        prompt_list, single = as_prompt_list(prompt)
        if not single:
            raise ValueError("`compare_alphas` takes one prompt; call it once per prompt.")
        alphas = [float(a) for a in alphas]
        if not alphas or len(set(alphas)) != len(alphas):
            raise ValueError(f"`alphas` must be a non-empty list of distinct values, got {alphas}.")
        texts = self.generate(
            prompt_list * len(alphas),
            alpha=alphas,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            **generate_kwargs,
        )
        return dict(zip(alphas, texts))

    @torch.no_grad()
    def analyze_alignment_effect(
        self,
        prompt: Prompt,
        alpha: float | None = None,
        max_new_tokens: int = 32,
        top_k: int = 5,
        temperature: float = 0.0,
        **generate_kwargs: Any,
    ) -> dict[str, Any]:
        """
        Generate a response at `alpha`, then report for each generated token the statistics of the module
        docstring. Returns `{"prompt", "alpha", "response", "tokens": [per-token dicts], "summary": {means}}`; each
        per-token dict holds `token`, `token_id`, `kl`, `entropy_base`, `entropy_final`, `entropy_change`,
        `alignment_norm`, `prob_base`, `prob_final` (of the generated token), `promoted` and `suppressed` (lists of
        `[token, a_t value]`, `top_k` each).
        """
        prompt_list, single = as_prompt_list(prompt)
        if not single:
            raise ValueError("`analyze_alignment_effect` takes one prompt; call it once per prompt.")
        alpha = self.default_alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"`analyze_alignment_effect` takes one finite float alpha, got {alpha!r}.")
        if top_k < 1:
            raise ValueError(f"`top_k` must be >= 1, got {top_k}.")
        inputs, completion, mask = self._generate_ids(
            prompt_list, alpha, None, max_new_tokens, temperature, **generate_kwargs
        )
        completion = completion[:, : int(mask.sum())]
        sequence = torch.cat([inputs["input_ids"], completion], dim=1)
        # One pass at unit strength gives z_base and a_t; z_final = z_base + alpha * a_t.
        out = self.model(input_ids=sequence, alpha=1.0, return_alignment=True)
        start = inputs["input_ids"].shape[1] - 1
        positions = slice(start, start + completion.shape[1])
        z_base = out.base_logits[0, positions].float()  # (T, V)
        a_t = out.alignment_logits[0, positions].float()  # (T, V)
        logp_base = torch.log_softmax(z_base, dim=-1)
        logp_final = torch.log_softmax(z_base + alpha * a_t, dim=-1)
        p_base, p_final = logp_base.exp(), logp_final.exp()
        kl = (p_final * (logp_final - logp_base)).sum(-1)
        entropy_base = -(p_base * logp_base).sum(-1)
        entropy_final = -(p_final * logp_final).sum(-1)
        norms = a_t.norm(dim=-1)
        k = min(top_k, a_t.shape[-1])
        promoted, suppressed = a_t.topk(k, dim=-1), (-a_t).topk(k, dim=-1)
        ids = completion[0].tolist()
        tokens = []
        for t, token_id in enumerate(ids):
            tokens.append(
                {
                    "token": self.tokenizer.decode([token_id]),
                    "token_id": token_id,
                    "kl": kl[t].item(),
                    "entropy_base": entropy_base[t].item(),
                    "entropy_final": entropy_final[t].item(),
                    "entropy_change": (entropy_final[t] - entropy_base[t]).item(),
                    "alignment_norm": norms[t].item(),
                    "prob_base": p_base[t, token_id].item(),
                    "prob_final": p_final[t, token_id].item(),
                    "promoted": self._decoded(promoted.indices[t], promoted.values[t]),
                    "suppressed": self._decoded(suppressed.indices[t], -suppressed.values[t]),
                }
            )
        summary = {
            name: (sum(token[name] for token in tokens) / len(tokens) if tokens else float("nan"))
            for name in ("kl", "entropy_change", "alignment_norm")
        }
        summary["total_kl"] = sum(token["kl"] for token in tokens)
        return {
            "prompt": prompt,
            "alpha": float(alpha),
            "response": self.tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": tokens,
            "summary": summary,
        }

    def _decoded(self, indices: torch.Tensor, values: torch.Tensor) -> list[list]:
        return [[self.tokenizer.decode([i]), v] for i, v in zip(indices.tolist(), values.tolist())]


__all__ = ["IAVInference"]
