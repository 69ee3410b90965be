"""FGSM over the test set: JAX against the numpy baselines and a GEMM "floor".

Run by `make bench-micro` (`pytest benchmarks -q --benchmark-only --benchmark-autosave`). All four
cases share one pytest-benchmark group, "fgsm", so the table compares them directly:

- jax:            `evasion.fgsm` (one jit(vmap(grad))), inputs device-resident, compile
                  excluded by a warmup call, every call ended by `jax.block_until_ready`;
- numpy-batched:  `baseline.fgsm_batched` in float32 (four matmuls in matrix form);
- numpy-loop:     `baseline.fgsm_loop`, one image at a time as the study did (3 rounds);
- gemm-floor:     one float32 numpy GEMM with FGSM's matmul FLOP count,
                  2 * B * (784 * h + h * 10) * 2 (forward 2 matmuls + backward 2 matmuls):
                  [B, 794] @ [794, 2h]. Its FLOP/s goes in extra_info.

Weights: the study's 784-200-10 MLP after one numpy epoch on 2,000 training images (timing
does not depend on accuracy; the short epoch keeps setup under a second).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from mlshift_jax.attacks import evasion
from mlshift_jax.bench.runner import fgsm_flops
from mlshift_jax.data import datasets
from mlshift_jax.models import baseline
from mlshift_jax.models.zoo import SEED_MLP

EPS = 0.1
HIDDEN = 200
N_FIT = 2000


@pytest.fixture(scope="module")
def case():
    """The test set (all of it: 10k images with the full MNIST) and float32 seed-MLP weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datasets.SampleDataWarning)
        ds = datasets.load("mnist")
    net = baseline.neuralNetwork(784, HIDDEN, 10, 0.1, rng=np.random.default_rng(0))
    net.train_epoch(np.asarray(ds.x_train[:N_FIT], np.float64), ds.y_train[:N_FIT])
    return {
        "wih": net.wih.astype(np.float32),
        "who": net.who.astype(np.float32),
        "x": np.ascontiguousarray(ds.x_test, np.float32),
        "y": np.asarray(ds.y_test, np.int32),
        "source": ds.source,
    }


def _info(benchmark, case, **more) -> None:
    benchmark.extra_info.update(n_images=len(case["y"]), eps=EPS, hidden=HIDDEN,
                                dtype="float32", data=case["source"], **more)


@pytest.mark.benchmark(group="fgsm")
def test_fgsm_jax(benchmark, case):
    params = jax.device_put({"wih": case["wih"], "who": case["who"]})
    x, y = jax.device_put(case["x"]), jax.device_put(case["y"])

    def run():
        return jax.block_until_ready(evasion.fgsm(SEED_MLP, params, x, y, eps=EPS))

    x_adv = run()  # trace + compile, not timed
    benchmark(run)
    _info(benchmark, case, backend=jax.default_backend(), device=str(jax.devices()[0]))
    assert x_adv.shape == case["x"].shape


@pytest.mark.benchmark(group="fgsm")
def test_fgsm_numpy_batched(benchmark, case):
    x_adv = benchmark(baseline.fgsm_batched, case["wih"], case["who"], case["x"], case["y"], EPS)
    _info(benchmark, case, backend="numpy")
    assert x_adv.dtype == np.float32


@pytest.mark.benchmark(group="fgsm")
def test_fgsm_numpy_loop(benchmark, case):
    x_adv = benchmark.pedantic(baseline.fgsm_loop,
                               args=(case["wih"], case["who"], case["x"], case["y"], EPS),
                               rounds=3, iterations=1)
    _info(benchmark, case, backend="numpy")
    assert x_adv.dtype == np.float32


@pytest.mark.benchmark(group="fgsm")
def test_gemm_floor(benchmark, case):
    n = len(case["y"])
    flop = fgsm_flops(n, HIDDEN, 784, 10)
    rng = np.random.default_rng(0)
    a = rng.random((n, 784 + 10), dtype=np.float32)
    b = rng.random((784 + 10, 2 * HIDDEN), dtype=np.float32)
    assert 2 * a.shape[0] * a.shape[1] * b.shape[1] == flop
    benchmark(np.matmul, a, b)
    _info(benchmark, case, backend="numpy", flop=flop)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        benchmark.extra_info["gflop_per_s"] = flop / stats.median / 1e9
