"""A fingerprint of a base model's weights, recorded in every adapter, so a head loaded onto another base of the same
shapes (a base model instead of its instruct version, a random model, another fine-tune) is noticed.

The fingerprint samples `SAMPLES_PER_TENSOR` values at fixed, evenly spaced positions of `TENSORS` weight tensors
spread evenly over the model's parameters in `named_parameters()` order (the first and the last always among them).
Names are taken as the bare model has them: alignment heads and LoRA weights are left out, and PEFT's `base_layer`
is read as the layer itself, so the same base gives the same fingerprint with or without adapters. It is stored as
`{"dtype": ..., "tensors": {name: [values]}}` and compared on the tensors both sides can read:

- same dtype as recorded: every sampled value must be equal (any change of a sampled weight is caught);
- another dtype (a bf16 load of an fp32-trained base, say): the relative distance `||s - s_rec||_2 / ||s_rec||_2`
  must stay below `DTYPE_TOLERANCE`, which covers rounding to bf16 (at most 2^-8 relative per value) and rules out
  other weights, which differ by far more.

Weights that are not materialised (ZeRO-3 partitions, the meta device) or not floating point (packed 4-bit storage)
are not read; when no tensor is left on either side, nothing can be told and nothing is checked.
"""

from __future__ import annotations

import torch
from torch import nn

TENSORS = 8
SAMPLES_PER_TENSOR = 16
DTYPE_TOLERANCE = 1e-2
_ADAPTER_MARKERS = ("alignment_heads.", "lora_")


def _bare_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`model`'s parameters under the names of the bare base model, adapters left out."""
    return [
        (name.replace(".base_layer.", "."), p)
        for name, p in model.named_parameters()
        if not any(marker in name for marker in _ADAPTER_MARKERS)
    ]


def _spaced(n: int, k: int) -> torch.Tensor:
    """`k` evenly spaced indices into `n` items, first and last included (integer arithmetic: exact for any `n`)."""
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)


def weights_fingerprint(model: nn.Module) -> dict | None:
    """`{"dtype", "tensors": {name: values}}` of `model`'s weights (see the module docstring), or None if none can be
    read."""
    parameters = _bare_parameters(model)
    if not parameters:
        return None
    picks = sorted(set(_spaced(len(parameters), TENSORS).tolist()))
    tensors, dtypes = {}, set()
    for name, p in (parameters[i] for i in picks):
        readable = p.dtype.is_floating_point and p.device.type != "meta" and p.numel() > 0
        if not readable or getattr(p, "ds_numel", p.numel()) != p.numel():
            continue
        flat = p.detach().reshape(-1)
        positions = _spaced(flat.numel(), SAMPLES_PER_TENSOR).to(flat.device)
        tensors[name] = [float(v) for v in flat[positions].float().cpu().tolist()]
        dtypes.add(str(p.dtype).removeprefix("torch."))
    if not tensors:
        return None
    return {"dtype": "/".join(sorted(dtypes)), "tensors": tensors}


def fingerprint_mismatch(recorded: dict, model: nn.Module) -> str | None:
    """
    Why `model`'s weights are not those the `recorded` fingerprint was taken from, or None when they are (or when it
    cannot be told: no tensor readable on both sides).
    """
    current = weights_fingerprint(model)
    if current is None:
        return None
    common = sorted(set(current["tensors"]) & set(recorded.get("tensors", {})))
    if not common:
        return None
    old = torch.tensor([recorded["tensors"][name] for name in common])
    new = torch.tensor([current["tensors"][name] for name in common])
    distance = float((new - old).norm() / old.norm().clamp(min=1e-12))
    same_dtype = current["dtype"] == recorded.get("dtype")
    if (same_dtype and torch.equal(new, old)) or (not same_dtype and distance <= DTYPE_TOLERANCE):
        return None
    return (
        f"its weights differ from those the head was trained on by {distance:.2%} (relative L2 over "
        f"{old.numel()} sampled values; {current['dtype']} now, {recorded.get('dtype')} then)"
    )
