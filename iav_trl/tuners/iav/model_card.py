"""The README.md written next to a saved alignment head: Hub metadata, the alpha guide and how to load it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from iav_trl.models.base_models import hub_model_id
from iav_trl.tuners.iav.alpha import ALPHA_GUIDE
from iav_trl.tuners.iav.config import AlignmentHeadConfig


def build_model_card(
    configs: Mapping[str, AlignmentHeadConfig],
    repo_id: str | None = None,
    datasets: Sequence[str] = (),
    training_summary: str | None = None,
) -> str:
    """A model card whose YAML header the Hub reads (`base_model`, `library_name`, `tags`, `datasets`)."""
    first = next(iter(configs.values()))
    base = first.base_model_name_or_path
    hub_base = hub_model_id(base)  # the Hub's metadata takes repo ids only, not local or package files
    header = ["---"]
    if hub_base:
        header.append(f"base_model: {hub_base}")
    header.append("library_name: iav-trl")
    tags = ["iav-trl", "alignment-head", "inherent-alignment-vectors", "trl", "dpo"]
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")
    header.append("tags:")
    header.extend(f"- {tag}" for tag in tags)
    if datasets:
        header.append("datasets:")
        header.extend(f"- {name}" for name in datasets)
    header.append("---")

    name = repo_id or "this adapter"
    load_from = repo_id or "path/to/adapter"
    heads = "\n".join(
        f"| `{adapter}` | {cfg.num_interventions} | {cfg.intervention_dim} | {cfg.default_alpha} |"
        for adapter, cfg in configs.items()
    )
    body = f"""
# Alignment head{f" for {base}" if base else ""}

{name} is an [iav-trl](https://github.com/iav-trl/iav-trl) alignment head (Inherent Alignment Vectors). It adds an
alignment vector `a_t` to the frozen base model's logits: `z_final = z_base + alpha * a_t`, with `alpha` chosen at
test time, per call or per batch row, without reloading anything.

| alpha | behaviour |
| --- | --- |
| 0.0 | exactly the base model |
| 0.5 | light alignment |
| 1.0 | standard (what training targets) |
| 1.5 | strong |
| 2.0 | maximum |

({ALPHA_GUIDE}.)

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from iav_trl import IAVModel

base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")
tokenizer = AutoTokenizer.from_pretrained("{base or "BASE_MODEL"}")
model = IAVModel.from_pretrained(base, "{load_from}")
inputs = tokenizer("Hello", return_tensors="pt")
out = model.generate(**inputs, alpha=1.0, max_new_tokens=32)
```

## Heads

| adapter | interventions | dim | default alpha |
| --- | --- | --- | --- |
{heads}
"""
    if training_summary:
        body += f"\n## Training\n\n{training_summary}\n"
    return "\n".join(header) + "\n" + body
