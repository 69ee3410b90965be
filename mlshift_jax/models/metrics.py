"""Classification metrics in JAX: jittable, vmappable, computed on the device.

Every metric matches scikit-learn (`accuracy_score`, `confusion_matrix`,
`precision_recall_fscore_support(average="macro", zero_division=0, labels=range(n_classes))`)
and is checked against it in `tests/test_metrics.py`.

Labels are integers in `[0, n_classes)`; a label outside that range is not counted in the
confusion matrix (no error can be raised from inside `jit`).

`evaluate` runs a model over a batch and returns the study's five numbers (accuracy, macro
precision, recall, F1 and mean confidence) with one device->host transfer; `evaluate_many`
does the same for a stack of models (params with a leading model axis) in one jitted call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.core.checks import finite_inputs, inputs_in_range
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import Model, Params, predict

SCORE_NAMES = ("accuracy", "precision", "recall", "f1", "confidence")


def _float_dtype():
    """The default float dtype: float32, or float64 under `jax_enable_x64`."""
    return jnp.result_type(float)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0 (scikit-learn's `zero_division=0`); NaN-free gradients."""
    num = num.astype(_float_dtype())
    den = den.astype(_float_dtype())
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def confusion_matrix(y_true: jax.Array, y_pred: jax.Array, n_classes: int) -> jax.Array:
    """Counts of (true, predicted) pairs. y_true, y_pred: [batch] int -> [n_classes, n_classes].

    Rows are true classes, columns predicted classes, as `sklearn.metrics.confusion_matrix`.
    One one-hot product, no Python loop; `n_classes` must be static under `jit`.
    """
    oh_true = jax.nn.one_hot(y_true, n_classes, dtype=jnp.int32)
    oh_pred = jax.nn.one_hot(y_pred, n_classes, dtype=jnp.int32)
    return jnp.einsum("bi,bj->ij", oh_true, oh_pred, preferred_element_type=jnp.int32)


def accuracy(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    """Share of exact matches. y_true, y_pred: [batch] int -> scalar; 0 for an empty batch."""
    return _safe_div(jnp.sum(y_true == y_pred), jnp.asarray(jnp.size(y_true)))


def per_class_prf(cm: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-class precision, recall and F1 from a confusion matrix. cm: [n, n] -> 3 x [n].

    As scikit-learn with `zero_division=0`: a class never predicted has precision 0, a class
    absent from y_true has recall 0, and F1 = 2 tp / (2 tp + fp + fn) is 0 when that
    denominator is 0 (the same value as 2 P R / (P + R) with 0 for P + R = 0).
    """
    tp = jnp.diagonal(cm)
    n_pred = jnp.sum(cm, axis=0)  # tp + fp
    n_true = jnp.sum(cm, axis=1)  # tp + fn
    precision = _safe_div(tp, n_pred)
    recall = _safe_div(tp, n_true)
    f1 = _safe_div(2 * tp, n_pred + n_true)
    return precision, recall, f1


def macro_prf(cm: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Macro precision, recall and F1 over ALL n classes. cm: [n, n] -> 3 scalars.

    Equals `precision_recall_fscore_support(average="macro", zero_division=0,
    labels=range(n))[:3]`: the unweighted mean of `per_class_prf`, classes absent from both
    y_true and y_pred included (they count as 0). Macro F1 is the mean of per-class F1, not
    the F1 of macro precision and recall.
    """
    precision, recall, f1 = per_class_prf(cm)
    return jnp.mean(precision), jnp.mean(recall), jnp.mean(f1)


def class_recall(cm: jax.Array, c: int | jax.Array) -> jax.Array:
    """Recall of class c. cm: [n, n], c: int (may be traced) -> scalar; 0 if c never occurs."""
    return _safe_div(cm[c, c], jnp.sum(cm[c]))


def mean_confidence(probs: jax.Array) -> jax.Array:
    """The study's "confidence": mean over examples of the top output. probs: [batch, n] -> scalar.

    Pass what `Model.probs` returns: raw sigmoid outputs for the seed MLP, softmax otherwise.
    """
    return jnp.mean(jnp.max(probs, axis=-1))


def attack_success_rate(y_true: jax.Array, y_pred: jax.Array, target: int | jax.Array) -> jax.Array:
    """BadNets attack success rate. y_true, y_pred: [batch] int, target: int -> scalar.

    The share of examples whose true class is not `target` that are predicted as `target`
    (Gu et al., "BadNets", 2017); NaN when no example is eligible (every one is of class
    `target`): there is nothing to measure, and 0 would read as "the backdoor failed".
    """
    eligible = y_true != target
    hits = eligible & (y_pred == target)
    n = jnp.sum(eligible)
    return jnp.where(n > 0, _safe_div(jnp.sum(hits), n), jnp.nan)


def scores_from_outputs(
    outputs: jax.Array,
    y: jax.Array,
    probs_fn: Callable[[jax.Array], jax.Array] | None = None,
    *,
    n_classes: int | None = None,
) -> dict[str, jax.Array]:
    """The five scores from model outputs already computed. outputs: [batch, K], y: [batch].

    n_classes: K for the confusion matrix (default: the outputs' width, the model's classes).

    `probs_fn` maps ONE example's outputs [n_out] to what confidence is read from
    (`Model.probs`); None takes the outputs as they are. The prediction is the argmax of the
    outputs. Pure and traceable: call it inside an attack's jit. Returns scalar arrays keyed
    by `SCORE_NAMES`.
    """
    n_classes = outputs.shape[-1] if n_classes is None else n_classes
    y_pred = jnp.argmax(outputs, axis=-1)
    probs = outputs if probs_fn is None else jax.vmap(probs_fn)(outputs)
    cm = confusion_matrix(y, y_pred, n_classes)
    precision, recall, f1 = macro_prf(cm)
    return {
        "accuracy": accuracy(y, y_pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confidence": mean_confidence(probs),
    }


def predict_keyed(model: Model, params: Params, x: jax.Array,
                  key: jax.Array | None = None) -> jax.Array:
    """Batched scores of any model. x: [batch, n_in] -> [batch, n_out].

    A stochastic model (`Model.stochastic`, a randomized defense) gets one fresh key per
    example, split from `key`; a deterministic one ignores `key`. Traceable.
    """
    if not model.stochastic:
        return predict(model, params, x)
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: model.apply(params, xi, key=ki))(x, keys)


def check_key(model: Model, key, who: str = "evaluate") -> None:
    """ConfigError when `model` is stochastic and no key is given."""
    if model.stochastic and key is None:
        raise ConfigError(f"{who}: model {model.name!r} is stochastic (draws fresh randomness "
                          "at every call); expected a jax.random key (key=...), found None")


def _scores(model: Model, params: Params, x: jax.Array, y: jax.Array, n_classes: int | None,
            key=None):
    return scores_from_outputs(predict_keyed(model, params, x, key), y, model.probs,
                               n_classes=n_classes)


@functools.partial(jax.jit, static_argnames=("model", "n_classes"))
def evaluate_arrays(
    model: Model, params: Params, x: jax.Array, y: jax.Array, *, n_classes: int | None = None,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Jitted core of `evaluate`: scalar arrays on the device. x: [batch, D], y: [batch].
    n_classes: None takes the model's (the width of its outputs).

    `model` is static (a `Model` NamedTuple of functions is hashable); one compile per model
    and input shape. key: required for a stochastic model (ConfigError without), else unused.
    """
    check_key(model, key)
    return _scores(model, params, x, y, n_classes, key)


def evaluate(
    model: Model, params: Params, x: jax.Array, y: jax.Array, *, n_classes: int | None = None,
    key: jax.Array | None = None, clip: bool = False,
) -> dict[str, float]:
    """accuracy, precision, recall, f1 (macro) and confidence of one model on (x, y).

    x: [batch, n_in], y: [batch] int. One jitted call, then one device->host transfer.
    key: required when `model.stochastic` (one draw per example), ignored otherwise.
    ConfigError for NaN / inf in x (they would count as class 0) and for values outside
    model.input_range (`core.checks.inputs_in_range`; clip=True clips and counts them).
    """
    finite_inputs("evaluate: x", x)
    x = inputs_in_range("evaluate: x", x, *model.input_range, clip=clip)
    scores = jax.device_get(evaluate_arrays(model, params, x, y, n_classes=n_classes, key=key))
    return {k: float(v) for k, v in scores.items()}


@functools.partial(jax.jit, static_argnames=("model", "n_classes", "batch_size"))
def evaluate_many(
    model: Model,
    stacked_params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    n_classes: int | None = None,
    batch_size: int | None = None,
) -> dict[str, jax.Array]:
    """`evaluate` for many models at once. stacked_params: leaves [n_models, ...].

    x: [batch, n_in], y: [batch] are shared by every model. Returns arrays [n_models] keyed
    by `SCORE_NAMES`, left on the device (`jax.device_get` them once). batch_size=None vmaps
    over all models together; an int evaluates that many at a time (`lax.map`) to bound the
    memory of the hidden activations, [batch_size, batch, n_hidden].
    """
    core = functools.partial(_scores, model, n_classes=n_classes)
    if batch_size is None:
        return jax.vmap(core, in_axes=(0, None, None))(stacked_params, x, y)
    return jax.lax.map(lambda p: core(p, x, y), stacked_params, batch_size=batch_size)


def summarize(values: dict[str, np.ndarray]) -> pd.DataFrame:
    """mean / std / min / max / n of per-model metrics, one row per metric.

    values: {name: [n_models]} (e.g. `jax.device_get(evaluate_many(...))`). std is the
    sample standard deviation (ddof=1), NaN for a single model.
    """
    rows = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64).ravel()
        if v.size == 0:
            raise ConfigError(f"summarize: metric {name!r} has no values; expected at least 1")
        std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
        rows[name] = {
            "mean": float(np.mean(v)),
            "std": std,
            "min": float(np.min(v)),
            "max": float(np.max(v)),
            "n": int(v.size),
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "std", "min", "max", "n"])
