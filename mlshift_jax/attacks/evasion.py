"""Test-time attacks: random noise, FGSM, PGD-L∞ and their targeted variants.

Every attack has one signature, so that the runner, the CLI and the tests drive them all from
`ATTACKS`:

    attack(model, params, x, y, *, eps, key=None, lo=None, hi=None, ...) -> x_adv

    model:  a `models.Model` (static under jit: its functions are hashed, not traced)
    params: the model's pytree of weights
    x:      [batch, D] float inputs in [lo, hi], D = prod(model.input_shape)
    y:      [batch] int true labels
    eps:    the L∞ budget; a traced value, so a sweep over eps never recompiles
    key:    a `jax.random` key; required by the random attacks and by every gradient attack on
            a stochastic model (`Model.stochastic`, a randomized defense: fresh randomness
            per example and per step, split from key; ConfigError without one)
    lo, hi: the valid input range; None (the default) takes the model's `input_range`
            (the dataset's: (0.01, 1.0) under the study's MNIST scaling, [0, 1] by default)
    x_adv:  [batch, D], same dtype as x, clipped to [lo, hi]

Each attack is one jitted call over the whole batch. Per-example input gradients are
`jax.vmap(jax.grad(loss, argnums=1))` of the attack's loss (`losses.py`): by default the
softmax cross-entropy on the model's logits (the logit of its outputs where they are
probabilities, as the seed MLP's sigmoid outputs), whatever loss the model was trained with;
`loss="train"` climbs the model's own training loss instead (the study's FGSM, E3), and
`loss="dlr"` the Difference of Logits Ratio (Croce & Hein 2020).
Arguments are checked in Python before jit (eps, lo, hi, step sizes and targets whenever they
are concrete) and a bad one raises `ConfigError`.

`sweep` runs one attack at many eps values in a single compiled call (vmap over eps).
The adaptive attacks (EOT, BPDA, Square, transfer) live in `adaptive.py` and register here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks.losses import check_loss, example_loss
from mlshift_jax.core.checks import finite_inputs, inputs_in_range
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params

# The attack key of a run seeded `seed`: fold_in(key(seed), KEY_STREAM). Training draws from
# key(seed) and its splits (fold_in(k, i) == split(k)[i] for small i), so attacks use a stream
# far from them and never reuse a training key.
KEY_STREAM = 0xA77AC


def attack_key(seed: int) -> jax.Array:
    """The random-attack key of a run seeded `seed` (noise draws, PGD's random start)."""
    return jax.random.fold_in(jax.random.key(seed), KEY_STREAM)


# PGD defaults: Madry et al.'s step size rule 2.5 * eps / steps (= eps / 4 at 10 steps).
PGD_STEPS = 10
PGD_STEP_FACTOR = 2.5


# --- argument checks (Python side, before jit) ------------------------------------------------


def _concrete(value: Any) -> np.ndarray | None:
    """`value` as a numpy array, or None while it is traced (inside jit, vmap or a sweep)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _check_inputs(model: Model, x: Any, y: Any, *,
                  clip: bool = False) -> tuple[jax.Array, jax.Array]:
    """x: [batch, n_in] float, y: [batch] int. Returns both as jax arrays.

    The checks every attack shares: x finite and inside the model's input_range
    (`core.checks.inputs_in_range`: one ConfigError naming the range and the values found,
    or, with clip, clipped and counted in a warning). An attack's own lo / hi only narrow
    where it clips its output."""
    if not isinstance(model, Model):
        raise ConfigError(f"model: expected a models.Model, found {type(model).__name__}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ConfigError(f"x: expected a float array [batch, n_in], found {x.dtype}{x.shape}")
    finite_inputs("x", x)
    x = inputs_in_range("x", x, *model.input_range, clip=clip)
    if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ConfigError(
            f"y: expected int labels of shape ({x.shape[0]},), found {y.dtype}{y.shape}")
    return x, y


def _check_eps(eps: Any, *, ndim: int = 0, name: str = "eps") -> None:
    """eps: a finite value >= 0 (a scalar, or 1-D for a sweep); checked when concrete."""
    value = _concrete(eps)
    if value is None:
        return
    if value.ndim != ndim or value.dtype.kind not in "fiu":  # real numbers only
        shape = "a scalar" if ndim == 0 else "a 1-D array"
        raise ConfigError(f"{name}: expected {shape} of numbers, found {value.dtype}{value.shape}")
    if value.size and not (np.all(np.isfinite(value)) and np.all(value >= 0)):
        raise ConfigError(f"{name}: expected finite values >= 0, found {value.tolist()}")


def _check_range(lo: Any, hi: Any) -> None:
    """lo < hi, both finite scalars; checked when concrete."""
    lo_v, hi_v = _concrete(lo), _concrete(hi)
    for name, v in (("lo", lo_v), ("hi", hi_v)):
        if v is not None and (v.ndim != 0 or v.dtype.kind not in "fiu" or not np.isfinite(v)):
            raise ConfigError(f"{name}: expected a finite scalar, found {v.tolist()!r}")
    if lo_v is not None and hi_v is not None and not lo_v < hi_v:
        raise ConfigError(f"input range: expected lo < hi, found lo={lo_v} >= hi={hi_v}")


def _check_key(key: Any, attack: str) -> None:
    if key is None:
        raise ConfigError(f"{attack}: expected a jax.random key (key=...), found None")


def _check_steps(steps: Any, step_size: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps: expected an int >= 1, found {steps!r}")
    if step_size is not None:
        _check_eps(step_size, name="step_size")


def _check_target(model: Model, params: Params, x: jax.Array, target: Any, attack: str) -> None:
    """target: an int class or [batch] ints in [0, n_out); checked when concrete."""
    if target is None:
        raise ConfigError(f"{attack}: expected a target class (target=...), found None")
    value = _concrete(target)
    if value is None:
        return
    if value.shape not in ((), x.shape[:1]) or not np.issubdtype(value.dtype, np.integer):
        raise ConfigError(f"target: expected an int or ints of shape ({x.shape[0]},), "
                          f"found {value.dtype}{value.shape}")
    apply = (functools.partial(model.apply, key=jax.random.key(0)) if model.stochastic
             else model.apply)
    n_out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    n_out = n_out.shape[-1]
    if value.size and (value.min() < 0 or value.max() >= n_out):
        raise ConfigError(f"target: expected classes in [0, {n_out}), found "
                          f"[{value.min()}, {value.max()}]")


def _bounds(model: Model, lo: Any, hi: Any) -> tuple[Any, Any]:
    """lo and hi, each None replaced by the model's input_range."""
    range_lo, range_hi = model.input_range
    return (range_lo if lo is None else lo), (range_hi if hi is None else hi)


def _prepare(model, x, y, eps, lo, hi):
    """The checks every attack shares; eps, lo, hi cast to x's dtype (one trace per dtype);
    lo / hi None take the model's input_range."""
    x, y = _check_inputs(model, x, y)
    lo, hi = _bounds(model, lo, hi)
    _check_eps(eps)
    _check_range(lo, hi)
    cast = functools.partial(jnp.asarray, dtype=x.dtype)
    return x, y, cast(eps), cast(lo), cast(hi)


# --- the jitted kernels ------------------------------------------------------------------------


def _input_grad(model: Model, params: Params, x: jax.Array, y: jax.Array,
                key: jax.Array | None = None, loss: str = "ce") -> jax.Array:
    """Per-example gradient of the attack loss `loss` (`losses.LOSSES`; "train": the model's
    training loss) w.r.t. the input. x: [batch, n_in] -> same.

    A stochastic model (`Model.stochastic`) gets one fresh key per example, split from `key`.
    """
    fn = example_loss(model, loss)
    if not model.stochastic:
        return jax.vmap(jax.grad(fn, argnums=1), in_axes=(None, 0, 0))(params, x, y)
    keys = jax.random.split(key, x.shape[0])

    def one(p, xi, yi, ki):
        return jax.grad(lambda v: fn(p, v, yi, ki))(xi)

    return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, y, keys)


def check_model_key(model: Model, key: Any, who: str) -> None:
    """ConfigError when `model` is stochastic (a randomized defense) and `key` is None."""
    if getattr(model, "stochastic", False) and key is None:
        raise ConfigError(f"{who}: model {model.name!r} is stochastic (draws fresh randomness "
                          "at every call); expected a jax.random key (key=...), found None")


def input_grad(model: Model, params: Params, x: jax.Array, y: jax.Array,
               key: jax.Array | None = None, *, loss: str = "ce") -> jax.Array:
    """grad_x L(params, x_i, y_i) for every example. x: [batch, n_in], y: [batch].

    L: the attack loss `loss` ("ce" on the logits, "dlr", or "train": `model.loss`).
    key: required when `model.stochastic` (split per example), ignored otherwise.
    """
    check_model_key(model, key, "input_grad")
    return _input_grad_jit(model, check_loss(loss, model), params, x, y, key)


@functools.partial(jax.jit, static_argnames=("model", "loss"))
def _input_grad_jit(model, loss, params, x, y, key):
    return _input_grad(model, params, x, y, key, loss)


@functools.partial(jax.jit, static_argnames=("kind",))
def _noise_kernel(kind: str, x, eps, key, lo, hi):
    if kind == "sign":
        u = jax.random.rademacher(key, x.shape, x.dtype)
    elif kind == "uniform":
        u = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    else:
        u = jax.random.normal(key, x.shape, x.dtype)
    return jnp.clip(x + eps * u, lo, hi)


@functools.partial(jax.jit, static_argnames=("model", "descend", "loss"))
def _fgsm_kernel(model, descend: bool, params, x, labels, eps, lo, hi, key=None, loss="ce"):
    step = -eps if descend else eps
    g = _input_grad(model, params, x, labels, key, loss)
    return jnp.clip(x + step * jnp.sign(g), lo, hi)


@functools.partial(jax.jit, static_argnames=("model", "descend", "steps", "random_start",
                                             "loss"))
def _pgd_kernel(model, descend: bool, steps: int, random_start: bool, params, x, labels, eps,
                step_size, key, lo, hi, loss="ce"):
    if step_size is None:
        step_size = eps * (PGD_STEP_FACTOR / steps)
    step = -step_size if descend else step_size

    def project(xa):  # onto the eps-ball around x, then into [lo, hi]
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), lo, hi)

    x0 = x
    if random_start:
        x0 = x + eps * jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
    # a stochastic model draws its randomness from a stream of its own, fresh at every step
    model_key = jax.random.fold_in(key, 1) if model.stochastic else None

    def body(i, xa):
        k = None if model_key is None else jax.random.fold_in(model_key, i)
        return project(xa + step * jnp.sign(_input_grad(model, params, xa, labels, k, loss)))

    return jax.lax.fori_loop(0, steps, body, project(x0))


# --- the attacks -------------------------------------------------------------------------------


def none(model: Model, params: Params, x, y, *, eps=0.0, key=None, lo=None,
         hi=None) -> jax.Array:
    """The identity: x unchanged ([batch, n_in]); the clean row of every table."""
    x, *_ = _prepare(model, x, y, eps, lo, hi)
    return x


def noise_sign(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
               hi=None) -> jax.Array:
    """x + eps * s, s = ±1 per pixel at random, clipped to [lo, hi]. x: [batch, n_in].

    The study's "randomly generated noise" ("Detection of ML Behavior Changes", Part 4): the
    FGSM step with the gradient's sign replaced by a coin flip, so it is FGSM's control.
    """
    _check_key(key, "noise-sign")
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    return _noise_kernel("sign", x, eps, key, lo, hi)


def noise_uniform(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
                  hi=None) -> jax.Array:
    """x + u, u ~ Uniform[-eps, eps] per pixel, clipped to [lo, hi]. x: [batch, n_in]."""
    _check_key(key, "noise-uniform")
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    return _noise_kernel("uniform", x, eps, key, lo, hi)


def noise_gauss(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
                hi=None) -> jax.Array:
    """x + n, n ~ Normal(0, eps^2) per pixel, clipped to [lo, hi]. x: [batch, n_in].

    Not bounded in L∞: a pixel may move by more than eps (before clipping).
    """
    _check_key(key, "noise-gauss")
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    return _noise_kernel("gauss", x, eps, key, lo, hi)


def fgsm(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
         hi=None, loss: str = "ce") -> jax.Array:
    """Fast Gradient Sign Method: clip(x + eps * sign(grad_x J(params, x, y)), lo, hi).

    Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015;
    the study's input attack. J is the attack loss `loss`: "ce" (default) the cross-entropy
    on the model's logits, "dlr", or "train" the model's own training loss (the study's: for
    the seed MLP the squared error 0.5 * sum((t - out)^2) against 0.01/0.99 targets).
    x: [batch, n_in], y: [batch] -> [batch, n_in]. `key` serves only stochastic models.
    """
    check_model_key(model, key, "fgsm")
    loss = check_loss(loss, model)
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    return _fgsm_kernel(model, False, params, x, y, eps, lo, hi,
                        key if model.stochastic else None, loss)


def fgsm_targeted(model: Model, params: Params, x, y, *, eps, target=None, key=None,
                  lo=None, hi=None, loss: str = "ce") -> jax.Array:
    """Targeted FGSM: clip(x - eps * sign(grad_x J(params, x, target)), lo, hi).

    One step down the loss toward `target` (an int class, or [batch] ints), as in Kurakin,
    Goodfellow & Bengio, "Adversarial Examples in the Physical World", ICLR workshop 2017
    (after Goodfellow et al. 2015). y: [batch] only fixes the batch size. J: the attack loss
    `loss` as in `fgsm`. `key` serves only stochastic models.
    """
    loss = check_loss(loss, model)
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    _check_target(model, params, x, target, "fgsm-targeted")
    check_model_key(model, key, "fgsm-targeted")
    labels = jnp.broadcast_to(jnp.asarray(target, y.dtype), y.shape)
    return _fgsm_kernel(model, True, params, x, labels, eps, lo, hi,
                        key if model.stochastic else None, loss)


def _pgd(name, descend, model, params, x, labels_fn, *, eps, key, lo, hi, steps, step_size,
         random_start, y, loss):
    _check_steps(steps, step_size)
    loss = check_loss(loss, model)
    check_model_key(model, key, name)
    if random_start:
        _check_key(key, name)
    x, y, eps, lo, hi = _prepare(model, x, y, eps, lo, hi)
    labels = labels_fn(x, y)
    if step_size is not None:
        step_size = jnp.asarray(step_size, x.dtype)
    return _pgd_kernel(model, descend, int(steps), bool(random_start), params, x, labels, eps,
                       step_size, key if random_start or model.stochastic else None, lo, hi,
                       loss)


def pgd(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
        steps: int = PGD_STEPS, step_size=None, random_start: bool = True,
        loss: str = "ce") -> jax.Array:
    """Projected gradient descent in L∞ (here ascent on the loss), `steps` FGSM steps.

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018. Starts at a uniform random point of the eps-ball (from
    `key`; `random_start=False` starts at x and needs no key), then repeats
    x <- clip(x + step_size * sign(grad_x J), x - eps, x + eps) clipped to [lo, hi], in one
    `lax.fori_loop`. step_size defaults to 2.5 * eps / steps (eps / 4 at the default 10 steps).
    J: the attack loss `loss` as in `fgsm` ("ce" on the logits by default).
    Returns the last iterate. x: [batch, n_in], y: [batch] -> [batch, n_in].
    """
    return _pgd("pgd", False, model, params, x, lambda x, y: y, eps=eps, key=key, lo=lo, hi=hi,
                steps=steps, step_size=step_size, random_start=random_start, y=y, loss=loss)


def pgd_targeted(model: Model, params: Params, x, y, *, eps, target=None, key=None,
                 lo=None, hi=None, steps: int = PGD_STEPS, step_size=None,
                 random_start: bool = True, loss: str = "ce") -> jax.Array:
    """Targeted PGD-L∞: `pgd` descending the loss toward `target` (int or [batch] ints).

    Madry et al., ICLR 2018; the targeted iterative form of Kurakin et al., 2017.
    """

    def labels_fn(x, y):
        _check_target(model, params, x, target, "pgd-targeted")
        return jnp.broadcast_to(jnp.asarray(target, y.dtype), y.shape)

    return _pgd("pgd-targeted", True, model, params, x, labels_fn, eps=eps, key=key, lo=lo,
                hi=hi, steps=steps, step_size=step_size, random_start=random_start, y=y,
                loss=loss)


# --- the registry ------------------------------------------------------------------------------


class Attack(NamedTuple):
    """A registered attack.

    fn(model, params, x, y, *, eps, key=None, lo, hi, ...) -> x_adv: [batch, n_in]
    needs_key: fn raises ConfigError without `key`.
    targeted: fn takes `target=` (an int class or [batch] ints) and aims at it.
    min_classes: the fewest classes a model may have (fn raises ConfigError below it: the
    DLR loss reads the 3rd largest logit, its targeted form the 4th).
    """

    name: str
    fn: Callable[..., jax.Array]
    needs_key: bool
    targeted: bool
    min_classes: int = 2


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("none", none, False, False),
        Attack("noise-sign", noise_sign, True, False),
        Attack("noise-uniform", noise_uniform, True, False),
        Attack("noise-gauss", noise_gauss, True, False),
        Attack("fgsm", fgsm, False, False),
        Attack("pgd", pgd, True, False),
        Attack("fgsm-targeted", fgsm_targeted, False, True),
        Attack("pgd-targeted", pgd_targeted, True, True),
    )
}


def get_attack(name: str) -> Attack:
    """The registered attack called `name`; ConfigError naming the known ones otherwise."""
    try:
        return ATTACKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}") from None


# --- many eps values at once -------------------------------------------------------------------

_STATIC_KW = frozenset({"steps", "random_start", "restarts", "samples", "queries", "loss",
                        "iterations", "version", "targets", "eot"})


@functools.partial(jax.jit, static_argnames=("fn", "model", "static_kw"))
def _sweep_kernel(fn, model, static_kw, params, x, y, eps_values, dynamic_kw):
    kw = {**dynamic_kw, **dict(static_kw)}
    return jax.vmap(lambda e: fn(model, params, x, y, eps=e, **kw))(eps_values)


def sweep(attack_fn: Attack | Callable[..., jax.Array], model: Model, params: Params, x, y,
          eps_values, **kw) -> jax.Array:
    """One attack at every eps in `eps_values`, as one compiled call (vmap over eps).

    attack_fn: an `Attack` or one of this module's attack functions; kw: its other keywords
    (key, target, lo, hi, steps, ...). The same key serves every eps, so the random attacks
    scale one noise draw. eps_values: [n_eps] -> x_adv: [n_eps, batch, n_in]. Changing the
    eps values (same count) does not recompile.
    """
    fn = attack_fn.fn if isinstance(attack_fn, Attack) else attack_fn
    if not callable(fn):
        raise ConfigError(f"attack_fn: expected an Attack or an attack function, found {fn!r}")
    _check_eps(eps_values, ndim=1, name="eps_values")
    x, y = _check_inputs(model, x, y)
    _check_range(*_bounds(model, kw.get("lo"), kw.get("hi")))
    if "steps" in kw or "step_size" in kw:
        _check_steps(kw.get("steps", PGD_STEPS), kw.get("step_size"))
    if kw.get("target") is not None:
        _check_target(model, params, x, kw["target"], getattr(attack_fn, "name", "sweep"))
    static_kw = tuple(sorted((k, v) for k, v in kw.items() if k in _STATIC_KW))
    dynamic_kw = {k: v for k, v in kw.items() if k not in _STATIC_KW}
    eps_values = jnp.asarray(eps_values, x.dtype)
    return _sweep_kernel(fn, model, static_kw, params, x, y, eps_values, dynamic_kw)


def linf_bounded(name: str) -> bool:
    """Whether attack `name` keeps ‖x_adv - x‖∞ <= eps (all but Gaussian noise)."""
    return get_attack(name).name != "noise-gauss"


# --- is the gradient informative? --------------------------------------------------------------

GRADIENT_ATTACKS = frozenset({"fgsm", "pgd", "fgsm-targeted", "pgd-targeted", "apgd-ce",
                              "apgd-dlr", "apgd-t", "autoattack"})

ZERO_GRAD_TOL = 1e-12  # |d loss / d pixel| at or below this counts as zero
ZERO_GRAD_FLAG = 0.5  # flag when more than this share of pixels has a zero gradient


class GradientMaskingWarning(UserWarning):
    """Most input gradients are (near) zero: gradient attacks cannot move those pixels, so a
    high accuracy under FGSM/PGD says little about robustness (Athalye et al., ICML 2018)."""


@functools.partial(jax.jit, static_argnames=("model",))
def _zero_grad_stats(model: Model, params: Params, x: jax.Array, y: jax.Array, tol: float,
                     key: jax.Array | None = None):
    g = jnp.abs(_input_grad(model, params, x, y, key))
    return jnp.mean(g <= tol), jnp.mean(jnp.all(g <= tol, axis=1))


def gradient_report(model: Model, params: Params, x, y, *, tol: float = ZERO_GRAD_TOL,
                    warn: bool = True, key: jax.Array | None = None) -> dict:
    """How much of the input gradient is (near) zero. x: [batch, n_in], y: [batch].

    Returns {"zero_grad_frac": share of pixels with |grad| <= tol, "zero_grad_images": share
    of images whose whole gradient is <= tol, "gradient_flag": True when zero_grad_frac >
    ZERO_GRAD_FLAG or any image has no gradient at all}; warns `GradientMaskingWarning` when
    flagged (unless `warn=False`). Inputs are checked as every attack checks them; key: the
    randomness of a stochastic model (required for one).
    """
    x, y = _check_inputs(model, x, y)
    if model.stochastic and key is None:
        raise ConfigError(f"gradient_report: model {model.name!r} is stochastic; expected a "
                          "jax.random key (key=...), found None")
    frac, images = (float(v) for v in _zero_grad_stats(model, params, x, y, tol, key))
    flag = frac > ZERO_GRAD_FLAG or images > 0
    if flag and warn:
        import warnings

        warnings.warn(f"{100 * frac:.0f}% of input gradients and {100 * images:.0f}% of "
                      f"images' whole gradients are zero (|grad| <= {tol:g}): gradient "
                      "attacks cannot move them; their accuracy under attack overstates "
                      "robustness", GradientMaskingWarning, stacklevel=2)
    return {"zero_grad_frac": frac, "zero_grad_images": images, "gradient_flag": flag}


# the adaptive attacks (eot-pgd, bpda-pgd, square, transfer), APGD and AutoAttack register
# themselves in ATTACKS
from mlshift_jax.attacks import adaptive as _adaptive  # noqa: E402,F401  (import for its side effect)
from mlshift_jax.attacks import autoattack as _autoattack  # noqa: E402,F401  (the same)
