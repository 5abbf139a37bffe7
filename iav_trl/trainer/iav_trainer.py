"""`IAVTrainer`: `trl.DPOTrainer` that trains an alignment head, taking its reference from the same forward pass."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, enable_full_determinism, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME, TrainerState
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import DPOConfig, DPOTrainer

from iav_trl.models.base_models import create_base_model, resolve_base_model
from iav_trl.models.fingerprint import weights_fingerprint
from iav_trl.trainer.callbacks import NonFiniteGuard
from iav_trl.trainer.checkpoints import checkpoint_problem, last_complete_checkpoint
from iav_trl.trainer.features import (
    FEATURE_COLUMNS,
    BackboneFeatureCollator,
    active_dropout,
    cache_backbone_features,
    check_features_apply,
    features_dtype,
)
from iav_trl.trainer.iav_config import IAVConfig
from iav_trl.trainer.input_checks import (
    check_not_emptied,
    check_pad_token,
    check_preference_datasets,
    check_preference_rows,
    named_datasets,
)
from iav_trl.trainer.kl_control import AdaptiveKLController
from iav_trl.trainer.preference_eval import evaluate_alphas
from iav_trl.trainer.trl_workarounds import (
    reference_from_policy_pass,
    reference_model_load_skipped,
    remove_trl_fused_forward,
)
from iav_trl.tuners.iav.config import AlignmentHeadConfig
from iav_trl.tuners.iav.fused import BaseLogitsCache
from iav_trl.tuners.iav.model import IAVModel, is_peft_model
from iav_trl.tuners.iav.model_card import build_model_card
from iav_trl.tuners.iav.save_and_load import backbone_dir, load_head, set_head_state_dict
from iav_trl.utils.files import atomic_write, atomic_write_text

SWEEP_FILE = "sweep.json"


def sweep_head_name(index: int) -> str:
    """The adapter name of the `index`-th value of `lambda_kl_sweep`."""
    return f"lambda_kl_{index}"


def _batch_features(model: IAVModel, batch: dict) -> torch.Tensor:
    """The backbone features of a batch padded by TRL's preference collator: the hidden states at its completion
    tokens' predecessors (labels are the input ids where `completion_mask` is set, as `DPOTrainer` scores them)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return model.scored_hidden_states(batch["input_ids"], batch["attention_mask"], labels)


def _keep_4bit_weights_trainable(model: nn.Module) -> None:
    """
    Stop bitsandbytes' CPU backend from repacking 4-bit weights for inference during evaluation.

    On CPUs with AVX512-BF16, the first eval-mode forward of a `Linear4bit` without gradients repacks its weights, for
    good, into a layout whose kernel has no autograd formula: any later training step through that layer (LoRA on a
    4-bit backbone) would get silently wrong gradients. Evaluating between training steps is routine, so the
    trainer keeps the training layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_full_backbone(backbone: PreTrainedModel, directory: str) -> None:
    """Load a fully trained backbone saved by `save_pretrained` (one or several safetensors shards) in place."""
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [SAFE_WEIGHTS_NAME]
    weights = {}
    for name in files:
        weights.update(load_file(os.path.join(directory, name)))
    result = backbone.load_state_dict(weights, strict=False)
    # `save_pretrained` writes one copy of tied tensors (e.g. an LM head tied to the embeddings): a missing key is
    # fine only when it shares its storage with a key that was loaded.
    state = backbone.state_dict()
    loaded_storage = {state[k].untyped_storage().data_ptr() for k in weights if k in state}
    missing = [k for k in result.missing_keys if state[k].untyped_storage().data_ptr() not in loaded_storage]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The checkpoint's backbone in {directory} does not match the model being trained (missing: {missing}, "
            f"unexpected: {result.unexpected_keys}). Resume with the same base model the checkpoint was trained from."
        )


# The IAV settings a plain `DPOConfig` lacks are read with `IAVConfig`'s defaults.
_IAV_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(IAVConfig) if f.name not in DPOConfig.__dataclass_fields__
}


class IAVTrainer(DPOTrainer):
    r"""
    Trainer for Inherent Alignment Vectors: a drop-in `trl.DPOTrainer` (same constructor, datasets, loss types,
    callbacks, logging, checkpoints) that trains an alignment head on a frozen causal LM.

    `model` may be a model id, a `PreTrainedModel` (a head is attached from `peft_config=AlignmentHeadConfig(...)`, or
    from `args`), a PEFT-wrapped model (the head is added on top) or an `IAVModel`. `peft_config` may also be a
    `peft.LoraConfig`, which puts LoRA on the backbone next to the head.

    For a batch of `B` pairs with completion masks `m` (shape `(2B, T-1)`, chosen rows then rejected rows), one
    forward pass gives, at every completion position `t`, `z_base` and the applied alignment `alpha * a_t`
    (`(tokens, V)`, in chunks, see `iav_trl.tuners.iav.fused`), and

        log pi(y)     = sum_t m_t log softmax(z_base + alpha a_t)_{y_t}          policy (grad through the head)
        log pi_ref(y) = sum_t m_t log softmax(z_base)_{y_t}                      reference (same pass, no grad)
        L_pref = DPOTrainer's loss for `loss_type` (sigmoid: -log sigmoid(beta [(log pi - log pi_ref)(y_w)
                 - (log pi - log pi_ref)(y_l)]), averaged over pairs)
        L_KL   = sum_{t} m_t KL(softmax(z_base + alpha a_t) || softmax(z_base)) / sum_t m_t
        L_L2   = sum_{t} m_t (1/V) ||alpha a_t||_2^2 / sum_t m_t
        L      = L_pref + lambda_kl L_KL + lambda_l2 L_L2

    With an explicit `ref_model`, or `freeze_backbone=False` without PEFT (the untouched copy of the backbone is then
    the reference), the reference log-probs come from that model, as in DPO. With LoRA on the backbone they come from
    the base model with the LoRA adapters disabled and alpha 0 (a second, gradient-free backbone pass).
    """

    _tag_names = ["trl", "dpo", "iav-trl", "alignment-head"]
    _name = "IAV"

    def __init__(
        self,
        model: str | PreTrainedModel | IAVModel,
        ref_model: PreTrainedModel | None = None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config: AlignmentHeadConfig | PeftConfig | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = IAVConfig(f"{(model_name or 'model').split('/')[-1]}-IAV")
        self._iav = SimpleNamespace(**{name: getattr(args, name, default) for name, default in _IAV_DEFAULTS.items()})
        named = named_datasets(train_dataset, eval_dataset)
        check_preference_datasets(named)
        check_preference_rows(named)  # None, numbers, empty or identical completions: before any model is loaded
        check_pad_token(processing_class, args)
        sizes = {name: len(dataset) for name, dataset in named.items() if isinstance(dataset, Dataset)}
        if isinstance(model, str):
            model_init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                model_init_kwargs["quantization_config"] = quantization_config
            model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                model_init_kwargs["device_map"] = None  # one whole copy per process, as DPOTrainer loads it
            with PartialState().main_process_first():  # one process converts a GGUF base, the others reuse it
                path, model_init_kwargs, name = resolve_base_model(model, model_init_kwargs)
            model = create_base_model(path, name, **model_init_kwargs)
            if path != name:  # a GGUF or package base: TRL would look for its tokenizer under the name
                processing_class = processing_class or AutoTokenizer.from_pretrained(path)
            quantization_config = None
            args.model_init_kwargs = None
        # The head is initialised randomly here, before `Trainer.__init__` seeds the RNG: seed it first, as Trainer
        # does, so that one `args.seed` always gives one initial head (whatever the global RNG held before).
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        model = self._attach_head(model, peft_config)
        trainable_backbone = any(p.requires_grad for p in model.base_model.parameters())
        if self._iav.precompute_backbone_features:
            check_features_apply(
                trainable_backbone=trainable_backbone,
                peft=is_peft_model(model.base_model),
                ref_model=ref_model is not None,
                datasets=named,
                dropout=active_dropout(model.get_base_model(), args.disable_dropout),
                sharded="FSDP" if args.fsdp else ("DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None),
            )
        if trainable_backbone and not is_peft_model(model.base_model) and ref_model is None:
            # Full fine-tuning: the reference is a frozen copy of the backbone as it was before training.
            ref_model = copy.deepcopy(model.get_base_model()).requires_grad_(False).eval()
        self._reference_in_policy_pass = ref_model is None
        if self._reference_in_policy_pass and args.sync_ref_model:
            raise ValueError(
                "`sync_ref_model=True` needs a reference model, but IAV's reference is the frozen base (z_base of "
                "the same forward pass). Set `sync_ref_model=False`, or pass a `ref_model`."
            )

        with reference_model_load_skipped(self._reference_in_policy_pass):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
            )
        if self._reference_in_policy_pass:
            self.precompute_ref_logps = False
        remove_trl_fused_forward(self.model)
        # `disable_dropout` is about noisy log-ratios of the backbone; the head's dropout is a regulariser. DPOTrainer
        # also casts a quantised model's trainable parameters to bf16 (QLoRA's LoRA weights): the heads stay fp32.
        for name, head in self.model.alignment_heads.items():
            head.dropout.p = self.model.iav_config[name].dropout
            head.float()
        if not trainable_backbone:
            self.aux_loss_enabled = False  # a frozen MoE router needs no load-balancing loss
        _keep_4bit_weights_trainable(self.model)
        check_not_emptied(sizes, named_datasets(self.train_dataset, self.eval_dataset), args.max_length)
        if self._iav.precompute_backbone_features:
            self._cache_backbone_features()
        if not any(isinstance(callback, NonFiniteGuard) for callback in self.callback_handler.callbacks):
            self.add_callback(NonFiniteGuard())
        # `lambda_kl_sweep`: head name -> its lambda_kl (empty without a sweep).
        self.sweep = {sweep_head_name(i): value for i, value in enumerate(self._iav.lambda_kl_sweep or ())}
        self.best_head = None
        self._sweep_metrics: dict[str, dict[str, float]] = {}
        if self.sweep and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "`lambda_kl_sweep` clips each head's gradient on its own, so that the heads train as separate runs "
                "would; DeepSpeed and FSDP clip the gradient of all parameters together. Use DDP (or one process), "
                "or train the values in separate runs."
            )
        self.kl_controller = None
        if self._iav.target_kl is not None:
            self.kl_controller = AdaptiveKLController(self._iav.lambda_kl, self._iav.target_kl, self._iav.kl_horizon)
            self.add_callback(self.kl_controller)

    @property
    def training_alpha(self) -> float:
        """The strength the heads train at (`args.alpha`; 1.0 with a plain `DPOConfig`)."""
        return self._iav.alpha

    def _attach_head(self, model, peft_config) -> IAVModel:
        head_config = IAVConfig.alignment_head_config(self._iav)  # also for a plain DPOConfig, from the defaults
        if isinstance(model, IAVModel):
            if self._iav.lambda_kl_sweep:
                raise ValueError(
                    "`lambda_kl_sweep` attaches one new head per value, but an `IAVModel` (with its heads) was "
                    "passed. Pass the base model instead."
                )
            if peft_config is not None:
                raise ValueError(
                    "You passed an `IAVModel` together with a `peft_config`. The model already has its alignment "
                    "head(s): drop `peft_config`, or pass the base model instead."
                )
            return model
        if isinstance(peft_config, AlignmentHeadConfig):
            head_config = peft_config
        elif isinstance(peft_config, PeftConfig):
            if peft_config.is_prompt_learning:
                raise ValueError(
                    f"A {type(peft_config).__name__} cannot be combined with an alignment head: prompt learning "
                    "prepends virtual tokens, so the head's positions no longer match the labels. Use a "
                    "`peft.LoraConfig` (or another adapter-type config) for the backbone, or no `peft_config`."
                )
            model = get_peft_model(model, peft_config)
        elif peft_config is not None:
            raise TypeError(
                "`peft_config` must be an `AlignmentHeadConfig` or a `peft.PeftConfig`, got "
                f"{type(peft_config).__name__}."
            )
        # With PEFT, the wrapper has already frozen what LoRA does not train.
        freeze = self._iav.freeze_backbone and not is_peft_model(model)
        model = IAVModel(model, head_config, freeze_backbone=freeze)
        if self._iav.lambda_kl_sweep:
            if is_peft_model(model.base_model):
                raise ValueError(
                    "`lambda_kl_sweep` trains independent heads over one frozen backbone pass, but a LoRA backbone "
                    "would be trained by all of them at once. Drop the `peft.LoraConfig`, or `lambda_kl_sweep`."
                )
            for index in range(len(self._iav.lambda_kl_sweep)):
                model.add_adapter(sweep_head_name(index), head_config)
            model.delete_adapter("default")
        return model

    def _cache_backbone_features(self) -> None:
        """
        Replace the datasets by copies that carry their cached backbone features (`iav_trl.trainer.features`), and the
        collator by one that hands them to the model: from here on no training or evaluation step runs the backbone.
        """
        model = self.accelerator.unwrap_model(self.model)
        dtype = features_dtype(self._iav.backbone_features_dtype, model.get_base_model().dtype)
        hidden_size = model.output_embeddings.weight.shape[1]
        if self.is_deepspeed_enabled:  # ZeRO-1/2 leave the model on the CPU until the engine is built; it fits
            model.to(self.accelerator.device)
        device = model.get_base_model().device
        state = PartialState()

        def compute(batch: dict) -> torch.Tensor:
            return _batch_features(model, {key: value.to(device) for key, value in batch.items()}).cpu()

        def share(fingerprint: str) -> str:
            shared = [fingerprint]
            broadcast_object_list(shared, from_process=0)
            return shared[0]

        settings = dict(
            compute=compute,
            collator=self.data_collator,
            hidden_size=hidden_size,
            dtype=dtype,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
            model_fingerprint=(
                model.get_base_model().config._name_or_path,
                weights_fingerprint(model.get_base_model()),
            ),
            process_index=state.process_index,
            num_processes=state.num_processes,
            share=share,
            wait_for_everyone=state.wait_for_everyone,
        )
        batch_size = self.args.precompute_ref_batch_size
        if self.train_dataset is not None:
            self.train_dataset = cache_backbone_features(
                self.train_dataset, "train", batch_size=batch_size or self.args.per_device_train_batch_size, **settings
            )
        eval_batch_size = batch_size or self.args.per_device_eval_batch_size
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {
                name: cache_backbone_features(dataset, name, batch_size=eval_batch_size, **settings)
                for name, dataset in self.eval_dataset.items()
            }
        elif self.eval_dataset is not None:
            self.eval_dataset = cache_backbone_features(
                self.eval_dataset, "eval", batch_size=eval_batch_size, **settings
            )
        self.data_collator = BackboneFeatureCollator(self.data_collator, dtype, hidden_size)

    def _clip_grad_norm(self, model):
        """With `lambda_kl_sweep`, each head's gradient is clipped on its own (the heads train as separate runs
        would); the norm returned is that of all of them together, as `Trainer` reports it."""
        if not self.sweep:
            return super()._clip_grad_norm(model)
        heads = self.accelerator.unwrap_model(model).alignment_heads
        norms = [torch.nn.utils.clip_grad_norm_(heads[name].parameters(), self.args.max_grad_norm) for name in heads]
        return torch.stack(norms).norm()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """`DPOTrainer.evaluate`; with `lambda_kl_sweep`, also choose the best head (`choose_best_head`)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.sweep:
            datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
            # Several evaluation sets are logged as `<prefix>_<set>_...`: the first one chooses.
            prefix = f"{metric_key_prefix}_{next(iter(datasets))}" if isinstance(datasets, dict) else metric_key_prefix
            self.choose_best_head(metrics, prefix)
        return metrics

    def evaluate_alphas(
        self, alphas: Sequence[float], eval_dataset=None, per_pair: bool = False
    ) -> list[dict[str, Any]]:
        """
        Held-out preference scores of the aligned model at each of `alphas`, from one backbone pass per batch: DPO's
        implicit reward `beta * (log p_alpha - log p_ref)` of every pair, and per alpha its `accuracy`, `margin`,
        `chosen_reward`, `rejected_reward`, `loss`, `ties`, `win_rate` and teacher-forced `kl` per completion token
        (`iav_trl.trainer.preference_eval`). `eval_dataset` as `evaluate` takes it (`None`: the trainer's own).
        `per_pair=True` adds `margins`, every pair's reward margin in the dataset's order (for a paired comparison
        with another method on the same pairs). What `iav-trl eval` prints.
        """
        return evaluate_alphas(self, alphas, eval_dataset, per_pair)

    def choose_best_head(self, metrics: dict[str, float], prefix: str = "eval") -> str:
        """
        The sweep's rule: the head with the highest `<prefix>_<head>/rewards/accuracies` on the evaluation set (the
        first one, when there are several), ties broken by the lowest `<prefix>_<head>/iav/pref_loss` (the
        preference loss alone: the heads' KL weights differ).
        It becomes the active adapter and `best_head`; `sweep.json` (written with the model) records every head.
        """

        def score(name: str) -> tuple[float, float]:
            return (metrics[f"{prefix}_{name}/rewards/accuracies"], -metrics[f"{prefix}_{name}/iav/pref_loss"])

        self.best_head = max(self.sweep, key=score)
        self._sweep_metrics = {
            name: {
                key[len(f"{prefix}_{name}/") :]: value
                for key, value in metrics.items()
                if key.startswith(f"{prefix}_{name}/")
            }
            for name in self.sweep
        }
        self.accelerator.unwrap_model(self.model).set_adapter(self.best_head)
        return self.best_head

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._iav.precompute_backbone_features and not set(FEATURE_COLUMNS) <= set(self._signature_columns):
            self._signature_columns = [*self._signature_columns, *FEATURE_COLUMNS]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._reference_in_policy_pass:
            return dataset  # the reference log-probs come from each step's own forward pass
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        `L_pref` from `DPOTrainer`, plus `lambda_kl * L_KL + lambda_l2 * L_L2` (see the class docstring). With
        `lambda_kl_sweep`, the sum over the heads of each head's own loss, from one backbone pass (or the cache).
        """
        readout_cache = BaseLogitsCache(int(self._iav.readout_memory_gb * 2**30))
        if self._reference_in_policy_pass:  # z_base's home for this batch, and the readout's memory budget
            inputs = {**inputs, "readout_cache": readout_cache}
        try:
            if not self.sweep:
                lambda_kl = self._iav.lambda_kl if self.kl_controller is None else self.kl_controller.value
                return self._head_loss(model, inputs, return_outputs, num_items_in_batch, self._iav.alpha, lambda_kl)
            return self._sweep_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            readout_cache.clear()  # the backward pass needs only what each head kept, not z_base

    def _sweep_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The sum over the heads of `lambda_kl_sweep` of each head's own loss, its metrics under `<head>/<metric>`."""
        if "backbone_features" not in inputs:  # the one backbone pass every head reads
            inputs = {**inputs, "backbone_features": _batch_features(self.accelerator.unwrap_model(model), inputs)}
        mode = "train" if self.model.training else "eval"
        total, outputs = 0.0, None
        for index, (name, lambda_kl) in enumerate(self.sweep.items()):
            before = {key: len(values) for key, values in self._metrics[mode].items()}
            last = index == len(self.sweep) - 1  # TRL's `return_outputs` costs a full pass: once, for the last head
            result = self._head_loss(
                model, inputs, return_outputs and last, num_items_in_batch, {name: self._iav.alpha}, lambda_kl
            )
            loss, outputs = result if return_outputs and last else (result, None)
            for key in list(self._metrics[mode]):  # this head's metrics, under `<head>/<metric>`
                if key.split("/", 1)[0] in self.sweep:
                    continue
                values = self._metrics[mode][key]
                self._metrics[mode][f"{name}/{key}"].extend(values[before.get(key, 0) :])
                del values[before.get(key, 0) :]
                if not values:
                    del self._metrics[mode][key]
            total = total + loss
        return (total, outputs) if return_outputs else total

    def _head_loss(self, model, inputs, return_outputs, num_items_in_batch, alpha, lambda_kl):
        """One head's (or, with `alpha` a float, the active heads') loss at strength `alpha` and weight `lambda_kl`."""
        mode = "train" if self.model.training else "eval"
        fused_outputs = []

        def policy(*args, **kwargs):
            kwargs.setdefault("alpha", alpha)
            outputs = model(*args, **kwargs)
            if kwargs.get("fused_lm_head"):
                fused_outputs.append(outputs)
            return outputs

        if self._reference_in_policy_pass:
            with reference_from_policy_pass(self, inputs, fused_outputs) as batch:
                result = super().compute_loss(policy, batch, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(policy, inputs, return_outputs, num_items_in_batch)
        pref_loss, outputs = result if return_outputs else (result, None)

        fused = fused_outputs[-1]
        mask = fused.label_mask
        count = mask.sum().clamp(min=1)
        kl = (fused.kl * mask).sum() / count
        l2 = (fused.l2 * mask).sum() / count
        loss = pref_loss + lambda_kl * kl + self._iav.lambda_l2 * l2

        gather = self.accelerator.gather_for_metrics
        norm = (fused.alignment_norm * mask).sum() / count
        for key, value in (("pref_loss", pref_loss), ("kl", kl), ("l2", l2), ("alignment_norm", norm)):
            self._metrics[mode][f"iav/{key}"].append(gather(value.detach()).mean().item())
        if self.kl_controller is not None:
            self._metrics[mode]["iav/lambda_kl"].append(lambda_kl)
            if mode == "train":
                self.kl_controller.observe(self._metrics[mode]["iav/kl"][-1])
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and loading: the heads (and a trained backbone or its LoRA adapters), never a frozen backbone.

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        # DeepSpeed ZeRO-3 leaves each process a slice of every head parameter, and the parent passes no head weights
        # without `zero3_save_16bit_model`: gather the heads (every process runs `_save`) and save them whole.
        partitioned = [p for p in model.alignment_heads.parameters() if getattr(p, "ds_numel", p.numel()) != p.numel()]
        if partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                return self._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        full_backbone = any(p.requires_grad for p in model.base_model.parameters()) and not is_peft_model(
            model.base_model
        )
        if full_backbone:  # the heads belong to the trained backbone saved next to them, not to the initial base
            fingerprint = weights_fingerprint(model.get_base_model())
            for name, config in model.iav_config.items():
                model.iav_config[name] = dataclasses.replace(config, base_model_fingerprint=fingerprint)
        model.save_pretrained(output_dir, state_dict=state_dict, datasets=self._dataset_names())
        if any(p.requires_grad for p in model.base_model.parameters()):
            backbone_state = None
            if state_dict is not None:
                prefix = "base_model."
                backbone_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            model.base_model.save_pretrained(backbone_dir(output_dir), state_dict=backbone_state)
        if self.sweep:
            record = {
                "rule": "highest eval rewards/accuracies, then lowest eval iav/pref_loss (choose_best_head)",
                "best_head": self.best_head,
                "heads": {
                    name: {"lambda_kl": value, "eval": self._sweep_metrics.get(name)}
                    for name, value in self.sweep.items()
                },
            }
            atomic_write_text(os.path.join(output_dir, SWEEP_FILE), json.dumps(record, indent=2))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write(os.path.join(output_dir, TRAINING_ARGS_NAME), lambda path: torch.save(self.args, path))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Trainer writes a checkpoint's files one by one, `trainer_state.json` last: refuse one a kill cut short.
        optimizer_state = not self.args.save_only_model
        problem = checkpoint_problem(resume_from_checkpoint, optimizer_state)
        if problem is not None:
            complete = last_complete_checkpoint(
                os.path.dirname(os.path.abspath(resume_from_checkpoint)), optimizer_state
            )
            advice = f"resume from {complete}, the newest complete checkpoint next to it" if complete else "start over"
            raise ValueError(
                f"Cannot resume from {resume_from_checkpoint}: {problem}. Delete it (so that "
                f"`resume_from_checkpoint=True` skips it) and {advice}."
            )
        if self.kl_controller is not None:
            saved = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            controller = saved.stateful_callbacks.get(type(self.kl_controller).__name__)
            if controller is None:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint} with `target_kl` set: the checkpoint was trained "
                    "with a fixed `lambda_kl`, so it holds no adaptive value to continue from. Resume with "
                    "`target_kl=None`, or start over."
                )
            self.kl_controller.value = controller["attributes"]["value"]
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        for name in model.adapter_names:
            _, tensors, path = load_head(resume_from_checkpoint, None if name == "default" else name)
            set_head_state_dict(model, name, tensors, path)
        backbone = backbone_dir(resume_from_checkpoint)
        if os.path.isdir(backbone):
            if is_peft_model(model.base_model):
                weights = load_file(os.path.join(backbone, "adapter_model.safetensors"))
                set_peft_model_state_dict(model.base_model, weights)
            else:
                _load_full_backbone(model.base_model, backbone)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _dataset_names(self) -> list[str]:
        name = getattr(self.args, "dataset_name", None)
        return [name] if name else []

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> None:
        """The adapter's model card (Hub metadata, alpha guide, how to load), with this run's settings."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        a = self._iav
        lambda_kl = f"lambda_kl {a.lambda_kl}"
        if self.kl_controller is not None:
            lambda_kl += f" adapted to {self.kl_controller.value:.4g} for a target KL of {a.target_kl} per token"
        summary = (
            f"Trained with `IAVTrainer` (loss types {self.loss_types}, beta {self.beta}, alpha {a.alpha}, "
            f"{lambda_kl}, lambda_l2 {a.lambda_l2}, learning rate {self.args.learning_rate}, "
            f"{self.state.global_step} steps)."
        )
        datasets = [dataset_name] if dataset_name else self._dataset_names()
        card = build_model_card(model.iav_config, self.args.hub_model_id, datasets=datasets, training_summary=summary)
        os.makedirs(self.args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.args.output_dir, "README.md"), card)
