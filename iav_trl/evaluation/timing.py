"""Side-by-side wall-clock timing: the one helper the evaluator and the benchmarks time decoding with.

Each callable runs `warmup` times, then once per round, in interleaved rounds whose order rotates (round `r` starts
at the `r`-th callable), so that load which drifts on a shared machine falls on every callable alike. On CUDA the
device is synchronised around each call. For `work` units per call (e.g. generated tokens), per callable:

    best_s, median_s           the fastest and the median call (interference only adds time: best is the steadiest
                               estimate of the cost itself, median the typical one)
    per_s                      work / median_s (throughput)
    speed_vs[other]            median over rounds of t_other / t_self (each round times both back to back, so
                               drift between rounds cancels; > 1: faster than `other`)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def time_rounds(
    runs: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    before_call: Callable[[int], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every call of every callable in `runs`, `rounds` per callable (see the module docstring).
    `before_call(round_index)`, if given, runs untimed before each timed call (e.g. to seed sampling)."""
    if rounds < 1:
        raise ValueError(f"`rounds` must be at least 1, got {rounds}.")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    names = list(runs)

    def call(name: str) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        runs[name]()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in names:
            call(name)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_call is not None:
                before_call(round_index)
            seconds[name].append(call(name))
    return seconds


def summarize_times(seconds: Mapping[str, list[float]], work: float) -> dict[str, dict[str, Any]]:
    """`best_s`, `median_s`, `per_s` and `speed_vs` of each callable (see the module docstring)."""
    return {
        name: {
            "best_s": min(times),
            "median_s": statistics.median(times),
            "per_s": work / statistics.median(times),
            "speed_vs": {
                other: statistics.median(t_other / t for t_other, t in zip(seconds[other], times))
                for other in seconds
                if other != name
            },
        }
        for name, times in seconds.items()
    }
