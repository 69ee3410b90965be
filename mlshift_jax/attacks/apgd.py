"""Auto-PGD (APGD) in L∞: PGD with a step size that tunes itself, on CE or DLR, untargeted
or targeted.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (Algorithm 1). Per image, `iterations` (100) steps:

- start at x + eps * u / max|u|, u ~ U[-1, 1]^D, in [lo, hi];
- step 2 * eps; a momentum step x <- P(x + 0.75 (z - x) + 0.25 (x - x_prev)), z = P(x + step *
  sign(grad)) (the first step without momentum), P the projection onto the eps-ball and
  [lo, hi];
- checkpoints at p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the
  iterations (`checkpoints`); at each one the step halves, and the iterate restarts from the
  best point found so far, where the loss rose on at most 75% of the steps since the last
  checkpoint, or where the step was not halved at the last checkpoint and the best loss has
  not risen since;
- the point of highest loss is kept, and the last iterate that fooled the model.

Losses (`losses.py`, on the model's logits): "ce" (APGD-CE), "dlr" (APGD-DLR) and the
targeted DLR toward each of the `targets` classes ranked 2nd, 3rd, ... by the clean logits
(APGD-T, 9 targets as in AutoAttack's standard version). EOT (`eot` > 1) averages the
gradient over draws of a stochastic model's randomness (AutoAttack's `rand` version, 20).

Shapes: x: [batch, D], y: [batch] -> x_adv: [batch, D]. Each image has its own step size:
the whole loop is written for one image and `jax.vmap`ped over the batch, inside one
`jax.jit` per (model, loss, iterations, eot) with eps, lo, hi traced (a new eps does not
recompile). Where an image is not fooled, x_adv is its point of highest loss. With EOT the
host drops the images already fooled every CHUNK steps (`run`); an image's outcome is the
same, since each image's steps do not depend on the rest of its batch.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import losses
from mlshift_jax.attacks._common import (
    Attack,
    check_int,
    check_key,
    check_model_key,
    concrete,
    prepare,
)
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params

ITERATIONS = 100  # Croce & Hein's n_iter
TARGETS = 9  # APGD-T's target classes (AutoAttack standard)
EOT_ITER = 20  # AutoAttack's rand version: gradient draws per step
MOMENTUM = 0.75  # alpha
RHO = 0.75  # a checkpoint halves the step where at most RHO of the steps raised the loss
P1, DECAY, P_MIN = 0.22, 0.03, 0.06  # the checkpoint schedule


def checkpoints(iterations: int) -> list[int]:
    """The iterations after which APGD checks its step size, in the reference's integer form
    of p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): the first interval is
    max(int(0.22 n), 1) steps, each next one `max(int(0.03 n), 1)` shorter, never below
    max(int(0.06 n), 1). [22, 41, 57, 70, 80, 87, 93, 99] for n = 100 (counted in steps
    done; the check after step s is at loop index s - 1)."""
    first = max(int(P1 * iterations), 1)
    shortest, decr = max(int(P_MIN * iterations), 1), max(int(DECAY * iterations), 1)
    out, at, k = [], 0, first
    while at + k <= iterations:
        at += k
        out.append(at)
        k = max(k - decr, shortest)
    return out


def _value(model, loss, eot, params, y, t, k_model, xa, i):
    """(mean gradient over eot draws, loss and logits of the last draw) at xa: [D]."""
    def one(k):
        def f(v):
            z = losses.logits(model, params, v, k if model.stochastic else None)
            if loss == "ce":
                val = losses.ce(z, y)
            elif loss == "dlr":
                val = losses.dlr(z, y)
            else:
                val = losses.dlr_targeted(z, y, t)
            return val, z
        (val, z), g = jax.value_and_grad(f, has_aux=True)(xa)
        return g, val, z

    if eot == 1 or not model.stochastic:
        return one(jax.random.fold_in(k_model, i))
    g, val, z = jax.vmap(one)(jax.random.split(jax.random.fold_in(k_model, i), eot))
    return jnp.mean(g, 0), val[-1], z[-1]


def _start(model, loss, eot, params, x, y, t, eps, lo, hi, key) -> dict:
    """One image's state before the first step: the random start x0 and its gradient."""
    k_start, k_model = jax.random.split(key)
    u = jax.random.uniform(k_start, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    x0 = jnp.clip(x + eps * u / jnp.max(jnp.abs(u)), lo, hi)
    g0, l0, z0 = _value(model, loss, eot, params, y, t, k_model, x0, 0)
    return dict(
        x=x0, x_old=x0, g=g0, x_best=x0, g_best=g0, l_best=l0, x_adv=x0,
        fooled=jnp.argmax(z0) != y, step=jnp.asarray(2.0, x.dtype) * eps,
        # the reference compares the first step's loss with 0 (its unfilled last row)
        l_prev=jnp.zeros((), x.dtype), n_up=jnp.zeros((), jnp.int32),
        l_best_check=l0, reduced=jnp.asarray(True), k_model=k_model)


def _schedule(iterations: int) -> tuple[jax.Array, jax.Array]:
    """(marks [iterations] bool: a checkpoint ends at step i + 1; windows [iterations]: the
    steps since the previous checkpoint)."""
    marks = np.zeros(iterations, bool)
    windows = np.ones(iterations, np.int32)
    prev = 0
    for c in checkpoints(iterations):
        marks[c - 1], windows[c - 1] = True, c - prev
        prev = c
    return jnp.asarray(marks), jnp.asarray(windows)


def _steps(model, loss, iterations, eot, params, x, y, t, eps, lo, hi, state, start, stop):
    """Steps start .. stop - 1 of APGD on one image x: [D] from `state` (`_start`'s, or a
    previous call's). -> the state after them."""
    marks, windows = _schedule(iterations)

    def project(v):
        return jnp.clip(jnp.clip(v, x - eps, x + eps), lo, hi)

    def body(i, s):
        a = jnp.where(i > 0, MOMENTUM, 1.0).astype(x.dtype)
        z = project(s["x"] + s["step"] * jnp.sign(s["g"]))
        x_new = project(s["x"] + (z - s["x"]) * a + (s["x"] - s["x_old"]) * (1 - a))
        g, val, logits = _value(model, loss, eot, params, y, t, s["k_model"], x_new, i + 1)
        wrong = jnp.argmax(logits) != y
        up = val > s["l_best"]
        s = dict(s, x_old=s["x"], x=x_new, g=g,
                 x_adv=jnp.where(wrong, x_new, s["x_adv"]), fooled=s["fooled"] | wrong,
                 n_up=s["n_up"] + (val > s["l_prev"]), l_prev=val,
                 x_best=jnp.where(up, x_new, s["x_best"]), g_best=jnp.where(up, g, s["g_best"]),
                 l_best=jnp.where(up, val, s["l_best"]))

        def check(s):
            k = windows[i]
            halve = (s["n_up"] <= k * RHO) | (~s["reduced"] & (s["l_best_check"] >= s["l_best"]))
            return dict(s, step=jnp.where(halve, s["step"] / 2, s["step"]),
                        x=jnp.where(halve, s["x_best"], s["x"]),
                        g=jnp.where(halve, s["g_best"], s["g"]),
                        reduced=halve, l_best_check=s["l_best"],
                        n_up=jnp.zeros((), jnp.int32))

        return jax.lax.cond(marks[i], check, lambda s: s, s)

    return jax.lax.fori_loop(start, stop, body, state)


def _result(s: dict) -> tuple[jax.Array, jax.Array]:
    """(x_adv [b, D]: the last fooling iterate where an image was fooled, else its point of
    highest loss; fooled [b])."""
    return jnp.where(s["fooled"][:, None], s["x_adv"], s["x_best"]), s["fooled"]


@functools.partial(jax.jit, static_argnames=("model", "loss", "iterations", "eot"))
def _kernel(model, loss, iterations, eot, params, x, y, t, eps, lo, hi, key):
    """APGD on a batch, vmapped over images, every step on every image (the traced path).
    -> (x_adv [b, D], fooled [b])."""
    keys = jax.random.split(key, x.shape[0])

    def one(xi, yi, ti, ki):
        s = _start(model, loss, eot, params, xi, yi, ti, eps, lo, hi, ki)
        return _steps(model, loss, iterations, eot, params, xi, yi, ti, eps, lo, hi, s, 0,
                      iterations)

    return _result(jax.vmap(one)(x, y, t, keys))


@functools.partial(jax.jit, static_argnames=("model", "loss", "eot"))
def _start_batch(model, loss, eot, params, x, y, t, eps, lo, hi, keys):
    return jax.vmap(lambda xi, yi, ti, ki: _start(model, loss, eot, params, xi, yi, ti, eps,
                                                  lo, hi, ki))(x, y, t, keys)


@functools.partial(jax.jit, static_argnames=("model", "loss", "iterations", "eot"))
def _steps_batch(model, loss, iterations, eot, params, x, y, t, eps, lo, hi, state, start,
                 stop):
    return jax.vmap(lambda xi, yi, ti, si: _steps(model, loss, iterations, eot, params, xi, yi,
                                                  ti, eps, lo, hi, si, start, stop))(
        x, y, t, state)


CHUNK = 10  # steps between the host's looks at which images are still standing


def _on_host(model, loss, iterations, eot, params, x, y, t, eps, lo, hi, key):
    """The same steps per image as `_kernel` (the same keys, the same global step numbers),
    but every CHUNK steps the host drops the images already fooled: an image's outcome
    (fooled or not) and the points it visits up to being fooled do not depend on which
    other images share its batch, and a fooled image stays fooled. The batch is re-cut only
    where it halves (`bucket_size`), so at most log2(b / 64) + 2 shapes compile."""
    n = int(x.shape[0])
    keys = jax.random.split(key, n)
    state = _start_batch(model, loss, eot, params, x, y, t, eps, lo, hi, keys)
    alive = np.flatnonzero(~np.asarray(state["fooled"]))
    idx, size = np.arange(n), n  # the batch the kernel runs on (padded) and its size
    for start in range(0, iterations, CHUNK):
        if alive.size == 0:
            break
        if bucket_size(alive.size, n) <= size // 2:
            size = bucket_size(alive.size, n)
            idx = np.concatenate([alive, np.full(size - alive.size, alive[0], alive.dtype)])
        sub = jax.tree_util.tree_map(lambda a, i=idx: a[i], state)
        sub = _steps_batch(model, loss, iterations, eot, params, x[idx], y[idx], t[idx], eps,
                           lo, hi, sub, start, min(start + CHUNK, iterations))
        state = jax.tree_util.tree_map(lambda a, b, i=idx: a.at[i].set(b), state, sub)
        alive = np.flatnonzero(~np.asarray(state["fooled"]))
    return _result(state)


@functools.partial(jax.jit, static_argnames=("model",))
def clean_logits(model, params, x, key):
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: losses.logits(model, params, xi,
                                                 ki if model.stochastic else None))(x, keys)


def ranked_targets(model: Model, params: Params, x, key, n: int) -> jax.Array:
    """APGD-T's targets: per image the classes ranked 2nd .. (n+1)-th by the clean logits.
    x: [b, D] -> [n, b] ints."""
    z = clean_logits(model, params, x, key)
    order = jnp.argsort(-z, axis=1)
    return order[:, 1:n + 1].T


def check_common(name: str, model: Model, key: Any, iterations: Any, eot: Any) -> None:
    """The checks every APGD variant shares (key, iterations >= 1, eot >= 1)."""
    check_key(key, name)
    check_model_key(model, key, name)
    check_int(iterations, "iterations")
    check_int(eot, "eot")


def run(model: Model, params: Params, x, y, t, *, loss: str, eps, key, lo, hi,
        iterations: int = ITERATIONS, eot: int = 1):
    """One APGD run (arrays already checked and cast). -> (x_adv [b, D], fooled [b]).
    With EOT (eot > 1 on a stochastic model: every step costs eot gradients) and concrete
    arrays, the host drops the fooled images every CHUNK steps (`_on_host`: the same
    outcome per image); otherwise, and always inside jit or a sweep, every step runs on
    every image in one compiled call (`_kernel`: one compile, where `_on_host` compiles a
    few batch shapes, which only pays off when steps are expensive)."""
    if (eot == 1 or not model.stochastic or concrete(eps) is None or concrete(x) is None
            or concrete(t) is None):
        return _kernel(model, loss, int(iterations), int(eot), params, x, y, t, eps, lo, hi,
                       key)
    return _on_host(model, loss, int(iterations), int(eot), params, x, y, t, eps, lo, hi, key)


def _apgd(name, loss, model, params, x, y, *, eps, key, lo, hi, iterations, eot, restarts):
    check_common(name, model, key, iterations, eot)
    check_int(restarts, "restarts")
    if model.n_classes < 3 and loss == "dlr":
        raise ConfigError(f"{name}: expected a model with at least 3 classes (DLR), found "
                          f"{model.n_classes}")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    best, fooled = run(model, params, x, y, y, loss=loss, eps=eps, key=key, lo=lo, hi=hi,
                       iterations=iterations, eot=eot)
    for r in range(1, restarts):
        cand, f = run(model, params, x, y, y, loss=loss, eps=eps,
                      key=jax.random.fold_in(key, 1000 + r), lo=lo, hi=hi,
                      iterations=iterations, eot=eot)
        take = f & ~fooled
        best = jnp.where(take[:, None], cand, best)
        fooled = fooled | f
    return best


def apgd_ce(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
            iterations: int = ITERATIONS, restarts: int = 1, eot: int = 1) -> jax.Array:
    """APGD-CE: Auto-PGD on the cross-entropy of the logits (Croce & Hein, ICML 2020).
    x: [batch, D], y: [batch] -> [batch, D]; `restarts` random starts (a later one kept
    where it fools an image the earlier ones did not); eot: gradient draws per step on a
    stochastic model."""
    return _apgd("apgd-ce", "ce", model, params, x, y, eps=eps, key=key, lo=lo, hi=hi,
                 iterations=iterations, eot=eot, restarts=restarts)


def apgd_dlr(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
             iterations: int = ITERATIONS, restarts: int = 1, eot: int = 1) -> jax.Array:
    """APGD-DLR: Auto-PGD on the Difference of Logits Ratio (Croce & Hein, ICML 2020),
    invariant to the logits' scale. At least 3 classes. x: [batch, D] -> [batch, D]."""
    return _apgd("apgd-dlr", "dlr", model, params, x, y, eps=eps, key=key, lo=lo, hi=hi,
                 iterations=iterations, eot=eot, restarts=restarts)


def apgd_t(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
           iterations: int = ITERATIONS, targets: int = TARGETS, eot: int = 1) -> jax.Array:
    """APGD-T: Auto-PGD on the targeted DLR loss toward each of the `targets` classes ranked
    2nd, 3rd, ... by the clean logits, in turn; an image fooled by one target keeps that
    point (Croce & Hein, ICML 2020; 9 targets in AutoAttack). At least 4 classes; targets
    in [1, n_classes - 1]. x: [batch, D], y: [batch] -> [batch, D].

    Inside jit (a traced eps, `evasion.sweep`) every target runs on every image; called
    directly, each target runs only on the images no earlier target fooled."""
    check_common("apgd-t", model, key, iterations, eot)
    if model.n_classes < 4:
        raise ConfigError(f"apgd-t: expected a model with at least 4 classes (targeted DLR), "
                          f"found {model.n_classes}")
    targets = check_int(targets, "targets", 1, model.n_classes - 1)
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    best, _ = targeted(model, params, x, y, eps=eps, key=key, lo=lo, hi=hi,
                       iterations=iterations, targets=targets, eot=eot)
    return best


def targeted(model, params, x, y, *, eps, key, lo, hi, iterations, targets, eot,
             active=None):
    """APGD-T's loop over targets (arrays checked). active: [b] bool, the images to attack
    (default all). -> (x_adv [b, D], fooled [b])."""
    order = ranked_targets(model, params, x, jax.random.fold_in(key, 77), targets)
    best = x
    fooled = jnp.zeros(x.shape[0], bool)
    active = jnp.ones(x.shape[0], bool) if active is None else active
    on_host = concrete(eps) is not None and concrete(x) is not None
    for r in range(targets):
        k = jax.random.fold_in(key, r)
        if on_host:
            todo = np.flatnonzero(np.asarray(active & ~fooled))
            if todo.size == 0:
                break
            cand, f = on_subset(lambda xs, ys, ts, kk: run(
                model, params, xs, ys, ts, loss="dlr-t", eps=eps, key=kk, lo=lo, hi=hi,
                iterations=iterations, eot=eot), todo, k, x, y, order[r])
            best = best.at[todo].set(cand)
            fooled = fooled.at[todo].set(f)
        else:
            cand, f = run(model, params, x, y, order[r], loss="dlr-t", eps=eps, key=k,
                          lo=lo, hi=hi, iterations=iterations, eot=eot)
            take = active & ~fooled & (f | (r == 0))
            best = jnp.where(take[:, None], cand, best)
            fooled = fooled | (f & active)
    return best, fooled


BUCKET = 64  # subsets are padded to 64 * 2^k images (or all n): each size is one compile of
# every attack that runs on it (1-5 s on 2 cores), while a padded image costs little below 64
# (a step's fixed cost dominates there); the defense table at n = 500 compiled a fresh
# shape at nearly every eps with the finer 16 / 24 * 2^k sizes


def bucket_size(m: int, n: int) -> int:
    """The padded size of a subset of m images out of n: the smallest of 64, 128, 256, ...
    that is >= m, at most n."""
    size = BUCKET
    while size < m:
        size *= 2
    return min(size, n)


def on_subset(fn, idx: np.ndarray, key, *arrays):
    """fn(*(a[idx] for a in arrays), key) on the images `idx` only, padded (repeating the
    first one) to `bucket_size`; returns fn's outputs cut back to len(idx)."""
    n = int(arrays[0].shape[0])
    m = len(idx)
    size = bucket_size(m, n)
    pad = np.concatenate([idx, np.full(size - m, idx[0], idx.dtype)])
    out = fn(*(a[pad] for a in arrays), key)
    return tuple(o[:m] for o in out)


CROCE_HEIN = ("Croce & Hein, \"Reliable evaluation of adversarial robustness with an ensemble "
               "of diverse parameter-free attacks\", ICML 2020")
_STATIC = ("iterations", "restarts", "eot")

RECORDS: tuple[Attack, ...] = (
    Attack("apgd-ce", apgd_ce, "APGD-CE", CROCE_HEIN, needs_key=True, uses_gradient=True,
           static=_STATIC),
    Attack("apgd-dlr", apgd_dlr, "APGD-DLR", CROCE_HEIN, needs_key=True, uses_gradient=True,
           static=_STATIC, min_classes=3),
    Attack("apgd-t", apgd_t, "APGD-T", CROCE_HEIN, needs_key=True, uses_gradient=True,
           static=("iterations", "targets", "eot"), min_classes=4),
)
