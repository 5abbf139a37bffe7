"""The benchmark's markdown table and its figure (reward-KL frontier, reward against alpha)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COLORS = {"SFT": "black", "IAV": "tab:blue", "DPO": "tab:orange", "GenARM": "tab:green"}


def markdown_table(rows: Sequence[Mapping[str, Any]], speed: Mapping[str, Mapping[str, float]]) -> str:
    """
    One line per (method, setting): mean true reward, gain over SFT, KL to SFT (with standard errors), the share of
    well-formed responses, and the method's decode tokens/s.
    """
    lines = [
        "| method | setting | reward | gain over SFT | KL to SFT (nats) | well-formed | decode tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        tokens_per_s = speed.get(row["method"], {}).get("tokens_per_s")
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['reward']:.3f} ± {row['reward_stderr']:.3f} | "
            f"{row['gain']:+.3f} | {row['kl']:.2f} ± {row['kl_stderr']:.2f} | {row['well_formed']:.0%} | "
            + ("-" if tokens_per_s is None else f"{tokens_per_s:.0f}")
            + " |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Left: reward against KL to the SFT model, one curve per method. Right: reward against alpha (IAV, GenARM)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    frontier, by_alpha = figure.subplots(1, 2)
    for method, color in COLORS.items():
        points = [row for row in rows if row["method"] == method]
        if not points:
            continue
        points.sort(key=lambda row: row["kl"])
        frontier.errorbar(
            [row["kl"] for row in points],
            [row["reward"] for row in points],
            xerr=[row["kl_stderr"] for row in points],
            yerr=[row["reward_stderr"] for row in points],
            marker="o",
            color=color,
            label=method,
            capsize=2,
        )
        for i, row in enumerate(points):
            if method != "SFT":  # labels alternate below / above the points, so neighbours do not overlap
                offset = (4, -10) if i % 2 == 0 else (4, 5)
                frontier.annotate(
                    row["setting"], (row["kl"], row["reward"]), fontsize=7, xytext=offset, textcoords="offset points"
                )
        alphas = sorted((row["alpha"], row["reward"], row["reward_stderr"]) for row in points if "alpha" in row)
        if alphas:
            by_alpha.errorbar(*zip(*alphas), marker="o", color=color, label=method, capsize=2)
    frontier.set_xlabel("KL(method || SFT), nats per response")
    frontier.set_ylabel("mean true reward (held-out prompts)")
    frontier.set_title("reward-KL frontier")
    frontier.legend()
    by_alpha.set_xlabel("alpha")
    by_alpha.set_ylabel("mean true reward")
    by_alpha.set_title("reward against alpha")
    by_alpha.legend()
    figure.tight_layout()
    figure.savefig(path)
