"""Run an experiment matrix: train, attack, time and score every cell, caching each one.

`run(matrix_path, *, out_dir, only=None, force=False) -> pandas.DataFrame` of records, one row
per selected cell (all cells, or those whose id matches `only`), in matrix order. Its
`attrs["run"]` holds the run's facts (wall time, data source per dataset, skipped datasets,
cells computed / reused) for `report.write`. A dataset that fails to load (DataError, e.g.
Fashion-MNIST not installed) is skipped with a note on stderr and in `attrs["run"]["skipped"]`.

The cache lives in `<out_dir>/.cache/` (git-ignored), so each results folder carries its own:

    .cache/cells/<cell hash>.json          one finished cell's record
    .cache/params/<train hash>-<data hash>-<determinism>.npz / .json   trained params, time

A damaged entry (unreadable, truncated, not a record of its cell) counts as missing: it is
rebuilt, and one warning line lists what was damaged. Every key includes
`determinism_key()` (jaxlib, backend, device kind, CPU cores): see the README.

Every file is written atomically (`files.atomic_path`): an interrupted run leaves whole files,
and the next run computes only the cells whose record is missing. A cached record counts only
if it was computed on the same data (its `data_hash`, a fingerprint of the loaded arrays);
`force=True` recomputes (and retrains) everything selected.

Timing follows `timing.py`: inputs are put on the device first; the first call (trace +
compile + run) is `compile_s`; then `rounds` calls, ended by `block_until_ready`, give
median / min / max (fewer rounds, at least one, where one call would exceed `max_seconds`).
Training is timed once (`time_once`, compile included for JAX). The numpy baseline is timed in
the same run as the JAX code it is compared with: both live in one speed cell.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from mlshift_jax.attacks import autoattack, defenses, evasion, get_attack, obfuscation
from mlshift_jax.bench import detection_bench, stability, sweeps, torch_peer
from mlshift_jax.bench.matrix import (
    AttackConfig,
    Cell,
    DefenseConfig,
    DetectConfig,
    Matrix,
    PoisonSweepConfig,
    SpeedConfig,
    StabilityConfig,
    TrainSpec,
    cells,
    load,
    select,
    with_dataset,
)
from mlshift_jax.bench.matrix import tiny as tiny_matrix
from mlshift_jax.core import memory_maps, outdir, sharding, study
from mlshift_jax.core.errors import ConfigError, DataError, Interrupted
from mlshift_jax.core.files import cached_npz, check_arrays, write_text
from mlshift_jax.core.provenance import code_digest, git_commit, relative_source
from mlshift_jax.core.timing import (
    NOISY,
    RERUNS,
    PeakMemory,
    Timing,
    interleaved,
    spread,
    time_call,
    time_once,
)
from mlshift_jax.data import datasets
from mlshift_jax.models import baseline, population, zoo
from mlshift_jax.models.metrics import SCORE_NAMES, evaluate, evaluate_arrays, predict_keyed
from mlshift_jax.models.recipes import TrainConfig, resolve
from mlshift_jax.models.registry import fit, get_recipe, model_for
from mlshift_jax.models.train import (
    SEED_SGD_BLOCK,
    init_population,
    train_minibatch,
    train_seed_sgd,
    train_seed_sgd_population,
)
from mlshift_jax.models.weights import flatten, unflatten
from mlshift_jax.models.zoo import Model, predict

CACHE_DIR = ".cache"
N_EXAMPLES = 6  # images kept per clean / FGSM cell for the report's digit grid
TIMING_FIELDS = ("compile_s", "median_s", "min_s", "max_s", "iqr_s", "rounds")


# --- timing with the output kept -----------------------------------------------------------


def _once(fn: Callable[..., Any], *args: Any) -> tuple[Timing, Any]:
    """`time_once(fn, *args)` and the call's output."""
    out = []

    def keep(*a):
        out.append(fn(*a))
        return out[-1]

    return time_once(keep, *args), out[0]


def measure(fn: Callable[..., Any], *args: Any, rounds: int, max_seconds: float,
            compiled: bool = True) -> tuple[Timing, Any]:
    """Time fn(*args) as timing.py says; return (Timing, output of the first call).

    The first call is `compile_s` (None when `compiled=False`, for numpy); then up to `rounds`
    timed calls, fewer where one warm call shows they would take more than `max_seconds`; a
    warm call over `max_seconds` is itself the one round (two calls in all, not three; one
    for numpy).
    """
    first, out = _once(fn, *args)
    warm = _once(fn, *args)[0] if compiled else first
    n = max(1, min(rounds, int(max_seconds / max(warm.median_s, 1e-9))))
    # a call slower than max_seconds gets one round: the warm call already is that round
    # (compiled, ended by block_until_ready; numpy's first call), so it is not run again
    timing = warm if n == 1 else time_call(fn, *args, rounds=n, warmup=0)
    return timing._replace(compile_s=first.median_s if compiled else None), out


def _timing_fields(t: Timing, scale: float = 1.0) -> dict[str, Any]:
    out = {k: getattr(t, k) for k in TIMING_FIELDS}
    for k in ("median_s", "min_s", "max_s", "iqr_s"):
        out[k] *= scale
    return out


# --- numpy yardsticks ------------------------------------------------------------------------


def numpy_scores(outputs: np.ndarray, y: np.ndarray,
                 n_classes: int | None = None) -> dict[str, float]:
    """The five scores of `metrics.scores_from_outputs`, in numpy. outputs: [n, K], y: [n];
    n_classes: K (default: the outputs' width).

    Macro precision / recall / F1 over all classes with zero_division=0, as scikit-learn.
    """
    n_classes = outputs.shape[1] if n_classes is None else n_classes
    pred = np.argmax(outputs, axis=1)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes)
    cm = cm.reshape(n_classes, n_classes)
    tp, n_pred, n_true = np.diag(cm), cm.sum(0), cm.sum(1)

    def div(a, b):
        return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)

    return {"accuracy": float(np.mean(pred == y)),
            "precision": float(np.mean(div(tp, n_pred))),
            "recall": float(np.mean(div(tp, n_true))),
            "f1": float(np.mean(div(2 * tp, n_pred + n_true))),
            "confidence": float(np.mean(np.max(outputs, axis=1)))}


def numpy_evaluate(wih: np.ndarray, who: np.ndarray, x: np.ndarray, y: np.ndarray):
    """The seed MLP's forward pass and scores in numpy. x: [n, D], y: [n]."""
    return numpy_scores(baseline.sigmoid(baseline.sigmoid(x @ wih.T) @ who.T), y)


def gemm_floor_operands(n: int, hidden: int, n_in: int, n_out: int, seed: int = 0):
    """Two float32 matrices whose product costs exactly FGSM's FLOPs on the seed MLP over n
    images: a [n, n_in + n_out] @ b [n_in + n_out, 2 * hidden] (forward and backward matmuls
    folded into one GEMM, the fastest shape numpy has for that work)."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, n_in + n_out), dtype=np.float32),
            rng.random((n_in + n_out, 2 * hidden), dtype=np.float32))


_matmul_jit = jax.jit(jnp.matmul)


def fgsm_flops(n: int, hidden: int, n_in: int, n_out: int) -> int:
    """FLOPs of FGSM's matmuls on the seed MLP over n images: forward x @ wih.T, h @ who.T,
    backward dz2 @ who, dz1 @ wih; 2 FLOPs per multiply-add."""
    return 2 * n * (n_in * hidden + hidden * n_out) * 2


# --- the digit examples a record carries -----------------------------------------------------


def encode_images(x: np.ndarray, input_range: tuple[float, float] = (0.01, 1.0)) -> str:
    """Flat images [k, D] in input_range (lo, hi) -> base64 of uint8 pixels (the report's
    example grid; the record carries the image shape beside them)."""
    lo, hi = input_range
    q = np.round((np.asarray(x, np.float64) - lo) / (hi - lo) * 255)
    return base64.b64encode(np.clip(q, 0, 255).astype(np.uint8).tobytes()).decode()


def decode_images(text: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`encode_images` back to floats in [0, 1]: [k, H, W, C] for shape (H, W, C); None:
    the study's 28x28x1 (records written before they carried their shape)."""
    q = np.frombuffer(base64.b64decode(text), np.uint8).astype(np.float32) / 255
    return q.reshape(-1, *(shape or zoo.STUDY_SPEC.input_shape))


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


def _load_datasets(names: list[str], matrix: Matrix | None = None, data_dir: str | None = None
                   ) -> tuple[dict[str, Loaded], dict[str, str]]:
    """({name: Loaded}, {name: why it was skipped}). A DataError skips that dataset only.
    A name the matrix defines by path ([datasets.<name>]) is loaded from there, named `name`;
    data_dir (bench --data-dir) is where the built-in datasets are looked for."""
    loaded, skipped = {}, {}
    for name in names:
        try:
            kw = matrix.load_kwargs(name) if matrix else {"name": name}
            if data_dir is not None and kw == {"name": name}:
                kw["data_dir"] = data_dir
            ds = datasets.load(**kw)
            if ds.name != name:
                ds = replace(ds, name=name)
        except DataError as e:
            skipped[name] = str(e)
            print(f"mlshift: skipping {name}: {e}", file=sys.stderr)
            continue
        loaded[name] = Loaded(ds, data_hash(ds))
    return loaded, skipped


# --- one run's memory: data on the device, trained params, clean scores --------------------


class _Memo(NamedTuple):
    arrays: dict  # (dataset, split, n) -> (x, y) on the device
    trained: dict  # params key -> _Trained
    per_test: dict  # (params key, n_test) -> {"clean": scores, "zero_grad_frac": float}
    damaged: list  # cache entries found damaged (treated as missing, rebuilt)


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


class _Trained(NamedTuple):
    arch: Model
    params: Any
    train_s: float
    n_train: int
    finite: bool


def _device(memo: _Memo, loaded: Loaded, split: str, n: int | None):
    key = (loaded.ds.name, split, n)
    if key not in memo.arrays:
        x, y = getattr(loaded.ds, f"x_{split}")[:n], getattr(loaded.ds, f"y_{split}")[:n]
        memo.arrays[key] = (jax.device_put(x), jax.device_put(y))
    return memo.arrays[key]


_TRAIN_S, _N_TRAIN = "__train_s__", "__n_train__"  # a params entry's timing and data size


def _trained(spec: TrainSpec, loaded: Loaded, memo: _Memo, cache: Path,
             force: bool) -> tuple[str, _Trained]:
    """Params for `spec` on `loaded`: from this run, from the cache, or trained (timed once)."""
    # trained params depend on the trainer's code too: a code change retrains
    where = hashlib.sha256(f"{determinism_key()}|{code_digest()}".encode()).hexdigest()[:6]
    key = f"{spec.hash}-{loaded.hash}-{where}"
    if key in memo.trained:
        return key, memo.trained[key]
    path = cache / "params" / f"{key}.npz"

    def compute():  # "a/b/0" names: any pytree (flax, equinox); the timing beside them
        ds = capped(loaded.ds, spec.n_train, None)
        timing, params = _once(partial(fit, spec.model, spec.train_config(), spec=ds.spec),
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
    trained = _Trained(model_for(spec.model, loaded.ds.spec, spec.train_config()),
                       jax.device_put(params), meta["train_s"], meta["n_train"], finite)
    memo.trained[key] = trained
    return key, trained


@jax.jit
def _perturbation(x: jax.Array, x_adv: jax.Array) -> dict[str, jax.Array]:
    """Share of pixels changed and the L∞ size of the change. x, x_adv: [n, D]."""
    return {"changed_frac": jnp.mean(x_adv != x), "linf": jnp.max(jnp.abs(x_adv - x))}


@partial(jax.jit, static_argnames="model")
def _zero_grad_frac(model: Model, params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Share of pixels whose input gradient is exactly 0 (FGSM leaves them where they are)."""
    return jnp.mean(evasion.input_grad(model, params, x, y) == 0)


def _per_test(key: str, trained: _Trained, x, y, attack: str, memo: _Memo) -> dict:
    slot = memo.per_test.setdefault((key, x.shape[0]), {})
    if "clean" not in slot:
        slot["clean"] = evaluate(trained.arch, trained.params, x, y)
    if get_attack(attack).uses_gradient and "zero_grad_frac" not in slot:
        slot["zero_grad_frac"] = float(_zero_grad_frac(trained.arch, trained.params, x, y))
    return slot


# --- computing one cell of each kind --------------------------------------------------------


@functools.cache
def _mesh():
    """All devices (every host's) as one mesh; see `sharding`."""
    return sharding.make_mesh()


def _base(cell: Cell, loaded: Loaded) -> dict[str, Any]:
    device = jax.devices()[0]
    return {"id": cell.id, "hash": cell.hash, "kind": cell.kind, "block": cell.block,
            "dataset": loaded.ds.name, "data_source": relative_source(loaded.ds.source),
            "is_sample": loaded.ds.is_sample, "data_hash": loaded.hash,
            "backend": jax.default_backend(), "device_kind": device.device_kind,
            "determinism": determinism_key(), "code_digest": code_digest(),
            "commit": git_commit()}


def _attack_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    cfg: AttackConfig = cell.config
    spec = cfg.train
    key, trained = _trained(spec, loaded, memo, cache, force)
    x, y = _device(memo, loaded, "test", cfg.n_test)
    per_test = _per_test(key, trained, x, y, cfg.attack, memo)
    attack = get_attack(cfg.attack)
    options = dict(cfg.options)
    if attack.targeted:
        # the study's target class 3, or the last class of data with fewer classes
        options.setdefault("target", min(study.E7_TARGET, trained.arch.n_classes - 1))
    # one code path from 1 device to N: the batch split across the mesh, params replicated
    (xs, ys), n = sharding.shard_leading((x, y), _mesh())
    fn = partial(attack.fn, trained.arch, sharding.replicate(trained.params, _mesh()),
                 eps=cfg.eps, key=evasion.attack_key(spec.seed), **options)
    timing, x_adv = measure(fn, xs, ys, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    x_adv = sharding.unpad(x_adv, n)
    scores = evaluate(trained.arch, trained.params, x_adv, y,
                      key=jax.random.fold_in(evasion.attack_key(spec.seed), 7))
    detail = {}
    if cfg.attack in ("none", "fgsm"):
        k = min(N_EXAMPLES, x.shape[0])
        pred = jnp.argmax(predict(trained.arch, trained.params, x_adv[:k]), axis=-1)
        detail["examples"] = {"images": encode_images(np.asarray(x_adv[:k]),
                                                      trained.arch.input_range),
                              "shape": list(trained.arch.input_shape),
                              "labels": np.asarray(y[:k]).tolist(),
                              "preds": np.asarray(pred).tolist()}
    return {
        **_base(cell, loaded), "model": spec.model, "arch": trained.arch.name,
        "seed": spec.seed, "attack": cfg.attack, "eps": cfg.eps, "n_train": trained.n_train,
        "n_test": int(x.shape[0]), "hidden": spec.hidden, "lr": spec.lr,
        "epochs": spec.epochs, **scores, "clean_accuracy": per_test["clean"]["accuracy"],
        **_timing_fields(timing), "train_s": trained.train_s, "params_finite": trained.finite,
        "zero_grad_frac": per_test.get("zero_grad_frac") if attack.uses_gradient
        else None, **{k: float(v) for k, v in _perturbation(x, x_adv).items()},
        "detail": detail,
    }


def _stability_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    cfg: StabilityConfig = cell.config
    ds = capped(loaded.ds, cfg.n_train, cfg.n_test)
    size = min(cfg.size, len(ds.y_train))
    table, train_s = stability.stability(ds, samples=cfg.samples, size=size, hidden=cfg.hidden,
                                         lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed)
    mean = table.loc["mean"]
    return {
        **_base(cell, loaded), "model": "seed-mlp", "arch": "seed-mlp", "seed": cfg.seed,
        "n_train": size, "n_test": len(ds.y_test), "hidden": cfg.hidden, "lr": cfg.lr,
        "epochs": cfg.epochs, **{m: float(mean[m]) for m in table.columns},
        "train_s": train_s, "params_finite": bool(np.all(np.isfinite(table.to_numpy()))),
        "detail": {"samples": cfg.samples, "size": size,
                   "table": json.loads(table.to_json(orient="split"))},
    }


# --- speed cells: every implementation of a workload timed in the same interleaved rounds ------

MIN_ROUNDS = 3   # a comparison takes at least this many rounds (a median needs a few)


class _Impl(NamedTuple):
    """One implementation of a speed workload, ready to time.

    fn: no arguments, inputs bound and already on their device; n_timed: items one call
    handles when fewer than the row's n (the row is scaled to n); ref: the numpy reference
    ("speed-up vs numpy" divides by it); peer: the torch row "vs torch" divides by, for the
    rows of the same `task`; compiled: the first call traces and compiles (JAX)."""

    impl: str
    fn: Callable[[], Any]
    n_timed: int | None = None
    ref: bool = False
    peer: bool = False
    compiled: bool = True
    task: str = ""
    note: str = ""


def _row(impl: str, timing: Timing, n: int, *, n_timed: int | None = None, ref: bool = False,
         note: str = "", peer: bool = False, task: str = "") -> dict[str, Any]:
    """One implementation's timing, scaled from n_timed items to n when it ran on a subset."""
    n_timed = n if n_timed is None else n_timed
    return {"impl": impl, "n": n, "n_timed": n_timed, "scale": n / n_timed, "ref": ref,
            "peer": peer, "task": task, "note": note, "spread": spread(timing),
            **_timing_fields(timing, n / n_timed)}


def _missing_row(impl: str, n: int, *, task: str = "", note: str = torch_peer.NOT_INSTALLED
                 ) -> dict[str, Any]:
    """A row for an implementation that could not run here (torch not installed)."""
    return {"impl": impl, "n": n, "n_timed": n, "scale": 1.0, "ref": False, "peer": True,
            "task": task, "note": note, "missing": True, "spread": None,
            **dict.fromkeys(TIMING_FIELDS)}


def _compare(impls: list[_Impl], n: int, *, rounds: int, max_seconds: float,
             min_rounds: int = MIN_ROUNDS) -> tuple[list[dict], dict]:
    """Time `impls` in the same interleaved rounds (`timing.interleaved`); -> (rows, facts).

    After one compiling call and one warm call each, the round count is `rounds`, fewer
    (down to `min_rounds`) where the slowest warm call times it would pass `max_seconds`.
    When any row's spread exceeds NOISY the rounds are taken again (up to RERUNS times) and
    the least noisy attempt is kept; facts: rounds, attempts, worst spread, noisy (still
    above NOISY after the reruns)."""
    fns = {i.impl: i.fn for i in impls}
    first = interleaved(fns, rounds=1, warmup=1)
    slowest = max(t.median_s for t in first.values())
    k = max(min_rounds, min(rounds, int(max_seconds / max(slowest, 1e-9))))
    best: tuple[float, dict[str, Timing]] | None = None
    attempts = 0
    for _ in range(1 + RERUNS):
        attempts += 1
        got = interleaved(fns, rounds=k, warmup=0)
        worst = max(spread(t) for t in got.values())
        if best is None or worst < best[0]:
            best = (worst, got)
        if worst <= NOISY:
            break
    worst, got = best
    rows = []
    for i in impls:
        t = got[i.impl]._replace(compile_s=first[i.impl].compile_s if i.compiled else None)
        rows.append({**_row(i.impl, t, n, n_timed=i.n_timed, ref=i.ref, note=i.note,
                            peer=i.peer, task=i.task),
                     "attempts": attempts, "noisy": spread(t) > NOISY})
    return rows, {"rounds": k, "attempts": attempts, "worst_spread": worst,
                  "noisy": worst > NOISY}


def _peers(make: Callable[[], list[_Impl]], missing: list[tuple[str, str]], n: int
           ) -> tuple[list[_Impl], list[dict]]:
    """The torch implementations `make()` builds, or, without torch, "not installed" rows
    for `missing` ((impl, task) pairs)."""
    if not torch_peer.available():
        return [], [_missing_row(impl, n, task=task) for impl, task in missing]
    return make(), []


def _torch_facts() -> dict[str, Any]:
    if not torch_peer.available():
        return {"torch": None}
    return {"torch": torch_peer.version(), "torch_threads": torch_peer.threads()}


def _seed_mlp(ds: datasets.Dataset, cfg: SpeedConfig) -> Model:
    """The study's MLP for ds with the speed cell's hidden size."""
    return zoo.build("seed-mlp", ds.spec, cfg.hidden)


def _speed_fgsm(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    model = _seed_mlp(ds, cfg)
    params = model.init(jax.random.key(cfg.seed))
    x, y = jax.device_put(ds.x_test), jax.device_put(ds.y_test)
    xn, yn = np.asarray(ds.x_test), np.asarray(ds.y_test)
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])  # float32
    n, k = len(yn), min(cfg.numpy_loop_images, len(yn))
    lo, hi = model.input_range
    d, n_out = model.n_inputs, model.n_classes
    a, b = gemm_floor_operands(n, cfg.hidden, d, n_out)
    ad, bd = jax.device_put((a, b))
    flops = fgsm_flops(n, cfg.hidden, d, n_out)
    impls = [
        # the study's FGSM on its own loss (the numpy and torch rows compute that one)
        _Impl("jax: jit(vmap(grad)), float32", partial(evasion.fgsm, model, params, x, y,
                                                       eps=cfg.eps, loss="train")),
        _Impl("numpy: batched matrix form, float32",
              partial(baseline.fgsm_batched, wih, who, xn, yn, cfg.eps, lo, hi), ref=True,
              compiled=False),
        _Impl("numpy: per-image loop (the study's way), float32",
              partial(baseline.fgsm_loop, wih, who, xn[:k], yn[:k], cfg.eps, lo, hi),
              n_timed=k, compiled=False, note=f"timed on the first {k} images, scaled x{n / k:g}"),
        _Impl("numpy: GEMM floor, float32", partial(np.matmul, a, b), compiled=False,
              note=f"one [{n}, {d + n_out}] @ [{d + n_out}, {2 * cfg.hidden}] GEMM = FGSM's "
                   f"{flops / 1e9:.2f} GFLOP"),
        _Impl("jax: the same GEMM, jit, float32", partial(_matmul_jit, ad, bd),
              note="XLA's GEMM floor"),
    ]
    names = [("torch: FGSM, autograd", "fgsm"), ("torch: FGSM, matrix-form gradient", "fgsm")]

    def make():
        out = []
        for analytic in (False, True):
            p = torch_peer.prepared_fgsm(wih, who, xn, yn, cfg.eps, lo, hi, analytic=analytic)
            out.append(_Impl(p.name, p.run, peer=not analytic, compiled=False, task="fgsm",
                             note="the torchattacks way" if not analytic else ""))
        return out

    peers, missing = _peers(make, names, n)
    impls = [i._replace(task="fgsm") for i in impls] + peers
    rows, facts = _compare(impls, n, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    rows += missing
    t = {r["impl"]: r["median_s"] for r in rows}
    t_jax, t_floor = t[impls[0].impl], t["numpy: GEMM floor, float32"]
    x_adv = evasion.fgsm(model, params, x, y, eps=cfg.eps, loss="train")
    x_np = baseline.fgsm_batched(wih, who, xn, yn, cfg.eps, lo, hi)
    jax_per_image = t_jax / n
    extra = {
        **facts, **_torch_facts(),
        "flops": flops, "gemm_gflop_per_s": flops / t_floor / 1e9,
        "jax_over_floor": t_jax / t_floor,
        "jax_over_xla_floor": t_jax / t["jax: the same GEMM, jit, float32"],
        "jax_s_per_image": jax_per_image, "study_s_per_image": study.e3_seconds_per_image(),
        "study_over_jax_per_image": study.e3_seconds_per_image() / jax_per_image,
        "agree_with_numpy": float(np.mean(np.asarray(x_adv) == x_np)),
    }
    return rows, extra


def numpy_pgd(wih, who, x, y, eps: float, lo: float, hi: float, *, steps: int) -> np.ndarray:
    """PGD-L∞ (Madry et al. 2018) in numpy from x (no random start): `steps` steps of
    2.5 * eps / steps along the sign of `baseline.input_grad_batched`, each projected on the
    eps-ball and [lo, hi]. x: [n, D] -> [n, D]."""
    step = 2.5 * eps / steps
    xa = np.array(x)
    for _ in range(steps):
        xa = xa + step * np.sign(baseline.input_grad_batched(wih, who, xa, y))
        xa = np.clip(np.clip(xa, x - eps, x + eps), lo, hi)
    return xa


def _speed_pgd(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    steps = evasion.PGD_STEPS
    model = _seed_mlp(ds, cfg)
    params = model.init(jax.random.key(cfg.seed))
    x, y = jax.device_put(ds.x_test), jax.device_put(ds.y_test)
    xn, yn = np.asarray(ds.x_test), np.asarray(ds.y_test)
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])
    lo, hi = model.input_range
    n = len(yn)
    jax_pgd = partial(evasion.pgd, model, params, x, y, eps=cfg.eps, steps=steps,
                      random_start=False, loss="train")  # the peers' loss: the study's
    impls = [
        _Impl(f"jax: PGD-{steps}, one fori_loop, float32", jax_pgd, task="pgd",
              note="no random start (as the peers)"),
        _Impl(f"numpy: PGD-{steps}, batched matrix form, float32",
              partial(numpy_pgd, wih, who, xn, yn, cfg.eps, lo, hi, steps=steps), ref=True,
              compiled=False, task="pgd"),
    ]

    def make():
        p = torch_peer.prepared_pgd(wih, who, xn, yn, cfg.eps, lo, hi, steps=steps)
        return [_Impl(p.name, p.run, peer=True, compiled=False, task="pgd")]

    peers, missing = _peers(make, [(f"torch: PGD-{steps}, autograd", "pgd")], n)
    rows, facts = _compare(impls + peers, n, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    agree = float(np.mean(np.asarray(jax_pgd()) == numpy_pgd(wih, who, xn, yn, cfg.eps, lo,
                                                             hi, steps=steps)))
    return rows + missing, {**facts, **_torch_facts(), "steps": steps, "agree_with_numpy": agree}


def _speed_epoch_per_sample(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    model = _seed_mlp(ds, cfg)
    params = model.init(jax.random.key(cfg.seed))
    x, y = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
    n, k = len(ds.y_train), min(cfg.numpy_epoch_samples, len(ds.y_train))
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])
    xs, ys = np.asarray(ds.x_train[:k], np.float64), np.asarray(ds.y_train[:k])

    def numpy_epoch():  # a fresh float64 network each call, as the study starts one
        net = baseline.neuralNetwork(model.n_inputs, cfg.hidden, model.n_classes, cfg.lr,
                                     wih=wih.astype(np.float64), who=who.astype(np.float64))
        net.train_epoch(xs, ys)

    subset = f"timed on the first {k} samples, scaled x{n / k:g}"
    impls = [
        _Impl(f"jax: one lax.scan over blocks of {SEED_SGD_BLOCK}, float32",
              partial(train_seed_sgd, params, x, y, lr=cfg.lr, epochs=1), task="epoch",
              note="the same updates, wih written once per block (train._seed_sgd_block)"),
        _Impl("jax: one lax.scan, one step per sample, float32",
              partial(train_seed_sgd, params, x, y, lr=cfg.lr, epochs=1, block=1),
              task="epoch", note="the rule as written (train.seed_sgd_step)"),
        _Impl("numpy: neuralNetwork.train_epoch (the study's loop), float64", numpy_epoch,
              n_timed=k, ref=True, compiled=False, task="epoch", note=subset),
    ]

    def make():
        p = torch_peer.prepared_seed_epoch(wih, who, ds.x_train[:k], ds.y_train[:k], cfg.lr)
        return [_Impl(p.name, p.run, n_timed=k, peer=True, compiled=False, task="epoch",
                      note=subset)]

    peers, missing = _peers(
        make, [("torch: the study's per-sample rule, in place, float32", "epoch")], n)
    rows, facts = _compare(impls + peers, n, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    return rows + missing, {**facts, **_torch_facts(), "samples": n}


def minibatch_flops(n_batches: int, batch: int, n_in: int, hidden: int, n_out: int) -> int:
    """FLOPs of the matmuls of one minibatch epoch of a one-hidden-layer MLP: per batch the
    forward x @ w1.T and h @ w2.T, the backward weight gradients (same sizes) and the hidden
    error d2 @ w2 (no input gradient); 2 FLOPs per multiply-add."""
    return 2 * n_batches * batch * (2 * n_in * hidden + 3 * hidden * n_out)


@partial(jax.jit, static_argnames=("batch",))
def matmul_steps(w1: jax.Array, w2: jax.Array, x: jax.Array, *, batch: int):
    """Only the five matmuls of each minibatch step of a one-hidden-layer MLP (those
    `minibatch_flops` counts), over x's batches in one `lax.scan`: the floor of a minibatch
    epoch at its batch size, without activations, loss, optimizer or shuffling.
    w1: [h, D], w2: [K, h], x: [n, D]; -> (w1, w2) after tiny updates (kept so that no matmul
    is loop-invariant)."""
    n_batches = x.shape[0] // batch
    xs = x[: n_batches * batch].reshape(n_batches, batch, -1)

    def step(w, xb):
        a, b = w
        h = xb @ a.T
        o = h @ b.T
        d1 = o @ b
        return (a - 1e-9 * (d1.T @ xb), b - 1e-9 * (o.T @ h)), None

    return jax.lax.scan(step, (w1, w2), xs)[0]


def _speed_epoch_minibatch(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    x, y = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
    n = len(ds.y_train)
    impls, names, flops, batches = [], [], {}, {}

    def make():
        return [_Impl(p.name, p.run, peer=True, compiled=False, task=task)
                for task, p in torch_ready]

    torch_ready = []
    for name in ("mlp-sgd", "mlp-ce"):
        recipe = get_recipe(name)
        tc = resolve(recipe, TrainConfig(hidden=cfg.hidden, epochs=1, seed=cfg.seed))
        k_init, k_shuffle = jax.random.split(jax.random.key(cfg.seed))
        model = recipe.build(ds.spec, tc)
        params = model.init(k_init)
        n_batches = n // tc.batch_size
        batches[name] = tc.batch_size
        flops[name] = minibatch_flops(n_batches, tc.batch_size, model.n_inputs, cfg.hidden,
                                      model.n_classes)
        if not any(i.task == f"matmuls-{tc.batch_size}" for i in impls):
            w1 = jnp.zeros((cfg.hidden, x.shape[1]), jnp.float32)
            w2 = jnp.zeros((ds.n_classes, cfg.hidden), jnp.float32)
            impls.append(_Impl(
                f"jax: only the matmuls, batch {tc.batch_size}, one scan",
                partial(matmul_steps, w1, w2, x, batch=tc.batch_size),
                task=f"matmuls-{tc.batch_size}",
                note="the epoch's five matmuls per step and nothing else"))
        impls.append(_Impl(
            f"jax: {name} ({tc.optimizer}, batch {tc.batch_size}), one scan",
            partial(train_minibatch, k_shuffle, params, x, y, model=model,
                    optimizer=tc.optimizer, lr=float(tc.lr), batch_size=tc.batch_size,
                    epochs=1), task=name))
        names.append((f"torch: {name} ({tc.optimizer}, batch {tc.batch_size}), torch.optim",
                      name))
        if torch_peer.available():  # the same shuffle as train_minibatch's first epoch
            order = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, 0), n))
            torch_ready.append((name, torch_peer.prepared_minibatch(
                name, jax.tree.map(np.asarray, params), ds.x_train, ds.y_train, order,
                lr=float(tc.lr), batch_size=tc.batch_size, optimizer=tc.optimizer)))
    d, n_out = x.shape[1], ds.n_classes
    a, b = gemm_floor_operands(n, cfg.hidden, d, n_out)
    gemm = 2 * n * (d + n_out) * 2 * cfg.hidden
    impls.append(_Impl("jax: one GEMM, jit, float32", partial(_matmul_jit, *jax.device_put((a, b))),
                       task="gemm", note=f"[{n}, {d + n_out}] @ [{d + n_out}, "
                                         f"{2 * cfg.hidden}]: the machine's GEMM rate"))
    peers, missing = _peers(make, names, n)
    rows, facts = _compare(impls + peers, n, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    t = {r["impl"]: r["median_s"] for r in rows}
    rate = gemm / t["jax: one GEMM, jit, float32"]
    for row in rows:  # each epoch's floor ratios live in its row (records.csv: plain values)
        if row["task"] in flops:
            row["flops"] = flops[row["task"]]
            row["floor_s"] = flops[row["task"]] / rate
            row["over_floor"] = row["median_s"] / row["floor_s"]
            matmuls = t[f"jax: only the matmuls, batch {batches[row['task']]}, one scan"]
            row["over_matmuls"] = row["median_s"] / matmuls
            row["note"] = (f"{flops[row['task']] / 1e9:.1f} GFLOP: "
                           f"{row['over_floor']:.2f}× its GEMM floor, "
                           f"{row['over_matmuls']:.2f}× its matmuls alone")
    return rows + missing, {**facts, **_torch_facts(), "samples": n,
                            "gemm_gflop_per_s": rate / 1e9}


def _speed_metrics(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    model = _seed_mlp(ds, cfg)
    params = model.init(jax.random.key(cfg.seed))
    x, y = jax.device_put(ds.x_test), jax.device_put(ds.y_test)
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])
    xn, yn = np.asarray(ds.x_test), np.asarray(ds.y_test)
    n = len(ds.y_test)
    impls = [_Impl("jax: metrics.evaluate (forward + 5 scores), float32",
                   partial(evaluate_arrays, model, params, x, y), task="metrics"),
             _Impl("numpy: forward + argmax + bincount P/R/F1, float32",
                   partial(numpy_evaluate, wih, who, xn, yn), ref=True, compiled=False,
                   task="metrics")]
    rows, facts = _compare(impls, n, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    s_jax, s_np = evaluate_arrays(model, params, x, y), numpy_evaluate(wih, who, xn, yn)
    diff = max(abs(float(s_jax[m]) - s_np[m]) for m in SCORE_NAMES)
    return rows, {**facts, "max_abs_diff": diff}


def _speed_population(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    n, m = len(ds.y_train), cfg.population
    size = min(cfg.population_size, n)
    idx = np.stack([datasets.subsample(cfg.seed + i, n, size) for i in range(m)])
    keys = jax.random.split(jax.random.key(cfg.seed), m)
    model = _seed_mlp(ds, cfg)
    params = init_population(model, keys)
    xs, ys = jax.device_put(ds.x_train[idx]), jax.device_put(ds.y_train[idx])
    chunk = population.chunk_size(m, size, model.n_inputs)
    singles = [(jax.tree.map(lambda a, i=i: a[i], params), xs[i], ys[i]) for i in range(m)]

    def separate():
        return [train_seed_sgd(p, a, b, lr=cfg.lr, epochs=1) for p, a, b in singles]

    k = max(1, min(cfg.numpy_epoch_samples // m, size))
    weights = [(np.asarray(p["wih"], np.float64), np.asarray(p["who"], np.float64))
               for p, _, _ in singles]
    subsets = [(np.asarray(ds.x_train[i[:k]], np.float64), ds.y_train[i[:k]]) for i in idx]

    def numpy_population():  # fresh networks each call, from the same initial weights
        for (wih, who), (a, b) in zip(weights, subsets, strict=True):
            baseline.neuralNetwork(model.n_inputs, cfg.hidden, model.n_classes, cfg.lr,
                                   wih=wih, who=who).train_epoch(a, b)

    total = m * size
    impls = [
        _Impl(f"jax: {m} models as one population ({chunk} per vmap, the harness's choice "
              f"on {jax.default_backend()})",
              partial(train_seed_sgd_population, params, xs, ys, lr=cfg.lr, epochs=1,
                      chunk=chunk), task="population"),
        _Impl(f"jax: {m} models in one vmap",
              partial(train_seed_sgd_population, params, xs, ys, lr=cfg.lr, epochs=1),
              task="population"),
        _Impl(f"jax: {m} separate trainings (one jit, called {m} times)", separate,
              task="population"),
        _Impl(f"numpy: {m} x neuralNetwork.train_epoch, float64", numpy_population,
              n_timed=m * k, ref=True, compiled=False, task="population",
              note=f"timed on {k} samples per model, scaled x{size / k:g}"),
    ]
    rows, facts = _compare(impls, total, rounds=cfg.rounds, max_seconds=cfg.max_seconds)
    t_pop, t_vmap, t_sep = (r["median_s"] for r in rows[:3])
    return rows, {**facts, "models": m, "size": size, "chunk": chunk,
                  "population_over_separate": t_pop / t_sep,
                  "vmap_over_separate": t_vmap / t_sep}


def _speed_detection(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    """The detection workload's cost: `detect`'s calibration (a population of clean and
    poisoned retrains), a `detect_pair` call once the calibration is cached (first call,
    compiling, and warm), and the Neural Cleanse trigger search of one model and of a
    vmapped population (`neural_cleanse.reverse_triggers`, `scan_population`). Each is too
    slow for rounds: one timed call after the compiling one (`_twice`)."""
    from mlshift_jax.detection import change, neural_cleanse

    n = len(ds.y_train)
    size = min(10_000, n)
    model = _seed_mlp(ds, cfg)
    m = max(2, cfg.scan_models)
    keys = jax.random.split(jax.random.key(cfg.seed), m)
    stacked = train_seed_sgd_population(init_population(model, keys),
                                        jax.device_put(ds.x_train[:size]),
                                        jax.device_put(ds.y_train[:size]), lr=cfg.lr, epochs=1)
    ref, sus = (jax.tree.map(lambda a, i=i: a[i], stacked) for i in (0, 1))
    calib = change.CalibrationConfig(n_null=cfg.detect_null, sample_size=size, seed=cfg.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t_cal, null = _once(lambda: change.calibrate("seed-mlp", cfg.hidden, ds, calib,
                                                     cache_path=tmp))
        members = cfg.detect_null + len(null.changed_kinds)
        rows.append(_row(f"calibrate: {members} retrains on {size:,} images (one population), "
                         "probes answered, cached", t_cal._replace(compile_s=None), members,
                         task="calibration", note="once; compile included"))
        # the timing does not depend on the level; it only has to be one the null can reach
        alpha = max(0.05, 1.0 / (cfg.detect_null + 1))
        detect = partial(change.detect_pair, ref, sus, ds, config=calib, cache_path=tmp,
                         seed=cfg.seed, alpha=alpha)
        jax.clear_caches()  # as a fresh `mlshift detect` process: every program compiles
        t_cold, _ = _once(detect)
        rows.append(_row("detect_pair, cached calibration, first call", t_cold._replace(
            compile_s=None), 1, task="detect",
            note="traces and compiles; the CLI's compilation cache skips the compiling"))
        rows += _twice([_Impl("detect_pair, cached calibration, warm", detect,
                              compiled=False, task="detect", note="the call again")], 1)
    k = min(500, len(ds.y_test))
    xs, ys = jax.device_put(ds.x_test[:k]), jax.device_put(ds.y_test[:k])
    scan_cfg = neural_cleanse.ScanConfig(steps=cfg.scan_steps)
    key = jax.random.key(cfg.seed)
    scans = [
        _Impl(f"scan-model: reverse_triggers, 1 model ({scan_cfg.steps} steps x "
              f"{model.n_classes} classes)",
              partial(neural_cleanse.reverse_triggers, model, ref, xs, ys, key=key,
                      config=scan_cfg), task="scan"),
        _Impl(f"scan-model: scan_population, {m} models in one jit",
              partial(neural_cleanse.scan_population, model, stacked, xs, ys, key=key,
                      config=scan_cfg), n_timed=m, task="scan",
              note=f"per model (the call scans {m}; chunk: the CPU/accelerator default)"),
    ]
    rows += _twice(scans, 1)
    return rows, {"calibration_members": members, "sample_size": size, "scan_models": m,
                  "scan_images": k, "scan_steps": scan_cfg.steps}


def _twice(impls: list[_Impl], n: int) -> list[dict]:
    """Rows for work too slow for rounds (the detection workload): each implementation called
    twice, the first call its compile_s (when compiled), the second its one timed round."""
    got = interleaved({i.impl: i.fn for i in impls}, rounds=1, warmup=1)
    return [_row(i.impl, got[i.impl]._replace(compile_s=got[i.impl].compile_s if i.compiled
                                               else None), n, n_timed=i.n_timed,
                 note=i.note, task=i.task) for i in impls]


AUTOATTACK_IMAGES = 200  # the AutoAttack row: the first 200 test images (torchattacks is slow)


def _speed_autoattack(ds: datasets.Dataset, cfg: SpeedConfig) -> tuple[list, dict]:
    """AutoAttack (standard) on the study's MLP trained one epoch, first AUTOATTACK_IMAGES
    test images at cfg.eps: the harness's beside torchattacks' at the reference's settings,
    in the same interleaved rounds (one timed round: a torchattacks call takes minutes)."""
    model = _seed_mlp(ds, cfg)
    params = train_seed_sgd(model.init(jax.random.key(cfg.seed)), jax.device_put(ds.x_train),
                            jax.device_put(ds.y_train), lr=cfg.lr, epochs=1)
    params = jax.tree.map(np.asarray, params)
    n = min(AUTOATTACK_IMAGES, len(ds.y_test))
    x, y = jax.device_put(ds.x_test[:n]), jax.device_put(ds.y_test[:n])
    key = evasion.attack_key(cfg.seed)

    last: dict[str, Any] = {}  # each side's latest output, for the agreement

    def ours():
        last["ours"] = autoattack.report(model, params, x, y, eps=cfg.eps, key=key, lo=0.0,
                                         hi=1.0)
        return last["ours"].x_adv

    impls = [_Impl("jax: AutoAttack (APGD-CE, APGD-T, Square 5000), vmap over images", ours,
                   task="autoattack", note="box [0, 1] as torchattacks; no FAB-T")]
    missing_name = "torchattacks: AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000)"
    peers: list[_Impl] = []
    missing: list[dict] = []
    if torch_peer.torchattacks_available():
        p = torch_peer.prepared_autoattack(params, "seed-mlp", ds.x_test[:n], ds.y_test[:n],
                                           cfg.eps, model.input_shape, model.n_classes)
        def theirs():
            last["theirs"] = p.run()
            return last["theirs"]

        peers = [_Impl(p.name, theirs, peer=True, compiled=False, task="autoattack",
                       note="the reference's settings (100 iterations)")]
    else:
        missing = [_missing_row(missing_name, n, task="autoattack")]
    rows, facts = _compare(impls + peers, n, rounds=1, max_seconds=0.0, min_rounds=1)
    robust = last["ours"].robust
    extra = {**facts, **_torch_facts(), "eps": cfg.eps, "images": n,
             "robust_accuracy": float(robust.mean())}
    if peers:
        ref = p.run.robust(last["theirs"])
        extra.update(torchattacks_robust_accuracy=float(ref.mean()),
                     agreement=float(np.mean(ref == robust)))
    return rows + missing, extra


SPEED_WORKLOADS: dict[str, Callable[[datasets.Dataset, SpeedConfig], tuple[list, dict]]] = {
    "fgsm": _speed_fgsm,
    "pgd": _speed_pgd,
    "autoattack": _speed_autoattack,
    "epoch-per-sample": _speed_epoch_per_sample,
    "epoch-minibatch": _speed_epoch_minibatch,
    "metrics": _speed_metrics,
    "population": _speed_population,
    "detection": _speed_detection,
}


def _speed_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    cfg: SpeedConfig = cell.config
    ds = capped(loaded.ds, cfg.n_train, cfg.n_test)
    rows, extra = SPEED_WORKLOADS[cfg.workload](ds, cfg)
    head = rows[0]
    return {**_base(cell, loaded), "workload": cfg.workload, "n_train": len(ds.y_train),
            "n_test": len(ds.y_test), "hidden": cfg.hidden, "seed": cfg.seed,
            **{k: head[k] for k in TIMING_FIELDS}, "detail": {"rows": rows, "extra": extra}}


def _poison_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    cfg: PoisonSweepConfig = cell.config
    ds = capped(loaded.ds, None, cfg.n_test)
    table = sweeps.run_sweep(ds, sweeps.sweep_configs(cfg.sweep), model=cfg.model,
                             seed=cfg.seed, hidden=cfg.hidden, epochs=cfg.epochs,
                             n_train=None if cfg.n_train is None
                             else min(cfg.n_train, len(ds.y_train)))
    a = table.attrs
    return {
        **_base(cell, loaded), "model": cfg.model,
        "arch": model_for(cfg.model, loaded.ds.spec, TrainConfig(hidden=cfg.hidden)).name,
        "seed": cfg.seed, "n_train": a["n_train"], "n_test": a["n_test"], "hidden": cfg.hidden,
        "epochs": a["epochs"], "train_s": a["train_s"], "compile_s": a["compile_s"],
        "params_finite": bool(np.all(np.isfinite(table["clean_accuracy"]))),
        "detail": {"sweep": cfg.sweep, "attrs": {k: v for k, v in a.items()
                                                  if isinstance(v, (int, float, str))},
                   "table": json.loads(table.to_json(orient="split"))},
    }


def _detect_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    cfg: DetectConfig = cell.config
    start = time.perf_counter()
    with PeakMemory() as mem:  # the speed table's detection row: the cell's time and memory
        tables = detection_bench.run(loaded.ds, quick=cfg.quick, seed=cfg.seed,
                                     parts=(cfg.part,))
    bench = detection_bench.QUICK if cfg.quick else detection_bench.FULL
    timing = tables["timing"]["seconds"]
    return {
        **_base(cell, loaded), "model": bench.recipe, "seed": cfg.seed, "hidden": bench.hidden,
        "n_train": min(bench.sample_size, len(loaded.ds.y_train)),
        "train_s": float(timing.get("train population", np.nan)),
        "median_s": time.perf_counter() - start, "peak_rss_bytes": mem.peak_bytes,
        "detail": {name: json.loads(t.to_json(orient="split")) for name, t in tables.items()},
    }


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays -> Python (for a record's JSON)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _defended(cfg: DefenseConfig, loaded: Loaded, base: _Trained) -> tuple[Model, Any, float]:
    """(defended model, its params, seconds to fit the defense: adversarial training or the
    denoiser; 0 for a pure wrapper)."""
    opts = dict(cfg.options)
    spec = cfg.train
    if cfg.defense == "adv-train":
        ds = capped(loaded.ds, spec.n_train, None)
        adv_cfg = replace(spec.train_config(),
                          epochs=spec.epochs * defenses.ADV_EPOCH_FACTOR)
        timing, params = _once(partial(defenses.adv_fit, spec.model, adv_cfg,
                                       eps=float(opts["eps"]), steps=int(opts["steps"]),
                                       warmup=float(opts.get("warmup", 0.0)), spec=ds.spec),
                               ds.x_train, ds.y_train)
        return defenses.build("adv-train", base.arch, **opts), params, timing.median_s
    if defenses.get_defense(cfg.defense).needs_state:
        ds = capped(loaded.ds, spec.n_train, None)
        key = jax.random.fold_in(jax.random.key(spec.seed), 0xDAE)
        timing, state = _once(partial(defenses.fit_state, cfg.defense, base.arch, key=key,
                                      **opts), ds.x_train)
        return (defenses.build(cfg.defense, base.arch, state=state, **opts), base.params,
                timing.median_s)
    return defenses.build(cfg.defense, base.arch, **opts), base.params, 0.0


def _correct(model: Model, params, x_adv, y, key) -> np.ndarray:
    """[b] bool: which images the model still classifies correctly (one draw of a stochastic
    model's randomness from key, as `evaluate` takes it)."""
    return np.asarray(jnp.argmax(predict_keyed(model, params, x_adv, key), -1) == y)


def _autoattack_sweep(model: Model, params, x, y, eps_values, *, key, lo, hi, queries=None):
    """AutoAttack at every eps (standard; `rand` for a stochastic model), each call picking
    the images still standing on the host. -> (x_adv [n_eps, b, D], per-eps counts)."""
    version = "rand" if model.stochastic else "standard"
    out, counts = [], []
    for eps in eps_values:
        kw = {} if queries is None else {"queries": queries}
        r = autoattack.report(model, params, x, y, eps=float(eps), key=key, lo=lo, hi=hi,
                              version=version, **kw)
        out.append(r.x_adv)
        counts.append({"version": version, **r.counts()})
    return jnp.stack(out), counts


def _defense_cell(cell: Cell, loaded: Loaded, memo: _Memo, cache: Path, force: bool) -> dict:
    """One row of the defense x attack table: every column at every eps (one compiled eps
    sweep per column, timed; AutoAttack one call per eps, timed once with its compiles), the
    clean
    accuracy, the worst case per image over every column, the obfuscation probe and its
    flags."""
    cfg: DefenseConfig = cell.config
    spec = cfg.train
    _, base = _trained(spec, loaded, memo, cache, force)
    model, params, defense_s = _defended(cfg, loaded, base)
    x, y = _device(memo, loaded, "test", cfg.n_test)
    lo, hi = (float(v) for v in model.input_range)
    key = evasion.attack_key(spec.seed)
    eval_key = jax.random.fold_in(key, 7)
    clean = evaluate(model, params, x, y, key=eval_key)["accuracy"]
    adaptive_name = defenses.get_defense(cfg.defense).adaptive
    eps_values = jnp.asarray(cfg.eps, x.dtype)
    rows, accuracy, correct, aa_counts = [], {}, {}, None
    for column in cfg.attacks:
        name = adaptive_name if column == "adaptive" else column
        if column == "autoattack":
            fn = partial(_autoattack_sweep, model, params, key=key, lo=lo, hi=hi)
            # one call (minutes on a robust model), its time including the compiles
            timing, (x_adv, aa_counts) = _once(fn, x, y, cfg.eps)
            _column_rows(model, params, x_adv, y, cfg.eps, column, name, timing, eval_key,
                         rows, accuracy, correct)
            continue
        attack = get_attack(name)
        kw: dict[str, Any] = {"key": key, "lo": lo, "hi": hi}
        kw.update({k: v for k, v in (("steps", cfg.steps), ("samples", cfg.samples),
                                     ("queries", cfg.queries)) if attack.accepts(k)})
        if attack.accepts("steps") and attack.accepts("restarts"):  # the PGD attacks' restarts
            kw["restarts"] = cfg.restarts
        if attack.surrogate and defenses.get_defense(cfg.defense).kind == "training":
            kw["source_params"] = base.params  # crafted on the undefended weights
        fn = partial(evasion.sweep, attack, model, params, **kw)
        timing, x_adv = measure(fn, x, y, eps_values, rounds=cfg.rounds,
                                max_seconds=cfg.max_seconds)
        _column_rows(model, params, x_adv, y, cfg.eps, column, name, timing, eval_key, rows,
                     accuracy, correct)
    if correct:  # an image is robust only if it survived every column (never min of accuracies)
        for eps in cfg.eps:
            robust = autoattack.robust_per_image(
                {c: v for (c, e), v in correct.items() if e == eps})
            accuracy[("worst", eps)] = float(np.mean(robust))
            rows.append({"column": "worst", "attack": "per image", "eps": eps,
                         "accuracy": float(np.mean(robust)), "median_s": float("nan"),
                         "compile_s": float("nan"), "rounds": 0})
    n_probe = min(cfg.probe_n, int(x.shape[0]))
    probed = obfuscation.probe(model, params, x[:n_probe], y[:n_probe],
                               key=jax.random.fold_in(key, 11), eps=max(cfg.eps),
                               steps=cfg.steps)
    raised = obfuscation.flags({k: v for k, v in accuracy.items() if k[0] != "worst"}, probed,
                               n=int(x.shape[0]), autoattack=None if aa_counts is None else
                               dict(zip(cfg.eps, aa_counts, strict=True)))
    pgd40 = {}
    if cfg.defense == "adv-train":  # Madry et al.'s yardstick: PGD-40 at the training eps
        adv_eps = float(dict(cfg.options)["eps"])
        x_adv = evasion.pgd(model, params, x, y, eps=adv_eps, steps=40,
                            key=jax.random.fold_in(key, 40), lo=lo, hi=hi)
        pgd40 = {"pgd40_eps": adv_eps, "adv_steps": int(dict(cfg.options).get("steps", 7)),
                 "pgd40_accuracy": evaluate(model, params, x_adv, y, key=eval_key)["accuracy"]}
    return {
        **_base(cell, loaded), "model": spec.model, "arch": model.name, "seed": spec.seed,
        **pgd40,
        "defense": cfg.defense, "adaptive": adaptive_name, "n_train": base.n_train,
        "n_test": int(x.shape[0]), "hidden": spec.hidden, "lr": spec.lr,
        "epochs": spec.epochs, "clean_accuracy": clean, "train_s": base.train_s,
        "defense_s": defense_s, "stochastic": bool(model.stochastic),
        "flags": "; ".join(raised),
        "detail": {"rows": rows, "probe": {k: v for k, v in probed.items()
                                           if k != "pgd_steps"},
                   "pgd_steps": {str(k): v for k, v in probed["pgd_steps"].items()},
                   "flags": raised,
                   **({"autoattack": {str(e): c for e, c in zip(cfg.eps, aa_counts,
                                                                 strict=True)}}
                      if aa_counts is not None else {})},
    }


def _column_rows(model, params, x_adv, y, eps_list, column, name, timing, eval_key, rows,
                 accuracy, correct) -> None:
    """Score one column's x_adv [n_eps, b, D]: per-image correctness and accuracy per eps,
    appended to rows / accuracy / correct (keyed (column, eps))."""
    for i, eps in enumerate(eps_list):
        ok = _correct(model, params, x_adv[i], y, jax.random.fold_in(eval_key, 1 + i))
        correct[(column, eps)] = ok
        accuracy[(column, eps)] = float(np.mean(ok))
        rows.append({"column": column, "attack": name, "eps": eps, "accuracy": float(np.mean(ok)),
                     "median_s": timing.median_s, "compile_s": timing.compile_s,
                     "rounds": timing.rounds})


COMPUTE = {"attack": _attack_cell, "stability": _stability_cell, "speed": _speed_cell,
           "poison": _poison_cell, "detect": _detect_cell, "defense": _defense_cell}


# --- progress --------------------------------------------------------------------------------

LINE_FORMAT = "[{n_fmt}/{total_fmt}] {percentage:3.0f}% elapsed {elapsed} eta {remaining}"


class Progress:
    """The progress of a run's cells on `stream` (default stderr), for any kind of stream.

    On a terminal: a live tqdm bar (count, percent, elapsed, ETA, the running cell). Off a
    terminal (a log file, a pipe, CI): one line per finished cell, "[3/27]  11% elapsed
    00:42 eta 05:36  <cell id> (12.3 s)", the ETA = mean time per finished cell x cells left.
    `start(label)` when a cell begins, `done(label)` when it ends, `close()` at the end.
    """

    def __init__(self, total: int, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n = int(total), 0
        self.start_time = self.cell_time = time.perf_counter()
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=self.total, file=self.stream, unit="cell", dynamic_ncols=True,
                        mininterval=0) if self.live and self.total else None

    def start(self, label: str) -> None:
        """A cell begins (shown on the live bar)."""
        self.cell_time = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def done(self, label: str) -> None:
        """A cell has finished: advance the bar, or write its line."""
        self.n += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            return
        meter = tqdm.format_meter(self.n, self.total, now - self.start_time,
                                  bar_format=LINE_FORMAT)
        self.stream.write(f"{meter}  {label} ({now - self.cell_time:.1f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar (a no-op off a terminal)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the run -----------------------------------------------------------------------------------


def _dataset_of(cell: Cell) -> str:
    return cell.config.dataset


def _cached(cache: Path, cell: Cell, loaded: Loaded, damaged: list,
            reuse_stale: bool = False) -> dict | None:
    """The cached record to reuse for `cell`, or None to compute it.

    A record counts if it is whole and was computed on the same data under the same
    `determinism_key` by the same code (`provenance.code_digest`). A record of other code is
    stale: None (recomputed), unless `reuse_stale`, when it is returned as it is (its
    `code_digest` and `commit` name the code that made it). A damaged record (unreadable, not
    JSON, not a record of this cell) is listed in `damaged` and treated as missing."""
    path = cache / "cells" / f"{cell.hash}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        whole = (isinstance(record, dict) and record.get("hash") == cell.hash
                 and isinstance(record.get("data_hash"), str))
    except (OSError, ValueError):
        whole = False
    if not whole:
        damaged.append(f"cells/{path.name}")
        return None
    if record.get("data_hash") != loaded.hash or _lacks_peer(record):
        return None
    if record.get("determinism") != determinism_key():
        return None
    if record.get("code_digest") != code_digest() and not reuse_stale:
        return None
    return record


def _lacks_peer(record: dict) -> bool:
    """A speed record timed without torch, now that torch is installed: recompute it, so that
    `make bench` times torch whenever the peers extra is there."""
    if record.get("kind") != "speed":
        return False
    rows = (record.get("detail") or {}).get("rows") or []
    return any(r.get("missing") for r in rows) and torch_peer.available()


def _warn_damaged(cache: Path, damaged: list) -> None:
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3
                                          else "")
        warnings.warn(f"{len(damaged)} damaged cache entr{'y' if len(damaged) == 1 else 'ies'} "
                      f"in {cache} treated as missing and rebuilt: {shown}", stacklevel=3)


MATRICES = Path(str(resources.files("mlshift_jax.bench") / "matrices"))  # package data
DEFAULT_MATRIX = MATRICES / "full.toml"  # `mlshift bench`
QUICK_MATRIX = MATRICES / "quick.toml"  # `mlshift bench --quick`
# how run.json names the default matrix: now, and before it moved into the package
_DEFAULT_NAMES = (relative_source(str(DEFAULT_MATRIX)), "bench/matrix.toml")


def _holds_default_run(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a full-data run of the default matrix (what the committed
    results/<platform>/ holds): told by its run.json (the matrix it names, not tiny, no
    dataset from the bundled sample), wherever the folder is."""
    path = Path(out_dir) / "run.json"
    try:
        if not path.is_file() or path.stat().st_size > outdir.MAX_BYTES:
            return False
        info = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return False
    if not isinstance(info, dict) or not isinstance(info.get("matrix"), str):
        return False
    named = info["matrix"]
    default = any(named == n or named.endswith("/" + n) for n in _DEFAULT_NAMES)
    datasets = info.get("datasets")
    full = isinstance(datasets, dict) and all(
        isinstance(d, dict) and d.get("is_sample") is False for d in datasets.values())
    return default and full and not info.get("tiny")


def _check_committed(out_dir, matrix_path, dataset, sample: bool) -> None:
    """A folder holding the default matrix's run on the full data (the committed
    results/<platform>/, recognised by its run.json) takes only that run again: ConfigError
    for another matrix, --dataset or the bundled sample there."""
    if not _holds_default_run(out_dir):
        return
    same = Path(matrix_path).resolve() == DEFAULT_MATRIX.resolve() and dataset is None
    if same and sample:
        raise ConfigError(f"--out {out_dir}: the committed results of the full data; refusing "
                          "to write a run on the bundled sample there (set MLSHIFT_DATA_DIR "
                          "or give --out another folder)")
    if not same:
        raise ConfigError(f"--out {out_dir}: the committed results of the default matrix; "
                          f"refusing to write {Path(matrix_path).name}"
                          f"{' on ' + dataset if dataset else ''} there; give --out another "
                          "folder")


def _file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 12 hex): what names a matrix in run.json, with its
    path relative to the repository."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


_ABS_PATH = re.compile(r"(?<![\w:./~-])/[^\s'\",;()]+")


def _without_paths(text: str) -> str:
    """text with each absolute path in it made relative (`provenance.relative_source`)."""
    return _ABS_PATH.sub(lambda m: relative_source(m.group(0)), text)


def run(matrix_path: str | Path, *, out_dir: str | Path, only: str | None = None,
        force: bool = False, data_dir: str | None = None, dataset: str | None = None,
        sample_out_dir: str | Path | None = None, reuse_stale: bool = False,
        tiny: bool = False, allow_code: tuple[str, ...] = ()) -> pd.DataFrame:
    """Run the cells of the matrix at `matrix_path` whose id matches `only` (fnmatch pattern
    or substring; None: all); reuse cached cells unless `force`. Returns their records.

    data_dir: where every dataset is looked for (`datasets.load`); dataset: run the matrix on this
    dataset instead of its own (`matrix.with_dataset`); sample_out_dir: where the run goes
    instead of `out_dir` when a dataset comes from the bundled sample (said in one line), so
    a sample run never lands in a full-data results folder. `attrs["run"]["out_dir"]` is the
    folder used. Ctrl-C raises `Interrupted` (how many cells are cached). reuse_stale: reuse
    cached cells computed by other code (another `code_digest`) instead of recomputing them;
    their records get status "stale" and keep the digest and commit of the code that made
    them (the report marks them). tiny: every cell at a smoke test's size (`matrix.tiny`).
    allow_code: the user model references ("pkg.module:attr") the caller names; the matrix
    may name no other (`matrix.parse`).

    Each record is one row: id, kind, block, dataset, model, attack, eps, seed, n_train,
    n_test, accuracy, precision, recall, f1, confidence, clean_accuracy, compile_s, median_s,
    min_s, max_s, iqr_s, rounds, train_s, ..., code_digest and commit (the code that computed
    it), compute_s and peak_rss_bytes_cell (the cell's wall time and the process's peak
    resident memory while it ran, when it was computed), status ("computed", "reused" or
    "stale") and `detail` (a dict: digit examples, the stability table, a speed cell's
    implementations).
    """
    start, started = time.perf_counter(), datetime.now(timezone.utc)
    mx = load(matrix_path, allow_code=allow_code)
    if dataset is not None:
        mx = with_dataset(mx, dataset)
    if tiny:
        mx = tiny_matrix(mx)
    selected = select(cells(mx), only)
    if not selected:
        raise ConfigError(f"{matrix_path}: no cell id matches {only!r}; ids look like "
                          f"{cells(mx)[0].id!r}")
    names = list(dict.fromkeys(_dataset_of(c) for c in selected))
    try:
        loaded, skipped = _load_datasets(names, mx, data_dir)
    except KeyboardInterrupt:  # before any cell ran: say what the cache already holds
        cells_dir = Path(out_dir) / CACHE_DIR / "cells"
        held = sum((cells_dir / f"{c.hash}.json").is_file() for c in selected)
        raise Interrupted(held, len(selected)) from None
    if not loaded:
        raise DataError(f"{matrix_path}: no dataset of the matrix could be loaded: "
                        + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if sample_out_dir is not None and any(d.ds.is_sample for d in loaded.values()):
        print(f"mlshift: the bundled sample, not the full data: results go to "
              f"{sample_out_dir}, not {out_dir}", file=sys.stderr)
        out_dir = sample_out_dir
    _check_committed(out_dir, matrix_path, dataset,
                     any(d.ds.is_sample for d in loaded.values()))
    outdir.claim(out_dir)  # only a folder mlshift wrote, or a new one
    outdir.record(out_dir, folders=[CACHE_DIR])
    cache = Path(out_dir) / CACHE_DIR
    outdir.clean_temps(out_dir)  # what a hard-killed run left half-written
    records: dict[str, dict] = {}
    todo = []
    memo = _Memo({}, {}, {}, [])
    for cell in selected:
        name = _dataset_of(cell)
        if name in skipped:
            continue
        record = None if force else _cached(cache, cell, loaded[name], memo.damaged,
                                            reuse_stale)
        if record is None:
            todo.append(cell)
        else:
            status = "reused" if record.get("code_digest") == code_digest() else "stale"
            records[cell.id] = {**record, "id": cell.id, "block": cell.block, "status": status}
    by_hash: dict[str, dict] = {}
    shown = Progress(len(todo))
    try:
        for cell in todo:
            shown.start(cell.id)
            record = by_hash.get(cell.hash)
            if record is None:
                began = time.perf_counter()
                with PeakMemory(interval=0.2) as mem:
                    record = COMPUTE[cell.kind](cell, loaded[_dataset_of(cell)], memo, cache,
                                                force)
                record["compute_s"] = time.perf_counter() - began
                record["peak_rss_bytes_cell"] = mem.peak_bytes
                record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                if jax.process_index() == 0:  # several hosts run the same cells; one writes
                    write_text(cache / "cells" / f"{cell.hash}.json",
                               json.dumps(record, indent=1, default=_json_default))
                by_hash[cell.hash] = record
            records[cell.id] = {**record, "id": cell.id, "block": cell.block,
                                "status": "computed"}
            shown.done(cell.id)
            memory_maps.relieve()  # 150+ cells of compiles would pass the kernel's map limit
    except KeyboardInterrupt:
        shown.close()
        _warn_damaged(cache, memo.damaged)
        raise Interrupted(len(records), len(selected)) from None
    shown.close()
    _warn_damaged(cache, memo.damaged)
    frame = pd.DataFrame([records[c.id] for c in selected if c.id in records])
    computed = {c.hash: by_hash[c.hash] for c in todo if c.hash in by_hash}
    frame.attrs["run"] = {
        "matrix": relative_source(str(matrix_path)), "matrix_sha256": _file_hash(matrix_path),
        "only": only, "force": force, "reuse_stale": reuse_stale, "tiny": tiny,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "cells": len(selected), "computed": len(todo),
        "reused": sum(r["status"] == "reused" for r in records.values()),
        "stale": sum(r["status"] == "stale" for r in records.values()),
        "skipped_cells": sum(_dataset_of(c) in skipped for c in selected),
        "compute_s": sum(float(r.get("compute_s") or 0.0) for r in computed.values()),
        "code_digest": code_digest(), "commit": git_commit(),
        "datasets": {n: {"source": relative_source(d.ds.source), "is_sample": d.ds.is_sample,
                         "n_train": len(d.ds.y_train), "n_test": len(d.ds.y_test),
                         "data_hash": d.hash, "image_shape": list(d.ds.image_shape),
                         "n_classes": d.ds.n_classes, "input_range": list(d.ds.input_range),
                         "load": {k: relative_source(v) if isinstance(v, str) else v
                                  for k, v in mx.load_kwargs(n).items()}}
                     for n, d in loaded.items()},
        "skipped": {n: _without_paths(why) for n, why in skipped.items()},
        "out_dir": str(out_dir),  # report.run_info writes it relative (run.json)
        "determinism": determinism_key(),
    }
    return frame
