"""Populations of retrains on random samples: each member its own seed, its own random subset
of the training set and its own poisoning, all trained in one jit.

`population.train_poisoned` trains every member on the same (shared) training set, so that a
poisoning sweep differs only by its poisoning. A null distribution for a change test needs
what the study's stability experiment (E2) varies as well: the training sample. Here member i
trains on `x[idx_i]` (idx_i = `data.subsample(seed_i, n, size)`), poisoned by its config with
`population.poison_key(seed_i)`. The sample is gathered inside the jit, one group of members
at a time (`train.map_chunks`, `population.chunk_size` members per vmap), so at most one
group's copy of the sampled data exists at once; the trainers are those of `train.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import subsample
from mlshift_jax.models.population import (
    OWN_FIT,
    Plan,
    Population,
    check_data,
    chunk_size,
    fit_group,
    fit_one_by_one,
    init_members,
    map_chunks,
    poison_key,
)
from mlshift_jax.poisoning.poison import PoisonConfig, poison_arrays, stack_arrays, to_arrays


def _train_group(plan: Plan, x: jax.Array, y: jax.Array, group: dict):
    """Gather, poison and train one group. x: [n, D], y: [n] the full clean set."""
    xs, ys = x[group["idx"]], y[group["idx"]]  # [g, size, D], [g, size]
    xs, ys, masks = jax.vmap(poison_arrays)(group["poison_key"], xs, ys, group["poison"])
    return fit_group(plan, group, xs, ys), masks


_poison = jax.jit(poison_arrays)


@partial(jax.jit, static_argnames=("plan", "chunk"))
def _train_members(members: dict, x: jax.Array, y: jax.Array, *, plan: Plan, chunk: int):
    return map_chunks(partial(_train_group, plan, x, y), members, chunk)


def sample_indices(seeds: Sequence[int], n: int, size: int) -> np.ndarray:
    """The training sample of each member: int [m, size], row i = subsample(seeds[i], n, size)."""
    return np.stack([subsample(int(s), n, size) for s in seeds])


def _pad(tree, m: int, total: int):
    """Leaves [m, ...] -> [total, ...], the last member repeated (its results are dropped)."""
    if total == m:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], total - m, 0)]),
                        tree)


def run_in_groups(compiled: Callable, members, m: int, chunk: int, *args,
                  progress: Callable[[int, int, float], None] | None = None):
    """compiled(group, *args) for each group of `chunk` members of `members` (leaves [m,
    ...]; the last group padded with copies of the last member), results concatenated and
    cut back to m; progress(done, m, seconds) after each group. One compiled program serves
    every group, so only one group's working set exists at once."""
    groups = -(-m // chunk)
    padded = _pad(members, m, groups * chunk)
    start, outs = time.perf_counter(), []
    for g in range(groups):
        group = jax.tree.map(lambda a, g=g: a[g * chunk:(g + 1) * chunk], padded)
        outs.append(jax.block_until_ready(compiled(group, *args)))
        if progress is not None:
            progress(min((g + 1) * chunk, m), m, time.perf_counter() - start)
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(v) for v in a])[:m], *outs)


def train_sampled(plan: Plan, configs: Sequence[PoisonConfig], x, y, *, seeds: Sequence[int],
                  size: int, chunk: int | None = None,
                  progress: Callable[[int, int, float], None] | None = None,
                  ) -> tuple[Population, np.ndarray]:
    """Train member i on subsample(seeds[i]) of (x, y), poisoned by configs[i]: one jit.

    plan: `population.plan_for(recipe, TrainConfig(...), spec)`; x: [n, D], y: [n] the clean
    training set; size: images per member; chunk: members trained together (None:
    `population.chunk_size`); progress: with it, one compiled group of `chunk` members runs
    group after group (`run_in_groups`), progress(done, m, seconds) after each, so a long
    population reports as it goes and holds one group's data at a time. Returns (the
    Population, whose masks are over each member's own sample, and idx: int [m, size], the
    sample of each member).
    """
    configs, seeds = list(configs), [int(s) for s in seeds]
    if not configs or len(configs) != len(seeds):
        raise ConfigError(f"retrain: expected one seed per config and at least one member, "
                          f"found {len(configs)} configs and {len(seeds)} seeds")
    check_data(plan, x, y)
    spec = plan.arch.spec
    y_host = np.asarray(y)
    idx = sample_indices(seeds, len(y_host), size)
    params, shuffle_keys = init_members(plan, seeds, int(np.shape(x)[1]))
    members = jax.device_put({
        "params": params,
        "shuffle_key": shuffle_keys,
        "poison_key": jnp.stack([poison_key(s) for s in seeds]),
        "poison": jax.tree.map(jnp.asarray, stack_arrays(
            [to_arrays(c, y_host[i], spec) for c, i in zip(configs, idx, strict=True)])),
        "idx": jnp.asarray(idx, jnp.int32),
    })
    chunk = chunk_size(len(configs), size, spec.n_inputs) if chunk is None else int(chunk)
    x = jax.device_put(jnp.asarray(x, jnp.float32))
    y = jax.device_put(jnp.asarray(y_host, jnp.int32))
    if plan.kind == OWN_FIT:  # a user's own trainer: one member after another
        start = time.perf_counter()
        params, masks = fit_one_by_one(plan, members, seeds, x, y, idx)
        return Population(params, masks, masks.sum(axis=1), 1, 0.0,
                          time.perf_counter() - start, plan), idx
    m = len(configs)
    if progress is not None and chunk < m:
        start = time.perf_counter()
        group = jax.tree.map(lambda a: a[:chunk], members)
        compiled = _train_members.lower(group, x, y, plan=plan, chunk=chunk).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        params, masks = run_in_groups(compiled, members, m, chunk, x, y, progress=progress)
        return Population(params, masks, masks.sum(axis=1), chunk, compile_s,
                          time.perf_counter() - start, plan), idx
    start = time.perf_counter()
    compiled = _train_members.lower(members, x, y, plan=plan, chunk=chunk).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    params, masks = jax.block_until_ready(compiled(members, x, y))
    train_s = time.perf_counter() - start
    masks = np.asarray(masks)
    return Population(params, masks, masks.sum(axis=1), chunk, compile_s, train_s, plan), idx


def poisoned_sample(x, y, idx: np.ndarray, seed: int, config: PoisonConfig, spec):
    """Member data as `train_sampled` built it: (x', y', mask) for one member's sample idx:
    [size] and seed (for the training-data detectors, which need the poisoned set); spec:
    the data's models.Spec (or the plan's model)."""
    y_s = np.asarray(y)[idx]
    arrays = jax.tree.map(jnp.asarray, to_arrays(config, y_s, spec))
    return _poison(poison_key(int(seed)), jnp.asarray(np.asarray(x)[idx]),
                   jnp.asarray(y_s, jnp.int32), arrays)
