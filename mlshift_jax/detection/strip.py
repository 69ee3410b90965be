"""STRIP: is this input carrying a trigger? Input-level backdoor detection by superimposition.

Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan Attacks on Deep
Neural Networks", ACSAC 2019. A trigger dominates whatever it is stamped on: superimpose a
suspect input on N clean images and a backdoored model keeps answering the target class
(low entropy of its predictions), while a clean input blended with other images gives varied
answers (high entropy). The score of an input is minus its mean prediction entropy over the
N blends, so that higher means more suspicious (as every detector score in `detect`).

Superimposition adds the two images above the input range's floor and saturates at its top,
as the paper's `cv2.addWeighted(x, 1, clean, 1, 0)` does on pixel values:
blend(x, c) = lo + min((x - lo) + (c - lo), hi - lo).

Shapes: x [B, D] flat inputs; clean [M, D] (held-out clean images, M >= n_blends); scores [B].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.zoo import Model, Params

N_BLENDS = 32  # blends per input (the paper uses N = 100; 32 keeps the ranking, at 1/3 the cost)


def superimpose(x: jax.Array, clean: jax.Array, lo, hi) -> jax.Array:
    """Saturating sum of two images above the floor lo. x, clean: [..., D] -> [..., D]."""
    return lo + jnp.minimum((x - lo) + (clean - lo), hi - lo)


def _entropy(model: Model, scores: jax.Array) -> jax.Array:
    p = model.probs(scores)
    p = p / jnp.sum(p)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


@functools.partial(jax.jit, static_argnames=("model", "n_blends", "batch"))
def _scores(model: Model, params: Params, x: jax.Array, clean: jax.Array, key: jax.Array,
            n_blends: int, batch: int) -> jax.Array:
    lo, hi = (jnp.asarray(v, x.dtype) for v in model.input_range)
    keys = jax.random.split(key, x.shape[0])

    def one(xi, k):
        idx = jax.random.choice(k, clean.shape[0], (n_blends,), replace=False)
        blended = superimpose(xi[None], clean[idx], lo, hi)
        scores = jax.vmap(model.apply, in_axes=(None, 0))(params, blended)
        return -jnp.mean(jax.vmap(functools.partial(_entropy, model))(scores))

    return jax.lax.map(lambda args: one(*args), (x, keys), batch_size=batch)


def strip_scores(model: Model, params: Params, x, clean, *, key: jax.Array,
                 n_blends: int = N_BLENDS, batch: int = 64) -> jax.Array:
    """STRIP score of every input: minus the mean entropy of the model's predictions on
    `n_blends` superimpositions with random clean images (higher = more likely triggered).

    x: [B, D] inputs to judge; clean: [M, D] clean held-out images (M >= n_blends);
    key: which clean images each input is blended with; batch: inputs per vmap (memory:
    batch * n_blends forward passes at once). Returns [B]. Raises ConfigError on bad inputs.
    """
    x, clean = jnp.asarray(x), jnp.asarray(clean)
    d = int(np.prod(model.input_shape))
    for name, a in (("x", x), ("clean", clean)):
        if a.ndim != 2 or a.shape[1] != d or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ConfigError(f"strip: expected {name} float [n, {d}] (images "
                              f"{model.input_shape} flattened), found {a.dtype}{tuple(a.shape)}")
        if not bool(jnp.all(jnp.isfinite(a))):
            raise ConfigError(f"strip: expected finite {name}, found NaN or inf")
    if isinstance(n_blends, bool) or not isinstance(n_blends, int) or n_blends < 1:
        raise ConfigError(f"strip: expected n_blends an int >= 1, found {n_blends!r}")
    if clean.shape[0] < n_blends:
        raise ConfigError(f"strip: expected at least n_blends={n_blends} clean images, found "
                          f"{clean.shape[0]}")
    if x.shape[0] == 0:
        return jnp.zeros((0,), x.dtype)
    return _scores(model, params, x, clean.astype(x.dtype), key, n_blends,
                   max(1, min(int(batch), x.shape[0])))


DETECTORS: tuple[Detector, ...] = (
    Detector("strip", "input", strip_scores, "strip", "Gao et al., ACSAC 2019",
             f"-mean entropy of the outputs on the image superimposed on {N_BLENDS} clean "
             "images"),
)
