"""What computing one cell needs, whatever its experiment: the loaded data, the run's memory
(arrays on the device, trained params, clean scores), the params cache, timing with the
output kept, and the fields every record starts with.

An experiment's `compute(cell, loaded, memo, cache, force)` gets a `Loaded` dataset, the run's
`Memo`, the cache folder (`<out>/.cache`) and whether to retrain (`force`). Trained params
are cached as `params/<train hash>-<data hash>-<determinism>.npz / .json`; every key includes
`determinism_key()` (jaxlib, backend, device kind, CPU cores). A damaged entry is listed in
`memo.damaged` and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from mlshift_jax.bench.cells import Cell, TrainSpec
from mlshift_jax.core import sharding
from mlshift_jax.core.files import cached_npz, check_arrays
from mlshift_jax.core.provenance import code_digest, git_commit, relative_source
from mlshift_jax.core.timing import Timing, first_call, time_call
from mlshift_jax.data import datasets
from mlshift_jax.models.registry import fit, model_for
from mlshift_jax.models.weights import flatten, unflatten
from mlshift_jax.models.zoo import Model

TIMING_FIELDS = ("compile_s", "median_s", "min_s", "max_s", "iqr_s", "rounds")


# --- timing with the output kept -----------------------------------------------------------


def measure(fn: Callable[..., Any], *args: Any, rounds: int, max_seconds: float,
            compiled: bool = True) -> tuple[Timing, Any]:
    """Time fn(*args) as timing.py says; return (Timing, output of the first call).

    compiled (JAX): `compile_s` is the time JAX reports tracing, lowering and compiling during
    the first call (`compile_clock`; 0 where every program was already compiled), and the
    rest of that call, run_s, tells how slow a call is. A call with run_s over `max_seconds`
    is timed once: run_s is its one round (an upper bound of a warm call: it also holds the
    first call's dispatch, milliseconds), so a slow attack runs once, not twice. Otherwise up
    to `rounds` timed calls follow, as many as fit in `max_seconds`.
    compiled=False (numpy): compile_s is None and the first call is the one round when it
    takes over `max_seconds`.
    """
    first, out = first_call(fn, *args)
    compile_s = first.compile_s if compiled else None
    run_s = first.median_s - (compile_s or 0.0)
    if run_s > max_seconds:
        timing = first._replace(median_s=run_s, min_s=run_s, max_s=run_s, times_s=(run_s,))
    else:
        n = max(1, min(rounds, int(max_seconds / max(run_s, 1e-9))))
        timing = time_call(fn, *args, rounds=n, warmup=0)
    return timing._replace(compile_s=compile_s), out


def timing_fields(t: Timing, scale: float = 1.0) -> dict[str, Any]:
    """A Timing as record fields (TIMING_FIELDS), the times scaled by `scale`."""
    out = {k: getattr(t, k) for k in TIMING_FIELDS}
    for k in ("median_s", "min_s", "max_s", "iqr_s"):
        out[k] *= scale
    return out


# --- data --------------------------------------------------------------------------------------


class Loaded(NamedTuple):
    """A loaded dataset and a fingerprint of its arrays (shapes, labels, strided pixels)."""

    ds: datasets.Dataset
    hash: str


def data_hash(ds: datasets.Dataset) -> str:
    """`datasets.content_hash`: shapes, labels and every 97th image of each split (12 hex)."""
    return datasets.content_hash(ds)


def capped(ds: datasets.Dataset, n_train: int | None, n_test: int | None) -> datasets.Dataset:
    """ds cut to its first n_train training and n_test test images (None: all)."""
    return replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                   x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


# --- one run's memory: data on the device, trained params, clean scores --------------------


class Memo(NamedTuple):
    """What one run keeps between its cells (`runner.run` makes one per run)."""

    arrays: dict  # (dataset, split, n) -> (x, y) on the device
    trained: dict  # params key -> Trained
    per_test: dict  # (params key, n_test) -> {"clean": scores, "zero_grad_frac": float}
    damaged: list  # cache entries found damaged (treated as missing, rebuilt)
    fitted: dict  # (defense, options, data hash, n_train, seed) -> (fit seconds, its state)


def determinism_key() -> str:
    """What, besides a cell's config and data, decides its bits: jaxlib version, backend,
    device kind and, on CPU, the number of cores this process may use (XLA's CPU thread
    pool splits reductions by it). Part of every cache key: change one, and cells rerun."""
    import jaxlib

    device = jax.devices()[0]
    key = f"jaxlib {jaxlib.__version__}, {jax.default_backend()} {device.device_kind}"
    if jax.default_backend() == "cpu":
        key += f", {cpu_threads()} cores"
    return key


def cpu_threads() -> int:
    """Cores this process may run on (what XLA's CPU backend sizes its thread pool by)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Trained(NamedTuple):
    """A trained model: its architecture, params on the device, training seconds (timed
    once, compile included), training images and whether every param is finite."""

    arch: Model
    params: Any
    train_s: float
    n_train: int
    finite: bool


def on_device(memo: Memo, loaded: Loaded, split: str, n: int | None):
    """(x, y) of the first n images of `split` ("train" / "test"), put on the device once
    per run."""
    key = (loaded.ds.name, split, n)
    if key not in memo.arrays:
        x, y = getattr(loaded.ds, f"x_{split}")[:n], getattr(loaded.ds, f"y_{split}")[:n]
        memo.arrays[key] = (jax.device_put(x), jax.device_put(y))
    return memo.arrays[key]


_TRAIN_S, _N_TRAIN = "__train_s__", "__n_train__"  # a params entry's timing and data size


def trained(spec: TrainSpec, loaded: Loaded, memo: Memo, cache: Path,
            force: bool) -> tuple[str, Trained]:
    """Params for `spec` on `loaded`: from this run, from the cache, or trained (timed once)."""
    # trained params depend on the trainer's code too: a code change retrains
    where = hashlib.sha256(f"{determinism_key()}|{code_digest()}".encode()).hexdigest()[:6]
    key = f"{spec.hash}-{loaded.hash}-{where}"
    if key in memo.trained:
        return key, memo.trained[key]
    path = cache / "params" / f"{key}.npz"

    def compute():  # "a/b/0" names: any pytree (flax, equinox); the timing beside them
        ds = capped(loaded.ds, spec.n_train, None)
        timing, params = first_call(partial(fit, spec.model, spec.train_config(), spec=ds.spec),
                                    ds.x_train, ds.y_train)
        return {**flatten(jax.tree.map(np.asarray, params)),
                _TRAIN_S: np.array([timing.median_s]), _N_TRAIN: np.array([len(ds.y_train)])}

    # diverged params are cached as they are: the record flags them (params_finite)
    arrays = cached_npz(path, compute, what="a .npz of params", read=not force,
                        write=jax.process_index() == 0,
                        check=lambda a: (check_arrays(str(path), a, finite=False),
                                         a[_TRAIN_S], a[_N_TRAIN]),
                        on_damaged=lambda p: memo.damaged.append(f"params/{p.name}"))
    meta = {"train_s": float(arrays.pop(_TRAIN_S)[0]), "n_train": int(arrays.pop(_N_TRAIN)[0])}
    params = unflatten(arrays)  # nested for user models
    finite = all(bool(np.all(np.isfinite(v))) for v in jax.tree.leaves(params))
    out = Trained(model_for(spec.model, loaded.ds.spec, spec.train_config()),
                  jax.device_put(params), meta["train_s"], meta["n_train"], finite)
    memo.trained[key] = out
    return key, out


@functools.cache
def mesh():
    """All devices (every host's) as one mesh; see `sharding`."""
    return sharding.make_mesh()


def base_record(cell: Cell, loaded: Loaded) -> dict[str, Any]:
    """The fields every record starts with: the cell, its data, where and by what code."""
    device = jax.devices()[0]
    return {"id": cell.id, "hash": cell.hash, "kind": cell.kind, "block": cell.block,
            "dataset": loaded.ds.name, "data_source": relative_source(loaded.ds.source),
            "is_sample": loaded.ds.is_sample, "data_hash": loaded.hash,
            "backend": jax.default_backend(), "device_kind": device.device_kind,
            "determinism": determinism_key(), "code_digest": code_digest(),
            "commit": git_commit()}


def json_default(value: Any) -> Any:
    """numpy scalars and arrays -> Python (for a record's JSON)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")

