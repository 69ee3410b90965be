"""Test-time attacks: random noise, FGSM, PGD-L∞ and their targeted variants.

Every attack has one signature, so that the runner, the CLI and the tests drive them all from
`attacks.ATTACKS`:

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
The argument checks, the input gradient and the PGD kernel live in `_common.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlshift_jax.attacks._common import (
    PGD_STEPS,
    Attack,
    batch_input_grad,
    bounds,
    check_eps,
    check_inputs,
    check_key,
    check_model_key,
    check_range,
    check_steps,
    check_target,
    pgd_kernel,
    prepare,
)
from mlshift_jax.attacks.losses import check_loss
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params

# The attack key of a run seeded `seed`: fold_in(key(seed), KEY_STREAM). Training draws from
# key(seed) and its splits (fold_in(k, i) == split(k)[i] for small i), so attacks use a stream
# far from them and never reuse a training key.
KEY_STREAM = 0xA77AC


def attack_key(seed: int) -> jax.Array:
    """The random-attack key of a run seeded `seed` (noise draws, PGD's random start)."""
    return jax.random.fold_in(jax.random.key(seed), KEY_STREAM)


# --- the jitted kernels ------------------------------------------------------------------------


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
    return batch_input_grad(model, params, x, y, key, loss)


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
    g = batch_input_grad(model, params, x, labels, key, loss)
    return jnp.clip(x + step * jnp.sign(g), lo, hi)


# --- the attacks -------------------------------------------------------------------------------


def none(model: Model, params: Params, x, y, *, eps=0.0, key=None, lo=None,
         hi=None) -> jax.Array:
    """The identity: x unchanged ([batch, n_in]); the clean row of every table."""
    x, *_ = prepare(model, x, y, eps, lo, hi)
    return x


def noise_sign(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
               hi=None) -> jax.Array:
    """x + eps * s, s = ±1 per pixel at random, clipped to [lo, hi]. x: [batch, n_in].

    The study's "randomly generated noise" ("Detection of ML Behavior Changes", Part 4): the
    FGSM step with the gradient's sign replaced by a coin flip, so it is FGSM's control.
    """
    check_key(key, "noise-sign")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    return _noise_kernel("sign", x, eps, key, lo, hi)


def noise_uniform(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
                  hi=None) -> jax.Array:
    """x + u, u ~ Uniform[-eps, eps] per pixel, clipped to [lo, hi]. x: [batch, n_in]."""
    check_key(key, "noise-uniform")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    return _noise_kernel("uniform", x, eps, key, lo, hi)


def noise_gauss(model: Model, params: Params, x, y, *, eps, key=None, lo=None,
                hi=None) -> jax.Array:
    """x + n, n ~ Normal(0, eps^2) per pixel, clipped to [lo, hi]. x: [batch, n_in].

    Not bounded in L∞: a pixel may move by more than eps (before clipping).
    """
    check_key(key, "noise-gauss")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
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
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
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
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    check_target(model, params, x, target, "fgsm-targeted")
    check_model_key(model, key, "fgsm-targeted")
    labels = jnp.broadcast_to(jnp.asarray(target, y.dtype), y.shape)
    return _fgsm_kernel(model, True, params, x, labels, eps, lo, hi,
                        key if model.stochastic else None, loss)


def _pgd(name, descend, model, params, x, labels_fn, *, eps, key, lo, hi, steps, step_size,
         random_start, y, loss):
    check_steps(steps, step_size)
    loss = check_loss(loss, model)
    check_model_key(model, key, name)
    if random_start:
        check_key(key, name)
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    labels = labels_fn(x, y)
    if step_size is not None:
        step_size = jnp.asarray(step_size, x.dtype)
    return pgd_kernel(model, descend, int(steps), bool(random_start), params, x, labels, eps,
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
        check_target(model, params, x, target, "pgd-targeted")
        return jnp.broadcast_to(jnp.asarray(target, y.dtype), y.shape)

    return _pgd("pgd-targeted", True, model, params, x, labels_fn, eps=eps, key=key, lo=lo,
                hi=hi, steps=steps, step_size=step_size, random_start=random_start, y=y,
                loss=loss)


# --- the registry ------------------------------------------------------------------------------


# --- the records ------------------------------------------------------------------------------

_GOODFELLOW = ("Goodfellow, Shlens & Szegedy, \"Explaining and Harnessing Adversarial "
               "Examples\", ICLR 2015")
_MADRY = ("Madry, Makelov, Schmidt, Tsipras & Vladu, \"Towards Deep Learning Models Resistant "
          "to Adversarial Attacks\", ICLR 2018")
_KURAKIN = ("Kurakin, Goodfellow & Bengio, \"Adversarial Examples in the Physical World\", "
            "ICLR workshop 2017")
_STUDY = "\"Detection of ML Behavior Changes\", Part 4 (the study's random-noise control)"

RECORDS: tuple[Attack, ...] = (
    Attack("none", none, "clean", "the identity (no change)", category="none", box="none"),
    Attack("noise-sign", noise_sign, "noise ±eps", _STUDY, category="input-noise",
           needs_key=True, box="none"),
    Attack("noise-uniform", noise_uniform, "noise U[-eps, eps]", _STUDY,
           category="input-noise", needs_key=True, box="none"),
    Attack("noise-gauss", noise_gauss, "noise N(0, eps²)", _STUDY, category="input-noise",
           needs_key=True, box="none", linf_bounded=False),
    Attack("fgsm", fgsm, "FGSM", _GOODFELLOW, uses_gradient=True, static=("loss",)),
    Attack("pgd", pgd, "PGD", _MADRY, needs_key=True, uses_gradient=True,
           static=("steps", "random_start", "loss")),
    Attack("fgsm-targeted", fgsm_targeted, "FGSM (targeted)", _KURAKIN, targeted=True,
           uses_gradient=True, static=("loss",)),
    Attack("pgd-targeted", pgd_targeted, "PGD (targeted)", _MADRY, needs_key=True,
           targeted=True, uses_gradient=True, static=("steps", "random_start", "loss")),
)

# --- many eps values at once -------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("fn", "model", "static_kw"))
def _sweep_kernel(fn, model, static_kw, params, x, y, eps_values, dynamic_kw):
    kw = {**dynamic_kw, **dict(static_kw)}
    return jax.vmap(lambda e: fn(model, params, x, y, eps=e, **kw))(eps_values)


def sweep(attack: Attack, model: Model, params: Params, x, y, eps_values, **kw) -> jax.Array:
    """One attack at every eps in `eps_values`, as one compiled call (vmap over eps).

    attack: an `Attack` (`attacks.ATTACKS`); kw: its other keywords (key, target, lo, hi,
    steps, ...); those in `attack.static` are static under jit. The same key serves every
    eps, so the random attacks scale one noise draw. eps_values: [n_eps] -> x_adv:
    [n_eps, batch, n_in]. Changing the eps values (same count) does not recompile.
    ConfigError for an attack that is not an `Attack` record, or a bad argument.
    """
    if not isinstance(attack, Attack):
        raise ConfigError(f"attack: expected an Attack (attacks.ATTACKS[name]), found {attack!r}")
    check_eps(eps_values, ndim=1, name="eps_values")
    x, y = check_inputs(model, x, y)
    check_range(*bounds(model, kw.get("lo"), kw.get("hi")))
    if "steps" in kw or "step_size" in kw:
        check_steps(kw.get("steps", PGD_STEPS), kw.get("step_size"))
    if kw.get("target") is not None:
        check_target(model, params, x, kw["target"], attack.name)
    static_kw = tuple(sorted((k, v) for k, v in kw.items() if k in attack.static))
    dynamic_kw = {k: v for k, v in kw.items() if k not in attack.static}
    eps_values = jnp.asarray(eps_values, x.dtype)
    return _sweep_kernel(attack.fn, model, static_kw, params, x, y, eps_values, dynamic_kw)


# --- is the gradient informative? --------------------------------------------------------------

ZERO_GRAD_TOL = 1e-12  # |d loss / d pixel| at or below this counts as zero
ZERO_GRAD_FLAG = 0.5  # flag when more than this share of pixels has a zero gradient


class GradientMaskingWarning(UserWarning):
    """Most input gradients are (near) zero: gradient attacks cannot move those pixels, so a
    high accuracy under FGSM/PGD says little about robustness (Athalye et al., ICML 2018)."""


@functools.partial(jax.jit, static_argnames=("model",))
def _zero_grad_stats(model: Model, params: Params, x: jax.Array, y: jax.Array, tol: float,
                     key: jax.Array | None = None):
    g = jnp.abs(batch_input_grad(model, params, x, y, key))
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
    x, y = check_inputs(model, x, y)
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
