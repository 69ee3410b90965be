"""Stability over random samples (the study's E2): one model per seeded random subsample of
the training set, all trained together as one population (one compiled call; models per
vmap by `population.chunk_size`, and at most `GATHER_BYTES` of sampled copies at once: each
group gathers its samples inside the compiled call), each scored on the test set."""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.rules import check_at_most, check_memory
from mlshift_jax.core.sharding import make_mesh, replicate, shard_leading, unpad
from mlshift_jax.data.datasets import Dataset, subsample
from mlshift_jax.models.metrics import evaluate_many
from mlshift_jax.models.population import chunk_size
from mlshift_jax.models.train import init_population, map_chunks, train_seed_sgd
from mlshift_jax.models.zoo import build

MEASURES = ["accuracy", "precision", "recall", "f1"]


GATHER_BYTES = 1 << 30  # the sampled copies of the training set held at once, at most


@partial(jax.jit, static_argnames=("epochs", "chunk"))
def _train_on_samples(params, idx, x_all, y_all, *, lr, epochs: int, chunk: int):
    """Model i trains on x_all[idx[i]]; each group of `chunk` models gathers its own samples
    inside the compiled call, so only `chunk` sampled copies exist at once."""
    def group(g):
        train = jax.vmap(partial(train_seed_sgd, lr=lr, epochs=epochs))
        return train(g["params"], x_all[g["idx"]], y_all[g["idx"]])
    return map_chunks(group, {"params": params, "idx": idx}, chunk)


def peak_bytes(n_train: int, n_test: int, n_in: int, *, samples: int, size: int,
               hidden: int, n_classes: int = 10) -> tuple[int, int]:
    """(estimated peak bytes, models per group) of `stability`: the inputs on the device
    (float32 train and test sets), one group's sampled copies, every model's params (twice:
    before and after training) and the test outputs."""
    per_member = size * n_in * 4
    chunk = int(max(1, min(chunk_size(samples, size, n_in), GATHER_BYTES // max(per_member, 1))))
    inputs = (n_train + n_test) * n_in * 4
    params = 2 * samples * hidden * (n_in + n_classes) * 4
    outputs = samples * n_test * n_classes * 4 * 2
    return inputs + 2 * chunk * per_member + params + outputs + samples * size * 8, chunk


def stability(ds: Dataset, *, samples: int = 10, size: int = 10_000, hidden: int = 200,
              lr: float = 0.1, epochs: int = 1, seed: int = 0) -> tuple[pd.DataFrame, float]:
    """Train `samples` seed-mlp models, model i on subsample(seed + i) of `size` images.

    Returns (table, train_seconds): one row per sample (accuracy = the study's "performance",
    macro precision / recall / F1), then rows mean, std, min, max. ConfigError for a size
    above the training images there are, and, before anything large is allocated, when the
    estimated peak memory (`peak_bytes`, inputs included) exceeds what the machine has free.
    """
    n = len(ds.y_train)
    if samples < 1:
        raise ConfigError(f"samples must be >= 1; got {samples}")
    check_at_most(size, n, "size", f"training images of {ds.name}")
    n_in = ds.x_train.shape[1]
    need, chunk = peak_bytes(n, len(ds.y_test), n_in, samples=samples, size=size,
                             hidden=hidden, n_classes=ds.n_classes)
    check_memory(need, f"stability with {samples} samples of {size} images, hidden {hidden},",
                 "lower --samples/--size/--hidden")
    idx = np.stack([subsample(seed + i, n, size) for i in range(samples)])  # [samples, size]
    keys = jax.random.split(jax.random.key(seed), samples)
    model = build("seed-mlp", ds.spec, hidden)
    params = init_population(model, keys)
    mesh = make_mesh()
    x_all, y_all = replicate((jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), mesh)
    (params, idx_d), m = shard_leading((params, jnp.asarray(idx)), mesh)  # models split
    start = time.perf_counter()
    params = jax.block_until_ready(unpad(_train_on_samples(
        params, idx_d, x_all, y_all, lr=lr, epochs=epochs, chunk=chunk), m))
    train_seconds = time.perf_counter() - start
    del x_all, y_all, idx_d
    scores = evaluate_many(model, params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    table = pd.DataFrame({m: np.asarray(scores[m]) for m in MEASURES})
    table.index = [f"sample {i + 1}" for i in range(samples)]
    summary = table.agg(["mean", "std", "min", "max"])
    return pd.concat([table, summary]), train_seconds
