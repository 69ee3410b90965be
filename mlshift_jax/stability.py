"""Stability over random samples (the study's E2): one model per seeded random subsample of
the training set, all trained together as one population (one compiled call; models per
vmap by `population.chunk_size`), each scored on the test set."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.data import Dataset, subsample
from mlshift_jax.errors import ConfigError
from mlshift_jax.metrics import evaluate_many
from mlshift_jax.models import build
from mlshift_jax.population import chunk_size
from mlshift_jax.sharding import make_mesh, population_sharded
from mlshift_jax.train import init_population, train_seed_sgd_population

MEASURES = ["accuracy", "precision", "recall", "f1"]


def stability(ds: Dataset, *, samples: int = 10, size: int = 10_000, hidden: int = 200,
              lr: float = 0.1, epochs: int = 1, seed: int = 0) -> tuple[pd.DataFrame, float]:
    """Train `samples` seed-mlp models, model i on subsample(seed + i) of `size` images.

    Returns (table, train_seconds): one row per sample (accuracy = the study's "performance",
    macro precision / recall / F1), then rows mean, std, min, max.
    """
    n = len(ds.y_train)
    if samples < 1:
        raise ConfigError(f"samples must be >= 1; got {samples}")
    idx = np.stack([subsample(seed + i, n, size) for i in range(samples)])  # [samples, size]
    keys = jax.random.split(jax.random.key(seed), samples)
    model = build("seed-mlp", ds.spec, hidden)
    params = init_population(model, keys)
    x, y = jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx])
    start = time.perf_counter()
    params = jax.block_until_ready(population_sharded(  # the model axis split across devices
        train_seed_sgd_population, params, x, y, mesh=make_mesh(), lr=lr, epochs=epochs,
        chunk=chunk_size(samples, size, model.n_inputs)))
    train_seconds = time.perf_counter() - start
    scores = evaluate_many(model, params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    table = pd.DataFrame({m: np.asarray(scores[m]) for m in MEASURES})
    table.index = [f"sample {i + 1}" for i in range(samples)]
    summary = table.agg(["mean", "std", "min", "max"])
    return pd.concat([table, summary]), train_seconds
