"""Shared fixtures. Tests never reach the internet: downloads are switched off here, and the
data comes from MLSHIFT_DATA_DIR (CI points it at the full MNIST) or the bundled sample."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("MLSHIFT_NO_DOWNLOAD", "1")
# caches (the detect calibration, downloads) go to a throwaway folder, never the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mlshift-test-cache-")
# the CLI's persistent compilation cache (core/compile_cache.py) stays off in the test
# process: one test turning it on would make every later test write its programs to disk
os.environ["MLSHIFT_NO_COMPILE_CACHE"] = "1"


@pytest.fixture(scope="session")
def mnist():
    """Whatever MNIST this machine has: the full set, else the bundled sample."""
    import warnings

    from mlshift_jax.data import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return datasets.load("mnist")


@pytest.fixture(scope="session")
def full_mnist(mnist):
    """The full MNIST (60k/10k); skips where only the bundled sample is present."""
    if mnist.is_sample:
        pytest.skip("full MNIST not found: set MLSHIFT_DATA_DIR to a folder with the IDX files")
    return mnist


# --- trained models, one per session: any test file may take them instead of training its own

@pytest.fixture(scope="session")
def trained_seed_mlp(mnist):
    """The study's numpy MLP (784-100-10, lr 0.1, seed 0) after one epoch on the first 3,000
    training images: (the float64 `baseline.neuralNetwork`, its params as float32 JAX arrays,
    the first 500 test images as float32 [500, 784], their labels as int32 [500])."""
    import jax.numpy as jnp
    import numpy as np

    from mlshift_jax.models import baseline

    net = baseline.neuralNetwork(784, 100, 10, 0.1, rng=np.random.default_rng(0))
    net.train_epoch(np.asarray(mnist.x_train[:3000], np.float64), mnist.y_train[:3000])
    params = {k: jnp.asarray(v, jnp.float32) for k, v in net.params().items()}
    x = np.asarray(mnist.x_test[:500], np.float32)
    y = np.asarray(mnist.y_test[:500], np.int32)
    return net, params, x, y


@pytest.fixture(scope="session")
def trained_mlp_ce(mnist):
    """An mlp-ce of 64 hidden units after 3 epochs on the first 2,000 training images:
    (params, the first 200 test images and labels as JAX arrays, the 2,000 training images)."""
    import jax.numpy as jnp

    from mlshift_jax.models.recipes import TrainConfig
    from mlshift_jax.models.registry import fit

    x, y = mnist.x_train[:2000], mnist.y_train[:2000]
    params = fit("mlp-ce", TrainConfig(hidden=64, epochs=3), x, y)
    xt, yt = jnp.asarray(mnist.x_test[:200]), jnp.asarray(mnist.y_test[:200])
    return params, xt, yt, x


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test file (core/memory_maps.py): one pytest
    process that keeps them all reaches the kernel's limit on memory maps about 80% of the
    way through this suite, and the next compile segfaults."""
    yield
    from mlshift_jax.core import memory_maps

    memory_maps.relieve(share=0.0)
