"""The categorizer: from a fingerprint, name the change.

Categories (`CATEGORIES`): none / input-noise / adversarial-input / wrong-label /
trigger-only / backdoor (trigger + relabel). `CATEGORY_OF` maps the harness's change kinds
(attack names, poisoning names) onto them.

Inputs (`categorizer_inputs`): the fingerprint's scalar features (`fingerprint.FEATURES`) as
z-scores against the reference's own null distribution (clean retrains), so that features of
different references share one scale, then compressed by sign(z) * log(1 + |z|) (a change can
sit hundreds of null standard deviations out; the log keeps one feature from swamping the
rest).

Classifier: multinomial logistic regression with an L2 penalty, in JAX: inputs standardized
by the training cells' mean and standard deviation, classes weighted to equal total weight,
full-batch Adam on the mean cross-entropy for a fixed number of steps inside one `lax.scan`.
Transparent: `Categorizer.weights` [F, K] reads as "how much feature f pushes toward category
k", in training standard deviations. `cross_validate` holds out one *seed* at a time (every
cell generated with that seed: its reference, its retrains, its changed inputs), never single
rows, and trains all folds at once (`vmap` over folds, held-out rows weighted 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.fingerprint import FEATURES, Null

CATEGORIES = ("none", "input-noise", "adversarial-input", "wrong-label", "trigger-only",
              "backdoor")
CATEGORY_OF = {
    "clean": "none", "none": "none",
    "noise-sign": "input-noise", "noise-uniform": "input-noise", "noise-gauss": "input-noise",
    "fgsm": "adversarial-input", "pgd": "adversarial-input",
    "fgsm-targeted": "adversarial-input", "pgd-targeted": "adversarial-input",
    "eot-pgd": "adversarial-input", "bpda-pgd": "adversarial-input",
    "square": "adversarial-input", "transfer": "adversarial-input",
    "wrong-label": "wrong-label", "trigger": "trigger-only", "mixture": "backdoor",
    "blended": "backdoor", "sparse": "backdoor", "sig": "backdoor", "warp": "backdoor",
}
L2 = 1e-2
STEPS = 600
LEARNING_RATE = 0.05


def category_of(kind: str) -> str:
    """The category of a change kind (an attack or poisoning name)."""
    try:
        return CATEGORY_OF[kind]
    except KeyError:
        raise ConfigError(f"categorize: expected a change kind among {sorted(CATEGORY_OF)}, "
                          f"found {kind!r}") from None


def categorizer_inputs(features, null: Null) -> np.ndarray:
    """sign(z) log(1 + |z|) of the null z-scores. features: [m, F] in `null.names` order."""
    z = null.zscores(features)
    return np.sign(z) * np.log1p(np.abs(z))


# --- multinomial logistic regression -------------------------------------------------------------


def _fit(x: jax.Array, onehot: jax.Array, w: jax.Array, l2: float, steps: int):
    """Weighted multinomial logistic regression. x: [n, F], onehot: [n, K], w: [n] >= 0.

    Returns (weights [F, K], bias [K], center [F], scale [F]); traceable (vmap over folds).
    """
    wsum = jnp.maximum(jnp.sum(w), 1e-12)
    center = (w @ x) / wsum
    scale = jnp.sqrt((w @ (x - center) ** 2) / wsum)
    scale = jnp.where(scale > 1e-9, scale, 1.0)
    xs = (x - center) / scale
    per_class = onehot.T @ w  # [K] total weight per class
    cw = jnp.where(per_class > 0, 1.0 / jnp.maximum(per_class, 1e-12), 0.0)
    sw = w * (onehot @ cw)  # each present class gets equal total weight
    sw = sw / jnp.maximum(jnp.sum(sw), 1e-12)
    f, k = x.shape[1], onehot.shape[1]

    def loss(theta):
        logits = xs @ theta["w"] + theta["b"]
        ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)
        return jnp.sum(sw * ce) + l2 * jnp.sum(theta["w"] ** 2)

    opt = optax.adam(LEARNING_RATE)
    theta = {"w": jnp.zeros((f, k), x.dtype), "b": jnp.zeros((k,), x.dtype)}

    def step(carry, _):
        theta, state = carry
        grads = jax.grad(loss)(theta)
        updates, state = opt.update(grads, state, theta)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)
    return theta["w"], theta["b"], center, scale


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_folds(x, onehot, weights, l2, *, steps: int):
    """`_fit` for every row of weights: [n_folds, n] -> stacked results."""
    return jax.vmap(lambda w: _fit(x, onehot, w, l2, steps))(weights)


@dataclass(frozen=True, eq=False)
class Categorizer:
    """A fitted categorizer. weights: [F, K]; bias: [K]; center, scale: [F] the training
    inputs' standardization; features: the F input names; categories: the K class names."""

    weights: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    center: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    features: tuple[str, ...] = FEATURES
    categories: tuple[str, ...] = CATEGORIES

    def predict_proba(self, inputs) -> np.ndarray:
        """Category probabilities: inputs [m, F] (`categorizer_inputs`) -> [m, K]."""
        z = (np.asarray(inputs, np.float64) - self.center) / self.scale
        logits = z @ self.weights + self.bias
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=-1, keepdims=True)

    def predict(self, inputs) -> list[str]:
        """The most probable category of each row of inputs [m, F]."""
        return [self.categories[i] for i in self.predict_proba(inputs).argmax(axis=-1)]

    def table(self) -> pd.DataFrame:
        """The weights as a DataFrame: features x categories (plus the bias row)."""
        rows = np.vstack([self.weights, self.bias[None]])
        return pd.DataFrame(rows, index=[*self.features, "(bias)"], columns=self.categories)


def _encode(labels, categories: tuple[str, ...]) -> np.ndarray:
    unknown = sorted(set(labels) - set(categories))
    if unknown:
        raise ConfigError(f"categorize: expected labels among {categories}, found {unknown}")
    return np.eye(len(categories))[[categories.index(c) for c in labels]]


def fit(inputs, labels, *, categories: tuple[str, ...] = CATEGORIES,
        features: tuple[str, ...] = FEATURES, l2: float = L2,
        steps: int = STEPS) -> Categorizer:
    """Fit the categorizer on inputs [n, F] (`categorizer_inputs`) and labels ([n] names)."""
    x = np.asarray(inputs, np.float32)
    if x.ndim != 2 or x.shape[1] != len(features) or len(x) != len(labels):
        raise ConfigError(f"categorize: expected inputs [n, {len(features)}] with n labels, "
                          f"found {x.shape} and {len(labels)} labels")
    onehot = _encode(labels, categories)
    w, b, c, s = _fit_folds(jnp.asarray(x), jnp.asarray(onehot, jnp.float32),
                            jnp.ones((1, len(x)), jnp.float32), l2, steps=steps)
    return Categorizer(*(np.asarray(a[0], np.float64) for a in (w, b, c, s)),
                       features=features, categories=categories)


def cross_validate(inputs, labels, groups, *, categories: tuple[str, ...] = CATEGORIES,
                   l2: float = L2, steps: int = STEPS) -> np.ndarray:
    """Leave-one-group-out predictions: every row predicted by a categorizer that never saw
    its group (its seed). inputs: [n, F]; labels, groups: [n]. All folds in one jit.
    Returns the predicted category names, [n]."""
    x = np.asarray(inputs, np.float32)
    groups = np.asarray(groups)
    folds = np.unique(groups)
    if len(folds) < 2:
        raise ConfigError(f"categorize: expected at least 2 groups to hold out, found "
                          f"{len(folds)}")
    onehot = _encode(labels, categories)
    weights = (groups[None, :] != folds[:, None]).astype(np.float32)  # [folds, n]
    w, b, c, s = (np.asarray(a, np.float64) for a in _fit_folds(
        jnp.asarray(x), jnp.asarray(onehot, jnp.float32), jnp.asarray(weights), l2,
        steps=steps))
    out = np.empty(len(x), dtype=object)
    for i, g in enumerate(folds):
        rows = groups == g
        model = Categorizer(w[i], b[i], c[i], s[i], categories=categories)
        out[rows] = model.predict(x[rows])
    return out


def confusion_table(true, predicted, categories: tuple[str, ...] = CATEGORIES) -> pd.DataFrame:
    """Counts of (true category, predicted category): rows true, columns predicted."""
    cm = pd.crosstab(pd.Categorical(list(true), categories=categories),
                     pd.Categorical(list(predicted), categories=categories), dropna=False)
    cm.index.name, cm.columns.name = "true", "predicted"
    return cm.astype(int)
