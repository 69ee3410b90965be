"""JAX's persistent compilation cache for the command line: compile once per machine.

A CLI command is a fresh process, so without it every `mlshift detect` recompiles the same
few dozen programs (fingerprints, attacks on the probes, the categorizer): on a 2-core CPU
that compiling is most of a call with a cached calibration. XLA writes each compiled
program to `folder`, keyed by the program, jaxlib version, backend and flags, and the next
process loads it instead of compiling: the same executable, so the same results.

`enable(folder)` turns it on unless the user already chose a cache
(`JAX_COMPILATION_CACHE_DIR`) or opted out (`MLSHIFT_NO_COMPILE_CACHE=1`). The bench does not
call it: its speed table reports compile time, which a warm cache would hide.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OPT_OUT = "MLSHIFT_NO_COMPILE_CACHE"
MAX_BYTES = 1 << 30  # JAX evicts the least recently used programs beyond this (1 GiB)


def enable(folder: str | os.PathLike) -> Path | None:
    """Cache every compiled program (any compile time, any size; at most MAX_BYTES in all) in
    `folder`; return the folder in use (the user's `JAX_COMPILATION_CACHE_DIR` when set), or
    None when opted out or the folder cannot be created (a cache is an optimization: never an
    error)."""
    if os.environ.get(OPT_OUT, "").strip() not in ("", "0"):
        return None
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    path = Path(chosen) if chosen else Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not chosen:  # the user's own cache keeps the user's own limit
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
