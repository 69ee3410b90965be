"""Adaptive attacks: the attacks a defense must survive before its robustness is believed.

Same signature as `evasion.py` (`RECORDS`, assembled into `attacks.ATTACKS`):

    attack(model, params, x, y, *, eps, key, lo, hi, steps, restarts, ...) -> x_adv

- `eot-pgd`: PGD on the mean input gradient over `samples` draws of the model's randomness
  (Expectation over Transformation); `restarts` random starts, the worst kept per example.
  Athalye, Engstrom, Ilyas & Kwok, "Synthesizing Robust Adversarial Examples", ICML 2018;
  Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018.
- `bpda-pgd`: PGD with the defense's preprocessing replaced by the identity on the backward
  pass (Backward Pass Differentiable Approximation, a `jax.custom_vjp`), with EOT over
  `samples` where it is random. Athalye, Carlini & Wagner, ICML 2018.
- `square`: Square Attack L∞: random square-shaped ±eps updates kept when the margin loss
  falls; needs only the model's scores (`queries` forward passes). Andriushchenko, Croce,
  Flammarion & Hein, ECCV 2020.
- `transfer`: PGD crafted on the undefended model (`defenses.base_of`, with `source_params`
  when its weights differ, e.g. adversarial training), applied to the defended one.
  Papernot et al. 2017; Athalye et al. 2018.

All are one jitted call over the batch with explicit keys: the same key gives the same
x_adv. On a model that draws no randomness, `eot-pgd` with `restarts=1` is `evasion.pgd`
exactly (same key, same start, same steps); on a model with no preprocessing (or an identity
one), `bpda-pgd` is too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import defenses, losses
from mlshift_jax.attacks._common import (
    PGD_STEP_FACTOR,
    PGD_STEPS,
    Attack,
    batch_input_grad,
    check_count,
    check_key,
    check_steps,
    concrete,
    prepare,
)
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params, affine_split

EOT_SAMPLES = 8
SQUARE_QUERIES = 1000
SQUARE_P_INIT = 0.3  # Andriushchenko et al.'s value for MNIST


# --- BPDA: the preprocessing, identity on the way back ---------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _straight_through(pre, x, key):
    return pre(x, key)


def _st_fwd(pre, x, key):
    return pre(x, key), None


def _st_bwd(pre, _, g):
    return g, None


_straight_through.defvjp(_st_fwd, _st_bwd)


@functools.cache
def bpda_model(model: Model) -> Model:
    """`model` with its defense's preprocessing replaced by the identity on the backward
    pass (forward unchanged). A model that is not a `defenses` wrapper is returned as is."""
    d = defenses.info(model)
    if d is None or d.pre is None:  # undefended, or a defense in the weights
        return model
    base = bpda_model(d.base)
    approx = functools.partial(_straight_through, d.pre)
    wrapped = defenses.preprocessed(base, lambda x, key: approx(x, key),
                                    defense=f"{d.defense}-bpda", stochastic=d.pre_stochastic,
                                    options=d.options)
    return wrapped


# --- the PGD engine shared by eot-pgd, bpda-pgd and transfer ---------------------------------


def _eot_grad(model, params, x, y, key, samples):
    """Mean over `samples` draws of the per-example input gradient (one draw, exactly
    `_common.batch_input_grad`, for a model without randomness)."""
    if not model.stochastic:
        return batch_input_grad(model, params, x, y)
    keys = jax.random.split(key, samples)
    grads = jax.vmap(lambda k: batch_input_grad(model, params, x, y, k))(keys)
    return jnp.mean(grads, axis=0)


def _expected_loss_and_error(model, params, x, y, key, samples):
    """Per-example mean attack loss (cross-entropy on the logits) and error rate over
    `samples` draws. -> ([b], [b])."""
    def one(k):
        keys = jax.random.split(k, x.shape[0])
        if model.stochastic:
            z = jax.vmap(lambda xi, ki: losses.logits(model, params, xi, ki))(x, keys)
        else:
            z = jax.vmap(lambda xi: losses.logits(model, params, xi))(x)
        loss = jax.vmap(losses.ce)(z, y)
        return loss, (jnp.argmax(z, -1) != y).astype(x.dtype)

    n = samples if model.stochastic else 1
    loss, err = jax.vmap(one)(jax.random.split(key, n))
    return jnp.mean(loss, 0), jnp.mean(err, 0)


@functools.partial(jax.jit, static_argnames=("grad_model", "eval_model", "steps", "restarts",
                                             "samples", "random_start"))
def _pgd_engine(grad_model, eval_model, steps, restarts, samples, random_start, params,
                eval_params, x, y, eps, step_size, key, lo, hi):
    """PGD-L∞ ascent on grad_model's loss (EOT over `samples` draws), `restarts` random
    starts; per example the start whose result eval_model gets most wrong (then highest
    loss) is kept. Restart 0 uses `key` as `evasion.pgd` does."""
    if step_size is None:
        step_size = eps * (PGD_STEP_FACTOR / steps)

    def project(xa):
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), lo, hi)

    def one_restart(k):
        x0 = x
        if random_start:
            x0 = x + eps * jax.random.uniform(k, x.shape, x.dtype, minval=-1.0, maxval=1.0)
        model_key = jax.random.fold_in(k, 1)

        def body(i, xa):
            g = _eot_grad(grad_model, params, xa, y, jax.random.fold_in(model_key, i), samples)
            return project(xa + step_size * jnp.sign(g))

        return jax.lax.fori_loop(0, steps, body, project(x0))

    if restarts == 1:
        return one_restart(key)
    best = one_restart(key)
    k_eval = jax.random.fold_in(key, 2)
    loss, err = _expected_loss_and_error(eval_model, eval_params, best, y, k_eval, samples)
    score = err * 1e6 + loss
    for r in range(1, restarts):
        cand = one_restart(jax.random.fold_in(key, 1000 + r))
        loss, err = _expected_loss_and_error(eval_model, eval_params, cand, y, k_eval, samples)
        s = err * 1e6 + loss
        better = s > score
        best = jnp.where(better[:, None], cand, best)
        score = jnp.where(better, s, score)
    return best


def _run_pgd(name, grad_model, eval_model, params, eval_params, x, y, *, eps, key, lo, hi,
             steps, step_size, restarts, samples, random_start):
    check_steps(steps, step_size)
    check_count(restarts, "restarts")
    check_count(samples, "samples")
    check_key(key, name)
    x, y, eps, lo, hi = prepare(eval_model, x, y, eps, lo, hi)
    if step_size is not None:
        step_size = jnp.asarray(step_size, x.dtype)
    return _pgd_engine(grad_model, eval_model, int(steps), int(restarts), int(samples),
                       bool(random_start), params, eval_params, x, y, eps, step_size, key,
                       lo, hi)


def eot_pgd(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
            steps: int = PGD_STEPS, step_size=None, restarts: int = 1,
            samples: int = EOT_SAMPLES, random_start: bool = True) -> jax.Array:
    """PGD on the expectation over the model's randomness (EOT).

    Each step averages the input gradient over `samples` fresh draws of the model's
    randomness (a randomized defense), then takes a sign step; `restarts` random starts, per
    example the one that fools the model most often (over `samples` draws) is kept. On a
    deterministic model with restarts=1 it equals `evasion.pgd` (same key). x: [batch, D],
    y: [batch] -> [batch, D]. Athalye, Engstrom, Ilyas & Kwok, ICML 2018.
    """
    return _run_pgd("eot-pgd", model, model, params, params, x, y, eps=eps, key=key, lo=lo,
                    hi=hi, steps=steps, step_size=step_size, restarts=restarts,
                    samples=samples, random_start=random_start)


def bpda_pgd(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
             steps: int = PGD_STEPS, step_size=None, restarts: int = 1,
             samples: int = EOT_SAMPLES, random_start: bool = True) -> jax.Array:
    """PGD with Backward Pass Differentiable Approximation: the defense's preprocessing
    (`defenses.info(model).pre`: quantization, a median filter, a denoiser, random resizing)
    runs forward, and its backward pass is the identity (`jax.custom_vjp`); EOT over
    `samples` draws where the preprocessing is random. Restarts are scored on the real
    defended model. Athalye, Carlini & Wagner, ICML 2018. x: [batch, D] -> [batch, D].
    """
    return _run_pgd("bpda-pgd", bpda_model(model), model, params, params, x, y, eps=eps,
                    key=key, lo=lo, hi=hi, steps=steps, step_size=step_size,
                    restarts=restarts, samples=samples, random_start=random_start)


def transfer(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
             steps: int = PGD_STEPS, step_size=None, restarts: int = 1,
             source_params: Params | None = None, random_start: bool = True) -> jax.Array:
    """PGD crafted on the undefended model (`defenses.base_of(model)`), with its own weights
    `source_params` (default: `params`, right for the preprocessing defenses; pass the
    undefended weights for adversarial training). A transfer (black-box) attack: if it
    beats white-box PGD on the defended model, the defense masks gradients.
    x: [batch, D] -> [batch, D]. Papernot et al. 2017; Athalye et al. 2018.
    """
    source = defenses.base_of(model)
    src = params if source_params is None else source_params
    return _run_pgd("transfer", source, source, src, src, x, y, eps=eps, key=key, lo=lo,
                    hi=hi, steps=steps, step_size=step_size, restarts=restarts, samples=1,
                    random_start=random_start)


# --- Square Attack --------------------------------------------------------------------------


def _margin(model, params, x, y, key):
    """logit_y - max_{j != y} logit_j per example (< 0: misclassified). x: [b, D] -> [b]."""
    if model.stochastic:
        keys = jax.random.split(key, x.shape[0])
        z = jax.vmap(lambda xi, ki: losses.logits(model, params, xi, ki))(x, keys)
    else:
        z = jax.vmap(lambda xi: losses.logits(model, params, xi))(x)
    return jax.vmap(losses.margin)(z, y)


SQUARE_MARKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves past each (of 10k)
# squares of at most this share of the pixels update w @ x from their columns; larger ones
# recompute it: on 2 CPU cores (800 images, hidden 200) gathering s^2 columns per image cost
# 0.3-1.9 ms a query for s = 1..4 and as much as the whole product (about 4 ms) from s = 5
INCREMENTAL_SHARE = 1 / 40


def square_sides(p_init: float, queries: int, h: int, w: int) -> tuple[tuple[int, int], ...]:
    """Andriushchenko et al.'s piecewise-constant schedule as ((queries, side), ...) stretches
    in order: p = p_init halving past each of SQUARE_MARKS on the iteration rescaled to
    10,000 (the reference's `p_selection`), side = round(sqrt(p * h * w)) in 1..min(h, w)-1
    (float32, as the reference computes it on the image's dtype)."""
    stretches: list[list[int]] = []
    for i in range(queries):
        halvings = sum((i * 10_000) // queries > m for m in SQUARE_MARKS)
        p = np.float32(p_init) / np.float32(2.0 ** halvings)
        side = int(np.clip(np.round(np.sqrt(p * np.float32(h * w))), 1, min(h, w) - 1))
        if stretches and stretches[-1][1] == side:
            stretches[-1][0] += 1
        else:
            stretches.append([1, side])
    return tuple((n, side) for n, side in stretches)


@functools.partial(jax.jit, static_argnames=("model", "queries", "restarts", "p_init",
                                             "incremental"))
def square_kernel(model, queries, restarts, params, x, y, eps, key, lo, hi, p_init,
                  incremental=True):
    """Square Attack on checked arrays (see `square`). With `incremental` (the default) and a
    model whose first layer is affine (`zoo.affine_split`), a query's scores come from the
    stored pre-activations plus the changed square's pixels times their columns of the
    weights (s^2 columns, not all D; s^2 <= INCREMENTAL_SHARE * D), resynchronised at each
    stretch of the schedule; the random draws and so the squares tried are the same either
    way, the margins equal to float rounding."""
    h, w, c = model.input_shape
    b = x.shape[0]
    img = x.reshape(b, h, w, c)
    split = affine_split(model) if incremental and lo.ndim == hi.ndim == 0 else None

    def cut(a, top, left, side):  # [b, h, w, ...] -> each image's square [b, side, side, ...]
        return jax.vmap(lambda ai, r, q: jax.lax.dynamic_slice(
            ai, (r, q) + (0,) * (ai.ndim - 2), (side, side) + ai.shape[2:]))(a, top, left)

    put = jax.vmap(lambda a, v, r, q: jax.lax.dynamic_update_slice(a, v, (r, q, 0)))
    if split is not None:
        weights, bias, rest = split(params)
        columns = weights.T.reshape(h, w, c, -1)  # [h, w, c, hidden]: each pixel's column

        def pre_of(xb):  # [b, h, w, c] -> [b, hidden]
            pre = xb.reshape(b, -1) @ weights.T
            return pre if bias is None else pre + bias

        def margin_of_pre(pre):
            z = jax.vmap(lambda v: losses.to_logits(model, rest(v)))(pre)
            return jax.vmap(losses.margin)(z, y)

    def query(ki, side, x_best):
        """One square per image: (new window, old window, top, left, margin key)."""
        k_r, k_c, k_v, k_m = jax.random.split(ki, 4)
        top = jax.random.randint(k_r, (b, 1, 1, 1), 0, h - side + 1).reshape(b)
        left = jax.random.randint(k_c, (b, 1, 1, 1), 0, w - side + 1).reshape(b)
        vals = eps * jax.random.rademacher(k_v, (b, 1, 1, c), x.dtype)
        xw, old = cut(img, top, left, side), cut(x_best, top, left, side)
        new = jnp.clip(xw + vals, lo, hi)
        # a square that changes nothing wastes the query: as the reference does
        # (resampling until the window changes), take the opposite sign there
        same = ~jnp.any(jnp.abs(new - old) >= 1e-7, axis=(1, 2, 3))
        new = jnp.where(same[:, None, None, None], jnp.clip(xw - vals, lo, hi), new)
        return new, old, top, left, k_m

    def full_step(side):
        def body(i, carry):
            x_best, m_best, k_loop = carry
            new, _, top, left, k_m = query(jax.random.fold_in(k_loop, i), side, x_best)
            x_new = put(x_best, new, top, left)
            m_new = (margin_of_pre(pre_of(x_new)) if split is not None else
                     _margin(model, params, x_new.reshape(b, -1), y, k_m))
            better = m_new < m_best
            return (jnp.where(better[:, None, None, None], x_new, x_best),
                    jnp.where(better, m_new, m_best), k_loop)
        return body

    def incremental_step(side):
        def body(i, carry):
            x_best, m_best, pre_best, k_loop = carry
            new, old, top, left, _ = query(jax.random.fold_in(k_loop, i), side, x_best)
            cols = jax.vmap(lambda r, q: jax.lax.dynamic_slice(  # [b, side, side, c, hidden]
                columns, (r, q, 0, 0), (side, side, c, columns.shape[-1])))(top, left)
            pre_new = pre_best + jnp.einsum("bijc,bijch->bh", new - old, cols)
            m_new = margin_of_pre(pre_new)
            better = m_new < m_best
            x_best = put(x_best, jnp.where(better[:, None, None, None], new, old), top, left)
            return (x_best, jnp.where(better, m_new, m_best),
                    jnp.where(better[:, None], pre_new, pre_best), k_loop)
        return body

    def one_restart(k):
        k_init, k_loop = jax.random.split(k)
        stripes = eps * jax.random.rademacher(k_init, (b, 1, w, c), x.dtype)
        x_best = jnp.clip(img + stripes, lo, hi)
        m_best = _margin(model, params, x_best.reshape(b, -1), y, jax.random.fold_in(k_init, 1))
        start = 0
        for n, side in square_sides(p_init, queries, h, w):
            if split is not None and side * side <= INCREMENTAL_SHARE * h * w:
                x_best, m_best, _, _ = jax.lax.fori_loop(
                    start, start + n, incremental_step(side),
                    (x_best, m_best, pre_of(x_best), k_loop))
            else:
                x_best, m_best, _ = jax.lax.fori_loop(start, start + n, full_step(side),
                                                      (x_best, m_best, k_loop))
            start += n
        return x_best.reshape(b, -1), m_best

    x_best, m_best = one_restart(key)
    for r in range(1, restarts):
        x_r, m_r = one_restart(jax.random.fold_in(key, 1000 + r))
        better = m_r < m_best
        x_best = jnp.where(better[:, None], x_r, x_best)
        m_best = jnp.where(better, m_r, m_best)
    return x_best


def square(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
           queries: int = SQUARE_QUERIES, restarts: int = 1,
           p_init: float = SQUARE_P_INIT) -> jax.Array:
    """Square Attack in L∞ (score-based, gradient-free).

    Starts from vertical stripes of ±eps, then `queries` times changes one random square
    (side sqrt(p * H * W), p halving on Andriushchenko et al.'s schedule from `p_init`,
    rescaled to `queries` as the reference's `p_selection`) to a random ±eps per channel
    (the opposite sign where that would change nothing), and keeps the change where the
    margin on the logits (`losses.margin`) falls. The defaults are the matrix's cheap
    setting; AutoAttack's standard one is queries=5000, p_init=0.8 (`autoattack.py`).
    Image shape from `model.input_shape`. Andriushchenko, Croce, Flammarion & Hein,
    "Square Attack: a query-efficient black-box adversarial attack via random search",
    ECCV 2020. x: [batch, D], y: [batch] -> [batch, D].
    """
    check_key(key, "square")
    check_count(queries, "queries")
    check_count(restarts, "restarts")
    p_value = concrete(p_init)
    if p_value is not None and not (p_value.ndim == 0 and p_value.dtype.kind in "fiu"
                                    and 0 < float(p_value) <= 1):
        raise ConfigError(f"p_init: expected a number in (0, 1], found {p_init!r}")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    return square_kernel(model, int(queries), int(restarts), params, x, y, eps, key, lo, hi,
                          float(p_init))


_ATHALYE = ("Athalye, Carlini & Wagner, \"Obfuscated Gradients Give a False Sense of "
            "Security\", ICML 2018")

RECORDS: tuple[Attack, ...] = (
    Attack("eot-pgd", eot_pgd, "EOT-PGD",
           "Athalye, Engstrom, Ilyas & Kwok, \"Synthesizing Robust Adversarial Examples\", "
           "ICML 2018; " + _ATHALYE, needs_key=True, uses_gradient=True,
           static=("steps", "restarts", "samples", "random_start")),
    Attack("bpda-pgd", bpda_pgd, "BPDA-PGD", _ATHALYE, needs_key=True,
           static=("steps", "restarts", "samples", "random_start")),
    Attack("square", square, "Square",
           "Andriushchenko, Croce, Flammarion & Hein, \"Square Attack: a query-efficient "
           "black-box adversarial attack via random search\", ECCV 2020", needs_key=True,
           box="black", static=("queries", "restarts", "p_init")),
    Attack("transfer", transfer, "transfer",
           "Papernot, McDaniel, Goodfellow, Jha, Celik & Swami, \"Practical Black-Box Attacks "
           "against Machine Learning\", AsiaCCS 2017; " + _ATHALYE, needs_key=True,
           box="black", static=("steps", "restarts", "random_start"), surrogate=True),
)
