"""The one timing helper (`iav_trl.evaluation.timing`) against a fake clock: which calls it times, in which order,
and the figures it derives from them."""

import pytest

from iav_trl.evaluation import timing


@pytest.fixture
def clock(monkeypatch):
    """A clock that each run advances by its own cost: `costs[name][k]` seconds for the k-th call of `name`."""
    state = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: state["now"])
    return state


def test_rounds_rotate_the_order_after_the_warm_up_and_time_each_call(clock):
    order, costs = [], {"a": [9.0, 2.0, 4.0, 3.0], "b": [9.0, 1.0, 1.0, 6.0]}

    def run(name):
        def call():
            clock["now"] += costs[name][sum(1 for n in order if n == name)]
            order.append(name)

        return call

    seeds = []
    seconds = timing.time_rounds({"a": run("a"), "b": run("b")}, rounds=3, warmup=1, before_call=seeds.append)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds starting at a, b, a
    assert seconds == {"a": [2.0, 4.0, 3.0], "b": [1.0, 1.0, 6.0]}  # warm-up calls untimed
    assert seeds == [0, 0, 1, 1, 2, 2]

    summary = timing.summarize_times(seconds, work=12)
    assert (summary["a"]["best_s"], summary["a"]["median_s"], summary["a"]["per_s"]) == (2.0, 3.0, 4.0)
    # median over rounds of t_b / t_a: (0.5, 0.25, 2.0) -> 0.5; and of t_a / t_b: (2, 4, 0.5) -> 2
    assert summary["a"]["speed_vs"] == {"b": 0.5} and summary["b"]["speed_vs"] == {"a": 2.0}


def test_no_round_is_refused():
    with pytest.raises(ValueError, match="`rounds` must be at least 1"):
        timing.time_rounds({"a": lambda: None}, rounds=0)
