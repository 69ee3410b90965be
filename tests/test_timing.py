"""Structure of `time_call`, `measure` and `compile_clock`, never speed: the machine is noisy."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.bench.context import measure
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.timing import Timing, compile_clock, first_call, time_call, time_once


@jax.jit
def _square_sum(x):
    return jnp.sum(x * x)


class _Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.fixture(scope="module")
def x():
    return jax.device_put(jnp.ones((64, 64)))


@pytest.mark.parametrize("rounds,warmup", [(1, 0), (3, 1), (4, 2)])
def test_calls_rounds_plus_warmup_times(x, rounds, warmup):
    fn = _Counter(_square_sum)
    t = time_call(fn, x, rounds=rounds, warmup=warmup)
    assert fn.calls == rounds + warmup
    assert t.rounds == rounds and len(t.times_s) == rounds
    assert (t.compile_s is None) == (warmup == 0)


def test_stats_are_ordered(x):
    t = time_call(_square_sum, x, rounds=7)
    assert 0 < t.min_s <= t.median_s <= t.max_s
    assert 0 <= t.iqr_s <= t.max_s - t.min_s
    assert t.compile_s is not None and t.compile_s > 0
    assert min(t.times_s) == t.min_s and max(t.times_s) == t.max_s


def test_compile_call_is_timed_apart_from_rounds(x):
    slow_first = {"n": 0}

    def fn(a):
        slow_first["n"] += 1
        if slow_first["n"] == 1:
            time.sleep(0.3)  # stands in for compilation
        return _square_sum(a)

    t = time_call(fn, x, rounds=3, warmup=1)
    assert t.compile_s >= 0.3
    assert t.max_s < 0.3


def test_every_call_is_synced_inside_the_timing(x):
    seen = []

    def sync(out):
        seen.append(out)
        time.sleep(0.01)  # the sync's duration must land inside each measurement
        return jax.block_until_ready(out)

    t = time_call(_square_sum, x, rounds=3, warmup=1, sync=sync)
    assert len(seen) == 4
    assert all(isinstance(o, jax.Array) and o.is_ready() for o in seen)
    assert t.min_s >= 0.01 and t.compile_s >= 0.01


def test_default_sync_is_block_until_ready_and_passes_numpy_through():
    assert time_call.__kwdefaults__["sync"] is jax.block_until_ready
    out = np.arange(3.0)
    assert jax.block_until_ready(out) is out
    assert jax.block_until_ready({"a": 1.0, "b": None}) == {"a": 1.0, "b": None}
    t = time_once(np.linalg.norm, np.ones(10))
    assert t.rounds == 1 and t.compile_s is None and t.iqr_s == 0.0
    assert t.min_s == t.median_s == t.max_s


def test_to_dict_is_json_ready(x):
    t = time_call(_square_sum, x, rounds=2)
    d = t.to_dict()
    assert set(d) == set(Timing._fields)
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"warmup": -1}])
def test_bad_arguments_raise(x, kwargs):
    with pytest.raises(ConfigError):
        time_call(_square_sum, x, **kwargs)


def test_interleaved_times_every_implementation_in_every_round():
    from mlshift_jax.core.timing import interleaved, spread

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = interleaved(fns, rounds=4, warmup=1, sync=lambda r: r)
    assert set(out) == {"a", "b", "c"} and all(t.rounds == 4 for t in out.values())
    assert calls[:3] == ["a", "b", "c"]  # warmups
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds[0] == ["a", "b", "c"] and rounds[1] == ["b", "c", "a"]  # order rotates
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(out[n].compile_s is not None and spread(out[n]) >= 0 for n in out)
    with pytest.raises(ConfigError):
        interleaved({}, rounds=2)


def test_peak_memory_sees_a_block_that_holds_memory():
    from mlshift_jax.core.timing import PeakMemory

    if PeakMemory.rss_bytes() is None:
        pytest.skip("no /proc/self/statm here")
    start = PeakMemory.rss_bytes()
    with PeakMemory(interval=0.01) as mem:
        held = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.05)  # a few samples while it is held
    assert mem.peak_bytes >= held.nbytes and mem.peak_bytes >= start * 0.99


def test_compile_clock_counts_a_fresh_compile_and_nothing_once_compiled():
    f = jax.jit(lambda v: jnp.tanh(v) @ v.T + 1.0)  # a fresh program: traced and compiled
    v = jnp.ones((8, 8))
    with compile_clock() as first:
        jax.block_until_ready(f(v))
    with compile_clock() as again:
        jax.block_until_ready(f(v))
    assert first.seconds > 0 and first.programs >= 1
    assert again.seconds == 0.0 and again.programs == 0


def test_first_call_keeps_the_output_and_reads_compile_only_when_compiling():
    f = jax.jit(lambda v: jnp.cos(v) @ v.T - 2.0)
    v = jnp.ones((6, 6))
    fresh, out = first_call(f, v)
    again, out2 = first_call(f, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(f(v)))
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out))
    assert 0 < fresh.compile_s <= fresh.median_s and fresh.rounds == 1
    assert again.compile_s == 0.0


def _counting(fn, sleep_s):
    calls = []

    def call(*a):
        calls.append(1)
        time.sleep(sleep_s)
        return fn(*a)
    return call, calls


def test_measure_runs_a_slow_call_once_and_times_its_compile_apart(x):
    f = jax.jit(lambda v: jnp.sin(v) * 3.0 - v)
    call, calls = _counting(f, 0.05)
    timing, out = measure(call, x, rounds=5, max_seconds=0.01)
    assert len(calls) == 1  # over max_seconds: the first call less its compile is the round
    assert timing.rounds == 1 and timing.compile_s > 0
    assert timing.median_s >= 0.05  # the sleep is in the round, the compile is not added
    np.testing.assert_allclose(out, np.sin(x) * 3.0 - x, rtol=1e-6)


def test_measure_times_fast_calls_in_rounds_after_the_first(x):
    f = jax.jit(lambda v: jnp.cos(v) + 2.0 * v)
    call, calls = _counting(f, 0.0)
    timing, _ = measure(call, x, rounds=3, max_seconds=60.0)
    assert timing.rounds == 3 and len(calls) == 1 + 3  # no extra warm call
    call, calls = _counting(np.cos, 0.02)  # numpy: no compile, the first call is the round
    timing, _ = measure(call, np.ones(4), rounds=3, max_seconds=0.001, compiled=False)
    assert timing.compile_s is None and timing.rounds == 1 and len(calls) == 1
