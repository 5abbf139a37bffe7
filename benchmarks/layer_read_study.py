"""Does the head gain from reading more than the last layer, or from more capacity? Evidence for issue 11's gap.

The alignment head reads `h_t`, the final (normed) hidden state, the one vector the base model's own next-token
prediction is made from. DPO + LoRA changes every layer. This study asks whether the head is behind because the last
layer no longer carries what separates a chosen from a rejected response, by letting it read, from the same
backbone pass, the residual stream of earlier decoder layers as well:

    x_t     = [h_t ; norm(r_t^(l_1)) ; ... ; norm(r_t^(l_m))]     (..., (1 + m) d)
    u_t     = W_read x_t                                          (..., r)    the only change to the head
    delta_t = the head's usual routing, proposals and write (`iav_trl.tuners.iav.head`)
    a_t     = s W_U delta_t,   z_final = z_base + alpha a_t       the output side is unchanged

`r_t^(l)` is the residual stream after decoder layer `l` and `norm` the model's final RMSNorm (the "logit lens"
scaling: earlier layers' residual norms differ by orders of magnitude). Decoding would still need one vocabulary
projection; only the read widens. `head_sizes` also varies the head's capacity (`K x r`, the number and dimension
of its interventions), the other thing the head could lack.

So that the variants differ in the read alone, every variant is trained and scored by this module's own plain
PyTorch loop, on the same features from one backbone pass:

    L = -mean_pairs log sigmoid(beta [(sum_c log p_final - sum_c log p_base) - (same for rejected)])
        + lambda_kl mean_tokens KL(p_final || p_base) + lambda_l2 mean_tokens (1/V) ||a_t||^2

(IAVTrainer's loss, with TRL's tokenization replaced by the chat template's prompt / completion split); AdamW,
linear decay to 0, gradient norm clipped at 1, one epoch (`epochs`). The data and splits are the default-`lambda_kl`
study's: the real-data benchmark's training pairs, validated on its validation pairs plus the last pairs of its
shuffled pool; the held-out split is never read. Reported per variant and alpha, means over seeds: the win rate of
the implicit reward (ties as half) ± the seeds' standard error, the mean margin and the KL per completion token.
Writes `layer_read_study.json` and `.md` into `output_dir`.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.layer_read_study
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from benchmarks.kl_default_study import KLDefaultConfig, seed_table, study_splits, summarize
from benchmarks.real_data.benchmark import load_pairs, report_main
from benchmarks.real_data.methods import load_model, quiet
from iav_trl.evaluation.metrics import win_rate
from iav_trl.models.base_models import load_base_tokenizer
from iav_trl.tuners.iav.config import AlignmentHeadConfig
from iav_trl.tuners.iav.head import AlignmentHead


@dataclass
class LayerReadConfig(KLDefaultConfig):
    """The default-`lambda_kl` study's model, data and splits, plus the layers read and the loss settings."""

    read_layers: list[str] = field(
        default_factory=lambda: ["", "15", "10,20"],
        metadata={
            "help": "Variants: comma-separated decoder layers (1-based) read besides the last; '' reads the last only."
        },
    )
    head_sizes: list[str] = field(
        default_factory=lambda: ["8x256"],
        metadata={"help": "Head sizes, `KxR`: K interventions of dimension R (8x256 is the default head's)."},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of every variant."})
    lambda_kl: float = field(default=0.3, metadata={"help": "Weight of the KL term (IAVConfig's default)."})
    lambda_l2: float = field(default=0.01, metadata={"help": "Weight of the alignment logits' squared RMS."})
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout on the head's subspace read in training."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay of the head."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds (head, order)."})
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "Alphas to score."})


def layer_sets(config: LayerReadConfig) -> list[tuple[int, ...]]:
    """The variants' extra layers, as sorted tuples (empty: the last layer alone)."""
    return [tuple(sorted(int(layer) for layer in spec.split(",") if layer.strip())) for spec in config.read_layers]


def head_sizes(config: LayerReadConfig) -> list[tuple[int, int]]:
    """The variants' head sizes as `(num_interventions, intervention_dim)`."""
    sizes = []
    for spec in config.head_sizes:
        parts = spec.lower().split("x")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(f"`head_sizes` entries are `KxR` with positive integers (e.g. 8x256), got {spec!r}.")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def tokenize_pair(tokenizer, row: dict[str, Any]) -> dict[str, list[int]]:
    """Prompt ids (chat template with the generation prompt) and each side's completion ids after them."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = {"prompt": prompt_ids}
    for side in ("chosen", "rejected"):
        text = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        if not text.startswith(prompt):
            raise ValueError(f"The chat template's {side} text does not start with its prompt text; cannot split it.")
        out[side] = tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"]
    return out


CONTEXT_READS = ("prompt_mean", "running_mean")


def context_reads(final: torch.Tensor, prompt_length: int, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Summaries of the context at each scored position `t` (`P - 1 <= t < T - 1`), from the final hidden states of
    the whole sequence `final` `(T, d)` with a prompt of `P` tokens, each `(T - P, d)`:

        prompt_mean_t  = (1 / P) sum_{s < P} h_s        the request, fixed once the prompt is read
        running_mean_t = (1 / (t + 1)) sum_{s <= t} h_s  everything read so far
    """
    scored = slice(prompt_length - 1, final.shape[0] - 1)
    count = final.shape[0] - prompt_length
    reads = {
        "prompt_mean": lambda: final[:prompt_length].mean(0).expand(count, -1),
        "running_mean": lambda: (final.cumsum(0) / torch.arange(1, final.shape[0] + 1).unsqueeze(-1))[scored],
    }
    return [reads[name]() for name in names]


@torch.no_grad()
def backbone_features(
    model, tokenizer, pairs: Dataset, layers: tuple[int, ...], contexts: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """One backbone pass per sequence: at each scored position (a completion token's predecessor) the final hidden
    state `h` `(n, d)`, the extra reads `(n, len(layers) + len(contexts), d)` (the normed residual streams after
    `layers`, then the `context_reads` named in `contexts`), and the labels `(n,)`."""
    norm = model.get_decoder().norm
    features = []
    for row in pairs:
        ids = tokenize_pair(tokenizer, row)
        pair = {}
        for side in ("chosen", "rejected"):
            sequence = torch.tensor([ids["prompt"] + ids[side]])
            states = model(sequence, output_hidden_states=True).hidden_states
            scored = slice(len(ids["prompt"]) - 1, sequence.shape[1] - 1)
            extra = [norm(states[layer][0, scored]) for layer in layers]
            extra += context_reads(states[-1][0], len(ids["prompt"]), contexts)
            pair[side] = {
                "final": states[-1][0, scored].float(),
                "extra": torch.stack(extra, dim=1).float() if extra else None,
                "labels": sequence[0, len(ids["prompt"]) :],
            }
        features.append(pair)
    return features


def build_head(
    hidden_size: int, extra: int, seed: int, size: tuple[int, int] | None = None, dropout: float | None = None
) -> AlignmentHead:
    """An alignment head of `size` (`(K, r)`) and `dropout` (default `AlignmentHeadConfig`'s) with its read widened
    to `(1 + extra) * hidden_size` inputs."""
    torch.manual_seed(seed)
    defaults = AlignmentHeadConfig()
    interventions, dim = size or (defaults.num_interventions, defaults.intervention_dim)
    head = AlignmentHead(hidden_size, interventions, dim, defaults.dropout if dropout is None else dropout)
    if extra:
        head.read = nn.Linear((1 + extra) * hidden_size, dim, bias=False)
    return head


def _batch(features: list[dict[str, Any]], columns: list[int]) -> dict[str, Any]:
    """The batch's scored positions, chosen sequences first: head inputs, final states, labels and sequence ids."""
    inputs, finals, labels, sequence = [], [], [], []
    sides = [pair[side] for side in ("chosen", "rejected") for pair in features]
    for index, item in enumerate(sides):
        parts = [item["final"]] + ([item["extra"][:, columns].flatten(1)] if columns else [])
        inputs.append(torch.cat(parts, dim=-1))
        finals.append(item["final"])
        labels.append(item["labels"])
        sequence.append(torch.full((len(item["labels"]),), index))
    return {
        "inputs": torch.cat(inputs),
        "final": torch.cat(finals),
        "labels": torch.cat(labels),
        "sequence": torch.cat(sequence),
        "sequences": len(sides),
    }


def logits(head, unembedding: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`log p_base = log_softmax(W_U h)` and the alignment logits at strength 1, `a = W_U delta`, of every scored
    token `(N, V)`: what every alpha shares."""
    return F.log_softmax(batch["final"] @ unembedding.T, dim=-1), head(batch["inputs"]) @ unembedding.T


def pair_margins(log_base, a, batch, alpha: float, beta: float):
    """Per pair `beta [(sum log p_final(y) - sum log p_base(y))_chosen - (same)_rejected]` at `z_base + alpha a`
    (`log_softmax(log p_base + alpha a)` is `log p_final`: a softmax ignores the per-token constant), and per token
    KL(p_final || p_base) and `(1/V) ||alpha a||^2`."""
    a = alpha * a
    log_final = F.log_softmax(log_base + a, dim=-1)
    index = batch["labels"].unsqueeze(-1)
    gain = (log_final.gather(-1, index) - log_base.gather(-1, index))[:, 0]
    kl = (log_final.exp() * (log_final - log_base)).sum(-1)
    sums = torch.zeros(batch["sequences"]).index_add(0, batch["sequence"], gain)
    chosen, rejected = sums.chunk(2)
    return beta * (chosen - rejected), kl, a.square().mean(-1)


def train_head(features, config: LayerReadConfig, columns: list[int], seed: int, unembedding, size) -> AlignmentHead:
    """`config.epochs` (whole) epochs of the IAV loss over `features`, each in a seeded order (the module docstring's
    loop), with the config's head dropout and weight decay."""
    head = build_head(unembedding.shape[1], len(columns), seed, size, config.head_dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator, batches = torch.Generator().manual_seed(seed), []
    for _ in range(max(1, round(config.epochs))):
        order = torch.randperm(len(features), generator=generator).tolist()
        batches += [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches))
    head.train()
    for rows in batches:
        batch = _batch([features[i] for i in rows], columns)
        margins, kl, l2 = pair_margins(*logits(head, unembedding, batch), batch, 1.0, config.beta)
        loss = -F.logsigmoid(margins).mean() + config.lambda_kl * kl.mean() + config.lambda_l2 * l2.mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def score(head, features, config: LayerReadConfig, columns: list[int], unembedding) -> list[dict[str, float]]:
    """Per alpha: win rate (ties as half), mean margin and mean KL per completion token over `features`."""
    margins = {alpha: [] for alpha in config.alphas}
    kls = {alpha: [] for alpha in config.alphas}
    for start in range(0, len(features), config.eval_batch_size):
        batch = _batch(features[start : start + config.eval_batch_size], columns)
        log_base, a = logits(head, unembedding, batch)
        for alpha in config.alphas:
            margin, kl, _ = pair_margins(log_base, a, batch, alpha, config.beta)
            margins[alpha].append(margin)
            kls[alpha].append(kl)
    rows = []
    for alpha in config.alphas:
        margin, kl = torch.cat(margins[alpha]), torch.cat(kls[alpha])
        rows.append(
            {
                "alpha": alpha,
                "win_rate": win_rate(margin.tolist(), [0.0] * len(margin)),  # against the base model's margin, 0
                "margin": margin.mean().item(),
                "completion_kl": kl.mean().item(),
            }
        )
    return rows


def study_inputs(config: LayerReadConfig) -> tuple[Any, Any, dict[str, Dataset]]:
    """The model, its tokenizer, and the HH-RLHF `study_splits` (training and validation pairs) of a study."""
    quiet()
    tokenizer = load_base_tokenizer(config.model)
    model = load_model(config.model)
    pairs, _ = load_pairs(config.data_path("hh_rlhf"), tokenizer, config.max_length)
    return model, tokenizer, study_splits(pairs, config)


def study(config: LayerReadConfig) -> dict[str, Any]:
    start = time.perf_counter()
    model, tokenizer, splits = study_inputs(config)
    variants, sizes = layer_sets(config), head_sizes(config)
    layers = tuple(sorted({layer for variant in variants for layer in variant}))
    if any(not 1 <= layer < model.config.num_hidden_layers for layer in layers):
        raise ValueError(
            f"`read_layers` must name decoder layers 1..{model.config.num_hidden_layers - 1} (the last is always "
            f"read), got {list(layers)}."
        )
    features = {name: backbone_features(model, tokenizer, split, layers) for name, split in splits.items()}
    unembedding = model.get_output_embeddings().weight.detach().float()
    default_size = (AlignmentHeadConfig().num_interventions, AlignmentHeadConfig().intervention_dim)
    runs = []
    for size in sizes:
        for variant in variants:
            columns = [layers.index(layer) for layer in variant]
            name = "last layer" if not variant else "last + " + ", ".join(str(layer) for layer in variant)
            name += "" if size == default_size else f", {size[0]}x{size[1]} head"
            for seed in config.seeds:
                head = train_head(features["train"], config, columns, seed, unembedding, size)
                rows = score(head, features["validation"], config, columns, unembedding)
                parameters = sum(p.numel() for p in head.parameters())
                runs.append({"variant": name, "seed": seed, "trainable": parameters, "validation": rows})
                print(f"[{time.perf_counter() - start:6.0f}s] {name}, seed {seed}", flush=True)
    return {
        "config": asdict(config),
        "pairs": {name: len(split) for name, split in splits.items()},
        "runs": runs,
        "summary": [
            {**row, "trainable": next(run["trainable"] for run in runs if run["variant"] == row["variant"])}
            for row in summarize(runs, config.alphas)
        ],
        "wall_time_s": time.perf_counter() - start,
    }


def report(results: dict[str, Any]) -> str:
    config = results["config"]
    columns = {"head reads": lambda row: row["variant"], "trainable": lambda row: f"{row['trainable'] / 1e6:.2f}M"}
    lines = [
        f"## Layer-read study: {config['model']} on HH-RLHF",
        "",
        f"{results['pairs']['train']} training pairs (one epoch, batch {config['batch_size']}, learning rate "
        f"{config['learning_rate']:g}, lambda_kl {config['lambda_kl']:g}), {results['pairs']['validation']} "
        f"validation pairs; seeds {config['seeds']}, means over seeds (± the seeds' standard error of the win rate). "
        "KL: mean over the completion tokens of KL(p_final || p_base), teacher-forced.",
        "",
        *seed_table(results["summary"], config["alphas"], columns),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    report_main(LayerReadConfig, study, report, "layer_read_study")


if __name__ == "__main__":
    main()
