"""Training-data detectors: which training samples are poisoned?

Both read the penultimate-layer activations of the model trained on the (possibly poisoned)
data (`Model.features`; a model without features, such as a user's flax or equinox module,
gives its outputs, the logits, instead: see `activations`) and work one class at a time.
The rows of each class are gathered into padded blocks (`class_blocks`), so each detector
is one jitted call over all classes (vmap over the blocks), never a Python loop over
classes; block sizes are rounded up so that few shapes (and compiles) occur.

- Activation clustering: Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
  "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI SafeAI
  workshop 2019 (arXiv:1811.03728, 2018). Per predicted class: reduce the activations to
  `dims` dimensions (PCA here; the paper uses ICA), split them by 2-means, and flag the
  smaller cluster when it holds less than `size_threshold` of the class (0.35, the
  reference implementation's default in the Adversarial Robustness Toolbox).
- Spectral signatures: Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS
  2018. Per (training) label: centre the activations, take the top right singular vector v
  of the centred matrix, score each sample by its squared projection on v; flag the
  1.5 * eps highest-scoring samples of each class, eps the assumed poisoned fraction.

Each detector returns a per-sample score (for ROC-AUC; higher = more likely poisoned) and a
per-sample flag (for precision and recall), both against the poisoning's mask.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.detect import roc_auc
from mlshift_jax.models.zoo import Model, Params

AC_DIMS = 10
AC_SIZE_THRESHOLD = 0.35
AC_RESTARTS = 4
KMEANS_STEPS = 30
SPECTRAL_FACTOR = 1.5


class Detection(NamedTuple):
    """A training-data detector's output. score: [n] float (higher = more suspicious);
    flag: [n] bool (the samples it would remove)."""

    score: jax.Array
    flag: jax.Array


def activations(model: Model, params: Params, x: jax.Array, *,
                batch_size: int = 2048) -> jax.Array:
    """Penultimate-layer activations `model.features`: x: [n, D] -> [n, F].

    A model without `features` (user models: flax, nnx, equinox modules and Model records
    that define none) gives its outputs `model.apply` instead, the logits [n, K]: the
    detectors then cluster / project the logits, a weaker signal than the penultimate layer
    the papers use (K dimensions, after the last layer). Computed `batch_size` examples at a
    time (lax.map) to bound memory.
    """
    return _activations(model, params, x, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _activations(model: Model, params: Params, x: jax.Array, *, batch_size: int) -> jax.Array:
    layer = model.features if model.features is not None else model.apply
    return jax.lax.map(lambda xi: layer(params, xi), x, batch_size=batch_size)


def _n_classes(labels, n_classes: int | None) -> int:
    """n_classes, or the largest label + 1 (labels are concrete here, not traced)."""
    if n_classes is not None:
        return int(n_classes)
    labels = np.asarray(labels)
    return int(labels.max()) + 1 if labels.size else 1


# --- per-class blocks ---------------------------------------------------------------------------

BLOCK = 256  # the smallest class block; blocks grow by steps of 1.5x, 2x (few shapes, compiles)


def class_blocks(labels, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each class, padded: (idx int [n_classes, b], valid bool [n_classes, b]).

    b is the largest class size rounded up to the next of BLOCK * (1, 1.5, 2, 3, 4, 6, ...);
    padding rows point past the end (index n) and are invalid. Host-side (numpy): the shapes
    must be concrete. Working on blocks costs n * d^2 for a class covariance instead of
    n_classes * n * d^2 with masks over all samples.
    """
    labels = np.asarray(labels).ravel()
    n = labels.size
    n_classes = _n_classes(labels, n_classes)
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    b = BLOCK
    while b < counts.max():
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 256, 384, 512, 768, 1024, ...
    idx = np.full((n_classes, b), n, np.int32)
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        idx[c, :rows.size] = rows
    return idx, idx < n


def _gather(h: jax.Array, idx: jax.Array) -> jax.Array:
    """h: [n, d], idx: [C, b] (n = padding) -> [C, b, d], padding rows zero."""
    return jnp.take(h, idx, axis=0, mode="fill", fill_value=0.0)


def _scatter(values: jax.Array, idx: jax.Array, n: int, fill: float = 0.0) -> jax.Array:
    """Per-block values [C, b] back to the samples: -> [n] (padding dropped)."""
    return jnp.full((n,), fill, values.dtype).at[idx.ravel()].set(values.ravel(), mode="drop")


def _block_mean_cov(hb: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean [d], covariance [d, d] (1/n) and count of one block hb: [b, d] with w: [b]."""
    count = jnp.sum(w)
    safe = jnp.maximum(count, 1.0)
    mean = (w @ hb) / safe
    centred = (hb - mean) * w[:, None]
    return mean, centred.T @ centred / safe, count


def _top_eigvecs(cov: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k leading eigenpairs of a symmetric [d, d]: values [k], vectors [d, k]."""
    values, vectors = jnp.linalg.eigh(cov)  # ascending
    return values[::-1][:k], vectors[:, ::-1][:, :k]


# --- spectral signatures (Tran et al. 2018) ----------------------------------------------------


@jax.jit
def _spectral_blocks(h: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    hb = _gather(h.astype(jnp.float32), idx)  # [C, b, d]

    def per_class(block, w):
        mean, cov, _ = _block_mean_cov(block, w)
        value, vector = _top_eigvecs(cov, 1)
        return ((block - mean) @ vector[:, 0]) ** 2 / jnp.maximum(value[0], 1e-12)

    scores = jax.vmap(per_class)(hb, valid.astype(jnp.float32))
    return _scatter(scores, idx, h.shape[0])


def spectral_scores(h, y, n_classes: int | None = None) -> jax.Array:
    """Spectral-signature outlier scores. h: [n, d] activations, y: [n] int labels -> [n].

    For the class c of each sample: (h_i - mean_c) . v_c squared, v_c the top right singular
    vector of the centred class matrix (the top eigenvector of its covariance), divided by
    the top eigenvalue so that scores of different classes share one scale (a class's scores
    then average 1). Tran, Li & Madry, NeurIPS 2018, Algorithm 1. One jitted call.
    """
    idx, valid = class_blocks(y, n_classes)
    return _spectral_blocks(jnp.asarray(h), jnp.asarray(idx), jnp.asarray(valid))


def top_fraction_per_class(scores: jax.Array, y: jax.Array, fraction: float,
                           n_classes: int | None = None) -> jax.Array:
    """Flag the round(fraction * n_c) highest scores of each class c: -> bool [n]. y is
    concrete; n_classes defaults to its largest label + 1."""
    n_classes = _n_classes(y, n_classes)
    scores, y = jnp.asarray(scores), jnp.asarray(y)
    order = jnp.lexsort((-scores, y))  # by class, then by descending score
    counts = jnp.bincount(y, length=n_classes)
    starts = jnp.cumsum(counts) - counts
    sorted_y = y[order]
    position = jnp.arange(y.shape[0]) - starts[sorted_y]  # rank within the class
    quota = jnp.round(fraction * counts).astype(jnp.int32)
    flag_sorted = position < quota[sorted_y]
    return jnp.zeros(y.shape, bool).at[order].set(flag_sorted)


def spectral_signatures(h, y, *, eps: float, n_classes: int | None = None) -> Detection:
    """Spectral signatures (Tran et al., NeurIPS 2018): score every sample, flag the top
    1.5 * eps of each class. h: [n, d], y: [n] training labels, eps: the assumed upper bound
    on the poisoned fraction (the paper's epsilon); n_classes: K (default: max(y) + 1)."""
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"spectral signatures: expected eps in [0, 1], found {eps!r}")
    scores = spectral_scores(h, y, n_classes)
    flag = top_fraction_per_class(scores, np.asarray(y, np.int32),
                                  min(1.0, SPECTRAL_FACTOR * eps), n_classes)
    return Detection(scores, flag)


# --- activation clustering (Chen et al. 2018) --------------------------------------------------


def _two_means(z: jax.Array, w: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted 2-means (Lloyd) on z: [n, k] with weights w: [n] (0 = not in the class).

    Seeded: the first centre is a random member (from key), the second the member farthest
    from it (the greedy k-means++ choice). Returns (assignment int [n], inertia scalar).
    """
    logits = jnp.where(w > 0, 0.0, -jnp.inf)
    first = jax.random.categorical(key, logits)
    d0 = jnp.sum((z - z[first]) ** 2, axis=1)
    second = jnp.argmax(jnp.where(w > 0, d0, -1.0))
    centres = jnp.stack([z[first], z[second]])

    def dist(c):
        return jnp.sum((z[:, None, :] - c[None]) ** 2, axis=-1)  # [n, 2]

    def step(_, c):
        assign = jnp.argmin(dist(c), axis=1)
        one_hot = jax.nn.one_hot(assign, 2, dtype=z.dtype) * w[:, None]  # [n, 2]
        size = jnp.sum(one_hot, axis=0)
        new = (one_hot.T @ z) / jnp.maximum(size, 1.0)[:, None]
        return jnp.where(size[:, None] > 0, new, c)  # an emptied centre stays put

    centres = jax.lax.fori_loop(0, KMEANS_STEPS, step, centres)
    d = dist(centres)
    assign = jnp.argmin(d, axis=1)
    return assign, jnp.sum(jnp.min(d, axis=1) * w)


@functools.partial(jax.jit, static_argnames=("dims", "restarts"))
def _cluster_blocks(h, idx, valid, key, *, dims: int, restarts: int):
    hb = _gather(h.astype(jnp.float32), idx)  # [C, b, d]

    def per_class(block, w, k):
        mean, cov, count = _block_mean_cov(block, w)
        _, basis = _top_eigvecs(cov, dims)
        z = (block - mean) @ basis  # [b, dims]
        assigns, inertias = jax.vmap(lambda kk: _two_means(z, w, kk))(
            jax.random.split(k, restarts))
        assign = assigns[jnp.argmin(inertias)]
        size1 = jnp.sum(w * assign) / jnp.maximum(count, 1.0)
        return assign, jnp.where(assign == 1, size1, 1.0 - size1)

    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(idx.shape[0]))
    assign, rel = jax.vmap(per_class)(hb, valid.astype(jnp.float32), keys)  # [C, b] each
    n = h.shape[0]
    return _scatter(assign, idx, n, 0), _scatter(rel, idx, n, 1.0)


def cluster_classes(h, labels, key: jax.Array, *, dims: int = AC_DIMS,
                    restarts: int = AC_RESTARTS,
                    n_classes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per class of `labels`: PCA of the class's activations to `dims` dimensions, then the
    best (lowest inertia) of `restarts` seeded 2-means runs. One jitted call.

    h: [n, d], labels: [n] int. Returns (cluster: int [n] in {0, 1}, the cluster of each
    sample within its class; rel_size: [n] float, the share of its class in that cluster).
    """
    idx, valid = class_blocks(labels, n_classes)
    return _cluster_blocks(jnp.asarray(h), jnp.asarray(idx), jnp.asarray(valid), key,
                           dims=dims, restarts=restarts)


def activation_clustering(h, predicted, *, key: jax.Array,
                          dims: int = AC_DIMS,
                          size_threshold: float = AC_SIZE_THRESHOLD,
                          n_classes: int | None = None) -> Detection:
    """Activation clustering (Chen et al. 2018): per predicted class, 2-means on the
    activations reduced to `dims` PCA dimensions; the smaller cluster is flagged when its
    relative size is below `size_threshold`.

    h: [n, d], predicted: [n] int (the trained model's predicted class of each training
    sample). score = 1 - the relative size of the sample's cluster (members of small
    clusters score high; ties within a cluster). Seeded by `key`.
    """
    if not 0.0 < size_threshold <= 0.5:
        raise ConfigError(f"activation clustering: expected size_threshold in (0, 0.5], "
                          f"found {size_threshold!r}")
    _, rel = cluster_classes(h, predicted, key, dims=dims, n_classes=n_classes)
    return Detection(1.0 - rel, rel < size_threshold)


# --- scores ----------------------------------------------------------------------------------


def poisoned_share(y, mask, n_classes: int | None = None) -> float:
    """The largest share of poisoned samples in any one class of labels y ([n]): the per-class
    contamination that spectral signatures' eps bounds (Tran et al. 2018 assume an upper bound
    is known; this is the oracle one). mask: [n] bool."""
    y, mask = np.asarray(y).ravel(), np.asarray(mask, bool).ravel()
    n_classes = _n_classes(y, n_classes)
    counts = np.bincount(y, minlength=n_classes)
    poisoned = np.bincount(y[mask], minlength=n_classes)
    return float(np.max(poisoned / np.maximum(counts, 1)))


def precision_recall_auc(detection: Detection, mask) -> dict[str, float]:
    """precision and recall of `detection.flag`, ROC-AUC of `detection.score`, against the
    poison mask ([n] bool, the ground truth). Precision is 0 when nothing is flagged; AUC is
    NaN when the mask is all one value."""
    flag = np.asarray(detection.flag, bool)
    truth = np.asarray(mask, bool)
    tp = int(np.sum(flag & truth))
    precision = tp / flag.sum() if flag.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else float("nan")
    auc = roc_auc(np.asarray(detection.score), truth) if 0 < truth.sum() < truth.size \
        else float("nan")
    return {"precision": float(precision), "recall": float(recall), "auc": auc,
            "flagged": int(flag.sum()), "poisoned": int(truth.sum())}
