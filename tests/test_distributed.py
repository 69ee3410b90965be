"""`--distributed` for real (issue 23): two processes on 127.0.0.1 join one JAX run
(`jax.distributed.initialize` over gloo CPU collectives), train one population with its model
axis split across them, and the gathered population equals the one-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.data import datasets
from mlshift_jax.models.train import init_population, train_seed_sgd_population
from mlshift_jax.models.zoo import SEED_MLP

SCRIPT = Path(__file__).with_name("distributed_check.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::mlshift_jax.data.datasets.SampleDataWarning")
def test_two_processes_train_one_population_as_one_process_does(tmp_path):
    port = _free_port()
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "MLSHIFT_NO_DOWNLOAD": "1",
            "MLSHIFT_COORDINATOR": f"127.0.0.1:{port}", "MLSHIFT_NUM_PROCESSES": "2",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base.pop("XLA_FLAGS", None)  # one CPU device per process
    out = tmp_path / "population.npz"
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(out)], cwd=tmp_path,
                              env={**base, "MLSHIFT_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-2000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 2 and r["local_devices"] == 1
        assert r["mesh"] == 2 and set(r["local_shards"].values()) == {1}  # split, not copied
        assert r["shape"] == [5, 32, 784]

    ds = datasets.load("mnist")
    params = init_population(SEED_MLP, jax.random.split(jax.random.key(0), 5), n_hidden=32)
    one = train_seed_sgd_population(params, jnp.asarray(ds.x_train[:1000]),
                                    jnp.asarray(ds.y_train[:1000]), lr=0.1)
    with np.load(out) as two:
        assert set(two.files) == set(one)
        for k in one:
            np.testing.assert_allclose(two[k], np.asarray(one[k]), rtol=0, atol=1e-5)
