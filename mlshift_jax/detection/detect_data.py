"""Training-data detectors: which training samples are poisoned?

All three read the penultimate-layer activations of the model trained on the (possibly
poisoned) data (`Model.features`; a model without features, such as a user's flax or equinox
module, gives its outputs, the logits, instead: see `activations`) and work one class at a
time. The rows of each class are gathered into padded blocks of one size (`class_blocks`,
padding rows masked out), so each detector is one jitted call over all classes (vmap over the
blocks, never a Python loop over classes) and compiles once per block size: the size is the
largest class rounded up to a power of two (`block_size`), or a caller's fixed `block` (the
detection bench passes one size for all its members: one compile per detector).

- Activation clustering: Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
  "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI SafeAI
  workshop 2019 (arXiv:1811.03728, 2018). Per predicted class: reduce the activations to
  `dims` dimensions (PCA here; the paper uses ICA), split them by 2-means, and decide per
  class with the paper's two rules as the Adversarial Robustness Toolbox implements them
  (`analyze_by_silhouette_score`): the class is poisoned when its smaller cluster holds less
  than `size_threshold` of it (0.35) AND the split's silhouette score exceeds
  `silhouette_threshold` (0.10); the smaller cluster of a poisoned class is the suspect.
- Spectral signatures: Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS
  2018. Per (training) label: centre the activations, take the top right singular vector v
  of the centred matrix, score each sample by its squared projection on v; remove the
  round(1.5 * eps * n_c) highest-scoring samples of each class c (1.5 times the expected
  poison count), eps the assumed poisoned fraction.
- SPECTRE: Hayase, Kong, Somani, Oh, "SPECTRE: Defending Against Backdoor Attacks Using
  Robust Statistics", ICML 2021. Per label: project the centred activations on the class's
  top `dims` principal directions, estimate the clean mean and covariance robustly, whiten
  with them, and score by QUantum Entropy (QUE) outlier scores; remove the 1.5 * eps * n_c
  highest. The robust estimate here is a minimum-covariance-determinant fit by concentration
  steps (Rousseeuw & Van Driessen, FAST-MCD, 1999; half the class kept: breakdown 50%; one
  deterministic start, DetMCD's) instead of the paper's filter-based robust estimator.

Each detector returns a per-sample score (for ROC-AUC; higher = more suspicious) and a
per-sample flag (the samples it would remove), both to be judged against the poison mask.

All three assume the poisoned samples are a minority of their class. A BadNets mixture
relabels its poisoned images to one target class: at 20% of the eligible images (this
project's "mixture 20%") they are about 65% of the target class, the clean images of the
class become the minority, and none of these detectors can tell which group is the clean one
(activation clustering then flags nothing in that class; the two spectral methods rank the
clean minority highest). The detection bench's training-data table measures where this sets in.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.detect import roc_auc
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.zoo import Model, Params, predict

AC_DIMS = 10
AC_SIZE_THRESHOLD = 0.35
AC_SILHOUETTE_THRESHOLD = 0.10
AC_RESTARTS = 4
KMEANS_STEPS = 30
SILHOUETTE_ROWS = 512  # rows of the pairwise-distance matrix held at once (memory)
SILHOUETTE_SAMPLE = 1024  # rows of a class whose silhouettes are averaged (time)
SPECTRAL_FACTOR = 1.5
SPECTRE_DIMS = 32
SPECTRE_ALPHA = 4.0
SPECTRE_STEPS = 8
MAHALANOBIS_SHRINK = 1e-3  # ridge on the shared covariance, relative to its mean variance


class Detection(NamedTuple):
    """A training-data detector's output. score: [n] float (higher = more suspicious);
    flag: [n] bool (the samples it would remove); classes: [K] bool, the classes it judged
    poisoned (activation clustering) or None."""

    score: jax.Array
    flag: jax.Array
    classes: jax.Array | None = None


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

BLOCK = 64  # the smallest class block; sizes are powers of two from here


def block_size(count: int) -> int:
    """The block that holds a class of `count` rows: the next power of two >= count, at least
    BLOCK. Buckets by powers of two, so classes of 1,025 to 2,048 rows share one compile."""
    b = BLOCK
    while b < int(count):
        b *= 2
    return b


def class_counts(labels, n_classes: int | None = None) -> np.ndarray:
    """Rows per class: labels [n] int -> int [n_classes]."""
    labels = np.asarray(labels).ravel()
    return np.bincount(labels, minlength=_n_classes(labels, n_classes))[:_n_classes(
        labels, n_classes)]


def class_blocks(labels, n_classes: int | None = None, *,
                 block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each class, padded: (idx int [n_classes, b], valid bool [n_classes, b]).

    b is `block` when given (ConfigError when a class has more rows), else
    `block_size(largest class)`. Padding rows point past the end (index n) and are invalid.
    Host-side (numpy): the shapes must be concrete. Every detector compiles once per (n, d, b,
    n_classes), so a caller scoring many datasets of one size passes one `block` for all.
    """
    labels = np.asarray(labels).ravel()
    n = labels.size
    n_classes = _n_classes(labels, n_classes)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConfigError(f"training-data detectors: expected labels in 0..{n_classes - 1}, "
                          f"found {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    largest = int(counts.max()) if counts.size else 0
    if block is None:
        b = block_size(largest)
    elif int(block) < largest:
        raise ConfigError(f"training-data detectors: expected block >= the largest class "
                          f"({largest} rows), found {block}")
    else:
        b = int(block)
    order = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    idx = np.full((n_classes, b), n, np.int32)
    pos = np.arange(n) - starts[labels[order]]  # rank of each row within its class
    idx[labels[order], pos] = order
    return idx, idx < n


def _gather(h: jax.Array, idx: jax.Array) -> jax.Array:
    """h: [n, d], idx: [C, b] (n = padding) -> [C, b, d], padding rows zero."""
    return jnp.take(h, idx, axis=0, mode="fill", fill_value=0.0)


def _scatter(values: jax.Array, idx: jax.Array, n: int, fill=0.0) -> jax.Array:
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


def _top_in_block(score: jax.Array, w: jax.Array, quota: jax.Array) -> jax.Array:
    """bool [b]: the `quota` highest scores among the valid rows (w > 0) of one block."""
    masked = jnp.where(w > 0, score, -jnp.inf)
    order = jnp.argsort(-masked)  # one sort; the ranks by a scatter (0 = highest)
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.shape[0]))
    return (rank < quota) & (w > 0)


def removal_counts(labels, eps: float, n_classes: int | None = None,
                   factor: float = SPECTRAL_FACTOR) -> np.ndarray:
    """Samples removed per class: round(factor * eps * n_c), at most n_c -> int [n_classes].
    Tran et al. 2018 remove 1.5 times the expected number of poisoned samples of each class,
    eps the assumed poisoned fraction."""
    _check_eps(eps)
    counts = class_counts(labels, n_classes)
    return np.minimum(np.round(factor * eps * counts).astype(np.int32), counts)


def _check_eps(eps) -> None:
    if not (isinstance(eps, (int, float, np.floating)) and 0.0 <= float(eps) <= 1.0):
        raise ConfigError(f"training-data detectors: expected eps (the assumed poisoned "
                          f"fraction) in [0, 1], found {eps!r}")


def _per_class_inputs(h, y, n_classes, block):
    idx, valid = class_blocks(y, n_classes, block=block)
    return jnp.asarray(h), jnp.asarray(idx), jnp.asarray(valid)


# --- spectral signatures (Tran et al. 2018) ----------------------------------------------------


@jax.jit
def _spectral_blocks(h: jax.Array, idx: jax.Array, valid: jax.Array,
                     quota: jax.Array) -> tuple[jax.Array, jax.Array]:
    hb = _gather(h.astype(jnp.float32), idx)  # [C, b, d]

    def per_class(block, w, q):
        mean, cov, _ = _block_mean_cov(block, w)
        value, vector = _top_eigvecs(cov, 1)
        score = ((block - mean) @ vector[:, 0]) ** 2 / jnp.maximum(value[0], 1e-12)
        return score, _top_in_block(score, w, q)

    scores, flags = jax.vmap(per_class)(hb, valid.astype(jnp.float32), quota)
    n = h.shape[0]
    return _scatter(scores, idx, n), _scatter(flags, idx, n, False)


def spectral_scores(h, y, n_classes: int | None = None, *,
                    block: int | None = None) -> jax.Array:
    """Spectral-signature outlier scores. h: [n, d] activations, y: [n] int labels -> [n].

    For the class c of each sample: (h_i - mean_c) . v_c squared, v_c the top right singular
    vector of the centred class matrix (the top eigenvector of its covariance), divided by
    the top eigenvalue so that scores of different classes share one scale (a class's scores
    then average 1). Tran, Li & Madry, NeurIPS 2018, Algorithm 1. One jitted call.
    """
    return spectral_signatures(h, y, eps=0.0, n_classes=n_classes, block=block).score


def top_fraction_per_class(scores, y, fraction: float,
                           n_classes: int | None = None) -> np.ndarray:
    """Flag the round(fraction * n_c) highest scores of each class c: -> numpy bool [n]
    (ties: the earlier sample first). n_classes defaults to y's largest label + 1. On the
    host, where a sort of n numbers belongs: as eager JAX it compiled one small program per
    operation and array size."""
    n_classes = _n_classes(y, n_classes)
    scores, y = np.asarray(scores), np.asarray(y)
    order = np.lexsort((-scores, y))  # by class, then by descending score
    counts = np.bincount(y, minlength=n_classes)
    starts = np.cumsum(counts) - counts
    sorted_y = y[order]
    position = np.arange(y.shape[0]) - starts[sorted_y]  # rank within the class
    quota = np.round(fraction * counts).astype(np.int64)
    flag = np.zeros(y.shape, bool)
    flag[order] = position < quota[sorted_y]
    return flag


def spectral_signatures(h, y, *, eps: float, n_classes: int | None = None,
                        block: int | None = None) -> Detection:
    """Spectral signatures (Tran et al., NeurIPS 2018): score every sample (`spectral_scores`),
    flag the round(1.5 * eps * n_c) highest of each class c (`removal_counts`).

    h: [n, d], y: [n] training labels, eps: the assumed poisoned fraction (the paper's
    epsilon) in [0, 1]; n_classes: K (default: max(y) + 1); block: a fixed class-block size
    (`class_blocks`). ConfigError for eps outside [0, 1]. One jitted call.
    """
    _check_eps(eps)
    quota = removal_counts(y, eps, n_classes)
    score, flag = _spectral_blocks(*_per_class_inputs(h, y, n_classes, block),
                                   jnp.asarray(quota))
    return Detection(score, flag)


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


def _silhouette(z: jax.Array, assign: jax.Array, w: jax.Array, key: jax.Array | None = None,
                sample: int | None = None) -> jax.Array:
    """Mean silhouette (Rousseeuw 1987) of a 2-cluster split of the valid rows of z: [b, k].

    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean Euclidean distance to the other members of
    i's cluster, b_i to the members of the other cluster; s_i = 0 for a singleton (as
    scikit-learn's `silhouette_score`). Averaged over every valid row, or (key and sample
    given, sample < b) over `sample` valid rows drawn at random without replacement, each
    against all rows (scikit-learn's `sample_size`; all rows when the class has fewer).
    Pairwise distances SILHOUETTE_ROWS rows at a time."""
    z, assign, w = jnp.asarray(z), jnp.asarray(assign), jnp.asarray(w)
    b = z.shape[0]
    if key is None or sample is None or sample >= b:
        picked, pw = jnp.arange(b), w
    else:  # valid rows first (priority >= 1), in random order
        _, picked = jax.lax.top_k(jax.random.uniform(key, (b,)) + (w > 0), sample)
        pw = w[picked]
    m = picked.shape[0]
    rows = math.gcd(m, SILHOUETTE_ROWS)  # a divisor of m: the chunks tile the rows
    member = jax.nn.one_hot(assign, 2, dtype=z.dtype) * w[:, None]  # [b, 2]
    size = jnp.sum(member, axis=0)
    sq = jnp.sum(z * z, axis=1)

    def chunk(where):
        zi, ai = z[where], assign[where]
        d2 = sq[where][:, None] + sq[None] - 2 * zi @ z.T
        sums = jnp.sqrt(jnp.maximum(d2, 0.0)) @ member  # [rows, 2]
        own = jnp.take_along_axis(sums, ai[:, None], 1)[:, 0]
        other = jnp.take_along_axis(sums, 1 - ai[:, None], 1)[:, 0]
        n_own = size[ai] - 1.0
        a = own / jnp.maximum(n_own, 1.0)
        bb = other / jnp.maximum(size[1 - ai], 1.0)
        return jnp.where(n_own > 0, (bb - a) / jnp.maximum(jnp.maximum(a, bb), 1e-12), 0.0)

    s = jax.lax.map(chunk, picked.reshape(-1, rows)).reshape(-1)
    both = (size[0] > 0) & (size[1] > 0)
    return jnp.where(both, jnp.sum(s * pw) / jnp.maximum(jnp.sum(pw), 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("dims", "restarts"))
def _cluster_blocks(h, idx, valid, key, *, dims: int, restarts: int):
    hb = _gather(h.astype(jnp.float32), idx)  # [C, b, d]

    def per_class(block, w, k):
        mean, cov, count = _block_mean_cov(block, w)
        _, basis = _top_eigvecs(cov, dims)
        z = ((block - mean) @ basis) * w[:, None]  # [b, dims]
        assigns, inertias = jax.vmap(lambda kk: _two_means(z, w, kk))(
            jax.random.split(k, restarts))
        assign = assigns[jnp.argmin(inertias)]
        size1 = jnp.sum(w * assign) / jnp.maximum(count, 1.0)
        rel = jnp.where(assign == 1, size1, 1.0 - size1)
        sil = _silhouette(z, assign, w, jax.random.fold_in(k, restarts), SILHOUETTE_SAMPLE)
        return assign, rel, jnp.minimum(size1, 1.0 - size1), sil

    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(idx.shape[0]))
    assign, rel, smaller, sil = jax.lax.map(
        lambda a: per_class(*a), (hb, valid.astype(jnp.float32), keys))  # [C, b] / [C]
    n = h.shape[0]
    return _scatter(assign, idx, n, 0), _scatter(rel, idx, n, 1.0), smaller, sil


class Clusters(NamedTuple):
    """Per-class 2-means splits. cluster: int [n] in {0, 1}; rel_size: [n], the share of its
    class in the sample's cluster; smaller: [K] the smaller cluster's share of each class;
    silhouette: [K] the split's mean silhouette (0 for an empty class)."""

    cluster: jax.Array
    rel_size: jax.Array
    smaller: jax.Array
    silhouette: jax.Array


def cluster_classes(h, labels, key: jax.Array, *, dims: int = AC_DIMS,
                    restarts: int = AC_RESTARTS, n_classes: int | None = None,
                    block: int | None = None) -> Clusters:
    """Per class of `labels`: PCA of the class's activations to `dims` dimensions, then the
    best (lowest inertia) of `restarts` seeded 2-means runs, and the split's silhouette
    (averaged over SILHOUETTE_SAMPLE random rows of a larger class, each against all rows).
    h: [n, d], labels: [n] int. One jitted call (classes one after another inside it: the
    silhouette holds a [SILHOUETTE_ROWS, b] distance block per class)."""
    cluster, rel, smaller, sil = _cluster_blocks(
        *_per_class_inputs(h, labels, n_classes, block), key, dims=dims, restarts=restarts)
    return Clusters(cluster, rel, smaller, sil)


def activation_clustering(h, predicted, *, key: jax.Array,
                          dims: int = AC_DIMS,
                          size_threshold: float = AC_SIZE_THRESHOLD,
                          silhouette_threshold: float = AC_SILHOUETTE_THRESHOLD,
                          n_classes: int | None = None,
                          block: int | None = None) -> Detection:
    """Activation clustering (Chen et al. 2018) with the paper's per-class decision.

    h: [n, d], predicted: [n] int (the trained model's predicted class of each training
    sample). Per predicted class: 2-means on the activations reduced to `dims` PCA
    dimensions (`cluster_classes`); the class is judged poisoned when its smaller cluster
    holds less than `size_threshold` of it and the split's silhouette exceeds
    `silhouette_threshold` (the rules of ART's `analyze_by_silhouette_score`).

    score: in a class judged poisoned, 1 - the relative size of the sample's cluster (the
    suspect smaller cluster scores above 0.5, the rest of the class below); in every other
    class 0 (a class judged clean has no suspects, so its small clusters are not ranked above
    the poisoned class's majority). flag: the smaller cluster of each poisoned class.
    classes: [K] bool, the classes judged poisoned. Seeded by `key`. ConfigError for
    size_threshold outside (0, 0.5] or silhouette_threshold outside [-1, 1].
    """
    if not 0.0 < size_threshold <= 0.5:
        raise ConfigError(f"activation clustering: expected size_threshold in (0, 0.5], "
                          f"found {size_threshold!r}")
    if not -1.0 <= silhouette_threshold <= 1.0:
        raise ConfigError(f"activation clustering: expected silhouette_threshold in [-1, 1],"
                          f" found {silhouette_threshold!r}")
    predicted = np.asarray(predicted, np.int32)
    found = cluster_classes(h, predicted, key, dims=dims, n_classes=n_classes, block=block)
    classes = (found.smaller < size_threshold) & (found.silhouette > silhouette_threshold)
    poisoned = classes[jnp.asarray(predicted)]
    score = jnp.where(poisoned, 1.0 - found.rel_size, 0.0)
    return Detection(score, poisoned & (found.rel_size < 0.5), classes)


# --- SPECTRE (Hayase et al. 2021) ----------------------------------------------------------------


def _mcd(z: jax.Array, w: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Robust mean [k] and covariance [k, k] of the valid rows of z: [b, k]: SPECTRE_STEPS
    concentration steps of FAST-MCD (Rousseeuw & Van Driessen 1999), each refitting the
    mean and covariance to the `keep` rows of smallest Mahalanobis distance, started (as
    one of DetMCD's deterministic starts, Hubert, Rousseeuw & Verdonck 2012) from the `keep`
    rows nearest the coordinate-wise median, each coordinate scaled by its MAD."""
    k = z.shape[1]
    valid = jnp.where(w[:, None] > 0, z, jnp.nan)
    median = jnp.nanmedian(valid, axis=0)
    mad = jnp.nanmedian(jnp.abs(valid - median), axis=0)
    start = jnp.sum(((z - median) / jnp.maximum(mad, 1e-12)) ** 2, axis=1)
    first = _top_in_block(-start, w, keep).astype(z.dtype)

    def step(_, subset):
        mean, cov, _ = _block_mean_cov(z, subset)
        inv = jnp.linalg.pinv(cov + 1e-6 * jnp.eye(k), hermitian=True)
        dist = jnp.einsum("bi,ij,bj->b", z - mean, inv, z - mean)
        return _top_in_block(-dist, w, keep).astype(z.dtype)

    subset = jax.lax.fori_loop(0, SPECTRE_STEPS, step, first)
    mean, cov, _ = _block_mean_cov(z, subset)
    return mean, cov


@functools.partial(jax.jit, static_argnames=("dims",))
def _spectre_blocks(h, idx, valid, quota, *, dims: int, alpha: float):
    hb = _gather(h.astype(jnp.float32), idx)  # [C, b, d]

    def per_class(block, w, q):
        mean, cov, count = _block_mean_cov(block, w)
        _, basis = _top_eigvecs(cov, dims)
        z = (block - mean) @ basis  # [b, dims]
        keep = jnp.floor((count + dims + 1) / 2).astype(jnp.int32)  # MCD's half
        r_mean, r_cov = _mcd(z, w, keep)
        values, vectors = jnp.linalg.eigh(r_cov)
        whiten = vectors / jnp.sqrt(jnp.maximum(values, 1e-6 * jnp.max(values)))[None]
        white = ((z - r_mean) @ whiten) * w[:, None]  # [b, dims], robustly whitened
        _, s_cov, _ = _block_mean_cov(white, w)
        lam, vec = jnp.linalg.eigh(s_cov)
        # QUE: Q = exp(alpha (S - I) / (||S|| - 1)), tau_i = w_i' Q w_i / tr(Q)
        top = jnp.maximum(lam[-1] - 1.0, 1e-6)
        e = jnp.exp(alpha * (lam - 1.0) / top)
        proj = white @ vec
        score = (proj ** 2) @ e / jnp.sum(e)
        return score, _top_in_block(score, w, q)

    scores, flags = jax.vmap(per_class)(hb, valid.astype(jnp.float32), quota)
    n = h.shape[0]
    return _scatter(scores, idx, n), _scatter(flags, idx, n, False)


def spectre(h, y, *, eps: float, dims: int = SPECTRE_DIMS, alpha: float = SPECTRE_ALPHA,
            n_classes: int | None = None, block: int | None = None) -> Detection:
    """SPECTRE (Hayase et al., ICML 2021): robustly whitened QUE outlier scores per class.

    h: [n, d], y: [n] training labels. Per class: the centred activations projected on the
    class's top min(dims, d) principal directions; the mean and covariance estimated by a
    minimum-covariance-determinant fit (half the class kept, so the estimate follows the
    clean samples while they are more than half of the class); the samples whitened with
    them; QUE score tau_i = w_i' Q w_i / tr(Q), Q = exp(alpha (S - I) / (||S||_2 - 1)), S
    the whitened covariance (alpha 4, the paper's). Flags the round(1.5 * eps * n_c) highest
    of each class. ConfigError for eps outside [0, 1] or alpha <= 0. One jitted call.
    """
    _check_eps(eps)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"spectre: expected alpha > 0, found {alpha!r}")
    dims = min(int(dims), int(np.shape(h)[1]))
    quota = removal_counts(y, eps, n_classes)
    score, flag = _spectre_blocks(*_per_class_inputs(h, y, n_classes, block),
                                  jnp.asarray(quota), dims=dims, alpha=float(alpha))
    return Detection(score, flag)


def scan(model: Model, params: Params, x, y, *, eps: float, key: jax.Array,
         methods=None, block: int | None = None,
         reference: tuple | None = None) -> dict[str, Detection]:
    """Every method of `methods` (names of `DETECTORS`; None: all) on one training set:
    {method: Detection}, in the order of `DETECTORS`.

    x: [n, D] the (possibly poisoned) training images, y: [n] their labels, params: the
    model trained on them. Activation clustering splits by the model's predicted class, the
    spectral methods by the label. eps: the assumed poisoned fraction (removal counts).
    reference: (x_ref [m, D], y_ref [m]) images known to be clean, which "mahalanobis" needs
    (left out without one). ConfigError for an unknown method."""
    names = [d.name for d in DETECTORS]
    methods = names if methods is None else methods
    unknown = sorted(set(methods) - set(names))
    if unknown:
        raise ConfigError(f"training-data detectors: expected methods among {names}, "
                          f"found {unknown}")
    _check_eps(eps)
    x = jnp.asarray(x)
    h = activations(model, params, x)
    y = np.asarray(y, np.int32)
    out = {}
    for d in DETECTORS:
        if d.name in methods:
            found = d.score(model, params, x, y, h, eps=eps, key=key,
                            n_classes=model.n_classes, block=block, reference=reference)
            if found is not None:
                out[d.name] = found
    return out


# --- Mahalanobis distance to clean class means (Lee et al. 2018) -----------------------------


def mahalanobis(h, y, h_ref, y_ref, *, eps: float, n_classes: int | None = None) -> Detection:
    """Each training sample's Mahalanobis distance to the clean mean of its label (Lee et al.,
    NeurIPS 2018: class-conditional Gaussians with one shared covariance, fitted here on a
    clean reference set), the round(1.5 * eps * n_c) farthest of each class flagged.

    h: [n, d] training activations, y: [n] labels; h_ref: [m, d], y_ref: [m] activations and
    labels of images known to be clean (the harness uses the test split). Unlike the
    clustering and spectral methods it does not assume the poison is a minority of its class:
    a relabelled trigger image is scored against what the clean images of its new label look
    like. score: [n] squared distance; classes without a reference image score 0.
    ConfigError for eps outside [0, 1] or a reference without images."""
    _check_eps(eps)
    h_ref, y_ref = jnp.asarray(h_ref, jnp.float32), np.asarray(y_ref, np.int32)
    if h_ref.shape[0] < 2 or h_ref.ndim != 2 or h_ref.shape[1] != np.shape(h)[1]:
        raise ConfigError(f"mahalanobis: expected clean reference activations [m >= 2, "
                          f"{np.shape(h)[1]}], found {tuple(h_ref.shape)}")
    k = max(_n_classes(y, n_classes), int(y_ref.max()) + 1)
    score = _mahalanobis_scores(jnp.asarray(h, jnp.float32), jnp.asarray(y, jnp.int32),
                                h_ref, jnp.asarray(y_ref), k)
    flag = top_fraction_per_class(score, np.asarray(y, np.int32),
                                  min(1.0, SPECTRAL_FACTOR * eps), k)
    return Detection(score, flag)


@functools.partial(jax.jit, static_argnums=4)
def _mahalanobis_scores(h, y, h_ref, y_ref, k: int):
    onehot = jax.nn.one_hot(y_ref, k, dtype=h_ref.dtype)  # [m, K]
    counts = onehot.sum(0)  # [K]
    means = (onehot.T @ h_ref) / jnp.maximum(counts, 1.0)[:, None]  # [K, d]
    centred = h_ref - means[y_ref]
    cov = centred.T @ centred / h_ref.shape[0]
    ridge = MAHALANOBIS_SHRINK * jnp.maximum(jnp.trace(cov) / cov.shape[0], 1e-12)
    chol = jax.scipy.linalg.cho_factor(cov + ridge * jnp.eye(cov.shape[0]))
    diff = h - means[y]
    dist = jnp.sum(diff * jax.scipy.linalg.cho_solve(chol, diff.T).T, axis=1)
    return jnp.where(counts[y] > 0, dist, 0.0)


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


def precision_recall_auc(detection: Detection, mask, labels=None) -> dict[str, float]:
    """precision and recall of `detection.flag`, ROC-AUC of `detection.score`, against the
    poison mask ([n] bool, the ground truth). Precision is 0 when nothing is flagged; AUC is
    NaN when the mask is all one value. With labels ([n] int, the training labels) also
    "auc_in_class": the ROC-AUC among the samples of the label holding the most poisoned
    samples (the per-class ranking the detectors make, without comparing classes)."""
    flag = np.asarray(detection.flag, bool)
    truth = np.asarray(mask, bool)
    score = np.asarray(detection.score)
    tp = int(np.sum(flag & truth))
    precision = tp / flag.sum() if flag.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else float("nan")
    auc = roc_auc(score, truth) if 0 < truth.sum() < truth.size else float("nan")
    out = {"precision": float(precision), "recall": float(recall), "auc": auc,
           "flagged": int(flag.sum()), "poisoned": int(truth.sum())}
    if labels is not None:
        labels = np.asarray(labels).ravel()
        out["auc_in_class"] = float("nan")
        if truth.any():
            inside = labels == np.bincount(labels[truth]).argmax()
            if 0 < truth[inside].sum() < inside.sum():
                out["auc_in_class"] = roc_auc(score[inside], truth[inside])
    return out


# --- the registry's records (`Detector`; assembled in detection/__init__.py) ------------------


def _ac(model, params, x, y, h, *, eps, key, n_classes, block, reference):
    predicted = np.asarray(jnp.argmax(predict(model, params, x), -1), np.int32)
    return activation_clustering(h, predicted, key=key, n_classes=n_classes, block=block)


def _spectral(model, params, x, y, h, *, eps, key, n_classes, block, reference):
    return spectral_signatures(h, y, eps=eps, n_classes=n_classes, block=block)


def _spectre(model, params, x, y, h, *, eps, key, n_classes, block, reference):
    return spectre(h, y, eps=eps, n_classes=n_classes, block=block)


def _mahalanobis(model, params, x, y, h, *, eps, key, n_classes, block, reference):
    if reference is None:
        return None
    x_ref, y_ref = reference
    return mahalanobis(h, y, activations(model, params, jnp.asarray(x_ref)), y_ref, eps=eps,
                       n_classes=n_classes)


DETECTORS: tuple[Detector, ...] = (
    Detector("activation-clustering", "sample", _ac, "activation clustering",
             "Chen et al., arXiv:1811.03728",
             "1 - relative size of the sample's 2-means cluster (PCA 10) in a predicted class "
             "judged poisoned (smaller cluster < 35%, silhouette > 0.1), else 0"),
    Detector("spectral-signatures", "sample", _spectral, "spectral signatures",
             "Tran, Li & Madry, NeurIPS 2018",
             "squared projection on the top singular vector of its class"),
    Detector("spectre", "sample", _spectre, "SPECTRE", "Hayase et al., ICML 2021",
             "QUE score after robust (MCD) whitening of its class's top 32 principal "
             "directions"),
    Detector("mahalanobis", "sample", _mahalanobis, "Mahalanobis", "Lee et al., NeurIPS 2018",
             "squared Mahalanobis distance to the clean test images' mean of its label "
             "(shared covariance)"),
)  # the training-data detectors `scan` runs, in its output's order

