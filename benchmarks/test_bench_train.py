"""Micro-benchmarks of training (pytest-benchmark): `make bench-micro`.

Per-sample epoch: JAX `train_seed_sgd` (one lax.scan) vs the numpy baseline's `train_epoch`,
both on the same N_NUMPY samples (the numpy loop is slow), and JAX alone on N_JAX samples;
`extra_info` gives the sample count of each. Minibatch
epoch: JAX only, for each minibatch recipe. Compile is excluded (one warm-up round); every
JAX call ends with `block_until_ready`.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from mlshift_jax.data import datasets
from mlshift_jax.models import baseline
from mlshift_jax.models.recipes import TrainConfig, resolve
from mlshift_jax.models.registry import get_recipe
from mlshift_jax.models.train import train_minibatch, train_seed_sgd
from mlshift_jax.models.zoo import SEED_MLP, STUDY_SPEC

HIDDEN = 200
LR = 0.1
N_JAX = 10_000  # samples of the longer JAX epoch
N_NUMPY = 1_000  # samples of the epoch timed in both (numpy: about 0.25 ms each)


@pytest.fixture(scope="module")
def train_set():
    """The first N_JAX training images of whatever MNIST is here (full, else the sample)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = datasets.load("mnist")
    return ds.x_train[:N_JAX], ds.y_train[:N_JAX], ds.source


def _info(benchmark, **kw):
    benchmark.extra_info.update(hidden=HIDDEN, backend=jax.default_backend(), **kw)


@pytest.mark.benchmark(group="epoch-per-sample")
@pytest.mark.parametrize("n", [N_NUMPY, N_JAX])
def test_epoch_per_sample_jax(benchmark, train_set, n):
    x, y, source = train_set
    x, y = jax.device_put(x[:n]), jax.device_put(y[:n])
    params = SEED_MLP.init(jax.random.key(0), n_hidden=HIDDEN)

    def epoch():
        return jax.block_until_ready(train_seed_sgd(params, x, y, lr=LR, epochs=1))

    _info(benchmark, impl="jax lax.scan", dtype="float32", samples=len(y), data=source)
    out = benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
    assert np.all(np.isfinite(np.asarray(out["wih"])))


@pytest.mark.benchmark(group="epoch-per-sample")
def test_epoch_per_sample_numpy(benchmark, train_set):
    x, y, source = train_set
    x, y = np.asarray(x[:N_NUMPY], np.float64), np.asarray(y[:N_NUMPY])
    params = SEED_MLP.init(jax.random.key(0), n_hidden=HIDDEN)
    net = baseline.neuralNetwork(784, HIDDEN, 10, LR, wih=np.asarray(params["wih"]),
                                 who=np.asarray(params["who"]))
    _info(benchmark, impl="numpy train_epoch", dtype="float64", samples=len(y), data=source,
          note=f"compare with test_epoch_per_sample_jax[{len(y)}]: the same samples")
    benchmark.pedantic(net.train_epoch, args=(x, y), rounds=3, iterations=1)


@pytest.mark.benchmark(group="epoch-minibatch")
@pytest.mark.parametrize("name", ["mlp-sgd", "mlp-ce"])
def test_epoch_minibatch_jax(benchmark, train_set, name):
    x, y, source = train_set
    x, y = jax.device_put(x), jax.device_put(y)
    recipe = get_recipe(name)
    cfg = resolve(recipe, TrainConfig(hidden=HIDDEN, epochs=1))
    k_init, k_shuffle = jax.random.split(jax.random.key(0))
    model = recipe.build(STUDY_SPEC, cfg)
    params = model.init(k_init)

    def epoch():
        return jax.block_until_ready(train_minibatch(
            k_shuffle, params, x, y, model=model, optimizer=cfg.optimizer,
            lr=float(cfg.lr), batch_size=cfg.batch_size, epochs=1))

    _info(benchmark, impl=f"jax {name}", optimizer=cfg.optimizer, batch_size=cfg.batch_size,
          dtype="float32", samples=len(y), data=source)
    benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
