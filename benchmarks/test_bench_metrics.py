"""Micro-benchmarks of scoring (pytest-benchmark): `make bench-micro`.

The study's five numbers over the test set: JAX `metrics.evaluate_arrays` (forward pass +
confusion matrix + macro P/R/F1 + confidence, one jit) vs numpy (the same forward pass,
argmax, a bincount confusion matrix and P/R/F1). Compile excluded (one warm-up round); JAX
calls end with `block_until_ready`.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from mlshift_jax.bench.runner import numpy_evaluate
from mlshift_jax.data import datasets
from mlshift_jax.models.metrics import SCORE_NAMES, evaluate_arrays
from mlshift_jax.models.zoo import SEED_MLP

HIDDEN = 200


@pytest.fixture(scope="module")
def scored():
    """(params, x_test, y_test, source): an untrained seed MLP (the cost does not depend on
    the weights) and whatever MNIST test set is here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = datasets.load("mnist")
    params = SEED_MLP.init(jax.random.key(0), n_hidden=HIDDEN)
    return params, ds.x_test, ds.y_test, ds.source


@pytest.mark.benchmark(group="metrics")
def test_metrics_jax(benchmark, scored):
    params, x, y, source = scored
    x, y = jax.device_put(x), jax.device_put(y)

    def score():
        return jax.block_until_ready(evaluate_arrays(SEED_MLP, params, x, y))

    benchmark.extra_info.update(impl="jax evaluate_arrays", dtype="float32", n=len(y),
                                hidden=HIDDEN, data=source, backend=jax.default_backend())
    out = benchmark.pedantic(score, rounds=20, iterations=1, warmup_rounds=1)
    assert set(out) == set(SCORE_NAMES)


@pytest.mark.benchmark(group="metrics")
def test_metrics_numpy(benchmark, scored):
    params, x, y, source = scored
    wih, who = np.asarray(params["wih"]), np.asarray(params["who"])
    x, y = np.asarray(x), np.asarray(y)
    benchmark.extra_info.update(impl="numpy forward + bincount P/R/F1", dtype="float32",
                                n=len(y), hidden=HIDDEN, data=source)
    out = benchmark.pedantic(numpy_evaluate, args=(wih, who, x, y), rounds=20, iterations=1,
                             warmup_rounds=1)
    assert set(out) == set(SCORE_NAMES)
