"""`IAVModel`: a causal LM with one or more alignment heads, and `get_iav_model` to build one.

The base model is left as it is. Two hooks connect the heads to it:

- a forward pre-hook on the output embeddings (`lm_head`) sees the final hidden states `h` of every forward,
  including those `transformers.generate` makes, and - for models whose logit readout is linear - replaces them
  with `h + sum_i alpha_i delta_i(h)`, so `z_final = z_base + sum_i alpha_i a_t^(i)` costs one vocabulary
  projection;
- a forward hook on the model adds `sum_i alpha_i a_t^(i)` to the logits when the readout is soft-capped (Gemma-2/3),
  or when the caller asked for `z_base` and `a_t` separately.

Outside `IAVModel.forward` / `IAVModel.generate` (and inside `disable_alignment()`), the hooks do nothing: the base
model is exactly itself.

Lifecycle (as PEFT's `unload`): `IAVModel.unload()` removes both hooks, drops the heads, restores the base's
`requires_grad` flags and returns the base model, exactly as it was. The hooks reach the `IAVModel` through a weak
reference, so the base never keeps it alive: an `IAVModel` that is dropped is freed, and takes its hooks with it.

One base carries at most one live `IAVModel`. Attaching another (`get_iav_model(base, ...)` or
`IAVModel.from_pretrained(base, ...)` again, the PEFT habit of reloading onto the same base) detaches the old one
with a warning: its hooks are removed, so hooks never pile up and the base serves the new heads only. The old
`IAVModel` keeps its heads (`save_pretrained` still works), but its `forward`/`generate` raise, naming the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from iav_trl.models.base_models import load_base_model, recorded_source
from iav_trl.models.fingerprint import fingerprint_mismatch, weights_fingerprint
from iav_trl.tuners.iav.alpha import AlphaLike, resolve_alpha, strength_rows
from iav_trl.tuners.iav.config import AlignmentHeadConfig
from iav_trl.tuners.iav.fused import BaseLogitsCache, GramCache, fused_token_stats
from iav_trl.tuners.iav.head import AlignmentHead
from iav_trl.tuners.iav.model_card import build_model_card
from iav_trl.tuners.iav.readout import LogitReadout
from iav_trl.tuners.iav.save_and_load import get_head_state_dict, load_head, save_head, set_head_state_dict
from iav_trl.utils.files import atomic_write_text
from iav_trl.utils.hub import check_adapter_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Call:
    """What the hooks apply during one `forward`/`generate` call."""

    strengths: dict[str, float | torch.Tensor]
    decompose: bool  # keep z_base and add the alignment after the model's own logits
    hidden: torch.Tensor | None = None
    base_logits: torch.Tensor | None = None
    alignment_logits: torch.Tensor | None = None


@dataclasses.dataclass
class IAVFusedOutput(ModelOutput):
    """
    Output of `IAVModel.forward(..., labels=labels, fused_lm_head=True)`: per-token statistics of the next-token
    labels (shape `(batch, seq_len - 1)`, zero where the label is -100) without materialising the logits. The
    fields follow TRL's fused LM head (`log_probs`, `entropy`, `mean_logits`, `is_top1`, `log_sum_sq_probs`,
    `label_mask`), plus the reference log-probs and the IAV regularisers (see `iav_trl.tuners.iav.fused`).
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    l2: torch.Tensor | None = None
    alignment_norm: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _IAVHook:
    """A hook on the base model that calls `IAVModel.<method>` through a weak reference (a no-op once it is freed)."""

    def __init__(self, owner: IAVModel, method: str):
        self.owner = weakref.ref(owner)
        self.method = method

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        owner = self.owner()
        return None if owner is None else getattr(owner, self.method)(module, *args)


def _live_owner(causal_lm: nn.Module) -> IAVModel | None:
    """The live `IAVModel` whose hooks `causal_lm` carries (a deep copy of a base carries stale ones: ignored)."""
    for hook in causal_lm._forward_hooks.values():
        owner = hook.owner() if isinstance(hook, _IAVHook) else None
        if owner is not None and not (owner._unloaded or owner._detached) and owner.get_base_model() is causal_lm:
            return owner
    return None


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _unwrap_peft(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and not isinstance(model, PreTrainedModel) else model


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (`peft.PeftModel`), e.g. LoRA on the backbone under the heads."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class IAVModel(nn.Module):
    """
    A causal LM with alignment heads: `z_final = z_base + sum_i alpha_i a_t^(i)` (see `iav_trl.tuners.iav.alpha`).

    Build one with `get_iav_model(model, AlignmentHeadConfig(...))` or load a saved head with
    `IAVModel.from_pretrained(model, "path/or/repo")`. Attributes it does not define (e.g. `config`,
    `generation_config`, `device`) are those of the base model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: AlignmentHeadConfig,
        adapter_name: str = "default",
        freeze_backbone: bool = True,
        strict: bool = False,
    ):
        super().__init__()
        causal_lm = _unwrap_peft(model)
        if not isinstance(causal_lm, PreTrainedModel) or causal_lm.get_output_embeddings() is None:
            raise TypeError(
                f"IAVModel needs a transformers causal LM with output embeddings (an `AutoModelForCausalLM`), got "
                f"{type(model).__name__}."
            )
        self._unloaded = self._detached = False
        existing = _live_owner(causal_lm)
        # `unload` restores the flags the base had before any IAVModel froze it.
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        if existing is not None:
            logger.warning(
                "This %s already carried a live IAVModel (adapters %s); it is now detached from it: its `forward` and "
                "`generate` raise, its heads can still be saved. To keep several heads on one base, add them to one "
                "IAVModel with `add_adapter`/`load_adapter`; to hand the base over explicitly, call `unload()` first.",
                type(causal_lm).__name__,
                existing.adapter_names,
            )
            existing._detach()
            self._requires_grad = existing._requires_grad
        self.base_model = model
        self.alignment_heads = nn.ModuleDict()
        self.iav_config: dict[str, AlignmentHeadConfig] = {}
        self.readout = LogitReadout.from_config(causal_lm.config)
        self._gram = GramCache()  # W_U^T W_U for the frozen-backbone training step (see `iav_trl.tuners.iav.fused`)
        self._adapter_weights: dict[str, float] = {}
        self._alignment_enabled = True
        self._call: _Call | None = None
        if freeze_backbone:
            model.requires_grad_(False)
        self.add_adapter(adapter_name, config, strict=strict)
        self._hook_handles = [
            causal_lm.get_output_embeddings().register_forward_pre_hook(_IAVHook(self, "_lm_head_pre_hook")),
            causal_lm.register_forward_hook(_IAVHook(self, "_model_hook")),
        ]
        # Freed without `unload()`: the hooks go with it (the callback holds the handles, not `self`).
        self._finalizer = weakref.finalize(self, _remove_hooks, list(self._hook_handles))

    def unload(self) -> nn.Module:
        """
        Detach the heads and return the base model exactly as it was before `get_iav_model`/`from_pretrained` (like
        PEFT's `unload`): both hooks removed, the heads dropped, every parameter's `requires_grad` restored. The
        `IAVModel` is unusable afterwards. Save the heads first (`save_pretrained`) if you need them.
        """
        self._check_loaded(detached_ok=True)
        self._finalizer()  # removes the hooks, once
        base = self.base_model
        for name, param in base.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self.alignment_heads = nn.ModuleDict()
        self.iav_config, self._adapter_weights, self._call = {}, {}, None
        self._unloaded = True
        del self._modules["base_model"]
        return base

    def _detach(self) -> None:
        """Remove the hooks (another IAVModel takes the base over); the heads stay, for `save_pretrained`."""
        self._finalizer()
        self._detached = True

    def _check_loaded(self, detached_ok: bool = False) -> None:
        if self.__dict__.get("_unloaded"):
            raise ValueError(
                "This IAVModel was unloaded (`unload()` returned its base model and dropped its heads). Attach a new "
                "head with `get_iav_model(base, config)` or `IAVModel.from_pretrained(base, path)`."
            )
        if self.__dict__.get("_detached") and not detached_ok:
            raise ValueError(
                "This IAVModel was detached from its base model, because another IAVModel was attached to that base "
                "since (a base serves one IAVModel at a time). Use the newer one; to serve these heads too, save them "
                "(`save_pretrained` still works here) and `load_adapter` them into the newer one."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Attribute access: behave like the base model for everything IAV does not define.

    # transformers' Trainer refuses to train a quantized model that carries no adapters; the heads are adapters.
    _hf_peft_config_loaded = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                self._check_loaded()
                raise
            return getattr(self.base_model, name)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the backbone recomputes activations: transformers' `is_activation_checkpointing`, under the name
        TRL's DPOTrainer still reads (the base model's own alias of it warns that it is deprecated)."""
        return self.get_base_model().is_activation_checkpointing

    def get_base_model(self) -> PreTrainedModel:
        """The transformers model underneath (without PEFT wrappers); calling it gives exactly the base model."""
        return _unwrap_peft(self.base_model)

    @property
    def output_embeddings(self) -> nn.Module:
        return self.get_base_model().get_output_embeddings()

    # ----------------------------------------------------------------------------------------------------------------
    # Adapters

    def add_adapter(self, adapter_name: str, config: AlignmentHeadConfig, strict: bool = False) -> None:
        """Attach a new, zero-initialised head `adapter_name` (it starts at `a_t == 0`) and make it active. A config
        that records another base model (other weights, see `iav_trl.models.fingerprint`) warns, or raises with
        `strict`."""
        check_adapter_name(adapter_name)
        if adapter_name in self.alignment_heads:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; loaded: {self.adapter_names}.")
        config = self._bind_config(config, strict)
        weight = self.output_embeddings.weight
        head_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if not weight.dtype.is_floating_point:
            head_dtype = torch.float32
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        head = AlignmentHead(config.hidden_size, config.num_interventions, config.intervention_dim, config.dropout)
        head.to(device=device, dtype=head_dtype)
        head.requires_grad_(not config.inference_mode)
        if config.inference_mode:
            head.eval()
        self.alignment_heads[adapter_name] = head
        self.iav_config[adapter_name] = config
        if not self._adapter_weights:
            self._adapter_weights = {adapter_name: 1.0}

    def _bind_config(self, config: AlignmentHeadConfig, strict: bool) -> AlignmentHeadConfig:
        """Fill in the base model's name, shapes and weights fingerprint; refuse a config made for other shapes, and
        warn about (or, `strict`, refuse) one made for other weights."""
        causal_lm = self.get_base_model()
        weight = self.output_embeddings.weight
        # A weight partitioned by DeepSpeed ZeRO-3 is an empty 1-D tensor; `ds_shape` is its full shape.
        vocab_size, hidden_size = getattr(weight, "ds_shape", weight.shape)[-2:]
        name = getattr(causal_lm.config, "_name_or_path", None) or None
        source = recorded_source(name)  # a GGUF base converted by `iav_trl.models.base_models`: the name it was given
        name = source["name"] if source else name
        for field, actual in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            expected = getattr(config, field)
            if expected is not None and expected != actual:
                raise ValueError(
                    f"This alignment head was built for a base model with {field}={expected} "
                    f"({config.base_model_name_or_path or 'unknown base'}), but the model it is loaded onto has "
                    f"{field}={actual} ({name or type(causal_lm).__name__}). Load it onto the base model it was "
                    "trained for."
                )
        mismatch = config.base_model_fingerprint and fingerprint_mismatch(config.base_model_fingerprint, causal_lm)
        if mismatch:
            message = (
                f"This alignment head was trained on the base model {config.base_model_name_or_path or '(unnamed)'}, "
                f"but the model it is loaded onto ({name or type(causal_lm).__name__}) has other weights: {mismatch}. "
                "Its alignment vectors are meaningless there. Load it onto the base it was trained on (`iav-trl "
                "generate/eval` do so when no --model_name_or_path is given)"
            )
            if strict:
                raise ValueError(message + ".")
            logger.warning("%s, or pass `strict=True` to make this an error.", message)
        elif config.base_model_name_or_path and name and not _same_model(config.base_model_name_or_path, name):
            logger.warning(
                "The alignment head was trained on %r but is loaded onto %r. Shapes match, so it loads; check that "
                "the two are the same model.",
                config.base_model_name_or_path,
                name,
            )
        return dataclasses.replace(
            config,
            base_model_name_or_path=config.base_model_name_or_path or name,
            hidden_size=int(hidden_size),
            vocab_size=int(vocab_size),
            model_type=config.model_type or causal_lm.config.model_type,
            base_model_fingerprint=config.base_model_fingerprint or weights_fingerprint(causal_lm),
        )

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known([adapter_name])
        del self.alignment_heads[adapter_name]
        del self.iav_config[adapter_name]
        self._adapter_weights.pop(adapter_name, None)
        if not self._adapter_weights and self.adapter_names:
            self._adapter_weights = {self.adapter_names[0]: 1.0}

    def set_adapter(self, adapters: str | Sequence[str] | Mapping[str, float]) -> None:
        """
        Choose the active heads: a name, a list of names (weight 1 each) or `{name: weight}`. With `alpha` a float
        or per-row values, head `i` then contributes `alpha * weight_i * a_t^(i)`.
        """
        if isinstance(adapters, str):
            adapters = {adapters: 1.0}
        elif not isinstance(adapters, Mapping):
            adapters = {name: 1.0 for name in adapters}
        self._check_known(adapters)
        for name, weight in adapters.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"The weight of adapter {name!r} must be a finite float, got {weight!r}.")
        if not adapters:
            raise ValueError(f"`set_adapter` needs at least one adapter; loaded: {self.adapter_names}.")
        self._adapter_weights = {name: float(weight) for name, weight in adapters.items()}

    def _check_known(self, names) -> None:
        unknown = [name for name in names if name not in self.alignment_heads]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded adapters are {self.adapter_names}.")

    @property
    def adapter_names(self) -> list[str]:
        return list(self.alignment_heads.keys())

    @property
    def active_adapters(self) -> list[str]:
        return list(self._adapter_weights)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def adapter_weights(self) -> dict[str, float]:
        return dict(self._adapter_weights)

    @contextlib.contextmanager
    def disable_alignment(self) -> Iterator[None]:
        """Inside this context the model is exactly the base model (`z_final = z_base`)."""
        previous = self._alignment_enabled
        self._alignment_enabled = False
        try:
            yield
        finally:
            self._alignment_enabled = previous

    # ----------------------------------------------------------------------------------------------------------------
    # The hooks

    def _offset(self, hidden: torch.Tensor, strengths: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
        """`sum_i alpha_i delta_i(h)` in the dtype of `h`; per-row alphas broadcast over positions."""
        total = None
        for name, strength in strengths.items():
            head = self.alignment_heads[name]
            delta = head(hidden.to(head.write.weight.dtype))
            if isinstance(strength, torch.Tensor):
                strength = _rows(strength, hidden).to(delta.dtype)
            delta = delta * strength
            total = delta if total is None else total + delta
        return total.to(hidden.dtype)

    def _lm_head_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        call = self._call
        if call is None or not self._alignment_enabled or not call.strengths:
            return None
        if module is not self.output_embeddings:  # a stale hook on a deep copy of the base
            return None
        hidden = args[0]
        if call.decompose or not self.readout.is_linear:
            call.hidden = hidden
            return None
        return (hidden + self._offset(hidden, call.strengths), *args[1:])

    def _model_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call = self._call
        if call is None or call.hidden is None or module is not self.get_base_model():
            return output
        hidden, call.hidden = call.hidden, None
        weight = self.output_embeddings.weight
        alignment = self.readout.alignment_logits(self._offset(hidden, call.strengths).to(weight.dtype), weight)
        alignment = alignment.to(output.logits.dtype)
        if call.decompose:
            call.base_logits = output.logits
            call.alignment_logits = alignment
        output.logits = output.logits + alignment
        return output

    def set_engine_strengths(self, strengths: Mapping[str, torch.Tensor] | None) -> None:
        """
        Strengths for forwards that a serving engine runs on the base model directly, not through `forward` or
        `generate` (transformers' continuous batching calls the base model, see `iav_trl.inference.serving`); `None`
        clears them. Each tensor broadcasts against the hidden states the LM head receives, e.g. `(1, rows, 1)` for a
        packed batch with one scored row per request.
        """
        self._check_loaded()
        self._check_known(strengths or {})
        self._call = None if strengths is None else _Call(strengths=dict(strengths), decompose=False)

    @contextlib.contextmanager
    def _applying(self, strengths: dict[str, float | torch.Tensor], decompose: bool = False) -> Iterator[_Call]:
        previous, self._call = self._call, _Call(strengths=strengths, decompose=decompose)
        try:
            yield self._call
        finally:
            self._call = previous

    def _strengths(self, alpha: AlphaLike, batch_size: int | None) -> dict[str, float | torch.Tensor]:
        if not self._alignment_enabled:
            return {}
        defaults = {name: cfg.default_alpha for name, cfg in self.iav_config.items()}
        return resolve_alpha(alpha, self._adapter_weights, defaults, batch_size)

    # ----------------------------------------------------------------------------------------------------------------
    # Forward and generate

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        alpha: AlphaLike = None,
        return_alignment: bool = False,
        fused_lm_head: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """
        The base model's forward with `logits = z_final = z_base + alpha * a_t`.

        Args:
            alpha: strength, see `iav_trl.tuners.iav.alpha` (a float, one value per row, `{adapter: value}`, or
                `None` for each adapter's `default_alpha`).
            return_alignment: also return `base_logits` (`z_base`) and `alignment_logits` (`sum_i alpha_i a_t^(i)`,
                so that `logits == base_logits + alignment_logits`).
            fused_lm_head: with `labels`, return an `IAVFusedOutput` of per-token statistics instead of logits
                (TRL's fused LM head protocol; used by `IAVTrainer`). `backbone_features=` (the `(N, d)` output of
                `scored_hidden_states`) then stands for the frozen backbone's pass, which is skipped; without
                `fused_lm_head` they are ignored (logits at every position need the pass). `readout_cache=` (a
                `BaseLogitsCache`) shares `z_base` between calls on the same tokens (one per head of a sweep) and
                sets the memory budget of the frozen readout's gradient (`iav_trl.tuners.iav.fused`).
            labels: next-token labels (-100 = ignored); the loss is the model's own causal-LM loss on `z_final`.
        """
        self._check_loaded()
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        batch_size = None if reference is None else reference.shape[0]
        strengths = self._strengths(alpha, batch_size)
        if fused_lm_head:
            if labels is None:
                raise ValueError("`fused_lm_head=True` needs `labels` (the next-token targets, -100 = ignored).")
            return self._fused_forward(input_ids, attention_mask, labels, strengths, **kwargs)
        kwargs.pop("backbone_features", None)  # the logits of every position need the backbone's own pass
        kwargs.pop("readout_cache", None)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        with self._applying(strengths, decompose=return_alignment) as call:
            outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if return_alignment:
            outputs["base_logits"] = outputs.logits if call.base_logits is None else call.base_logits
            outputs["alignment_logits"] = (
                torch.zeros_like(outputs.logits) if call.alignment_logits is None else call.alignment_logits
            )
        if labels is not None:
            causal_lm = self.get_base_model()
            outputs["loss"] = causal_lm.loss_function(
                logits=outputs.logits, labels=labels, vocab_size=outputs.logits.shape[-1], **loss_kwargs
            )
        return outputs

    def _lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states as the LM head receives them (MiniCPM3 scales them, see `readout`)."""
        return hidden * self.readout.input_scale if self.readout.input_scale != 1.0 else hidden

    @torch.no_grad()
    def scored_hidden_states(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, labels: torch.LongTensor
    ) -> torch.Tensor:
        """
        The frozen backbone's hidden states `h_t` (as the LM head receives them) at the scored positions: those whose
        next-token label is not -100, in row-major order, `(N, d)`. Everything the head's training step needs from
        the backbone; `forward(..., fused_lm_head=True, backbone_features=...)` takes them instead of a pass.
        """
        self._check_loaded()
        causal_lm = self.get_base_model()
        outputs = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = self._lm_head_input(outputs.last_hidden_state)
        return hidden[:, :-1][labels[:, 1:].to(hidden.device) != -100]

    def _fused_forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor,
        strengths: dict[str, float | torch.Tensor],
        backbone_features: torch.Tensor | None = None,
        readout_cache: BaseLogitsCache | None = None,
        **kwargs: Any,
    ) -> IAVFusedOutput:
        """
        One backbone pass, then the chunked statistics of `iav_trl.tuners.iav.fused` on the scored positions. With
        `backbone_features` (the `(N, d)` hidden states of the scored positions, as `scored_hidden_states` returns
        them, e.g. from `IAVConfig.precompute_backbone_features`'s cache) the backbone does not run at all.
        """
        kwargs["use_cache"] = False
        kwargs.pop("num_items_in_batch", None)
        causal_lm = self.get_base_model()
        backbone_trainable = any(p.requires_grad for p in self.base_model.parameters())
        aux_loss = ref_hidden = None
        if backbone_features is not None:
            if backbone_trainable or is_peft_model(self.base_model):
                raise ValueError(
                    "`backbone_features` stand for a frozen backbone's pass, but this backbone is trained (LoRA or "
                    "full fine-tuning). Drop them, or freeze the backbone."
                )
            labels = labels[:, 1:].to(backbone_features.device)
            mask = labels != -100
            if backbone_features.shape[0] != int(mask.sum()):
                raise ValueError(
                    f"The batch has {int(mask.sum())} scored positions but {backbone_features.shape[0]} cached "
                    "backbone features: they were computed for other sequences (another tokenizer, `max_length` or "
                    "truncation). Recompute them (a new trainer does, for its own datasets)."
                )
            scored = backbone_features
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_trainable):
                backbone_outputs = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                hidden = self._lm_head_input(backbone_outputs.last_hidden_state)
            if kwargs.pop("output_router_logits", False):
                aux_loss = _load_balancing_loss(causal_lm, backbone_outputs.router_logits, attention_mask)
            if is_peft_model(self.base_model):
                # The reference is the untouched base model: PEFT adapters off, no alignment.
                with torch.no_grad(), self.base_model.disable_adapter():
                    ref_hidden = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                    ref_hidden = self._lm_head_input(ref_hidden.last_hidden_state[:, :-1])
            labels = labels[:, 1:].to(hidden.device)
            mask = labels != -100
            scored = hidden[:, :-1][mask]  # (N, d)
        if strengths:
            rows = mask.nonzero()[:, 0]
            token_strengths = {
                name: s[rows.to(s.device)] if isinstance(s, torch.Tensor) else s for name, s in strengths.items()
            }
            delta = self._offset(scored.float(), token_strengths)  # kept in float32, as the statistics are
        else:
            delta = torch.zeros_like(scored, dtype=torch.float32)
        lm_head = self.output_embeddings
        stats = fused_token_stats(
            self.readout,
            lm_head.weight,
            lm_head.bias if isinstance(getattr(lm_head, "bias", None), torch.Tensor) else None,
            scored,
            delta,
            labels[mask],
            ref_hidden=None if ref_hidden is None else ref_hidden[mask],
            gram=self._gram,
            base=readout_cache,
        )
        # `masked_scatter` keeps an all-masked micro-batch connected to the graph (a differentiable zero).
        per_token = {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in stats.items()}
        loss = -per_token["log_probs"].sum() / mask.sum().clamp(min=1)
        if aux_loss is not None:
            loss = loss + getattr(causal_lm.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
        return IAVFusedOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)

    @torch.no_grad()
    def generate(self, *args: Any, alpha: AlphaLike = None, **kwargs: Any) -> Any:
        """
        `transformers`' own `generate` (greedy, sampling, beams, streamers, ...) decoding `z_final`.

        Unless every strength is 0 (then the base model decodes alone), every loaded head runs with a per-row tensor
        strength (`iav_trl.tuners.iav.alpha.strength_rows`), so that a compiled decoding step
        (`cache_implementation="static"`, where `generate` compiles it) serves every alpha, per-row alphas and mixing
        weights with one graph.
        """
        self._check_loaded()
        # The rows, however they are passed: positionally or as `inputs=` (generate's own name), `input_ids=` or
        # `inputs_embeds=`; with none of them, generate starts one row from the BOS token.
        reference = args[0] if args else None
        for key in ("inputs", "input_ids", "inputs_embeds"):
            if reference is None:
                reference = kwargs.get(key)
        batch_size = reference.shape[0] if isinstance(reference, torch.Tensor) else 1
        strengths = self._strengths(alpha, batch_size)
        if strengths:  # otherwise every strength is 0: the base model's own pass, no head runs
            device = self.output_embeddings.weight.device
            strengths = strength_rows(strengths, list(self.alignment_heads), batch_size, device)
        with self._applying(strengths):
            return self.base_model.generate(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: Sequence[str] | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        datasets: Sequence[str] = (),
        training_summary: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Write the heads only (never backbone weights): `alignment_head_config.json`, `alignment_head.safetensors`
        and a model card `README.md`. The `default` adapter goes to `save_directory`, any other to
        `save_directory/<name>/` (PEFT's layout). `state_dict` (keys `alignment_heads.<name>.*`, e.g. gathered
        under DeepSpeed ZeRO-3) overrides the live parameters of the heads it holds.

        A process killed mid-save leaves each adapter directory loadable as the old adapter or the new one, never a
        mix (see `iav_trl.tuners.iav.save_and_load.save_head`).
        """
        if not is_main_process:
            return
        if kwargs.get("safe_serialization") is False:
            raise ValueError("iav-trl saves adapters as safetensors only; drop `safe_serialization=False`.")
        names = list(selected_adapters) if selected_adapters is not None else self.adapter_names
        if not names:
            raise ValueError(
                "There is nothing to save: "
                + ("`selected_adapters` is empty" if selected_adapters is not None else "this model has no adapters")
                + f" (loaded: {self.adapter_names}). Pass adapter names, or add a head with `add_adapter(name, "
                "config)` or `load_adapter(path, name)` first."
            )
        self._check_known(names)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; `save_pretrained` needs a directory.")
        for name in names:
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            save_head(directory, name, self.iav_config[name], get_head_state_dict(self, name, state_dict))
        card = build_model_card(
            {name: self.iav_config[name] for name in names}, datasets=datasets, training_summary=training_summary
        )
        atomic_write_text(os.path.join(save_directory, "README.md"), card)

    @classmethod
    def from_pretrained(
        cls,
        model: PreTrainedModel | str,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        subfolder: str | None = None,
        allow_pickle: bool = False,
        strict: bool = False,
        model_init_kwargs: Mapping[str, Any] | None = None,
        **hub_kwargs: Any,
    ) -> IAVModel:
        """
        Load a saved head onto `model`: a causal LM, or its name (a Hub id or path, a GGUF file, `repo:file.gguf` or
        `package:<module>/<file>`, see `iav_trl.models.base_models`), loaded without remote code with
        `model_init_kwargs` (`dtype`, `gguf_file`, `revision`, `attn_implementation`, ...). With `is_trainable=False`
        (the default) the head is frozen for inference. `revision`, `token`, `cache_dir`, ... are passed to the Hub
        download of the adapter. A head trained on another base of the same shapes (its recorded weights fingerprint
        differs) loads with a warning, or raises with `strict=True`. Weights are read from safetensors only;
        `allow_pickle=True` also accepts an `alignment_head.bin`/`.pt`, read with `torch.load(weights_only=True)`: only
        for files you trust.
        """
        if isinstance(model, (str, os.PathLike)):
            model = load_base_model(os.fspath(model), **dict(model_init_kwargs or {}))
        config, tensors, path = load_head(model_id, subfolder, allow_pickle, **hub_kwargs)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        iav_model = cls(model, config, adapter_name=adapter_name, strict=strict)
        set_head_state_dict(iav_model, adapter_name, tensors, path)
        return iav_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: str | None = None,
        allow_pickle: bool = False,
        strict: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Load another saved head under `adapter_name` (not activated: see `set_adapter`), like `from_pretrained`."""
        config, tensors, path = load_head(model_id, subfolder, allow_pickle, **hub_kwargs)
        active = self.adapter_weights
        self.add_adapter(adapter_name, dataclasses.replace(config, inference_mode=not is_trainable), strict=strict)
        try:
            set_head_state_dict(self, adapter_name, tensors, path)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._adapter_weights = active

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload alignment head",
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save the heads (and model card) to a temporary directory and upload it to `repo_id`, like PEFT."""
        from huggingface_hub import HfApi
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            card_path = os.path.join(tmp, "README.md")
            with open(card_path, encoding="utf-8") as fh:
                card = fh.read().replace("this adapter", repo_id, 1).replace("path/to/adapter", repo_id)
            atomic_write_text(card_path, card)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )


def _rows(strength: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per-row strengths `(B,)` shaped to broadcast over `hidden` `(B', ..., d)`; `generate` expands rows
    (beams, `num_return_sequences`) by repeating each one in place, so `B'` may be a multiple of `B`."""
    if strength.dim() == hidden.dim():  # already shaped to broadcast (`set_engine_strengths`)
        return strength.to(hidden.device)
    batch = hidden.shape[0]
    if strength.shape[0] != batch:
        if batch % strength.shape[0] != 0:
            raise ValueError(f"alpha has {strength.shape[0]} values but the model sees {batch} rows.")
        strength = strength.repeat_interleave(batch // strength.shape[0])
    return strength.to(hidden.device).view(batch, *([1] * (hidden.dim() - 1)))


def _same_model(recorded: str, actual: str) -> bool:
    """Whether two `name_or_path`s name one model: equal ids, or local paths (relative or not) to one directory or
    GGUF file."""
    if recorded == actual:
        return True
    return os.path.exists(recorded) and os.path.exists(actual) and os.path.samefile(recorded, actual)


def _load_balancing_loss(causal_lm: PreTrainedModel, router_logits, attention_mask) -> torch.Tensor:
    """A Mixture-of-Experts model's load-balancing loss, as its own forward computes it outside the decoder."""
    # Every MoE family in transformers shares Mixtral's function (through the modular system).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = causal_lm.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


def get_iav_model(
    model: PreTrainedModel,
    config: AlignmentHeadConfig | None = None,
    adapter_name: str = "default",
    freeze_backbone: bool = True,
) -> IAVModel:
    """Attach an alignment head to a causal LM (any `AutoModelForCausalLM`, or a PEFT-wrapped one)."""
    return IAVModel(model, config or AlignmentHeadConfig(), adapter_name=adapter_name, freeze_backbone=freeze_backbone)


__all__ = ["IAVFusedOutput", "IAVModel", "get_iav_model", "is_peft_model"]
