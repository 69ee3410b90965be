"""FAB-T in L∞: the targeted Fast Adaptive Boundary attack, as AutoAttack's standard version
runs it.

Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary
Attack", ICML 2020 (Algorithm 1, targeted form of Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", ICML 2020:
9 target classes, 1 restart, 100 steps, alpha_max 0.1, eta 1.05, beta 0.9).

Per image x_0 (label y) and target class t, from x_1 = x_0, `steps` times:

- linearise f = z_t - z_y (the model's logits, `losses.logits`) at x_1: the hyperplane
  pi = {v : f(x_1) + <grad f(x_1), v - x_1> = 0};
- d_1, d_2: the smallest L∞ moves from x_1 and from x_0 onto pi that stay in the box
  [lo, hi] (`project`; the closest feasible point where pi is out of reach);
- alpha = min(|d_1|∞ / (|d_1|∞ + |d_2|∞), alpha_max), the bias toward the original point;
- x_1 <- clip((1 - alpha) (x_1 + eta d_1) + alpha (x_0 + eta d_2), lo, hi) (eta: overshoot);
- where x_1 is misclassified it is kept if closer to x_0 than every earlier one, and
  x_1 <- x_0 + beta (x_1 - x_0) (the backward step).

The targets are the classes ranked 2nd .. (targets+1)-th by the clean logits
(`apgd.ranked_targets`); a restart after the first starts from x_0 + (eps / 2) u / |u|∞,
u ~ U[-1, 1]^D. An image counts as fooled where its closest adversarial point is within eps
(L∞); the first target (then restart) to fool it gives x_adv, x itself elsewhere and on
images the model already gets wrong. The runs never read eps (only the random restarts and
the final test do), so every target and restart runs on every image, in one jitted call
per (model, steps, targets, restarts), vmapped over images and runs, eps, lo, hi traced.

Shapes: x: [batch, D], y: [batch] -> x_adv: [batch, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlshift_jax.attacks import apgd, losses
from mlshift_jax.attacks._common import (
    Attack,
    check_eps,
    check_int,
    check_key,
    check_model_key,
    concrete,
    prepare,
)
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.train import map_chunks
from mlshift_jax.models.zoo import Model, Params, affine_split

STEPS = 100  # AutoAttack's FAB-T n_iter
TARGETS = 9  # n_target_classes
ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
MIN_NORM = 1e-8  # the reference's floor on |d|∞ in alpha's ratio
LANE_BYTES = 2**20  # CPU: runs stepped together hold about this much per [runs, D] array


def project(t: jax.Array, w: jax.Array, b: jax.Array, lo, hi) -> jax.Array:
    """The smallest L∞ move d from t: [D] onto the hyperplane <w, v> = b with t + d in
    [lo, hi]^D; where the box does not reach the hyperplane, the move to the box's corner
    closest to it. -> d: [D], 0 where w is 0.

    Moving coordinate i by at most lam toward the hyperplane closes
    G(lam) = sum_i |w_i| min(lam, room_i) of the gap c = |<w, t> - b|, room_i the distance
    to the box's face in that direction. G is concave, piecewise linear and increasing, so
    Newton's method from lam = 0 climbs it from below, each step landing on the root or in a
    later linear piece: exact after at most D steps (a few in practice), no sort needed."""
    gap = jnp.dot(w, t) - b
    sign = jnp.where(gap >= 0, 1.0, -1.0).astype(t.dtype)
    ws = w * sign  # now moving along -sign(ws) closes the gap c >= 0
    c = gap * sign
    room = jnp.where(ws > 0, t - lo, hi - t)
    aw = jnp.abs(ws)
    out_of_reach = c >= jnp.sum(aw * room)

    def unfinished(s):
        return ~s[1] & (s[2] < t.shape[0])

    def newton(s):
        lam, _, k = s
        closed = jnp.sum(aw * jnp.minimum(lam, room))
        slope = jnp.sum(jnp.where(room > lam, aw, 0))
        step = jnp.where(slope > 0, (c - closed) / jnp.where(slope > 0, slope, 1), 0)
        return lam + jnp.maximum(step, 0), ~(step > 0), k + 1

    lam, _, _ = jax.lax.while_loop(unfinished, newton,
                                   (jnp.zeros((), t.dtype), out_of_reach, 0))
    lam = jnp.where(out_of_reach, jnp.inf, lam)
    return jnp.where(ws != 0, -jnp.sign(ws) * jnp.minimum(lam, room), 0).astype(t.dtype)


def _one_run(model, steps, params, x0, y, t, start, lo, hi, alpha_max, eta, beta, key):
    """FAB toward target t from `start` on one image x0: [D]. -> (closest adversarial
    point [D], its L∞ distance to x0, inf where none was found).

    On a deterministic model whose first layer is affine (`zoo.affine_split`), the
    pre-activations of each new point are carried to the next step (the backward step is a
    convex combination, and so are its pre-activations): two products with the first layer
    per step (the point's, the gradient's) instead of three."""
    split = None if key is not None else affine_split(model)
    if split is not None:
        weights, bias, rest = split(params)

        def pre_of(v):
            return weights @ v if bias is None else weights @ v + bias

        def logits_of(pre, k):
            return losses.to_logits(model, rest(pre))

        def grad_of(pre1, k):  # gap and its input gradient through the stored pre
            f, g = jax.value_and_grad(lambda p_: gap_of(logits_of(p_, k)))(pre1)
            return f, g @ weights
    else:
        def pre_of(v):
            return v

        def logits_of(v, k):
            return losses.logits(model, params, v, k)

        def grad_of(pre1, k):  # here the pre-activations are the point itself
            return jax.value_and_grad(lambda v: gap_of(logits_of(v, k)))(pre1)

    def gap_of(z):  # z_t - z_y (>= 0 once classified t or beyond y)
        return z[t] - z[y]

    def body(i, s):
        x1, pre1, adv, res = s
        k1, k2 = ((None, None) if key is None
                  else jax.random.split(jax.random.fold_in(key, i)))
        f, w = grad_of(pre1, k1)
        b = jnp.dot(w, x1) - f
        d1 = project(x1, w, b, lo, hi)
        d2 = project(x0, w, b, lo, hi)
        a1 = jnp.maximum(jnp.max(jnp.abs(d1)), MIN_NORM)
        a2 = jnp.maximum(jnp.max(jnp.abs(d2)), MIN_NORM)
        alpha = jnp.clip(a1 / (a1 + a2), 0, alpha_max)
        x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, lo, hi)
        pre1 = pre_of(x1)
        fooled = jnp.argmax(logits_of(pre1, k2)) != y
        norm = jnp.max(jnp.abs(x1 - x0))
        closer = fooled & (norm < res)
        adv = jnp.where(closer, x1, adv)
        res = jnp.where(closer, norm, res)
        x1 = jnp.where(fooled, x0 + beta * (x1 - x0), x1)
        pre1 = jnp.where(fooled, pre0 + beta * (pre1 - pre0), pre1)
        return x1, pre1, adv, res

    inf = jnp.asarray(jnp.inf, x0.dtype)
    pre0 = pre_of(x0)
    _, _, adv, res = jax.lax.fori_loop(0, steps, body, (start, pre_of(start), x0, inf))
    return adv, res


def images_per_group(n_runs: int, d: int) -> int:
    """Images whose runs step together: on a CPU, as many as keep each [runs, D] array of
    the step within LANE_BYTES (the projections' Newton passes then read it from cache:
    FAB-T on 800 images took 10.4 s in groups of 37 against 17.5 s all at once, quiet 2
    cores); on an accelerator, all at once."""
    if jax.default_backend() != "cpu":
        return 1 << 30
    return max(1, LANE_BYTES // (4 * d * max(1, n_runs)))


@functools.partial(jax.jit, static_argnames=("model", "steps", "restarts", "group"))
def _kernel(model, steps, restarts, params, x, y, targets, eps, lo, hi, alpha_max, eta, beta,
            key, group):
    """Every (target, restart) run on every image, `group` images at a time. targets: [n, b]
    -> (closest adversarial points [b, n * restarts, D], their L∞ distances
    [b, n * restarts] (inf: none found), clean image classified right [b]); `pick` turns them
    into (x_adv, fooled) at an eps."""
    n, b = targets.shape
    k_start, k_model, k_clean = jax.random.split(key, 3)
    stochastic = model.stochastic

    def image(xi, yi, ti, i):
        def run(t, r):
            start = xi
            if restarts > 1:  # with one run per target, nothing before the final test reads
                # eps: a sweep over eps (a vmap) then runs each target once, not per eps
                u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k_start, i), r),
                                       xi.shape, xi.dtype, -1.0, 1.0)
                rand = jnp.clip(xi + 0.5 * eps * u / jnp.max(jnp.abs(u)), lo, hi)
                start = jnp.where(r > 0, rand, xi)
            km = (jax.random.fold_in(jax.random.fold_in(k_model, i), t * restarts + r)
                  if stochastic else None)
            return _one_run(model, steps, params, xi, yi, t, start, lo, hi, alpha_max, eta,
                            beta, km)

        ts = jnp.repeat(ti, restarts)
        rs = jnp.tile(jnp.arange(restarts), n)
        advs, res = jax.vmap(run)(ts, rs)  # [n * restarts, D], in the reference's order
        kc = jax.random.fold_in(k_clean, i) if stochastic else None
        right = jnp.argmax(losses.logits(model, params, xi, kc)) == yi
        return advs, res, right

    return map_chunks(lambda g: jax.vmap(image)(*g), (x, y, targets.T, jnp.arange(b)), group)


@jax.jit
def pick(x, advs, res, right, eps):
    """x_adv: the first run (in target, then restart order) whose closest adversarial point
    is within eps, x where none is or the clean image is wrong; -> (x_adv [b, D], fooled
    [b]). x: [b, D]; advs, res, right: `_kernel`'s."""
    ok = res <= eps
    first = jnp.argmax(ok, axis=1)
    fooled = jnp.take_along_axis(ok, first[:, None], axis=1)[:, 0] & right
    chosen = jnp.take_along_axis(advs, first[:, None, None], axis=1)[:, 0]
    return jnp.where(fooled[:, None], chosen, x), fooled


def runs(model: Model, params: Params, x, y, *, key, lo, hi, steps: int = STEPS,
         targets: int = TARGETS, restarts: int = 1, alpha_max=ALPHA_MAX, eta=ETA, beta=BETA,
         eps=0.0):
    """Every FAB-T run on checked arrays, before any eps test: (closest adversarial points
    [b, targets * restarts, D], their L∞ distances [b, targets * restarts], clean image right
    [b]); `pick(x, *runs(...), eps)` is `targeted` at that eps. With restarts=1 nothing here
    reads eps (restarts start within eps / 2), so one set of runs serves every eps."""
    key = jax.random.key(0) if key is None else key
    order = apgd.ranked_targets(model, params, x, jax.random.fold_in(key, 77), targets)
    cast = functools.partial(jnp.asarray, dtype=x.dtype)
    group = images_per_group(int(order.shape[0]) * int(restarts), int(x.shape[-1]))
    return _kernel(model, int(steps), int(restarts), params, x, y, order, cast(eps), lo, hi,
                   cast(alpha_max), cast(eta), cast(beta), key, group)


def targeted(model: Model, params: Params, x, y, *, eps, key, lo, hi, steps: int = STEPS,
             targets: int = TARGETS, restarts: int = 1, alpha_max=ALPHA_MAX, eta=ETA,
             beta=BETA):
    """FAB-T on checked arrays (`prepare`d; key a jax key, fixed or not). -> (x_adv [b, D],
    fooled [b] bool: misclassified within eps)."""
    return pick(x, *runs(model, params, x, y, key=key, lo=lo, hi=hi, steps=steps,
                         targets=targets, restarts=restarts, alpha_max=alpha_max, eta=eta,
                         beta=beta, eps=eps), eps)


def fab_t(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
          steps: int = STEPS, targets: int | None = None, restarts: int = 1,
          alpha_max=ALPHA_MAX, eta=ETA, beta=BETA) -> jax.Array:
    """FAB-T, L∞ (Croce & Hein, ICML 2020): per image, the closest adversarial point the
    targeted Fast Adaptive Boundary attack finds toward each of the `targets` classes ranked
    2nd, 3rd, ... by the clean logits; kept where within eps of x, x elsewhere.

    x: [batch, D] in the model's input range, y: [batch] -> x_adv: [batch, D] in [lo, hi].
    steps: iterations per run (100); targets: in [1, n_classes - 1] (None: 9, AutoAttack's
    number, or every other class where the model has fewer than 10); restarts: runs per
    target, the later ones from a random point within eps / 2 (1: deterministic, no key
    needed); alpha_max in [0, 1], eta >= 1, beta in [0, 1]. key: required for restarts > 1
    and for a stochastic model. ConfigError for a bad argument (steps < 1, targets out of
    range, a model with fewer than 2 classes, ...)."""
    check_int(steps, "steps")
    check_int(restarts, "restarts")
    if model.n_classes < 2:
        raise ConfigError(f"fab-t: expected a model with at least 2 classes, found "
                          f"{model.n_classes}")
    if targets is None:
        targets = min(TARGETS, model.n_classes - 1)
    targets = check_int(targets, "targets", 1, model.n_classes - 1)
    check_model_key(model, key, "fab-t")
    if restarts > 1:
        check_key(key, "fab-t")
    for name, value, low, high in (("alpha_max", alpha_max, 0, 1), ("eta", eta, 1, None),
                                   ("beta", beta, 0, 1)):
        check_eps(value, name=name)
        v = concrete(value)
        if v is not None and (v < low or (high is not None and v > high)):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{name}: expected a value {span}, found {v}")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    x_adv, _ = targeted(model, params, x, y, eps=eps, key=key, lo=lo, hi=hi, steps=steps,
                        targets=targets, restarts=restarts, alpha_max=alpha_max, eta=eta,
                        beta=beta)
    return x_adv


RECORDS: tuple[Attack, ...] = (
    Attack("fab-t", fab_t, "FAB-T",
           "Croce & Hein, \"Minimally distorted Adversarial Examples with a Fast Adaptive "
           "Boundary Attack\", ICML 2020", uses_gradient=True,
           static=("steps", "targets", "restarts")),
)
