import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core import sharding


@pytest.mark.slow
def test_four_forced_host_devices_give_the_one_device_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "MLSHIFT_NO_DOWNLOAD": "1"}
    script = Path(__file__).with_name("sharded_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4 and r["x_sharding_devices"] == 4
    assert r["population_shape"] == [6, 32, 784] and r["adv_shape"] == [1001, 784]
    assert r["population_max_diff"] <= 1e-5
    assert r["fgsm_pixels_differing"] <= 1001 * 784 * 1e-4  # sign flips at ~0 gradients only
    # PGD takes the sign of the gradient each step: where it is ~0, the sharded sum's rounding
    # can flip it (2 of 784,784 pixels, one image, with this seed's model); nothing else moves
    assert r["pgd_pixels_differing"] <= 1001 * 784 * 1e-4
    assert r["pgd_accuracy_diff"] <= 1 / 1001
    assert r["scores_max_diff"] <= 1e-6 and r["population_scores_max_diff"] <= 1e-6


def test_pad_and_unpad_on_one_device():
    mesh = sharding.make_mesh()
    x = jnp.arange(10.0).reshape(5, 2)
    placed, n = sharding.shard_leading(x, mesh)
    assert n == 5 and placed.shape[0] == sharding.padded_length(5, mesh)
    np.testing.assert_array_equal(sharding.unpad(placed, n), x)


def test_describe_devices_names_the_backend():
    assert jax.default_backend() in sharding.describe_devices()
