"""MI-FGSM: iterative FGSM with a momentum term on the L1-normalised gradient (L∞).

Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018
(Algorithm 1). From x_0 = x, `steps` (T = 10) times:

    g_{t+1} = decay * g_t + grad_x J(x_t, y) / ||grad_x J(x_t, y)||_1      (per example)
    x_{t+1} = clip(x_t + step_size * sign(g_{t+1}), x - eps, x + eps), clipped to [lo, hi]

with g_0 = 0, decay mu = 1.0 and step_size alpha = eps / steps (the paper's eps / T). An example
whose gradient is exactly 0 adds nothing to g (the paper's division is undefined there).
J: the attack loss `loss` as in `evasion.fgsm` ("ce" on the logits by default).
Shapes: x: [batch, D], y: [batch] -> x_adv: [batch, D]; one jitted call, eps traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlshift_jax.attacks._common import (
    Attack,
    batch_input_grad,
    check_eps,
    check_model_key,
    check_steps,
    prepare,
)
from mlshift_jax.attacks.losses import check_loss
from mlshift_jax.models.zoo import Model, Params

STEPS = 10  # the paper's T
DECAY = 1.0  # the paper's mu


@functools.partial(jax.jit, static_argnames=("model", "steps", "loss"))
def _kernel(model, steps, loss, params, x, y, eps, step_size, decay, key, lo, hi):
    if step_size is None:
        step_size = eps / steps

    def project(xa):  # onto the eps-ball around x, then into [lo, hi]
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), lo, hi)

    def body(i, carry):
        xa, g = carry
        k = None if key is None else jax.random.fold_in(key, i)
        grad = batch_input_grad(model, params, xa, y, k, loss)
        l1 = jnp.sum(jnp.abs(grad), axis=1, keepdims=True)
        g = decay * g + jnp.where(l1 > 0, grad / jnp.where(l1 > 0, l1, 1), 0)
        return project(xa + step_size * jnp.sign(g)), g

    return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))[0]


def mifgsm(model: Model, params: Params, x, y, *, eps, key=None, lo=None, hi=None,
           steps: int = STEPS, step_size=None, decay=DECAY, loss: str = "ce") -> jax.Array:
    """Momentum Iterative FGSM in L∞ (Dong et al., CVPR 2018): `steps` sign steps of
    `step_size` (default eps / steps) along the momentum g <- decay * g + grad / ||grad||_1,
    each projected onto the eps-ball around x and into [lo, hi]. No random start: `key`
    serves only a stochastic model (fresh randomness per step). x: [batch, D], y: [batch]
    -> [batch, D]. ConfigError for a bad argument (steps < 1, decay < 0, ...)."""
    check_steps(steps, step_size)
    check_eps(decay, name="decay")
    loss = check_loss(loss, model)
    check_model_key(model, key, "mi-fgsm")
    x, y, eps, lo, hi = prepare(model, x, y, eps, lo, hi)
    cast = functools.partial(jnp.asarray, dtype=x.dtype)
    return _kernel(model, int(steps), loss, params, x, y, eps,
                   None if step_size is None else cast(step_size), cast(decay),
                   key if model.stochastic else None, lo, hi)


RECORDS: tuple[Attack, ...] = (
    Attack("mi-fgsm", mifgsm, "MI-FGSM",
           "Dong, Liao, Pang, Su, Zhu, Hu & Li, \"Boosting Adversarial Attacks with "
           "Momentum\", CVPR 2018", uses_gradient=True, static=("steps", "loss")),
)
