"""Keep a long-lived process under the kernel's limit on memory maps.

XLA:CPU maps fresh memory for every program it compiles and keeps it while JAX caches the
program. A process that compiles thousands of programs (the bench runs 150+ cells, the test
suite ~900 tests) reaches Linux's per-process limit (`vm.max_map_count`, 65,530 by default)
and the next compile segfaults inside XLA (jax-ml/jax#27201 is one report). `relieve()`
drops JAX's compiled-program caches once the process holds more than a fraction of the limit;
programs still in use are recompiled on their next call.
"""

from __future__ import annotations

import gc
from pathlib import Path

import jax

SHARE = 0.5  # clear once this fraction of the limit is in use
DEFAULT_LIMIT = 65_530


def _limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return DEFAULT_LIMIT


def in_use() -> int | None:
    """How many memory maps this process holds; None where /proc is not there (macOS)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def relieve(share: float = SHARE) -> bool:
    """Clear JAX's caches (and collect) when more than `share` of the limit is in use.

    Returns True when it cleared. Cheap when it does not: one read of /proc/self/maps."""
    used = in_use()
    if used is None or used < share * _limit():
        return False
    jax.clear_caches()
    gc.collect()
    return True
