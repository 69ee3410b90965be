"""One process of a two-process run on 127.0.0.1 (tests/test_distributed.py starts two):
join with `sharding.initialize_distributed` (MLSHIFT_COORDINATOR, MLSHIFT_NUM_PROCESSES,
MLSHIFT_PROCESS_ID) over CPU collectives (gloo), train a population of seed-mlp models with
the model axis split across both processes' devices, gather it, and (process 0) save it to
the .npz named by argv[1]. Prints one JSON line of facts."""

import json
import sys
import warnings

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from mlshift_jax.core import sharding  # noqa: E402

sharding.initialize_distributed()  # before any other JAX call

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mlshift_jax.data import datasets  # noqa: E402
from mlshift_jax.models.train import init_population, train_seed_sgd_population  # noqa: E402
from mlshift_jax.models.zoo import SEED_MLP  # noqa: E402

MODELS, HIDDEN, IMAGES = 5, 32, 1000  # 5 models: padded to 6 over the two processes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds = datasets.load("mnist")
mesh = sharding.make_mesh()  # every process's devices
params = init_population(SEED_MLP, jax.random.split(jax.random.key(0), MODELS),
                         n_hidden=HIDDEN)
xt, yt = jnp.asarray(ds.x_train[:IMAGES]), jnp.asarray(ds.y_train[:IMAGES])
many = sharding.population_sharded(train_seed_sgd_population, params, xt, yt, mesh=mesh,
                                   lr=0.1)
local = {k: len(v.addressable_shards) for k, v in many.items()}
gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in many.items()}
if jax.process_index() == 0:
    np.savez(sys.argv[1], **gathered)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                  "mesh": int(mesh.size), "local_shards": local,
                  "shape": list(gathered["wih"].shape)}))
