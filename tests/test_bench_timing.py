"""bench.timing, the benchmarks' one timing loop, on the host clock (CPU)."""

import time

import pytest

from bench.timing import measure, median_spread, timed


def test_timed_calls_warmups_then_repeats_and_times_only_the_repeats():
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)

    runs = timed(fn, repeats=3, warmup=2)
    assert len(calls) == 5 and len(runs) == 3
    assert [r.result for r in runs] == [3, 4, 5]  # the timed calls are the last three, in order
    assert all(r.seconds >= 0 and r.host_seconds <= r.seconds for r in runs)
    assert len(timed(fn, repeats=2, warmup=0)) == 2 and len(calls) == 7


def test_a_sleeping_call_takes_at_least_its_sleep():
    got = measure(lambda: time.sleep(0.02) or "done")
    assert got.result == "done" and got.seconds >= 0.02 and got.ms >= 20
    assert got.host_seconds >= 0.02  # no device: host time is the whole call
    runs = timed(lambda: time.sleep(0.01), repeats=2, warmup=1, device="cpu")
    assert all(r.seconds >= 0.01 for r in runs)


def test_median_and_spread_are_max_minus_min_over_median():
    assert median_spread([1.0, 2.0, 4.0]) == (2.0, 1.5)
    assert median_spread([4.0, 1.0, 2.0, 3.0]) == (2.5, 3.0 / 2.5)
    assert median_spread([5.0]) == (5.0, 0.0)
    assert median_spread([0.0, 0.0]) == (0.0, 0.0)  # no division by a zero median


def test_an_unknown_clock_is_refused():
    with pytest.raises(ValueError):
        measure(lambda: None, clock="gpu")


def test_the_self_check_runs_on_a_cpu_with_the_wall_clock_alone():
    from bench.timing import self_check

    got = self_check(size=64, repeats=2)
    assert got["device"] == "cpu" and got["wall_ms"] > 0 and "back_to_back_ms" not in got
