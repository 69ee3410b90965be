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



@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test file (core/memory_maps.py): one pytest
    process that keeps them all reaches the kernel's limit on memory maps about 80% of the
    way through this suite, and the next compile segfaults."""
    yield
    from mlshift_jax.core import memory_maps

    memory_maps.relieve(share=0.0)
