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
starts and steps is kept. No clean data is needed. The detection statistic is the largest
r_c scored against the others: Wang et al. fit a null to the other K - 1 statistics (here a
Gamma distribution, scipy's maximum-likelihood fit with location 0) and take the p-value of
the largest under the maximum of K - 1 draws, p = 1 - F(r_max)^(K - 1). `score` returns
-log10 p (larger = more suspicious), which `scan.py` calibrates on the benign null rather
than trusting the parametric p-value.

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
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.zoo import Model, Params

_TINY = 1e-12


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


def p_value(margins) -> tuple[np.ndarray, np.ndarray]:
    """(p, target) of each model: the largest margin's p-value under the maximum of K - 1
    draws from a Gamma fitted (maximum likelihood, location 0) to the other K - 1 margins,
    p = 1 - F(r_max)^(K - 1), and the class of the largest margin. margins: [..., K] ->
    two arrays of shape [...]. Margins are floored at 1e-6 (the Gamma's support)."""
    from scipy import stats

    r = np.maximum(np.asarray(margins, np.float64), 1e-6)
    flat = r.reshape(-1, r.shape[-1])
    k = flat.shape[1]
    ps = np.empty(len(flat))
    for i, row in enumerate(flat):
        top = int(np.argmax(row))
        rest = np.delete(row, top)
        if np.ptp(rest) <= 1e-9 * max(1.0, rest.mean()):  # a degenerate null: no spread
            ps[i] = 0.0 if row[top] > rest.max() * (1 + 1e-6) else 1.0
            continue
        a, _, scale = stats.gamma.fit(rest, floc=0.0)
        ps[i] = -np.expm1((k - 1) * stats.gamma.logcdf(row[top], a, loc=0.0, scale=scale))
    return ps.reshape(r.shape[:-1]), np.argmax(r, -1)


def score(margins) -> tuple[np.ndarray, np.ndarray]:
    """(-log10 p, target) of `p_value` (p floored at 1e-300): larger = more suspicious."""
    p, target = p_value(margins)
    return -np.log10(np.maximum(p, 1e-300)), target


DETECTORS: tuple[Detector, ...] = (
    Detector("mm-bd", "model", score, "MM-BD", "Wang, Mahmood, Yang & Kesidis, IEEE S&P 2024",
             "-log10 p of the largest per-class maximum margin under a Gamma null fitted "
             "to the other classes"),
)
