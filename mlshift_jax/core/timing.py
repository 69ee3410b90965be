"""How mlshift_jax times things: the JAX FAQ's way ("Benchmarking JAX code").

- Inputs go on the device first (`jax.device_put`), so that host->device transfer is not
  timed; `time_call` does not move them.
- The first call, which traces and compiles, is timed apart (`compile_s`). `compile_clock`
  reads how much of a call JAX itself spent tracing, lowering and compiling (or loading a
  compiled program from its cache), from the compile events JAX reports (`jax.monitoring`).
- Every timed call ends with `jax.block_until_ready` on its output, since JAX dispatches
  asynchronously. It passes non-JAX leaves (numpy arrays, floats, None) through untouched,
  so numpy baselines are timed by the same function.
- The statistics are those of pytest-benchmark / asv: median, min, max, IQR over `rounds`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from mlshift_jax.core.errors import ConfigError


class Timing(NamedTuple):
    """Wall-clock seconds of one timed function.

    compile_s: the first call (trace + compile + run), None when warmup=0.
    median_s, min_s, max_s, iqr_s: over the `rounds` timed calls (iqr: 75th - 25th percentile,
    numpy's linear interpolation; 0 for a single round).
    times_s: every timed call, in order.
    """

    compile_s: float | None
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    rounds: int
    times_s: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict of the fields (times_s as a list)."""
        d = self._asdict()
        d["times_s"] = list(self.times_s)
        return d


# The events JAX records around each compile (jax/_src/dispatch.py): tracing to a jaxpr,
# lowering it to StableHLO, and the backend's compile (a persistent-cache read included).
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
_clocks: list[CompileClock] = []  # the clocks running now (nested ones each count)


class CompileClock:
    """Seconds JAX spent compiling while a `with compile_clock()` block ran: `seconds`,
    the sum of its COMPILE_EVENTS durations, and `programs`, the backend compiles (or cache
    loads) among them. Events of every thread count (the harness compiles on one)."""

    def __init__(self):
        self.seconds = 0.0
        self.programs = 0


def _on_event(event: str, seconds: float, **_) -> None:
    if event in COMPILE_EVENTS:
        for clock in _clocks:
            clock.seconds += seconds
            clock.programs += event.endswith("backend_compile_duration")


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def compile_clock():
    """`with compile_clock() as c: f(x)`: c.seconds is the time JAX spent tracing, lowering
    and compiling inside the block (0.0 when everything was already compiled)."""
    clock = CompileClock()
    _clocks.append(clock)
    try:
        yield clock
    finally:
        _clocks.remove(clock)


def _timed(fn: Callable[..., Any], args: tuple, sync: Callable[[Any], Any]) -> float:
    start = time.perf_counter()
    sync(fn(*args))
    return time.perf_counter() - start


def time_call(
    fn: Callable[..., Any],
    *args: Any,
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> Timing:
    """Time `fn(*args)`: `warmup` calls first, then `rounds` timed calls.

    args should already be on the device (`jax.device_put`); they are passed as they are.
    The first warmup call is timed as `compile_s`; the others only warm caches. Every call,
    warmup or timed, ends with `sync(output)` inside its timing (`jax.block_until_ready`).
    Pass keyword arguments with `functools.partial`. Calls `fn` exactly `warmup + rounds`
    times.

    For slow numpy baselines use `time_once` (rounds=1, warmup=0): the single call is the
    measurement and compile_s is None.
    """
    if rounds < 1:
        raise ConfigError(f"time_call: rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ConfigError(f"time_call: warmup must be >= 0, got {warmup}")
    compile_s = None
    for i in range(warmup):
        t = _timed(fn, args, sync)
        if i == 0:
            compile_s = t
    return _stats(compile_s, [_timed(fn, args, sync) for _ in range(rounds)])


def _stats(compile_s: float | None, times: list[float]) -> Timing:
    times = np.asarray(times, dtype=np.float64)
    q1, q3 = np.percentile(times, [25, 75])
    return Timing(
        compile_s=compile_s,
        median_s=float(np.median(times)),
        min_s=float(np.min(times)),
        max_s=float(np.max(times)),
        iqr_s=float(q3 - q1),
        rounds=len(times),
        times_s=tuple(float(t) for t in times),
    )


NOISY = 0.30  # a spread above this is noisy: the speed cells rerun such a comparison
RERUNS = 2    # ... at most this many times, then flag it


def spread(t: Timing) -> float:
    """(max - min) / median of a timing's rounds: how noisy it was (0 for one round)."""
    return (t.max_s - t.min_s) / t.median_s if t.median_s > 0 else 0.0


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> dict[str, Timing]:
    """Time several implementations of one workload in interleaved rounds.

    fns: {name: zero-argument callable} (bind inputs, already on their device, with
    functools.partial). Each is warmed up `warmup` times (the first timed as compile_s); then
    every round times each implementation once, the order rotating from round to round, so
    that a burst of load on a noisy machine hits all of them alike and their ratio, taken
    from medians over the same rounds, is fair. Returns {name: Timing}.
    """
    if rounds < 1:
        raise ConfigError(f"interleaved: rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ConfigError(f"interleaved: warmup must be >= 0, got {warmup}")
    if not fns:
        raise ConfigError("interleaved: expected at least one function, found none")
    names = list(fns)
    compile_s: dict[str, float | None] = dict.fromkeys(names)
    for name in names:
        for i in range(warmup):
            t = _timed(fns[name], (), sync)
            if i == 0:
                compile_s[name] = t
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            times[name].append(_timed(fns[name], (), sync))
    return {name: _stats(compile_s[name], times[name]) for name in names}


def time_once(
    fn: Callable[..., Any], *args: Any, sync: Callable[[Any], Any] = jax.block_until_ready
) -> Timing:
    """One call, no warmup: for numpy baselines too slow to repeat. compile_s is None."""
    return time_call(fn, *args, rounds=1, warmup=0, sync=sync)


def first_call(fn: Callable[..., Any], *args: Any) -> tuple[Timing, Any]:
    """The first call of fn(*args), timed once and synced, with its output: (Timing whose
    compile_s is the time JAX reported tracing, lowering and compiling during the call
    (`compile_clock`; 0 where every program was compiled before, never above the call's
    time) and median_s the whole call, output). The one place a first call is read."""
    out = []

    def keep(*a):
        out.append(fn(*a))
        return out[-1]

    with compile_clock() as clock:
        t = time_once(keep, *args)
    return t._replace(compile_s=min(clock.seconds, t.median_s)), out[0]


class PeakMemory:
    """The peak resident memory of this process while a `with` block runs, sampled.

        with PeakMemory() as mem:
            work()
        mem.peak_bytes  # bytes; None where /proc/self/statm is missing (not Linux)

    A thread reads the resident set size every `interval` seconds (and once at entry and at
    exit), so a peak shorter than the interval can be missed: a lower bound, close for work
    that holds its arrays for a while. Includes whatever the process held before the block.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_bytes: int | None = None
        self._stop = None
        self._thread = None

    @staticmethod
    def rss_bytes() -> int | None:
        """This process's resident set size now, in bytes (None where it cannot be read)."""
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        rss = self.rss_bytes()
        if rss is not None:
            self.peak_bytes = max(self.peak_bytes or 0, rss)

    def __enter__(self) -> PeakMemory:
        self._sample()
        if self.peak_bytes is None:
            return self
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._sample()
