"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (tests/test_sharding.py does):
the sharded attack, metrics and population give what one device gives. Prints one JSON line."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import evasion
from mlshift_jax.core import sharding
from mlshift_jax.data import datasets
from mlshift_jax.models.metrics import evaluate, evaluate_many
from mlshift_jax.models.train import init_population, train_seed_sgd_population
from mlshift_jax.models.zoo import SEED_MLP

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds = datasets.load("mnist")
mesh = sharding.make_mesh()
x, y = ds.x_test[:1001], ds.y_test[:1001]  # 1001: not a multiple of 4, so padding is used
keys = jax.random.split(jax.random.key(0), 6)  # 6 models: padded to 8
params = init_population(SEED_MLP, keys, n_hidden=32)
xt, yt = jnp.asarray(ds.x_train[:2000]), jnp.asarray(ds.y_train[:2000])

one = train_seed_sgd_population(params, xt, yt, lr=0.1)
many = sharding.population_sharded(train_seed_sgd_population, params, xt, yt, mesh=mesh, lr=0.1)
first = jax.tree.map(lambda a: a[0], one)

adv_one = evasion.fgsm(SEED_MLP, first, x, y, eps=0.1)
adv_many = sharding.attack_sharded(evasion.fgsm, SEED_MLP, first, x, y, mesh=mesh, eps=0.1)
pgd_kw = dict(eps=0.1, steps=5, random_start=False)
pgd_one = evasion.pgd(SEED_MLP, first, x, y, **pgd_kw)
pgd_many = sharding.attack_sharded(evasion.pgd, SEED_MLP, first, x, y, mesh=mesh, **pgd_kw)

(xs, ys), n = sharding.shard_leading((jnp.asarray(x), jnp.asarray(y)), mesh)
scores_one = evaluate(SEED_MLP, first, x, y)
scores_many = evaluate(SEED_MLP, sharding.replicate(first, mesh), xs[:n], ys[:n])
pop_one = evaluate_many(SEED_MLP, one, x, y)
pop_many = evaluate_many(SEED_MLP, many, *sharding.replicate((jnp.asarray(x), jnp.asarray(y)),
                                                              mesh))

print(json.dumps({
    "devices": jax.device_count(),
    "x_sharding_devices": len(xs.sharding.device_set),
    "population_max_diff": max(float(jnp.max(jnp.abs(one[k] - many[k]))) for k in one),
    "population_shape": list(many["wih"].shape),
    "fgsm_pixels_differing": int(np.sum(np.asarray(adv_one) != np.asarray(adv_many))),
    "pgd_pixels_differing": int(np.sum(np.abs(np.asarray(pgd_one) - np.asarray(pgd_many))
                                       > 1e-5)),
    "pgd_accuracy_diff": abs(evaluate(SEED_MLP, first, pgd_one, y)["accuracy"]
                             - evaluate(SEED_MLP, first, pgd_many, y)["accuracy"]),
    "adv_shape": list(adv_many.shape),
    "scores_max_diff": max(abs(scores_one[k] - scores_many[k]) for k in scores_one),
    "population_scores_max_diff": max(float(np.max(np.abs(np.asarray(pop_one[k])
                                                          - np.asarray(pop_many[k]))))
                                      for k in pop_one),
}))
