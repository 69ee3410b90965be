"""Input-level detectors: is this input adversarial or noisy, for this model? And their scores.

Every detector maps a batch of inputs to one suspicion score per input, higher meaning "more
likely changed", so that every detector is scored the same way (`roc_auc`, `tpr_at_fpr`)
with clean test images as the negatives:

- "confidence": minus the top output of `model.probs` (the study's confidence: the raw
  sigmoid for the seed MLP, the softmax otherwise). The max-softmax baseline of Hendrycks &
  Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017.
- "margin": minus (top1 - top2) of the same outputs.
- "entropy": the entropy of the output *distribution* (`distribution`: the outputs divided
  by their sum, which is the identity for softmax and makes the seed MLP's sigmoids sum to 1).
- "squeezing": feature squeezing, Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial
  Examples in Deep Neural Networks", NDSS 2018: the largest L1 distance between the output
  distribution on x and on each squeezed copy of x (bit-depth reduction, 2x2 and 3x3 median
  smoothing, the squeezers that paper uses on MNIST).

`input_scores` computes all four in one jitted call, batched with `vmap` over a model that
handles one example. The scoring helpers (`roc_auc`, `tpr_at_fpr`, `binary_cross_entropy`)
are numpy float64 on the host and match scikit-learn (tests/test_detect.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks.defenses import window_median
from mlshift_jax.core.checks import finite_inputs, inputs_in_range
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.zoo import Model, Params, square_shape

# --- squeezers (Xu et al. 2018) ----------------------------------------------------------------


def bit_depth(x: jax.Array, bits: int, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
    """Reduce the colour depth to `bits` bits: x: [..., D] in [lo, hi] -> same shape.

    Maps [lo, hi] to [0, 1], rounds to one of 2**bits levels, maps back (Xu et al. 2018,
    Sec. 4.1; 1 bit on MNIST thresholds each pixel at the middle of the range).
    """
    levels = 2**bits - 1
    u = (x - lo) / (hi - lo)
    return lo + jnp.round(u * levels) / levels * (hi - lo)



def median_smooth(x: jax.Array, size: int,
                  input_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Median filter over size x size windows of each channel of one image: x: [D] -> [D],
    the image flattened from input_shape (H, W, C) (None: square, one channel).

    As `scipy.ndimage.median_filter(img, size, mode="reflect")` per channel, which Xu et al.
    (2018, Sec. 4.2) use: the window of pixel i spans i - size//2 .. i - size//2 + size - 1
    (so a 2x2 window reaches up and left), edges are mirrored with the edge pixel repeated,
    and an even window takes the upper of its two middle values. One example; vmap to batch.
    """
    h, w, c = square_shape(x.shape[-1], "median_smooth") if input_shape is None else input_shape
    img = x.reshape(h, w, c)
    before, after = size // 2, size - 1 - size // 2
    padded = jnp.pad(img, ((before, after), (before, after), (0, 0)), mode="symmetric")
    return window_median(padded, size, h, w).reshape(x.shape)


class Squeezer(NamedTuple):
    """A squeezer: name and fn(x: [D], input_shape, input_range) -> [D] on one example (the
    image's shape (H, W, C) and valid range (lo, hi), from the model)."""

    name: str
    fn: Callable[[jax.Array, tuple[int, ...], tuple[float, float]], jax.Array]


def _bits(bits: int):
    def squeeze(x, input_shape, input_range):
        return bit_depth(x, bits, *input_range)
    return squeeze


def _median(size: int):
    def squeeze(x, input_shape, input_range):
        return median_smooth(x, size, input_shape)
    return squeeze


SQUEEZERS: tuple[Squeezer, ...] = (
    Squeezer("bit-1", _bits(1)),
    Squeezer("median-2x2", _median(2)),
    Squeezer("median-3x3", _median(3)),
)


def squeeze(model: Model, squeezer: Squeezer, x: jax.Array) -> jax.Array:
    """`squeezer` applied to ONE example x: [D] of `model`'s inputs (its shape and range)."""
    return squeezer.fn(x, tuple(model.input_shape), tuple(model.input_range))


# --- per-example scores --------------------------------------------------------------------------


def distribution(model: Model, scores: jax.Array) -> jax.Array:
    """The output distribution of one example: `model.probs(scores)` divided by its sum.

    scores: [n_out] -> [n_out], summing to 1 (softmax is unchanged; sigmoid outputs are
    normalized, as the entropy and the KL/L1 distances need a distribution).
    """
    p = model.probs(scores)
    return p / jnp.sum(p)


def _top2(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    top = jax.lax.top_k(p, 2)[0]
    return top[0], top[1]


def entropy(p: jax.Array) -> jax.Array:
    """Shannon entropy in nats of a distribution p: [n] -> scalar (0 log 0 = 0)."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def squeeze_distance(model: Model, params: Params, x: jax.Array, d: jax.Array,
                     squeezers: tuple[Squeezer, ...] = SQUEEZERS) -> jax.Array:
    """max over squeezers of ||d - distribution(f(squeeze(x)))||_1 for ONE example x: [D]
    whose output distribution is d: [n_out]."""
    return jnp.max(jnp.stack([
        jnp.sum(jnp.abs(d - distribution(model, model.apply(params, squeeze(model, s, x)))))
        for s in squeezers]))


def _confidence(model, params, x, p, squeezers):
    return -_top2(p)[0]


def _margin(model, params, x, p, squeezers):
    top1, top2 = _top2(p)
    return -(top1 - top2)


def _entropy(model, params, x, p, squeezers):
    return entropy(p / jnp.sum(p))


def _squeezing(model, params, x, p, squeezers):
    return squeeze_distance(model, params, x, p / jnp.sum(p), squeezers)


DETECTORS: tuple[Detector, ...] = (
    Detector("confidence", "input", _confidence, "confidence",
             "Hendrycks & Gimpel, ICLR 2017", "-max output"),
    Detector("margin", "input", _margin, "margin", "margin of the top two outputs",
             "-(top1 - top2) output"),
    Detector("entropy", "input", _entropy, "entropy", "-",
             "entropy of the output distribution"),
    Detector("squeezing", "input", _squeezing, "squeezing", "Xu, Evans & Qi, NDSS 2018",
             "max L1(f(x), f(squeeze(x))), bit-1 / median 2x2, 3x3"),
)  # the input detectors `input_scores` computes, in its output's order


def _one(model: Model, params: Params, x: jax.Array,
         squeezers: tuple[Squeezer, ...]) -> dict[str, jax.Array]:
    """Every score of `DETECTORS` for ONE example x: [D] (higher = more suspicious)."""
    p = model.probs(model.apply(params, x))
    return {d.name: d.score(model, params, x, p, squeezers) for d in DETECTORS}


def input_scores(model: Model, params: Params, x: jax.Array,
                 squeezers: tuple[Squeezer, ...] = SQUEEZERS) -> dict[str, jax.Array]:
    """Every input-level detector's score for every example, in one jitted call.

    x: [batch, n_in] -> {name: [batch]} for the names in `DETECTORS`, each oriented so
    that a higher score means "more likely adversarial or noisy". `model` and `squeezers` are
    static (hashable NamedTuples of functions). ConfigError for NaN / inf in x (entropy would
    call such an input the least suspicious one) and for values outside model.input_range.
    """
    finite_inputs("input_scores: x", x)
    x = inputs_in_range("input_scores: x", x, *model.input_range)
    return _input_scores(model, params, x, squeezers)


@functools.partial(jax.jit, static_argnames=("model", "squeezers"))
def _input_scores(model, params, x, squeezers):
    return jax.vmap(lambda xi: _one(model, params, xi, squeezers))(x)


def squeezing_score(model: Model, params: Params, x: jax.Array,
                    squeezers: tuple[Squeezer, ...] = SQUEEZERS) -> jax.Array:
    """Feature squeezing alone (Xu et al., NDSS 2018): x: [batch, n_in] -> [batch].

    max over squeezers of || distribution(f(x)) - distribution(f(squeeze(x))) ||_1.
    ConfigError for NaN / inf in x.
    """
    finite_inputs("squeezing_score: x", x)
    x = inputs_in_range("squeezing_score: x", x, *model.input_range)
    return _squeezing_score(model, params, x, squeezers)


@functools.partial(jax.jit, static_argnames=("model", "squeezers"))
def _squeezing_score(model, params, x, squeezers):
    def one(xi):
        return squeeze_distance(model, params, xi, distribution(model, model.apply(params, xi)),
                           squeezers)

    return jax.vmap(one)(x)


# --- scoring a detector (numpy, float64, on the host) -------------------------------------------


def _check_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ConfigError(f"scores and labels: expected the same length, found {s.size} "
                          f"and {y.size}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("scores: expected finite values, found NaN or inf")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ConfigError(f"labels: expected both positives and negatives, found "
                          f"{int(y.sum())} positives of {y.size}")
    return s, y


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` ([n], higher = positive) for `labels` ([n] bool).

    The Mann-Whitney U statistic with mid-ranks for ties, divided by n_pos * n_neg: equal to
    `sklearn.metrics.roc_auc_score(labels, scores)`. Needs both classes present.
    """
    s, y = _check_binary(scores, labels)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, np.float64)
    # mid-ranks: every member of a run of equal scores gets the run's mean rank (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve: (fpr, tpr, thresholds), each [k], one point per distinct score.

    A sample is called positive when its score >= threshold; the first point is (0, 0) at
    threshold +inf, as `sklearn.metrics.roc_curve(..., drop_intermediate=False)`.
    """
    s, y = _check_binary(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tpr_at_fpr(scores, labels, fpr: float = 0.05) -> float:
    """The detection rate at a false-positive budget: the largest TPR over the ROC points
    whose FPR is <= `fpr` (a threshold one could set without exceeding the budget).

    scores: [n], labels: [n] bool. Matches `max(tpr[fpr_curve <= fpr])` on scikit-learn's
    `roc_curve`.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ConfigError(f"fpr: expected a rate in [0, 1], found {fpr!r}")
    f, t, _ = roc_points(scores, labels)
    return float(t[f <= fpr + 1e-12].max())


def binary_cross_entropy(probs, labels, *, clip: float = 1e-6) -> float:
    """Mean cross-entropy (nats) of probabilities `probs` ([n], P(positive)) for `labels`.

    The NIST TrojAI leaderboard's score of a "poisoned" probability; probabilities are
    clipped to [clip, 1 - clip] first so that one confident mistake stays finite.
    Matches `sklearn.metrics.log_loss(labels, probs)` on unclipped inputs.
    """
    p = np.clip(np.asarray(probs, np.float64).ravel(), clip, 1.0 - clip)
    y = np.asarray(labels).ravel().astype(bool)
    if p.shape != y.shape:
        raise ConfigError(f"probs and labels: expected the same length, found {p.size} "
                          f"and {y.size}")
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def score_detector(scores, labels, fpr: float = 0.05) -> dict[str, float]:
    """{"auc": roc_auc, "tpr_at_fpr": tpr_at_fpr} of one detector's scores ([n])."""
    return {"auc": roc_auc(scores, labels), "tpr_at_fpr": tpr_at_fpr(scores, labels, fpr)}
