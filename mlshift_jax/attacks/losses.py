"""The attacks' own losses: on the model's logits, whatever loss the model was trained with.

A model's training loss is the wrong thing to climb for an attack: the study's MLP is trained
on the squared error of sigmoid outputs against 0.01/0.99 targets, and where a wrong class's
output already sits below 0.01 that loss's gradient pushes it the wrong way. The field's
attacks climb a loss on the scores before any squashing (Croce & Hein, "Reliable evaluation
of adversarial robustness with an ensemble of diverse parameter-free attacks", ICML 2020).

    logits(model, params, x: [D], key=None) -> [K]

the model's logits on ONE example: `model.apply` where its outputs are logits, and the logit
log(p) - log(1 - p) of each output where they are probabilities (`zoo.outputs_are_probabilities`:
the seed MLP's sigmoid outputs, exactly its pre-sigmoid activations up to rounding).

Losses on one example's logits z: [K] (scalars, larger = closer to an adversarial example):

- `ce(z, y)`: softmax cross-entropy -log softmax(z)_y;
- `dlr(z, y)`: Difference of Logits Ratio, -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12),
  z_pi the logits sorted in decreasing order (needs K >= 3);
- `dlr_targeted(z, y, t)`: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) (K >= 4);
- `margin(z, y)`: z_y - max_{j != y} z_j (< 0: misclassified), what Square Attack lowers.

`LOSSES` names the choices of a gradient attack's `loss=` keyword: "ce" (the default), "dlr",
and "train", the model's own training loss (`model.loss`, the study's FGSM).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params, outputs_are_probabilities

LOSSES = ("ce", "dlr", "train")
DLR_DENOM = 1e-12  # Croce & Hein's guard in DLR's denominator


def check_loss(loss: Any, model: Model | None = None) -> str:
    """`loss` if it is one of `LOSSES` (and the model has the classes DLR needs); else
    ConfigError naming the choices."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ConfigError(f"loss: expected one of {list(LOSSES)}, found {loss!r}")
    if loss == "dlr" and model is not None and model.n_classes < 3:
        raise ConfigError(f"loss 'dlr': expected a model with at least 3 classes, found "
                          f"{model.n_classes}")
    return loss


def to_logits(model: Model, scores: jax.Array) -> jax.Array:
    """One example's outputs [K] as logits: log(p) - log1p(-p) (p clipped to the open unit
    interval) where the model outputs probabilities, the outputs themselves otherwise."""
    if not outputs_are_probabilities(model):
        return scores
    tiny = jnp.finfo(scores.dtype).tiny
    p = jnp.clip(scores, tiny, 1.0 - jnp.finfo(scores.dtype).epsneg)
    return jnp.log(p) - jnp.log1p(-p)


def logits(model: Model, params: Params, x: jax.Array, key: jax.Array | None = None):
    """The model's logits on one example x: [D] -> [K]; key: its randomness (stochastic
    models only)."""
    scores = model.apply(params, x, key=key) if model.stochastic else model.apply(params, x)
    return to_logits(model, scores)


def ce(z: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of logits z: [K] at label y: -log softmax(z)_y."""
    return -jax.nn.log_softmax(z)[y]


def _others_max(z: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(jnp.arange(z.shape[-1]) == y, -jnp.inf, z))


def margin(z: jax.Array, y: jax.Array) -> jax.Array:
    """z_y - max_{j != y} z_j for logits z: [K] (negative once misclassified)."""
    return z[y] - _others_max(z, y)


def dlr(z: jax.Array, y: jax.Array) -> jax.Array:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 5) of logits z: [K] at label y:
    -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), z_pi sorted decreasing. K >= 3.
    Invariant to shifting and (positive) scaling of the logits."""
    s = jnp.sort(z)[::-1]
    return -margin(z, y) / (s[0] - s[2] + DLR_DENOM)


def dlr_targeted(z: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    """Targeted DLR (Croce & Hein 2020, eq. 6): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2
    + 1e-12) for logits z: [K], label y, target t. K >= 4."""
    s = jnp.sort(z)[::-1]
    return -(z[y] - z[t]) / (s[0] - 0.5 * (s[2] + s[3]) + DLR_DENOM)


def example_loss(model: Model, loss: str):
    """loss_fn(params, x: [D], y, key=None) -> scalar: the attack loss `loss` on one
    example ("train": `model.loss`, with key for a stochastic model)."""
    if loss == "train":
        def train(params, x, y, key=None):
            return model.loss(params, x, y, key=key) if model.stochastic \
                else model.loss(params, x, y)
        return train
    fn = {"ce": ce, "dlr": dlr}[loss]

    def on_logits(params, x, y, key=None):
        return fn(logits(model, params, x, key), y)

    return on_logits
