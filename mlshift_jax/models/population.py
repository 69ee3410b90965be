"""A whole poisoning sweep trained as one population: one jit, `vmap` over the model axis.

Member i is the model `registry.fit(recipe, TrainConfig(seed=seeds[i]), x_i, y_i)` would train
on `(x_i, y_i, _) = poison.apply(poison_key(seeds[i]), x, y, configs[i])`; `train_poisoned`
trains them all in one compiled call. Only the CLEAN training set goes in (one copy, shared
by every member); each member's poisoned copy is built inside the jit from it and the
member's `poison.PoisonArrays`, right before that member trains (`poison.poison_arrays`), and
the trainers are those of `train.py` (`train_seed_sgd_population`,
`train_minibatch_population`).

Members are trained `chunk` at a time: `lax.map` over groups of `chunk` members, each group
one `vmap`. So at most `chunk` poisoned copies of the training set exist at once (188 MB each
for the full MNIST in float32). `chunk_size` picks it:

- Every backend: the whole population in one `vmap`, capped so the poisoned copies take at
  most a quarter of the memory (the device's; on CPU the machine's RAM). Measured on this
  project's 2-core CPU (`bench/test_bench_population.py`, 7-model E7 sweep on 10,000 images,
  one run on a quiet machine): seed-mlp one vmap 2.05 s, one model at a time (`lax.map`)
  2.06 s, a Python loop of single trainings 2.08 s; mlp-ce 0.95 s, 1.10 s and 1.02 s. So one
  vmap is at least as fast as the loop on CPU too; on GPU and TPU it is what fills the device
  (the issue's H200 prototype: 64 minibatch models in 58 ms per epoch; not re-measured here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import usermodels
from mlshift_jax.models.recipes import (
    MINIBATCH,
    NUMPY,
    OWN_FIT,
    SEED_SGD,
    Recipe,
    TrainConfig,
    resolve,
)
from mlshift_jax.models.registry import get_recipe
from mlshift_jax.models.train import (
    init_population,
    map_chunks,
    train_minibatch_population,
    train_seed_sgd_population,
)
from mlshift_jax.models.zoo import STUDY_SPEC, Model, Params, check_spec, guess_spec
from mlshift_jax.poisoning.poison import PoisonConfig, poison_arrays, stack_arrays, to_arrays

POISON_STREAM = 0x9015  # fold_in(key(seed), POISON_STREAM) draws a member's poisoning
DEFAULT_DEVICE_BYTES = 16 * 2**30  # assumed when a device does not report its memory
MEMORY_SHARE = 0.25  # share of device memory the poisoned copies may take


class Plan(NamedTuple):
    """How a population is trained (hashable: a static argument of the jit).

    kind: "seed-sgd" (the study's per-sample rule, `train.train_seed_sgd`), "minibatch"
    (`train.train_minibatch`) or "own-fit" (a user Recipe's own `fit`, which cannot be
    vmapped: its members train one after another, `fit(arch, train, x_i, y_i)` with
    `train.seed` the member's seed); the other fields are the recipe's resolved settings.
    """

    recipe: str
    kind: str
    arch: Model
    hidden: int
    lr: float
    epochs: int
    optimizer: str | None = None
    batch_size: int | None = None
    fit: Callable | None = None  # own-fit: the recipe's fit
    train: TrainConfig | None = None  # own-fit: its resolved TrainConfig


class Population(NamedTuple):
    """A trained population. params: leaves [m, ...]; masks: bool [m, n] (the poisoned
    training samples of each member); counts: int [m]; chunk: members trained together;
    compile_s: trace + compile; train_s: the compiled run, ended by block_until_ready."""

    params: Params
    masks: np.ndarray
    counts: np.ndarray
    chunk: int
    compile_s: float
    train_s: float
    plan: Plan


def plan_for(recipe: str | None, train: TrainConfig | None = None, spec=None, *,
             model: Model | None = None) -> Plan:
    """The training plan of recipe `recipe` with `train`'s settings (recipe defaults filled)
    for data of `spec` (a models.Spec, Dataset or Model; default: the study's MNIST).

    recipe: a JAX built-in ("seed-mlp", "mlp-sgd", "mlp-ce", "cnn") or a user model
    "pkg.module:attr" that the harness trains (a flax / nnx / equinox module or a
    models.Model record: `train.train_minibatch` on its Model, so a population is a vmap of
    that over members, each initialised by the Model's `init(key)`). model: the Model to
    train (e.g. the one `registry.load_model` rebuilt, with its hyper-parameters) instead of
    the one the recipe builds; it must take the spec's images and classes. recipe None: a
    user's Model with no ref (`usermodels.wrap` of a Python object), trained as user models
    are (`usermodels.DEFAULTS`); model is then required. ConfigError for the numpy baseline
    and for a user Recipe with a trainer of its own (it cannot be vmapped).
    """
    if recipe is None:
        if model is None:
            raise ConfigError("population: expected a recipe name or a model, found neither")
        r = Recipe(model.name, lambda spec, cfg: model, usermodels.fit,
                   dict(usermodels.DEFAULTS), "a user's Model, trained as user models are",
                   trainer=MINIBATCH)
    else:
        r = get_recipe(recipe)
    cfg = resolve(r, train or TrainConfig())
    spec = check_spec(STUDY_SPEC if spec is None else spec)
    arch = r.build(spec, cfg) if model is None else model
    if (tuple(arch.input_shape), int(arch.n_classes)) != (tuple(spec.input_shape),
                                                           int(spec.n_classes)):
        raise ConfigError(f"population: model {arch.name} takes images "
                          f"{tuple(arch.input_shape)} with {arch.n_classes} classes; the data "
                          f"has {tuple(spec.input_shape)} with {spec.n_classes}")
    if r.trainer == OWN_FIT:
        return Plan(r.name, OWN_FIT, arch, cfg.hidden, float(cfg.lr), cfg.epochs,
                    fit=r.fit, train=cfg)
    if r.trainer == SEED_SGD:
        return Plan(r.name, SEED_SGD, arch, cfg.hidden, float(cfg.lr), cfg.epochs)
    if r.trainer == NUMPY or cfg.batch_size is None or cfg.optimizer is None:
        raise ConfigError(f"population: expected a JAX recipe (seed-mlp or a minibatch one), "
                          f"found {recipe!r}")
    return Plan(r.name, "minibatch", arch, cfg.hidden, float(cfg.lr), cfg.epochs,
                cfg.optimizer, cfg.batch_size)


def check_data(plan: Plan, x, y) -> None:
    """ConfigError unless x: [n, D] and y: [n] fit the plan's model (D values, K classes)."""
    model = plan.arch
    shape = tuple(np.shape(x))
    if len(shape) != 2 or shape[1] != model.n_inputs:
        raise ConfigError(f"population: expected x [n, {model.n_inputs}] for {model.name} "
                          f"on images {tuple(model.input_shape)}, found {list(shape)}")
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= model.n_classes):
        raise ConfigError(f"population: expected labels 0..{model.n_classes - 1}, found "
                          f"{int(y.min())}..{int(y.max())}")


def poison_key(seed: int) -> jax.Array:
    """The key that draws the poisoning of the member with this seed."""
    return jax.random.fold_in(jax.random.key(seed), POISON_STREAM)


def init_members(plan: Plan, seeds: Sequence[int], n_in: int) -> tuple[Params, jax.Array]:
    """(params [m, ...], shuffle keys [m]) exactly as `registry.fit` draws them for each seed."""
    roots = jnp.stack([jax.random.key(int(s)) for s in seeds])
    if plan.kind == SEED_SGD:
        init_keys, shuffle_keys = roots, roots  # seed-mlp trains in file order: no shuffle
    else:
        pairs = jax.vmap(jax.random.split)(roots)
        init_keys, shuffle_keys = pairs[:, 0], pairs[:, 1]
    if plan.kind == OWN_FIT:  # the recipe's fit initialises its own model
        return None, shuffle_keys
    params = init_population(plan.arch, init_keys, n_in=n_in, n_hidden=plan.hidden)
    return params, shuffle_keys


_poison_one = jax.jit(poison_arrays)


def fit_one_by_one(plan: Plan, members: dict, seeds: Sequence[int], x, y,
                   idx: np.ndarray | None = None) -> tuple[Params, np.ndarray]:
    """An own-fit population: member i's data (its sample `idx[i]`, or all of x: [n, D],
    y: [n]) poisoned as in the jit, then `plan.fit(plan.arch, replace(plan.train,
    seed=seeds[i]), x_i, y_i)`. -> (params stacked [m, ...], masks bool [m, n])."""
    params, masks = [], []
    for i, seed in enumerate(seeds):
        rows = slice(None) if idx is None else idx[i]
        arrays = jax.tree.map(lambda a, i=i: a[i], members["poison"])
        xi, yi, mask = _poison_one(members["poison_key"][i], x[rows], y[rows], arrays)
        params.append(plan.fit(plan.arch, replace(plan.train, seed=int(seed)),
                               np.asarray(xi), np.asarray(yi)))
        masks.append(np.asarray(mask))
    return jax.tree.map(lambda *leaves: np.stack(leaves), *params), np.stack(masks)


def device_bytes(device: Any | None = None) -> int:
    """Memory of `device` (default: the first) in bytes, DEFAULT_DEVICE_BYTES if unknown."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    return int(stats.get("bytes_limit", DEFAULT_DEVICE_BYTES))


def host_bytes() -> int:
    """Physical memory of this machine in bytes, DEFAULT_DEVICE_BYTES if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return DEFAULT_DEVICE_BYTES


def chunk_size(m: int, n_train: int, n_inputs: int, *, backend: str | None = None,
               memory: int | None = None) -> int:
    """How many of m members to train together in one vmap (see the module docstring).

    Every backend: m, capped so chunk poisoned copies of an [n_train, n_inputs] float32
    training set fit in MEMORY_SHARE of `memory` (default: the device's; on CPU the
    machine's RAM).
    """
    if m < 1:
        raise ConfigError(f"population: expected at least 1 member, found {m}")
    backend = backend or jax.default_backend()
    if memory is None:
        memory = host_bytes() if backend == "cpu" else device_bytes()
    per_member = 2 * n_train * n_inputs * 4  # the poisoned copy and the stamping temporary
    return int(max(1, min(m, (MEMORY_SHARE * memory) // per_member)))


def fit_group(plan: Plan, group: dict, xs: jax.Array, ys: jax.Array) -> Params:
    """Train one group of members on their own (already poisoned) data with the plan's
    trainer. group: {"params", "shuffle_key", ...} with leading axis g; xs: [g, n, D]."""
    if plan.kind == SEED_SGD:
        return train_seed_sgd_population(group["params"], xs, ys, lr=plan.lr,
                                         epochs=plan.epochs)
    return train_minibatch_population(
        group["shuffle_key"], group["params"], xs, ys, model=plan.arch,
        optimizer=plan.optimizer, lr=plan.lr, batch_size=plan.batch_size, epochs=plan.epochs)


def _train_group(plan: Plan, x: jax.Array, y: jax.Array, group: dict) -> tuple[Params, jax.Array]:
    """Poison and train one group of members. x: [n, D], y: [n] shared (clean)."""
    xs, ys, masks = jax.vmap(poison_arrays, in_axes=(0, None, None, 0))(
        group["poison_key"], x, y, group["poison"])  # [g, n, D], [g, n], [g, n]
    return fit_group(plan, group, xs, ys), masks


@partial(jax.jit, static_argnames=("plan", "chunk"))
def train_members(members: dict, x: jax.Array, y: jax.Array, *, plan: Plan,
                  chunk: int) -> tuple[Params, jax.Array]:
    """The population's one jit. members: {"params", "shuffle_key", "poison_key", "poison"}
    with leading axis m; x: [n, D], y: [n] clean and shared. -> (params [m, ...],
    masks bool [m, n])."""
    return map_chunks(partial(_train_group, plan, x, y), members, chunk)


class Prepared(NamedTuple):
    """A population ready to train: run() -> (params [m, ...], masks bool [m, n]), the
    compiled call on device-resident inputs (time it; end with block_until_ready)."""

    run: Callable[[], tuple[Params, jax.Array]]
    counts: np.ndarray
    chunk: int
    compile_s: float
    plan: Plan


def prepare(recipe: str, configs: Sequence[PoisonConfig], x, y, *,
            train: TrainConfig | None = None, seeds: Sequence[int] | None = None,
            chunk: int | None = None, spec=None) -> Prepared:
    """Everything `train_poisoned` does before the timed run: inputs on the device, initial
    params drawn, the jit lowered and compiled (compile_s). Same arguments."""
    configs = list(configs)
    train = train or TrainConfig()
    if not configs:
        raise ConfigError("population: expected at least 1 poison config, found none")
    seeds = [train.seed] * len(configs) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(configs):
        raise ConfigError(f"population: expected one seed per config ({len(configs)}), "
                          f"found {len(seeds)}")
    spec = guess_spec(x, y) if spec is None else check_spec(spec)
    plan = plan_for(recipe, replace(train, seed=seeds[0]), spec)
    check_data(plan, x, y)
    x = jax.device_put(jnp.asarray(x, jnp.float32))
    y_host = np.asarray(y)
    y = jax.device_put(jnp.asarray(y_host, jnp.int32))
    m, n = len(configs), int(y.shape[0])
    chunk = chunk_size(m, n, spec.n_inputs) if chunk is None else int(chunk)
    if chunk < 1:
        raise ConfigError(f"population: expected chunk >= 1, found {chunk}")
    params, shuffle_keys = init_members(plan, seeds, int(x.shape[1]))
    arrays = [to_arrays(c, y_host, spec) for c in configs]
    members = jax.device_put({
        "params": params,
        "shuffle_key": shuffle_keys,
        "poison_key": jnp.stack([poison_key(s) for s in seeds]),
        "poison": jax.tree.map(jnp.asarray, stack_arrays(arrays)),
    })
    counts = np.array([int(a.count) for a in arrays])
    if plan.kind == OWN_FIT:
        return Prepared(partial(fit_one_by_one, plan, members, seeds, x, y), counts, 1, 0.0,
                        plan)
    start = time.perf_counter()
    compiled = train_members.lower(members, x, y, plan=plan, chunk=chunk).compile()
    compile_s = time.perf_counter() - start
    return Prepared(partial(compiled, members, x, y), counts, chunk, compile_s, plan)


def train_poisoned(recipe: str, configs: Sequence[PoisonConfig], x, y, *,
                   train: TrainConfig | None = None, seeds: Sequence[int] | None = None,
                   chunk: int | None = None, spec=None) -> Population:
    """Train one model per poisoning config, all in one jit.

    recipe: a JAX recipe name ("seed-mlp", "mlp-sgd", "mlp-ce", "cnn"); configs: m poison
    configs; x: [n, D] float, y: int [n] the CLEAN training data; spec: their models.Spec
    (or Dataset; None: `models.guess_spec`, square single-channel images); train: the TrainConfig
    (its seed is the default seed of every member; recipe defaults fill what it leaves
    None); seeds: one per member (init, shuffle and poisoning draws; all members share
    `train.seed` by default, so that they differ only by their poisoning, and one fraction's
    poisoned set is a subset of a larger one's); chunk: members per vmap (None: `chunk_size`).
    """
    prepared = prepare(recipe, configs, x, y, train=train, seeds=seeds, chunk=chunk, spec=spec)
    start = time.perf_counter()
    params, masks = jax.block_until_ready(prepared.run())
    train_s = time.perf_counter() - start
    masks = np.asarray(masks)
    return Population(params, masks, masks.sum(axis=1), prepared.chunk, prepared.compile_s,
                      train_s, prepared.plan)


def member(params: Params, i: int) -> Params:
    """Member i's params out of a population's stacked params."""
    return jax.tree.map(lambda a: a[i], params)

