"""Speed ([speed]): each workload timed in every implementation the harness has of it (JAX,
the numpy reference, torch where installed) in the same interleaved rounds.

One `SpeedConfig` cell per workload (`WORKLOADS`, the one list of them); a workload function
builds its implementations, `_compare` times them (`timing.interleaved`, rerun while noisy)
and the cell's record holds every row and the workload's facts (FLOP floors, agreement with
numpy). The section is the workload x implementation table (with the detection benchmark's
cells, timed whole), the finding the speed-ups of JAX over numpy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.attacks import autoattack, evasion
from mlshift_jax.bench import torch_peer
from mlshift_jax.bench.cells import (
    BlockData,
    Cell,
    Experiment,
    Matrix,
    Parsers,
    ReportContext,
    inherit,
    shrink,
    unfit_calibration,
)
from mlshift_jax.bench.context import (
    TIMING_FIELDS,
    Loaded,
    Memo,
    base_record,
    capped,
    timing_fields,
)
from mlshift_jax.bench.experiments.detect import part_of
from mlshift_jax.bench.markdown import finite, fmt_time, md, ratio, records_of
from mlshift_jax.core import study
from mlshift_jax.core.timing import NOISY, RERUNS, Timing, first_call, interleaved, spread
from mlshift_jax.data import datasets
from mlshift_jax.models import baseline, population, zoo
from mlshift_jax.models.metrics import SCORE_NAMES, evaluate_arrays
from mlshift_jax.models.recipes import TrainConfig, resolve
from mlshift_jax.models.registry import get_recipe
from mlshift_jax.models.train import (
    SEED_SGD_BLOCK,
    init_population,
    train_minibatch,
    train_seed_sgd,
    train_seed_sgd_population,
)
from mlshift_jax.models.zoo import Model

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


# --- timing every implementation of a workload in the same interleaved rounds ----------------


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
            **timing_fields(timing, n / n_timed)}


def _missing_row(impl: str, n: int, *, task: str = "", note: str = torch_peer.NOT_INSTALLED
                 ) -> dict[str, Any]:
    """A row for an implementation that could not run here (torch not installed)."""
    return {"impl": impl, "n": n, "n_timed": n, "scale": 1.0, "ref": False, "peer": True,
            "task": task, "note": note, "missing": True, "spread": None,
            **dict.fromkeys(TIMING_FIELDS)}


def _compare(impls: list[_Impl], n: int, *, rounds: int, max_seconds: float,
             min_rounds: int = MIN_ROUNDS) -> tuple[list[dict], dict]:
    """Time `impls` in the same interleaved rounds (`timing.interleaved`); -> (rows, facts).

    After one compiling call of each JAX implementation (none for numpy and torch, which
    compile nothing) and one timed call of each, the round count is `rounds`, fewer (down to
    `min_rounds`) where the slowest call times it would pass `max_seconds`.
    When any row's spread exceeds NOISY the rounds are taken again (up to RERUNS times) and
    the least noisy attempt is kept; facts: rounds, attempts, worst spread, noisy (still
    above NOISY after the reruns)."""
    fns = {i.impl: i.fn for i in impls}
    compile_s = {i.impl: first_call(i.fn)[0].median_s for i in impls if i.compiled}
    first = interleaved(fns, rounds=1, warmup=0)
    slowest = max(t.median_s for t in first.values())
    k = max(min_rounds, min(rounds, int(max_seconds / max(slowest, 1e-9))))
    best: tuple[float, dict[str, Timing]] | None = None
    attempts = 0
    for _ in range(1 + RERUNS):
        attempts += 1
        # one round: the call above is that round (a torchattacks call takes 24 s)
        got = first if k == 1 and attempts == 1 else interleaved(fns, rounds=k, warmup=0)
        worst = max(spread(t) for t in got.values())
        if best is None or worst < best[0]:
            best = (worst, got)
        if worst <= NOISY:
            break
    worst, got = best
    rows = []
    for i in impls:
        t = got[i.impl]._replace(compile_s=compile_s.get(i.impl))
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


# --- the workloads ---------------------------------------------------------------------------


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
        t_cal, null = first_call(lambda: change.calibrate("seed-mlp", cfg.hidden, ds, calib,
                                                    cache_path=tmp))
        members = cfg.detect_null + len(null.changed_kinds)
        rows.append(_row(f"calibrate: {cfg.detect_null} benign + {len(null.changed_kinds)} "
                         f"changed models on {size:,} images, "
                         "probes answered, cached", t_cal._replace(compile_s=None), members,
                         task="calibration", note="once; compile included"))
        # the timing does not depend on the level; it only has to be one the null can reach
        alpha = max(0.05, 1.0 / (cfg.detect_null + 1))
        detect = partial(change.detect_pair, ref, sus, ds, config=calib, cache_path=tmp,
                         seed=cfg.seed, alpha=alpha)
        jax.clear_caches()  # as a fresh `mlshift detect` process: every program compiles
        t_cold, _ = first_call(detect)
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

    impls = [_Impl("jax: AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000), vmap over images",
                   ours, task="autoattack", note="box [0, 1] as torchattacks")]
    missing_name = "torchattacks: AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000)"
    peers: list[_Impl] = []
    missing: list[dict] = []
    if torch_peer.torchattacks_available():
        p = torch_peer.prepared_autoattack(model, params, ds.x_test[:n], ds.y_test[:n], cfg.eps)
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


WORKLOADS: dict[str, Callable[[datasets.Dataset, SpeedConfig], tuple[list, dict]]] = {
    "fgsm": _speed_fgsm,
    "pgd": _speed_pgd,
    "autoattack": _speed_autoattack,
    "epoch-per-sample": _speed_epoch_per_sample,
    "epoch-minibatch": _speed_epoch_minibatch,
    "metrics": _speed_metrics,
    "population": _speed_population,
    "detection": _speed_detection,
}


# --- the block and its cells -----------------------------------------------------------------


@dataclass(frozen=True)
class SpeedConfig:
    """One speed workload, every implementation of it timed in the same cell."""

    kind: ClassVar[str] = "speed"
    dataset: str
    workload: str
    hidden: int
    lr: float
    eps: float
    seed: int
    n_train: int | None
    n_test: int | None
    numpy_loop_images: int
    numpy_epoch_samples: int
    population: int
    population_size: int
    rounds: int
    max_seconds: float
    detect_null: int = 16
    scan_models: int = 2
    scan_steps: int = 300


@dataclass(frozen=True)
class Speed(BlockData):
    """The [speed] table: each of `workloads` on the study's MLP (one epoch where it trains)."""

    workloads: tuple[str, ...] = tuple(WORKLOADS)
    hidden: int = 200
    lr: float = 0.1
    eps: float = 0.1
    numpy_loop_images: int = 500
    numpy_epoch_samples: int = 2000
    population: int = 10
    population_size: int = 10_000
    detect_null: int = 16        # benign models in the detection workload's calibration
    scan_models: int = 2         # models in the detection workload's vmapped scan
    scan_steps: int = 300        # Adam steps per class of each scan (neural_cleanse default)


def schema(p: Parsers) -> dict:
    """The [speed] keys."""
    common = {k: v for k, v in p.common.items() if k != "epochs"}  # one epoch, always
    return {**common, "dataset": p.dataset,
            "workloads": lambda v, w: p.chk.names(v, w, set(WORKLOADS), "workload"),
            "eps": p.chk.float_, "numpy_loop_images": p.chk.int_,
            "numpy_epoch_samples": p.chk.int_, "population": p.chk.int_,
            "population_size": p.chk.int_, "detect_null": p.chk.int_,
            "scan_models": p.chk.int_, "scan_steps": p.chk.int_}


def cells(matrix: Matrix, sp: Speed) -> list[Cell]:
    """One cell per workload."""
    out = []
    for workload in sp.workloads:
        config = SpeedConfig(
            dataset=sp.dataset, workload=workload, hidden=sp.hidden, lr=sp.lr, eps=sp.eps,
            seed=sp.seed, n_train=inherit(sp.n_train, matrix.n_train),
            n_test=inherit(sp.n_test, matrix.n_test),
            numpy_loop_images=sp.numpy_loop_images, numpy_epoch_samples=sp.numpy_epoch_samples,
            population=sp.population, population_size=sp.population_size,
            rounds=matrix.timing.rounds, max_seconds=matrix.timing.max_seconds,
            detect_null=sp.detect_null, scan_models=sp.scan_models, scan_steps=sp.scan_steps)
        out.append(Cell(f"speed/{sp.dataset}/{workload}", "speed", config))
    return out


def tiny(sp: Speed) -> Speed:
    """[speed] with a handful of images, models and steps per workload."""
    return shrink(sp, numpy_loop_images=10, numpy_epoch_samples=20, population=2,
                  population_size=200, detect_null=2, scan_models=2, scan_steps=5)


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """Time every implementation of the cell's workload (`WORKLOADS`); the first row's
    timing is the record's, every row and the workload's facts its detail."""
    cfg: SpeedConfig = cell.config
    ds = capped(loaded.ds, cfg.n_train, cfg.n_test)
    rows, extra = WORKLOADS[cfg.workload](ds, cfg)
    head = rows[0]
    return {**base_record(cell, loaded), "workload": cfg.workload, "n_train": len(ds.y_train),
            "n_test": len(ds.y_test), "hidden": cfg.hidden, "seed": cfg.seed,
            **{k: head[k] for k in TIMING_FIELDS}, "detail": {"rows": rows, "extra": extra}}


def lacks_peer(record: dict) -> bool:
    """A speed record timed without torch, now that torch is installed: recompute it, so that
    `make bench` times torch whenever the peers extra is there."""
    if record.get("kind") != "speed":
        return False
    rows = (record.get("detail") or {}).get("rows") or []
    return any(r.get("missing") for r in rows) and torch_peer.available()


# --- tables.md ---------------------------------------------------------------------------------


def _detect_cell_rows(records: pd.DataFrame) -> list[dict[str, Any]]:
    """The speed table's rows for the detection benchmark cells ([detect]): the whole cell's
    wall time and the process's peak resident memory during it (sampled)."""
    out = []
    for _, r in records_of(records, kind="detect").iterrows():
        peak = r.get("peak_rss_bytes")
        out.append({
            "workload": "detection", "implementation": f"the detection benchmark cell "
            f"{part_of(r)} ({r.get('dataset', '')})",
            "n": "1", "median": fmt_time(r.get("median_s")), "min – max": "—",
            "rounds": 1, "spread": "—", "compile": "—", "speed-up vs numpy": "—",
            "vs torch": "—",
            "note": "one run, compile included" + (
                f"; peak memory {peak / 2**30:.2f} GiB" if finite(peak) else ""),
        })
    return out


def _table(records: pd.DataFrame) -> str:
    rows = records_of(records, kind="speed")
    if not len(rows):
        return "No speed cells in this run.\n"
    table, lines = [], []
    noisy = []
    for _, r in rows.iterrows():
        impls = r["detail"]["rows"]
        extra = r["detail"]["extra"]
        ref = next((i["median_s"] for i in impls if i["ref"]), None)
        peers = {i.get("task", ""): i["median_s"] for i in impls
                 if i.get("peer") and not i.get("missing")}
        for i in impls:
            missing = i.get("missing", False)
            spread = i.get("spread")
            if i.get("noisy"):
                noisy.append(r["workload"])
            table.append({
                "workload": r["workload"], "implementation": i["impl"],
                "n": f"{i['n']:,}",
                "median": torch_peer.NOT_INSTALLED if missing else fmt_time(i["median_s"]),
                "min – max": "—" if missing else
                f"{fmt_time(i['min_s'])} – {fmt_time(i['max_s'])}",
                "rounds": "—" if missing else i["rounds"],
                "spread": f"{spread:.0%}" + (" (noisy)" if i.get("noisy") else "")
                if finite(spread) else "—",
                "compile": fmt_time(i["compile_s"]),
                "speed-up vs numpy": "—" if missing or not ref else ratio(ref, i["median_s"]),
                "vs torch": "—" if missing or i.get("peer") else
                ratio(peers.get(i.get("task", "")), i["median_s"]),
                "note": ("reference; " if i["ref"] else "") + i["note"],
            })
        if r["workload"] == "fgsm":
            lines.append(
                f"- FGSM per image: JAX {fmt_time(extra['jax_s_per_image'])} vs the study's "
                f"{extra['study_s_per_image']:.0f} s (125 h / 6,000 images): "
                f"{extra['study_over_jax_per_image']:.3g}× less.")
            lines.append(
                f"- GEMM floor: one numpy float32 GEMM with FGSM's {extra['flops'] / 1e9:.2f} "
                f"GFLOP runs at {extra['gemm_gflop_per_s']:.0f} GFLOP/s; JAX FGSM takes "
                f"{extra['jax_over_floor']:.2f}× the floor's time "
                f"({extra['jax_over_xla_floor']:.2f}× that of the same GEMM in XLA).")
        floors = [i for i in impls if finite(i.get("over_floor"))]
        if r["workload"] == "epoch-minibatch" and floors:
            parts = [f"{i['impl'].split(' (')[0]} {i['over_floor']:.2f}×" for i in floors]
            alone = [f"{i['impl'].split(' (')[0]} {i['over_matmuls']:.2f}×" for i in floors
                     if finite(i.get("over_matmuls"))]
            lines.append(
                f"- Minibatch floor: an epoch's matmul FLOPs over the GEMM rate measured in the "
                f"same rounds ({extra['gemm_gflop_per_s']:.0f} GFLOP/s, one large XLA GEMM); "
                f"time / floor: {', '.join(parts)}"
                + (f"; time / the same matmuls at the batch size alone: {', '.join(alone)}"
                   if alone else "") + ".")
        if r["workload"] == "population":
            lines.append(f"- Population: {extra['models']} models as one population "
                         f"({extra.get('chunk', '?')} per vmap) take "
                         f"{extra.get('population_over_separate', float('nan')):.2f}× the time "
                         f"of {extra['models']} separate JAX trainings; all {extra['models']} "
                         f"in one vmap take {extra['vmap_over_separate']:.2f}×.")
        if r["workload"] == "autoattack" and "torchattacks_robust_accuracy" in extra:
            lines.append(f"- AutoAttack at eps {extra['eps']:g}: robust accuracy "
                         f"{extra['robust_accuracy']:.3f} (JAX) vs "
                         f"{extra['torchattacks_robust_accuracy']:.3f} (torchattacks), the same "
                         f"verdict on {extra['agreement']:.1%} of images.")
        if r["workload"] == "metrics":
            lines.append(f"- Metrics: JAX and numpy scores agree within "
                         f"{extra['max_abs_diff']:.1e}.")
        if r["workload"] in ("fgsm", "pgd") and "agree_with_numpy" in extra:
            if r["workload"] == "pgd":
                lines.append(f"- PGD-{extra.get('steps', 10)}: JAX and numpy agree on "
                             f"{extra['agree_with_numpy']:.2%} of pixels.")
    table += _detect_cell_rows(records)
    versions = sorted({str(r["detail"]["extra"].get("torch")) for _, r in rows.iterrows()
                       if r["detail"]["extra"].get("torch")})
    threads = sorted({r["detail"]["extra"].get("torch_threads") for _, r in rows.iterrows()
                      if r["detail"]["extra"].get("torch_threads")})
    lines.append(f"- torch: {', '.join(versions)} (CPU build, {threads[0]} threads, passive "
                 "OpenMP waiting)" if versions else
                 "- torch: not installed (`make bench-peers` installs the `peers` extra and "
                 "reruns this table).")
    if noisy:
        counts = {w: noisy.count(w) for w in dict.fromkeys(noisy)}
        lines.append(f"- Still noisy after {RERUNS} reruns (rows with a spread > {NOISY:.0%}, "
                     "marked in the table): "
                     + ", ".join(f"{w} ({c} of its rows)" for w, c in counts.items()) + ".")
    note = ("Each workload's implementations run in the same interleaved rounds (round r "
            "times each once, the order rotating), after one compiling call of each JAX row "
            "(numpy and torch compile nothing) and one call of each that sets the number of "
            "rounds (itself the one round where a call is too slow for more); "
            "median, min – max and `rounds` are over those rounds, and spread = (max − min) / "
            f"median. A workload with a spread over {NOISY:.0%} is rerun (up to {RERUNS} times) "
            "and its least noisy attempt kept. Inputs are on the device, each call ended by "
            "block_until_ready. Speed-up = the numpy reference row's median / this row's; vs "
            "torch = the torch row's (same task: torchattacks-style autograd for FGSM, the same "
            "recipe for a minibatch epoch) / this row's (> 1: faster). Rows timed on a subset "
            "are scaled to n, as their note says. 'not installed': torch (the `peers` extra) "
            "is missing.")
    return md(pd.DataFrame(table), note, index=False) + "\n" + "\n".join(lines) + "\n"


def finding(records: pd.DataFrame) -> str | None:
    """The speed-up of the first JAX row over the numpy reference, per workload."""
    parts = []
    for _, r in records_of(records, kind="speed").iterrows():
        impls = r["detail"]["rows"]
        ref = next((i["median_s"] for i in impls if i["ref"]), None)
        mine = next((i for i in impls if i["impl"].startswith("jax")), None)
        if ref and mine and finite(mine["median_s"]) and mine["median_s"] > 0:
            parts.append(f"{r['workload']} {ref / mine['median_s']:.3g}×")
    return ("**Speed-ups of JAX over numpy** (same run): " + ", ".join(parts) + "."
            if parts else None)


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """The workload x implementation table and its notes."""
    return [("Speed: workload × implementation", _table(records))]


EXPERIMENT = Experiment(
    block="speed", Block=Speed, Config=SpeedConfig, schema=schema, cells=cells, tiny=tiny,
    compute=compute, section=section, place=70, finding=finding, redo=lacks_peer,
    fits=lambda cell, spec: (unfit_calibration(spec) if cell.config.workload == "detection"
                             else None))
