"""PNG plots of `IAVEvaluator` results (matplotlib, installed with `pip install -e ".[eval]"`).

`plot_results(results, out_dir)` takes the evaluator's `results` (or the JSON `save_results` wrote) and draws what
it holds:

- `reward_vs_alpha.png`: mean reward (+- standard error) and win rate against alpha 0, per alpha;
- `kl_vs_alpha.png`: the sequence-level KL to the base model (both estimates), per alpha;
- `reward_kl_frontier.png`: reward against KL, one point per alpha;
- `cost_bars.png`: speed, latency per token and memory of IAV and the GenARM baseline relative to the base model;
- `controllability.png`: the controlled metric (reward or refusal rate) per alpha, with its rank correlation.

Figures are drawn on matplotlib's Agg canvas (no display needed) at `figsize` inches x `dpi`, i.e. 900 x 600 pixels
by default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

FIGSIZE = (6.0, 4.0)
DPI = 150


def _figure(figsize: tuple[float, float], dpi: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'Plotting needs matplotlib: `pip install -e ".[eval]"` (or `pip install matplotlib`).'
        ) from err
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _sections(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Accept the evaluator's whole `results` or the dict one evaluation method returned."""
    if "reward_mean" in results:
        return {"performance": results}
    if "ratios" in results:
        return {"efficiency": results}
    if "values" in results and "spearman" in results:
        return {"controllability": results}
    return {name: results[name] for name in ("performance", "efficiency", "controllability") if name in results}


def _errors(values):
    return None if values is None else [0.0 if v is None else v for v in values]


def plot_results(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> dict[str, str]:
    """Draw the plots `results` allows into `out_dir`; returns `{plot name: path}`."""
    sections = _sections(results)
    if not sections:
        raise ValueError(
            "Nothing to plot: pass the results of `evaluate_performance`, `evaluate_efficiency` or "
            f"`evaluate_controllability` (or the evaluator's `results`), got keys {sorted(results)}."
        )
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}

    def save(name: str, figure) -> None:
        figure.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        figure.savefig(path, dpi=dpi)
        paths[name] = path

    performance = sections.get("performance")
    if performance is not None:
        alphas = performance["alphas"]
        figure = _figure(figsize, dpi)
        ax = figure.add_subplot()
        ax.errorbar(alphas, performance["reward_mean"], yerr=_errors(performance.get("reward_stderr")), marker="o")
        ax.set_xlabel("alpha")
        ax.set_ylabel("mean reward")
        ax.set_title("Reward vs alpha")
        twin = ax.twinx()
        twin.plot(alphas, performance["win_rate_vs_base"], color="tab:orange", marker="s", linestyle="--")
        twin.set_ylabel("win rate vs alpha 0", color="tab:orange")
        twin.set_ylim(0, 1)
        save("reward_vs_alpha", figure)

        figure = _figure(figsize, dpi)
        ax = figure.add_subplot()
        ax.errorbar(
            alphas, performance["kl"], yerr=_errors(performance.get("kl_stderr")), marker="o", label="log-ratio"
        )
        ax.plot(alphas, performance["kl_stepwise"], marker="s", linestyle="--", label="stepwise")
        ax.set_xlabel("alpha")
        ax.set_ylabel("KL(p_alpha || p_base) per response (nats)")
        ax.set_title("KL to the base model vs alpha")
        ax.legend()
        save("kl_vs_alpha", figure)

        figure = _figure(figsize, dpi)
        ax = figure.add_subplot()
        ax.plot(performance["kl_stepwise"], performance["reward_mean"], marker="o")
        for alpha, kl, reward in zip(alphas, performance["kl_stepwise"], performance["reward_mean"]):
            ax.annotate(f"alpha={alpha:g}", (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL to the base model, stepwise estimate (nats)")
        ax.set_ylabel("mean reward")
        ax.set_title("Reward-KL frontier")
        save("reward_kl_frontier", figure)

    efficiency = sections.get("efficiency")
    if efficiency is not None:
        ratios = efficiency["ratios"]
        labels = ["base", "IAV (alpha 1)", "GenARM"]
        metrics = [("tokens_per_second", "speed"), ("latency_per_token", "latency / token"), ("memory", "memory")]
        figure = _figure(figsize, dpi)
        ax = figure.add_subplot()
        width = 0.25
        for k, (key, label) in enumerate(metrics):
            values = [1.0, ratios["iav/base"][key], ratios["genarm/base"][key]]
            positions = [i + (k - 1) * width for i in range(len(labels))]
            bars = ax.bar(positions, values, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("relative to the base model")
        ax.set_title(f"Decoding cost ({efficiency['device']}, {efficiency['new_tokens']} new tokens)")
        ax.legend()
        save("cost_bars", figure)

    control = sections.get("controllability")
    if control is not None:
        figure = _figure(figsize, dpi)
        ax = figure.add_subplot()
        ax.plot(control["alphas"], control["values"], marker="o")
        ax.set_xlabel("alpha")
        ax.set_ylabel(control["metric"].replace("_", " "))
        rho = control["spearman"]
        ax.set_title(f"Controllability (Spearman {'n/a' if rho is None else f'{rho:.2f}'})")
        save("controllability", figure)
    return paths


__all__ = ["plot_results"]
