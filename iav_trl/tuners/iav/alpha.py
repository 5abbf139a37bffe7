"""Parsing of the test-time alignment strength `alpha`.

With adapters `i` active at mixing weights `w_i`, a call decodes with

    z_final = z_base + sum_i alpha_i * a_t^(i),     alpha_i = alpha * w_i

where `alpha` is a float (every row), a sequence/tensor of one value per batch row, or a dict `{adapter: value}`
that sets each `alpha_i` directly (values again floats or per-row sequences). `None` means each adapter's
`default_alpha` (1.0 unless the adapter says otherwise). Guide: 0 base model, 0.5 light, 1.0 standard (what
training targets), 1.5 strong, 2.0 maximum.

Accepted: any `|alpha_i| <= ALPHA_LIMIT = 1000` (the user's values, and their products with the mixing weights).
That is 500 times the guide's maximum, and keeps `alpha_i * a_t` finite in float32 (max 3.4e38) for any alignment
logits below 3e35; a value such as 1e39 is not even a float32 (it rounds to inf) and turned every logit into inf or
NaN while `generate` still returned tokens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch

AlphaValue = Union[float, Sequence[float], np.ndarray, torch.Tensor]
AlphaLike = Union[AlphaValue, Mapping[str, AlphaValue], None]

ALPHA_GUIDE = "0 = base model, 0.5 light, 1.0 standard (the training target), 1.5 strong, 2.0 maximum"
ALPHA_LIMIT = 1000.0  # the largest |alpha_i| accepted, see the module docstring


def _beyond_limit(where: str, value: float) -> ValueError:
    return ValueError(
        f"{where} is {value:g}, beyond the supported range |alpha| <= {ALPHA_LIMIT:g} (larger strengths overflow "
        f"float32 logits to inf/NaN). Use a value such as {ALPHA_GUIDE}."
    )


def _strength(value: AlphaValue, batch_size: int | None, where: str) -> float | torch.Tensor:
    """One strength: a python float, or a float32 tensor of shape `(batch_size,)` for per-row values."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where} must be a finite number or one number per batch row, got {value!r}.")
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value}. Use a value such as {ALPHA_GUIDE}.")
        if abs(value) > ALPHA_LIMIT:
            raise _beyond_limit(where, value)
        return value
    if isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{where} must be a number or a sequence of numbers, got {type(value).__name__}.")
    try:
        tensor = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where} must be a number or a sequence of numbers, got {value!r}.") from err
    if tensor.dim() == 0:
        return _strength(tensor.item(), batch_size, where)
    if tensor.dim() != 1:
        raise ValueError(
            f"{where} must be a float or a 1-D sequence (one value per row), got shape {tuple(tensor.shape)}."
        )
    if batch_size is not None and tensor.numel() != batch_size:
        raise ValueError(
            f"{where} has {tensor.numel()} values but the batch has {batch_size} rows: pass one value per row, "
            "or a single float for every row."
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} must be finite, got {tensor.tolist()}. Use values such as {ALPHA_GUIDE}.")
    if tensor.abs().max() > ALPHA_LIMIT:
        raise _beyond_limit(f"{where} (row {int(tensor.abs().argmax())})", float(tensor.abs().max()))
    return tensor


def resolve_alpha(
    alpha: AlphaLike,
    active: Mapping[str, float],
    defaults: Mapping[str, float],
    batch_size: int | None,
) -> dict[str, float | torch.Tensor]:
    """
    Turn a user's `alpha` into per-adapter strengths `{adapter: alpha_i}` (floats or `(batch_size,)` tensors).

    `active` maps the active adapters to their mixing weights, `defaults` every loaded adapter to its
    `default_alpha`. Adapters whose strength is exactly 0 are left out, so they cost nothing.
    """
    if isinstance(alpha, Mapping):
        unknown = sorted(str(name) for name in alpha if name not in defaults)
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown} in `alpha`; loaded adapters are {sorted(defaults)}.")
        strengths = {name: _strength(value, batch_size, f"alpha[{name!r}]") for name, value in alpha.items()}
    elif alpha is None:
        strengths = {name: defaults[name] * weight for name, weight in active.items()}
    else:
        value = _strength(alpha, batch_size, "alpha")
        strengths = {name: value * weight for name, weight in active.items()}
    for name, value in strengths.items():  # alpha times the mixing weights (`set_adapter`), or a default_alpha
        largest = abs(value) if isinstance(value, float) else float(value.abs().max())
        if largest > ALPHA_LIMIT:
            raise _beyond_limit(f"The strength of adapter {name!r} (alpha times its mixing weight)", largest)
    return {name: value for name, value in strengths.items() if not (isinstance(value, float) and value == 0.0)}


def strength_rows(
    strengths: Mapping[str, float | torch.Tensor], adapters: Sequence[str], batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """
    `strengths` (as `resolve_alpha` returns them) as one float32 `(batch_size,)` tensor per adapter of `adapters`, in
    that order, on `device`; 0 for an adapter `strengths` leaves out. Decoding passes these: a compiled decoding
    step (`torch.compile`, e.g. `generate`'s static-cache compilation) then sees the same names, types and shapes
    for every alpha, per-row alphas and mixing weights, so a new value never recompiles it (Dynamo specializes on
    Python floats and on which adapters run).
    """
    rows = {}
    for name in adapters:
        value = strengths.get(name, 0.0)
        rows[name] = (
            value.to(device=device, dtype=torch.float32)
            if isinstance(value, torch.Tensor)
            else torch.full((batch_size,), value, dtype=torch.float32, device=device)
        )
    return rows
