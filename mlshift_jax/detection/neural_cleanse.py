"""Reference-free backdoor scan: reverse-engineer a minimal trigger for every class at once.

Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019). For each candidate target
class t, find the smallest mask m (over the image's H x W pixels, shared by its channels) and a
pattern p (in the model's input range) such that stamping them,

    x' = (1 - m) * x + m * p,

sends clean images of other classes to t:

    min_{m, p}  mean_x CE(f(x'), t) + cost_t * |m|_1.

A backdoored model has a target class reachable with a far smaller mask than the others. The
L1 norms of the best masks (one per class) are scored with the **anomaly index**, the robust
z-score of the smallest norm: (median - norm) / (1.4826 * MAD); Wang et al. flag an index
above 2. A clean model can have a naturally small-norm class (the study's MLP: digit 1), so
`calibrate_threshold` sets the threshold on the indices of clean models of the same recipe
and reports its leave-one-out false-positive rate.

Everything is one jitted call: `vmap` over the classes (every target at once), and
`scan_population` adds a `vmap` over models. The cost of each class follows Neural Cleanse's
schedule: raised while the trigger's attack rate on the batch is at least `target_rate`,
lowered otherwise (smoothly, per step), and the smallest mask that reached the target rate is
kept.

Shapes: x [N, D] flat images (D = H*W*C, row-major (H, W, C), as everywhere in the harness);
masks [K, H, W]; patterns [K, H, W, C]; norms, rates [K].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlshift_jax.core.checks import count_nonfinite
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import class_null
from mlshift_jax.detection.class_null import MAD_SCALE
from mlshift_jax.detection.detector import Detector
from mlshift_jax.models.train import map_chunks
from mlshift_jax.models.zoo import Model, Params

SIGN = -1.0  # a small mask norm is suspicious (`class_null`'s sign)
TEXTBOOK_THRESHOLD = 2.0  # Wang et al.'s cut-off on the anomaly index
_TINY = 1e-12


class ScanConfig(NamedTuple):
    """Settings of the trigger search (hashable: a static argument of the jit).

    steps: Adam steps per class; batch: images per step (cycled through the N given);
    lr: Adam's rate on the mask and pattern logits; init_cost: the starting weight of |m|_1;
    target_rate: the attack rate a trigger must reach to count; cost_factor: how much the
    cost moves per `patience` steps above (up) or below (down, 1.5x faster) the target rate.
    """

    steps: int = 300
    batch: int = 256
    lr: float = 0.1
    init_cost: float = 1e-3
    target_rate: float = 0.99
    cost_factor: float = 1.5
    patience: int = 10

    def validate(self) -> ScanConfig:
        for name in ("steps", "batch", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"scan: expected {name} an integer >= 1, found {value!r}")
        for name in ("lr", "init_cost", "cost_factor"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"scan: expected {name} a finite number > 0, found {value!r}")
        if not 0.0 < self.target_rate <= 1.0:
            raise ConfigError(f"scan: expected target_rate in (0, 1], found {self.target_rate!r}")
        return self


DEFAULT = ScanConfig()


class Triggers(NamedTuple):
    """The reversed trigger of every class. masks: [..., K, H, W] in [0, 1]; patterns:
    [..., K, H, W, C] in the input range; norms: [..., K] L1 norm of each mask (pixels);
    rates: [..., K] attack rate of the stamped trigger on the images not of that class;
    reached: [..., K] bool, whether any step reached `target_rate` (else the last mask)."""

    masks: jax.Array
    patterns: jax.Array
    norms: jax.Array
    rates: jax.Array
    reached: jax.Array


def _log_dist(model: Model, scores: jax.Array) -> jax.Array:
    """log of the output distribution (model.probs normalized to sum to 1). scores: [K]."""
    p = model.probs(scores)
    return jnp.log(jnp.maximum(p / jnp.sum(p), _TINY))


def stamp(x: jax.Array, mask: jax.Array, pattern: jax.Array,
          input_shape: tuple[int, ...]) -> jax.Array:
    """(1 - m) * x + m * p on flat images. x: [N, D]; mask: [H, W]; pattern: [H, W, C].

    The mask is spread over the channels and both are flattened to [D] (row-major (H, W, C),
    like x), so the arithmetic runs on x's own [N, D] layout: the same products as on
    [N, H, W, C] images, but XLA:CPU ran the whole trigger search 2.3x faster this way
    (MNIST, 10 classes x 64 images a step, this project's 2-core CPU)."""
    m = jnp.broadcast_to(mask[..., None], input_shape).reshape(-1)
    return (1.0 - m) * x + m * pattern.reshape(-1)


def _decode(v: dict, lo, hi) -> tuple[jax.Array, jax.Array]:
    return jax.nn.sigmoid(v["mask"]), lo + (hi - lo) * jax.nn.sigmoid(v["pattern"])


def _one_class(model: Model, cfg: ScanConfig, params: Params, batches: jax.Array,
               labels: jax.Array, x_all: jax.Array, y_all: jax.Array, target: jax.Array,
               key: jax.Array) -> Triggers:
    """The trigger search for ONE target class. batches: [S, b, D], labels: [S, b]."""
    h, w, c = model.input_shape
    lo, hi = (jnp.asarray(v, x_all.dtype) for v in model.input_range)
    opt = optax.adam(cfg.lr)
    k1, k2 = jax.random.split(key)
    v0 = {"mask": jax.random.uniform(k1, (h, w), x_all.dtype, -1.0, 1.0),
          "pattern": jax.random.uniform(k2, (h, w, c), x_all.dtype, -1.0, 1.0)}
    up = cfg.cost_factor ** (1.0 / cfg.patience)
    down = cfg.cost_factor ** (1.5 / cfg.patience)
    apply = jax.vmap(model.apply, in_axes=(None, 0))

    def objective(v, xb, yb, cost):
        mask, pattern = _decode(v, lo, hi)
        scores = apply(params, stamp(xb, mask, pattern, model.input_shape))
        ce = -jax.vmap(lambda s: _log_dist(model, s)[target])(scores)
        other = (yb != target).astype(xb.dtype)
        hit = (jnp.argmax(scores, -1) == target).astype(xb.dtype)
        rate = jnp.sum(hit * other) / jnp.maximum(jnp.sum(other), 1.0)
        norm = jnp.sum(mask)
        return jnp.mean(ce) + cost * norm, (rate, norm)

    def step(carry, i):
        v, s, cost, best_norm, best_v = carry
        xb, yb = batches[i % batches.shape[0]], labels[i % labels.shape[0]]
        grads, (rate, norm) = jax.grad(objective, has_aux=True)(v, xb, yb, cost)
        ok = rate >= cfg.target_rate
        better = ok & (norm < best_norm)
        best_norm = jnp.where(better, norm, best_norm)
        best_v = jax.tree.map(lambda b, n: jnp.where(better, n, b), best_v, v)
        cost = jnp.where(ok, cost * up, cost / down)
        updates, s = opt.update(grads, s, v)
        return (optax.apply_updates(v, updates), s, cost, best_norm, best_v), None

    carry = (v0, opt.init(v0), jnp.asarray(cfg.init_cost, x_all.dtype),
             jnp.asarray(jnp.inf, x_all.dtype), v0)
    v, _, _, best_norm, best_v = jax.lax.scan(step, carry, jnp.arange(cfg.steps))[0]
    reached = jnp.isfinite(best_norm)
    v = jax.tree.map(lambda b, last: jnp.where(reached, b, last), best_v, v)
    mask, pattern = _decode(v, lo, hi)
    pred = jnp.argmax(apply(params, stamp(x_all, mask, pattern, model.input_shape)), -1)
    other = y_all != target
    rate = jnp.sum((pred == target) & other) / jnp.maximum(jnp.sum(other), 1)
    return Triggers(mask, pattern, jnp.sum(mask), rate, reached)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _scan(model: Model, cfg: ScanConfig, params: Params, x: jax.Array, y: jax.Array,
          key: jax.Array) -> Triggers:
    n = x.shape[0]
    b = min(cfg.batch, n)
    perm = jax.random.permutation(jax.random.fold_in(key, 0), n)
    n_batches = max(1, n // b)
    idx = perm[: n_batches * b].reshape(n_batches, b)
    targets = jnp.arange(model.n_classes)
    keys = jax.random.split(jax.random.fold_in(key, 1), model.n_classes)
    one = functools.partial(_one_class, model, cfg, params, x[idx], y[idx], x, y)
    return jax.vmap(one)(targets, keys)


@functools.partial(jax.jit, static_argnames=("model", "cfg", "chunk"))
def _scan_models(model: Model, cfg: ScanConfig, stacked: Params, x: jax.Array, y: jax.Array,
                 key: jax.Array, chunk: int) -> Triggers:
    if chunk == 1:  # one model at a time, unbatched: a vmap over one model ran 2x slower
        return jax.lax.map(lambda p: _scan(model, cfg, p, x, y, key), stacked)
    group = jax.vmap(functools.partial(_scan, model, cfg), in_axes=(0, None, None, None))
    return map_chunks(lambda p: group(p, x, y, key), stacked, chunk)


def _check(model: Model, x, y) -> tuple[jax.Array, jax.Array]:
    if not isinstance(model, Model):
        raise ConfigError(f"scan: expected a models.Model, found {type(model).__name__}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    d = int(np.prod(model.input_shape))
    if x.ndim != 2 or x.shape[1] != d or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ConfigError(f"scan: expected x float [N, {d}] (images {model.input_shape} "
                          f"flattened), found {x.dtype}{tuple(x.shape)}")
    if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ConfigError(f"scan: expected y int [{x.shape[0]}], found {y.dtype}{tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ConfigError(f"scan: expected at least 2 clean images, found {x.shape[0]}")
    if int(count_nonfinite(x)):
        raise ConfigError("scan: expected finite images, found NaN or inf")
    if len(model.input_shape) != 3:
        raise ConfigError(f"scan: expected the model's input_shape (H, W, C), found "
                          f"{model.input_shape}")
    return x, y


def reverse_triggers(model: Model, params: Params, x, y, *, key: jax.Array,
                     config: ScanConfig = DEFAULT) -> Triggers:
    """The minimal trigger of every class of one model, in one compiled call.

    model: a `models.Model` (any input shape and class count); params: its weights; x: [N, D]
    clean images (a few hundred suffice), y: [N] their labels; key: the random init and batch
    order. Returns `Triggers` with a leading class axis K. Raises ConfigError on bad inputs.
    """
    x, y = _check(model, x, y)
    return _scan(model, config.validate(), params, x, y, key)


def scan_population(model: Model, stacked_params: Params, x, y, *, key: jax.Array,
                    config: ScanConfig = DEFAULT, chunk: int | None = None) -> Triggers:
    """`reverse_triggers` for a population: stacked_params leaves [M, ...] -> Triggers [M, K, ...].

    One jit: `chunk` models per vmap (each vmapping its classes), `lax.map` over the groups;
    every model sees the same images and key. chunk None: 1 on CPU, and all M at once on an
    accelerator, which a single model leaves idle. chunk 1 maps over the models unbatched:
    on CPU a vmap over models turns the model's matrix products into batched ones, which run
    slower even for a vmap over one model.
    """
    x, y = _check(model, x, y)
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else m
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"scan: expected chunk an integer >= 1, found {chunk!r}")
    return _scan_models(model, config.validate(), stacked_params, x, y, key, int(chunk))


def scan_in_groups(model: Model, stacked_params: Params, x, y, *, key: jax.Array,
                   config: ScanConfig = DEFAULT, group: int = 4,
                   progress=None) -> Triggers:
    """`scan_population`, `group` models per compiled call, one call after another
    (`retrain.run_in_groups`): the same result, with progress(done, M, seconds) after each
    group so a long null reports as it goes. -> Triggers [M, K, ...] as numpy arrays."""
    from mlshift_jax.models.retrain import run_in_groups

    x, y = _check(model, x, y)
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ConfigError(f"scan: expected group an integer >= 1, found {group!r}")
    group = int(min(group, m))
    chunk = 1 if jax.default_backend() == "cpu" else group
    first = jax.tree.map(lambda a: jnp.asarray(a[:group]), stacked_params)
    compiled = _scan_models.lower(model, config.validate(), first, x, y, key,
                                  chunk=chunk).compile()
    return Triggers(*run_in_groups(compiled, stacked_params, m, group, x, y, key,
                                   progress=progress))


def compile_triggers(model: Model, params: Params, x, y, *, key: jax.Array,
                     config: ScanConfig = DEFAULT):
    """`reverse_triggers`'s compiled call, for timing: -> a function of no arguments that
    runs the search (same arguments, same result; the trace and compile happen here)."""
    x, y = _check(model, x, y)
    args = (params, x, y, key)
    compiled = _scan.lower(model, config.validate(), *args).compile()
    return functools.partial(compiled, *args)


def compile_population(model: Model, stacked_params: Params, x, y, *, key: jax.Array,
                       config: ScanConfig = DEFAULT, chunk: int | None = None):
    """`scan_population`'s compiled call, for timing: -> a function of no arguments that runs
    the scan (same arguments, same result; the trace and compile happen here)."""
    x, y = _check(model, x, y)
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    chunk = (1 if jax.default_backend() == "cpu" else m) if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ConfigError(f"scan: expected chunk an integer >= 1, found {chunk!r}")
    args = (stacked_params, x, y, key)
    compiled = _scan_models.lower(model, config.validate(), *args, chunk=int(chunk)).compile()
    return functools.partial(compiled, *args)


def anomaly_indices(norms) -> np.ndarray:
    """Robust z-score of each class's mask norm below the median: (median - norm) / (1.4826 *
    MAD). norms: [..., K] -> [..., K] (positive = smaller than typical)."""
    norms = np.asarray(norms, np.float64)
    med = np.median(norms, axis=-1, keepdims=True)
    mad = MAD_SCALE * np.median(np.abs(norms - med), axis=-1, keepdims=True)
    return (med - norms) / np.maximum(mad, _TINY)


def anomaly_index(norms) -> tuple[np.ndarray, np.ndarray]:
    """(index, class): the largest anomaly index of each model and the class it belongs to
    (Neural Cleanse's suspected target). norms: [..., K] -> two arrays of shape [...]."""
    idx = anomaly_indices(norms)
    return idx.max(axis=-1), idx.argmax(axis=-1)


class Threshold(NamedTuple):
    """A calibrated anomaly-index threshold. value: flag an index above it; n_null: clean
    models it was set on; fpr_loo: leave-one-out false-positive rate on them (each clean model
    judged by the threshold set on the others); alpha: the target false-positive rate."""

    value: float
    n_null: int
    fpr_loo: float
    alpha: float


def _threshold(null: np.ndarray, alpha: float, floor: float) -> float:
    """The smallest threshold >= floor with at most a share alpha of `null` above it."""
    null = np.sort(null)
    allowed = int(np.floor(alpha * len(null)))  # how many null indices may lie above
    return float(max(floor, null[len(null) - 1 - allowed]))


def calibrate_threshold(null_indices, *, alpha: float = 0.05,
                        floor: float = TEXTBOOK_THRESHOLD) -> Threshold:
    """Threshold on the anomaly index from clean models of the same recipe.

    null_indices: [M] anomaly indices of M clean models. The threshold is the smallest value,
    at least `floor` (Wang et al.'s 2), that at most a share alpha of them exceed; fpr_loo is
    measured leave-one-out. Raises ConfigError for fewer than 2 models or alpha outside (0, 1).
    """
    null = np.asarray(null_indices, np.float64).ravel()
    if null.size < 2 or not np.all(np.isfinite(null)):
        raise ConfigError(f"scan: expected at least 2 finite null anomaly indices, found "
                          f"{null.tolist()}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"scan: expected alpha in (0, 1), found {alpha!r}")
    value = _threshold(null, alpha, floor)
    flagged = [null[i] > _threshold(np.delete(null, i), alpha, floor) for i in range(null.size)]
    return Threshold(value, int(null.size), float(np.mean(flagged)), float(alpha))


def verdict(norms, threshold: float) -> dict:
    """The scan's answer for one model. norms: [K] -> {verdict, target, anomaly_index,
    threshold}: "backdoor" with the suspected target class when the index exceeds the
    threshold, else "clean" with target None."""
    index, cls = anomaly_index(np.asarray(norms)[None])
    index, cls = float(index[0]), int(cls[0])
    flagged = index > threshold
    return {"verdict": "backdoor" if flagged else "clean", "target": cls if flagged else None,
            "anomaly_index": index, "threshold": float(threshold)}


class_score = class_null.scorer(SIGN, "reversed-trigger mask norm", "Neural Cleanse")


DETECTORS: tuple[Detector, ...] = (
    Detector("neural-cleanse", "model", class_score, "Neural Cleanse",
             "Wang et al., IEEE S&P 2019",
             "largest robust z of a class's log reversed-trigger mask norm against the same "
             "class in a null of benign models (the within-model anomaly index is reported "
             "beside it)"),
)
