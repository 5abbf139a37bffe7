"""A GenARM-style decoding baseline: a base causal LM guided, token by token, by an autoregressive reward LM.

GenARM (Xu et al., 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model for Test-time
Alignment") decodes from

    pi(y_t | x, y_<t)  ∝  pi_base(y_t | x, y_<t) * pi_arm(y_t | x, y_<t) ** (1 / beta)

with `pi_arm` an autoregressive reward model: a second causal LM over the same vocabulary. Here `alpha = 1 / beta`,
and each decoding step combines, for the batch's `(B, V)` next-token logits,

    z_t = z_base + alpha * log_softmax(z_arm)                                            (B, V)

(the log-softmax of the reward LM's logits, as in GenARM; `log_softmax(z_base)` would differ from `z_base` by a
per-row constant, which changes neither greedy choices nor the sampled distribution). `alpha = 0` is exactly the base
model. The combination runs before temperature / top-k / top-p, which then act on `z_t`.

Each model keeps its own KV cache: the base model's is transformers' own, inside `generate`; the reward LM's is owned
by `GenARMLogitsProcessor`, which feeds the reward LM the whole (possibly left-padded) prompt on its first call and
then only the newest token. So GenARM goes through the same `generate` as the base model and IAV, and costs one extra
forward of the reward LM per token (versus none for IAV, whose alignment vector comes from the base model's own
hidden state).

Public API (stable; `benchmarks/` import it):

- `GenARMLogitsProcessor(reward_model, alpha=1.0, attention_mask=None)`: a `transformers.LogitsProcessor`; pass it
  as `base_model.generate(..., logits_processor=[processor])`. Give it the prompt's `attention_mask` when the batch is
  left-padded. One processor serves one `generate` call: call `processor.reset()` before reusing it (it tells a
  continuation from a new generation by shape only, to add no device synchronisation to a decoding step).
- `genarm_generate(base_model, reward_model, input_ids, attention_mask=None, alpha=1.0, **generate_kwargs)`: the
  same, in one call; returns `generate`'s output (a `(B, prompt + new)` LongTensor unless `return_dict_in_generate`).

Greedy decoding, sampling (with `num_return_sequences`) and any other logits processor work. Beam search does not:
it reorders rows and scores normalised log-probabilities, which this baseline does not model; `genarm_generate`
refuses it with a `ValueError`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, PreTrainedModel


def output_cache(output: Any) -> Any:
    """The KV cache of a model or `generate` output: `cache` in recent transformers, `past_key_values` before."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


class GenARMLogitsProcessor(LogitsProcessor):
    """
    Adds `alpha * log_softmax(z_arm)` to the base model's next-token logits, `z_arm` from `reward_model` run with its
    own KV cache. One instance serves one `generate` call; `reset()` it before the next.

    Args:
        reward_model (`PreTrainedModel`):
            The autoregressive reward model: a causal LM with the base model's vocabulary (its logits must have the
            same last dimension as the base model's).
        alpha (`float`, defaults to `1.0`):
            Guidance strength, `1 / beta` in GenARM's notation. 0 decodes exactly the base model.
        attention_mask (`torch.Tensor`, *optional*):
            The prompt's `(B, L)` attention mask (0 on padding). Needed for left-padded batches; without it every
            prompt token is attended to. With `num_return_sequences = n` pass the `(B, L)` mask of the prompts: it is
            repeated for the `B * n` rows.
    """

    def __init__(self, reward_model: PreTrainedModel, alpha: float = 1.0, attention_mask: torch.Tensor | None = None):
        if not isinstance(reward_model, nn.Module) or not callable(getattr(reward_model, "forward", None)):
            raise TypeError(f"`reward_model` must be a causal LM (`AutoModelForCausalLM`), got {type(reward_model)}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not torch.isfinite(torch.tensor(alpha)):
            raise ValueError(f"`alpha` must be a finite float (GenARM's 1 / beta), got {alpha!r}.")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"`attention_mask` must be the prompt's (batch, length) mask, got {attention_mask.shape}."
            )
        self.reward_model = reward_model
        parameters = inspect.signature(reward_model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are needed, also when the prompt goes through (as `generate` does).
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.alpha = float(alpha)
        self.attention_mask = attention_mask
        self._ids_shape: tuple[int, int] | None = None  # (B, T) of the tokens already in the reward model's cache
        self._mask: torch.Tensor | None = None  # (B, T) their attention mask
        self._positions: torch.Tensor | None = None  # (B,) position id of the next token
        self._cache: Any = None

    @property
    def past_key_values(self) -> Any:
        """The reward model's KV cache after the latest step (`None` before the first)."""
        return self._cache

    def reset(self) -> None:
        """Drop the reward model's cache (the next call starts from its `input_ids` as a prompt)."""
        self._ids_shape = self._mask = self._positions = self._cache = None

    def _continues(self, input_ids: torch.LongTensor) -> bool:
        """Whether `input_ids` is the cached rows plus one token (a decoding step); checked by shape only."""
        return (
            self._ids_shape is not None
            and input_ids.shape[0] == self._ids_shape[0]
            and input_ids.shape[1] == self._ids_shape[1] + 1
        )

    def _prompt_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones_like(input_ids)
        mask = self.attention_mask.to(input_ids.device)
        rows, length = input_ids.shape
        if mask.shape[1] != length or rows % mask.shape[0] != 0:
            raise ValueError(
                f"GenARMLogitsProcessor got an attention_mask of shape {tuple(mask.shape)} but generation starts "
                f"from input_ids of shape {tuple(input_ids.shape)}: pass the mask of these prompts (or build one "
                "processor per batch)."
            )
        return mask.repeat_interleave(rows // mask.shape[0], dim=0)

    @torch.no_grad()
    def _reward_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`z_arm` for the next token of every row, `(B, V)`, advancing the reward model's cache by one step."""
        device = next(self.reward_model.parameters()).device
        if self._continues(input_ids):
            new = input_ids[:, -1:]
            self._mask = torch.cat([self._mask, self._mask.new_ones(new.shape)], dim=1)
            positions = self._positions[:, None]
        else:
            new = input_ids
            self._mask = self._prompt_mask(input_ids)
            positions = (self._mask.long().cumsum(-1) - 1).clamp(min=0)
            self._cache = None
        outputs = self.reward_model(
            input_ids=new.to(device),
            attention_mask=self._mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{self._cache_argument: self._cache},
            **self._extra,
        )
        self._cache = output_cache(outputs)
        self._ids_shape = tuple(input_ids.shape)
        self._positions = positions[:, -1] + 1
        return outputs.logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """`scores + alpha * log_softmax(z_arm)`: `input_ids` `(B, T)`, `scores` `(B, V)` -> `(B, V)`."""
        reward_logits = self._reward_logits(input_ids)
        if reward_logits.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"The reward model's vocabulary ({reward_logits.shape[-1]} logits) differs from the base model's "
                f"({scores.shape[-1]}): GenARM needs a reward LM with the base model's tokenizer and vocabulary."
            )
        guidance = torch.log_softmax(reward_logits.to(device=scores.device, dtype=torch.float32), dim=-1)
        return scores + self.alpha * guidance.to(scores.dtype)


def genarm_generate(
    base_model: PreTrainedModel,
    reward_model: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    **generate_kwargs: Any,
) -> Any:
    """
    Decode `base_model` guided by `reward_model` (`z_t = z_base + alpha * log_softmax(z_arm)`, see the module
    docstring) through `base_model.generate`, with any `generate` keyword (`max_new_tokens`, `do_sample`,
    `temperature`, `top_p`, `num_return_sequences`, `logits_processor`, `return_dict_in_generate`, ...).

    Returns what `generate` returns: the `(B * num_return_sequences, prompt + new)` token ids by default.
    """
    num_beams = generate_kwargs.get("num_beams")
    generation_config = generate_kwargs.get("generation_config")
    if num_beams is None and generation_config is not None:
        num_beams = generation_config.num_beams
    if num_beams is not None and num_beams > 1:
        raise ValueError(
            f"genarm_generate does not support beam search (num_beams={num_beams}): the reward model's cache cannot "
            "follow reordered beams. Use greedy decoding or sampling (do_sample=True, num_return_sequences=n)."
        )
    processor = GenARMLogitsProcessor(reward_model, alpha=alpha, attention_mask=attention_mask)
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    return base_model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_processor=[processor, *processors],
        **generate_kwargs,
    )


__all__ = ["GenARMLogitsProcessor", "genarm_generate"]
