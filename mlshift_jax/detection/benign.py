"""Benign change: what users do to clean models, so that a detector's null knows it.

A backdoor scan calibrated only on clean retrains of one recipe flags what users do to
clean models every day (a 30%-magnitude-pruned clean MLP scored an anomaly index of 2.53
against a threshold of 2.00). `benign_null` trains a population of clean models in which
each member is one of these benign variants, each with a fresh parent of its own (its own
seed, sample order and init), so the members are independent draws:

- "retrain": the recipe as given, another seed and data order;
- "retrain-sample": trained on a random half of the training set;
- "retrain-epochs": one epoch more;
- "retrain-lr-low" / "retrain-lr-high": half / twice the learning rate;
- "prune-10" / "prune-30" / "prune-50": magnitude pruning (Han et al. 2015, "Learning both
  Weights and Connections for Efficient Neural Networks"): the smallest |w| of each weight
  array (leaves of 2 or more dimensions) set to 0, that share per array;
- "quant-8" / "quant-4": symmetric uniform weight quantization per array (Jacob et al. 2018)
  to 2^(b-1) - 1 levels each side of 0 (weights only; biases stay float32);
- "float16": every leaf rounded to float16 and back;
- "fine-tune": one more epoch at a tenth of the learning rate on a random clean sample of
  `FINE_TUNE_SIZE` images;
- "distill": hard-label distillation (Hinton et al. 2015 with the teacher's argmax as label):
  a fresh student trained on the training images labelled by a clean teacher.

Every variant trains with the population trainers (one vmap per group of members, see
`models/population.py`); the weight transforms are pure functions of one model's params
(`transform`), vmapped over the members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.population import OWN_FIT, Plan, fit_group, init_members
from mlshift_jax.models.retrain import run_in_groups, sample_indices, train_sampled
from mlshift_jax.models.zoo import Params
from mlshift_jax.poisoning.poison import make_config

VARIANTS = ("retrain", "retrain-sample", "retrain-epochs", "retrain-lr-low", "retrain-lr-high",
            "prune-10", "prune-30", "prune-50", "quant-8", "quant-4", "float16", "fine-tune",
            "distill")
TRANSFORMS = {"prune-10": ("prune", 0.1), "prune-30": ("prune", 0.3), "prune-50": ("prune", 0.5),
              "quant-8": ("quant", 8), "quant-4": ("quant", 4), "float16": ("float16", None)}
FINE_TUNE_SIZE = 10_000  # clean images a fine-tuned member sees (fewer when the data has fewer)
FINE_TUNE_LR = 0.1  # the fine-tune's learning rate, as a share of the recipe's
BENIGN_STREAM = 0xBE9  # seeds of the second stage (fine-tune sample, distilled student)
TRAIN_BUDGET = 800 * 2**20  # bytes one group of null models may train on (`train_chunk`)


def prune(params: Params, share: float) -> Params:
    """Magnitude pruning: in each weight leaf (ndim >= 2) the `share` of entries with the
    smallest |w| set to 0 (ties at the cut may prune a few more); other leaves unchanged."""
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"prune: expected a share in [0, 1), found {share!r}")

    def one(w):
        if w.ndim < 2:
            return w
        flat = jnp.abs(w).reshape(-1)
        k = int(np.floor(share * flat.size))
        if k == 0:
            return w
        cut = jnp.sort(flat)[k - 1]
        return jnp.where(jnp.abs(w) <= cut, jnp.zeros_like(w), w)

    return jax.tree.map(one, params)


def quantize(params: Params, bits: int) -> Params:
    """Symmetric uniform quantization of each weight leaf (ndim >= 2): scale = max|w| /
    (2^(bits-1) - 1), w -> round(w / scale) * scale; other leaves unchanged."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"quantize: expected bits an integer in 2..16, found {bits!r}")
    levels = 2 ** (bits - 1) - 1

    def one(w):
        if w.ndim < 2:
            return w
        scale = jnp.maximum(jnp.max(jnp.abs(w)), 1e-12) / levels
        return (jnp.round(w / scale) * scale).astype(w.dtype)

    return jax.tree.map(one, params)


def to_float16(params: Params) -> Params:
    """Every leaf rounded to float16 and back to its dtype."""
    return jax.tree.map(lambda w: w.astype(jnp.float16).astype(w.dtype), params)


def transform(params: Params, variant: str) -> Params:
    """One model's params under a weight-transform variant (prune-*, quant-*, float16)."""
    if variant not in TRANSFORMS:
        raise ConfigError(f"benign: expected one of {', '.join(TRANSFORMS)}, found {variant!r}")
    kind, arg = TRANSFORMS[variant]
    if kind == "prune":
        return prune(params, arg)
    if kind == "quant":
        return quantize(params, arg)
    return to_float16(params)


def variants_of(n: int, variants: Sequence[str] = VARIANTS) -> list[str]:
    """The variant of each of n null members: `variants` cycled (member i: variants[i % V])."""
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"benign: expected variants among {', '.join(VARIANTS)}, "
                              f"found {v!r}")
    if not variants:
        raise ConfigError("benign: expected at least one variant, found none")
    return [variants[i % len(variants)] for i in range(n)]


def train_chunk(m: int, size: int, n_inputs: int, budget: int | None = None) -> int:
    """Null models trained together: as many of m as keep one group's training copies (the
    gathered sample and its poisoned copy, float32 [size, n_inputs] each) within `budget`
    bytes (default TRAIN_BUDGET), at least 1. Full MNIST (60,000 x 784): 376 MB a model, so
    2 at a time; the whole first scan then stays under 3 GB (measured: docs/cli.md, Caches)."""
    per_member = 2 * size * n_inputs * 4
    return int(max(1, min(m, (TRAIN_BUDGET if budget is None else budget) // per_member)))


def _train(plan: Plan, seeds, x, y, size, chunk, progress) -> Params:
    pop, _ = train_sampled(plan, [make_config("clean")] * len(seeds), x, y, seeds=seeds,
                           size=size, chunk=chunk, progress=progress)
    return pop.params


@partial(jax.jit, static_argnames=("plan",))
def _fit_on(plan: Plan, group: dict, x: jax.Array, y: jax.Array) -> Params:
    """Train a group from its params on its own rows: group {"params", "shuffle_key",
    "idx" [g, s], "labels" [g, s]}; x [n, D] shared."""
    return fit_group(plan, group, x[group["idx"]], group["labels"])


@partial(jax.jit, static_argnames=("model",))
def _teacher_labels(model, params: Params, x: jax.Array) -> jax.Array:
    """argmax of a stack of teachers on x [n, D] -> int32 [m, n]."""
    one = lambda p: jnp.argmax(jax.vmap(model.apply, in_axes=(None, 0))(p, x), -1)  # noqa: E731
    return jax.lax.map(one, params).astype(jnp.int32)


def _second_stage(plan: Plan, params: Params, seeds, x, y, idx, labels, chunk,
                  progress) -> Params:
    """Train params [m, ...] further on rows idx [m, s] with labels [m, s], in groups."""
    _, keys = init_members(plan, [int(s) + BENIGN_STREAM for s in seeds], int(x.shape[1]))
    members = {"params": params, "shuffle_key": keys, "idx": jnp.asarray(idx, jnp.int32),
               "labels": jnp.asarray(labels, jnp.int32)}
    m = len(seeds)
    chunk = min(chunk, m)
    first = jax.tree.map(lambda a: a[:chunk], members)
    compiled = _fit_on.lower(plan, first, x, y).compile()
    return run_in_groups(compiled, members, m, chunk, x, y, progress=progress)


def fine_tune(plan: Plan, parents: Params, seeds: Sequence[int], x, y, *, size: int,
              chunk: int, progress=None) -> Params:
    """"fine-tune": each parent (stacked params [m, ...]) trained one more epoch at
    FINE_TUNE_LR of the recipe's rate on its own random clean sample of FINE_TUNE_SIZE
    images (fewer when the data has fewer; `size` unused). x: [n, D], y: [n] host labels;
    seeds: one per parent (its sample and order). -> params [m, ...]."""
    x = jnp.asarray(x, jnp.float32)
    y = np.asarray(y)
    n = len(y)
    idx = sample_indices([int(sd) + BENIGN_STREAM for sd in seeds], n, min(FINE_TUNE_SIZE, n))
    return _second_stage(plan._replace(lr=plan.lr * FINE_TUNE_LR, epochs=1), parents, seeds,
                         x, y, idx, y[idx], chunk, progress)


def distill(plan: Plan, parents: Params, seeds: Sequence[int], x, y, *, size: int,
            chunk: int, progress=None) -> Params:
    """"distill": hard-label distillation (Hinton et al. 2015, the teacher's argmax as
    label): for each teacher (stacked params [m, ...]) a fresh student of the recipe trained
    on `size` random training images labelled by the teacher. -> params [m, ...]."""
    x = jnp.asarray(x, jnp.float32)
    y = np.asarray(y)
    idx = sample_indices([int(sd) + BENIGN_STREAM for sd in seeds], len(y), size)
    labels = np.concatenate([np.asarray(_teacher_labels(
        plan.arch, jax.tree.map(lambda a, k=k: a[k:k + 1], parents), x[idx[k]]))
        for k in range(len(seeds))])
    start, _ = init_members(plan, [int(sd) + 2 * BENIGN_STREAM for sd in seeds],
                            int(x.shape[1]))
    return _second_stage(plan, start, seeds, x, y, idx, labels, chunk, progress)


SECOND_STAGE = {"fine-tune": fine_tune, "distill": distill}  # variants trained from a parent


def benign_null(plan: Plan, x, y, *, seeds: Sequence[int], size: int, chunk: int,
                variants: Sequence[str] = VARIANTS,
                log: Callable[[str], None] | None = None) -> tuple[Params, list[str]]:
    """Train len(seeds) clean models, member i as variant `variants_of(...)[i]` with seed i.

    plan: the recipe's `population.Plan` (a user recipe with its own trainer gets only the
    variants that need no trainer of the harness: its retrains and the weight transforms);
    x: [n, D], y: [n] the clean training set; size: training images of a "retrain" (each in
    its own order, or sample); chunk: members trained together (`train_chunk`); log:
    progress lines. Returns (params stacked [m, ...] in member order, the variant names).
    """
    seeds = [int(s) for s in seeds]
    names = variants_of(len(seeds), variants)
    if plan.kind == OWN_FIT:  # no harness trainer for the second stage or other settings
        names = [v if v == "retrain" or v in TRANSFORMS else "retrain" for v in names]
    x = jax.device_put(jnp.asarray(x, jnp.float32))
    y_host = np.asarray(y)

    def progress(what):
        if log is None:
            return None
        return lambda done, m, s: log(f"null: {what}: trained {done} of {m} models, {s:.0f} s")

    groups = {  # members trained alike: (plan, sample size) per training setting
        "default": (plan, size),
        "retrain-sample": (plan, max(1, size // 2)),
        "retrain-epochs": (plan._replace(epochs=plan.epochs + 1), size),
        "retrain-lr-low": (plan._replace(lr=plan.lr * 0.5), size),
        "retrain-lr-high": (plan._replace(lr=plan.lr * 2.0), size),
    }
    setting = [v if v in groups else "default" for v in names]
    out: list = [None] * len(seeds)
    for name, (p, s) in groups.items():
        rows = [i for i, g in enumerate(setting) if g == name]
        if not rows:
            continue
        params = _train(p, [seeds[i] for i in rows], x, y_host, s, min(chunk, len(rows)),
                        progress(name if name != "default" else "retrains and parents"))
        for j, i in enumerate(rows):
            out[i] = jax.tree.map(lambda a, j=j: np.asarray(a[j]), params)
    stack = jax.tree.map(lambda *a: np.stack(a), *out)
    for kind in ("fine-tune", "distill"):
        rows = [i for i, v in enumerate(names) if v == kind]
        if not rows:
            continue
        parents = jax.tree.map(lambda a, rows=rows: a[np.asarray(rows)], stack)
        trained = SECOND_STAGE[kind](plan, parents, [seeds[i] for i in rows], x, y_host,
                                     size=size, chunk=min(chunk, len(rows)),
                                     progress=progress(kind))
        for j, i in enumerate(rows):
            for leaf, new in zip(jax.tree.leaves(stack), jax.tree.leaves(trained), strict=True):
                leaf[i] = np.asarray(new[j])
    for v in TRANSFORMS:
        rows = np.asarray([i for i, name in enumerate(names) if name == v], int)
        if rows.size:
            moved = jax.vmap(partial(transform, variant=v))(
                jax.tree.map(lambda a, rows=rows: jnp.asarray(a[rows]), stack))
            for leaf, new in zip(jax.tree.leaves(stack), jax.tree.leaves(moved), strict=True):
                leaf[rows] = np.asarray(new)
    return stack, names
