"""Reference-free backdoor statistic with no trigger-shape assumption: the maximum margin.

MM-BD (Wang, Mahmood, Yang & Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks
with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024,
arXiv 2205.06900). A backdoor makes its target class reachable with an unusually large
margin: the trigger drives the target's score far above every other class's, whatever the
trigger's shape (patch, blend, sparse pixels, warp). For each class c,

    r_c = max_{x in [lo, hi]^D}  log p_c(x) - max_{k != c} log p_k(x)

(the logit margin for a softmax model; log p is the model's normalised output, so a
sigmoid-output MLP's margin is not capped at 1), found by projected gradient ascent
(x = lo + (hi - lo) * sigmoid(v), Adam on v) from `starts` random points; the largest over
starts and steps is kept. No clean data is needed. Wang et al. score the largest r_c
against the model's other K - 1 classes (a Gamma null fitted to them). Benign models have
naturally easy classes too, so `scan-model` instead scores each class against the SAME class
over its null of benign models (`class_score`, `class_null`: the robust z of the log margin)
and calibrates that score's tail p-value on the null: on the development population this
found 1% backdoors the within-model Gamma statistic missed (`class_null`'s docstring).

Everything is one jitted call: `vmap` over classes and starts; `margins_population` maps
over models (`lax.map`). Shapes: margins [K] (one model), [M, K] (a population).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import class_null
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.zoo import Model, Params

_TINY = 1e-12
SIGN = 1.0  # a large margin is suspicious (`class_null`'s sign)


class MarginConfig(NamedTuple):
    """Settings of the margin search (hashable: a static argument of the jit). steps: Adam
    steps; starts: random starting points per class; lr: Adam's rate on the logits v."""

    steps: int = 200
    starts: int = 8
    lr: float = 0.1

    def validate(self) -> MarginConfig:
        for name in ("steps", "starts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"mm-bd: expected {name} an integer >= 1, found {value!r}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"mm-bd: expected lr a finite number > 0, found {self.lr!r}")
        return self


DEFAULT = MarginConfig()


def margin(model: Model, params: Params, x: jax.Array, c) -> jax.Array:
    """log p_c(x) - max_{k != c} log p_k(x) of one flat image x [D] (model.probs
    normalised to sum to 1, floored at 1e-12)."""
    p = model.probs(model.apply(params, x))
    logp = jnp.log(jnp.maximum(p / jnp.sum(p), _TINY))
    others = jnp.where(jnp.arange(logp.shape[-1]) == c, -jnp.inf, logp)
    return logp[c] - jnp.max(others)


def _one_model(model: Model, cfg: MarginConfig, params: Params, key: jax.Array) -> jax.Array:
    lo, hi = (jnp.asarray(v, jnp.float32) for v in model.input_range)
    k, d = model.n_classes, int(np.prod(model.input_shape))
    v0 = jax.random.normal(key, (k, cfg.starts, d), jnp.float32)
    cls = jnp.broadcast_to(jnp.arange(k)[:, None], (k, cfg.starts))
    opt = optax.adam(cfg.lr)

    def total(v):
        x = lo + (hi - lo) * jax.nn.sigmoid(v)
        m = jax.vmap(jax.vmap(lambda xi, ci: margin(model, params, xi, ci)))(x, cls)
        return -jnp.sum(m), m

    def step(carry, _):
        v, s, best = carry
        grads, m = jax.grad(total, has_aux=True)(v)
        updates, s = opt.update(grads, s, v)
        return (optax.apply_updates(v, updates), s, jnp.maximum(best, m)), None

    best0 = jnp.full((k, cfg.starts), -jnp.inf, jnp.float32)
    v, _, best = jax.lax.scan(step, (v0, opt.init(v0), best0), None, length=cfg.steps)[0]
    last = total(v)[1]
    return jnp.max(jnp.maximum(best, last), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _margins(model: Model, cfg: MarginConfig, params: Params, key: jax.Array) -> jax.Array:
    return _one_model(model, cfg, params, key)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _margins_models(model: Model, cfg: MarginConfig, stacked: Params,
                    key: jax.Array) -> jax.Array:
    return jax.lax.map(lambda p: _one_model(model, cfg, p, key), stacked)


def _check_model(model: Model) -> None:
    if not isinstance(model, Model):
        raise ConfigError(f"mm-bd: expected a models.Model, found {type(model).__name__}")
    if model.n_classes < 3:
        raise ConfigError(f"mm-bd: expected at least 3 classes (the largest margin is scored "
                          f"against the others), found {model.n_classes}")


def max_margins(model: Model, params: Params, *, key: jax.Array,
                config: MarginConfig = DEFAULT) -> jax.Array:
    """The maximum margin r_c of every class of one model -> [K] (module docstring).
    key: the random starts. ConfigError for bad settings or fewer than 3 classes."""
    _check_model(model)
    return _margins(model, config.validate(), params, key)


def margins_population(model: Model, stacked_params: Params, *, key: jax.Array,
                       config: MarginConfig = DEFAULT) -> jax.Array:
    """`max_margins` for stacked params (leaves [M, ...]) -> [M, K], one compiled call
    (`lax.map` over the models, each with the same starts)."""
    _check_model(model)
    return _margins_models(model, config.validate(), stacked_params, key)


def compile_margins(model: Model, params: Params, *, key: jax.Array,
                    config: MarginConfig = DEFAULT):
    """`max_margins`'s compiled call, for timing: -> a function of no arguments."""
    _check_model(model)
    compiled = _margins.lower(model, config.validate(), params, key).compile()
    return functools.partial(compiled, params, key)


class_score = class_null.scorer(SIGN, "maximum margin", "MM-BD")


DETECTORS: tuple[Detector, ...] = (
    Detector("mm-bd", "model", class_score, "MM-BD",
             "Wang, Mahmood, Yang & Kesidis, IEEE S&P 2024",
             "largest robust z of a class's log maximum margin against the same class in a "
             "null of benign models"),
)
