"""`EvaluationConfig`: what `IAVEvaluator` generates, samples and measures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class EvaluationConfig:
    """
    Configuration of `IAVEvaluator`.

    Parameters that control generation:
        alphas (`list[float]`, defaults to `[0.0, 0.5, 1.0, 1.5, 2.0]`):
            Alignment strengths to evaluate. Alpha 0 (the base model) is always added, as the reference of the
            win rate and the KL.
        max_new_tokens (`int`, defaults to `128`):
            New tokens per response. `evaluate_efficiency` decodes exactly this many for every method.
        num_samples (`int`, defaults to `1`):
            Responses sampled per prompt and alpha. More samples lower the variance of the reward and KL estimates
            (the KL's standard error is reported); needs `temperature > 0`.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature; 0 decodes greedily. At 1 (with `top_k=0`, `top_p=1`) the KL is that of the
            model's own distributions.
        top_p (`float`, defaults to `1.0`):
            Nucleus sampling. Below 1 the KL estimate scores the untruncated distributions (see the module
            docstring).
        top_k (`int`, defaults to `0`):
            Top-k sampling (0 = off; note that `transformers` otherwise defaults to 50).
        batch_size (`int`, defaults to `8`):
            (prompt, alpha) rows per `generate` call (each yields `num_samples` responses) and per scoring pass.
        seed (`int`, defaults to `0`):
            Seed of each batch's sampling, so that results are reproducible.
        device (`str`, *optional*):
            Device to run on (the model is moved there); defaults to where the model is.

    Parameters that control scoring and the analyses:
        reward_batch_size (`int`, defaults to `16`):
            Responses per call of the reward function / reward model.
        top_tokens (`int`, defaults to `10`):
            Promoted / suppressed tokens listed by `analyze_alignment_vectors`.
        max_analysis_tokens (`int`, defaults to `512`):
            Response positions whose alignment vectors `analyze_alignment_vectors` collects (an `(N, V)` matrix is
            decomposed, so this bounds its memory).

    Parameters that control the cost comparison:
        efficiency_rounds (`int`, defaults to `5`):
            Timed rounds; in each, every method decodes all prompts once, in rotating order.
        efficiency_warmup (`int`, defaults to `1`):
            Untimed passes per method before timing.
        genarm_alpha (`float`, defaults to `1.0`):
            Guidance strength of the GenARM baseline (`1 / beta`); its cost does not depend on it.

    Other parameters:
        show_progress (`bool`, defaults to `True`):
            Show progress bars.
        generator_name (`str`, *optional*):
            Name written in the `generator` field of the AlpacaEval export; defaults to
            `<base model name>-iav-alpha<alpha>`.
    """

    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0], metadata={"help": "Alignment strengths to evaluate."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "New tokens per response."})
    num_samples: int = field(default=1, metadata={"help": "Responses sampled per prompt and alpha."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    batch_size: int = field(default=8, metadata={"help": "(prompt, alpha) rows per generate / scoring call."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    device: str | None = field(default=None, metadata={"help": "Device to run on (default: the model's)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Responses per reward call."})
    top_tokens: int = field(default=10, metadata={"help": "Promoted/suppressed tokens listed per head."})
    max_analysis_tokens: int = field(default=512, metadata={"help": "Positions collected for the spectrum."})
    efficiency_rounds: int = field(default=5, metadata={"help": "Timed rounds of the cost comparison."})
    efficiency_warmup: int = field(default=1, metadata={"help": "Untimed passes per method before timing."})
    genarm_alpha: float = field(default=1.0, metadata={"help": "Guidance strength of the GenARM baseline."})
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    generator_name: str | None = field(default=None, metadata={"help": "`generator` of the AlpacaEval export."})

    def __post_init__(self) -> None:
        alphas = list(self.alphas) if isinstance(self.alphas, Sequence) and not isinstance(self.alphas, str) else None
        if not alphas or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas
        ):
            raise ValueError(f"`alphas` must be a non-empty list of finite floats, got {self.alphas!r}.")
        self.alphas = [float(a) for a in alphas]
        for name in ("max_new_tokens", "num_samples", "batch_size", "reward_batch_size", "top_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("max_analysis_tokens", "efficiency_rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.efficiency_warmup, int) or self.efficiency_warmup < 0:
            raise ValueError(f"`efficiency_warmup` must be a non-negative integer, got {self.efficiency_warmup!r}.")
        if not self.temperature >= 0:
            raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(
                f"`num_samples={self.num_samples}` needs sampling: greedy decoding (temperature 0) gives one "
                "response per prompt. Set `temperature > 0` or `num_samples=1`."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be a non-negative integer (0 = off), got {self.top_k!r}.")
        if not math.isfinite(self.genarm_alpha):
            raise ValueError(f"`genarm_alpha` must be finite, got {self.genarm_alpha!r}.")
