"""A whole proportion sweep trained as one population vs a Python loop of single trainings.

Run by `make bench-micro`. The sweep is the study's E7 (mixture, 4x4 patch -> 3, proportions
0 .. 0.8: 7 models) on the first N_TRAIN training images. Per recipe, in ONE run:

- population: `population.prepare(...)` compiled first (not timed), then its run timed by
  pytest-benchmark (the poisoning happens inside the jit, from the shared clean data), with
  the chunk `population.chunk_size` picks for this backend;
- loop: `poison.apply` + `registry.fit` per config, after one warm-up pass (compiles), timed
  with `timing.time_call`, every call ended by `block_until_ready`;
- full vmap: the same population with chunk = 7 (where the rule did not pick it already).

extra_info carries the medians and the ratios loop / population and full-vmap / population
(> 1: the population is faster). Ratios within one run are what to compare across machines.
"""

from __future__ import annotations

import warnings

import jax
import pytest

from mlshift_jax.bench import sweeps
from mlshift_jax.core.timing import time_call
from mlshift_jax.data import datasets
from mlshift_jax.models import population
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import fit
from mlshift_jax.poisoning import poison

N_TRAIN = 10_000
ROUNDS = 3
RECIPES = {  # modest, so that `make bench-micro` stays a few minutes
    "seed-mlp": TrainConfig(hidden=200, epochs=1),
    "mlp-ce": TrainConfig(hidden=200, epochs=2),
}


@pytest.fixture(scope="module")
def case():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datasets.SampleDataWarning)
        ds = datasets.load("mnist")
    n = min(N_TRAIN, len(ds.y_train))
    return {"x": ds.x_train[:n], "y": ds.y_train[:n], "source": ds.source,
            "configs": sweeps.proportion_configs("mixture")}


def _loop(recipe, train, configs, x, y):
    key = population.poison_key(train.seed)
    out = []
    for cfg in configs:
        xp, yp, _ = poison.apply(key, x, y, cfg)
        out.append(fit(recipe, train, xp, yp))
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.benchmark(group="population")
def test_sweep_population_vs_loop(benchmark, case, recipe):
    train, configs = RECIPES[recipe], case["configs"]
    x, y = jax.device_put(case["x"]), jax.device_put(case["y"])
    prepared = population.prepare(recipe, configs, x, y, train=train)

    def run():
        return jax.block_until_ready(prepared.run())

    run()  # the first run of the compiled call, not timed
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    loop = time_call(_loop, recipe, train, configs, x, y, rounds=ROUNDS)
    info = {"recipe": recipe, "members": len(configs), "n_train": int(len(y)),
            "hidden": train.hidden, "epochs": prepared.plan.epochs, "chunk": prepared.chunk,
            "compile_s": prepared.compile_s, "loop_median_s": loop.median_s,
            "backend": jax.default_backend(), "data": case["source"]}
    if prepared.chunk != len(configs):
        full = population.prepare(recipe, configs, x, y, train=train, chunk=len(configs))
        info["full_vmap_median_s"] = time_call(full.run, rounds=ROUNDS).median_s
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        info["population_median_s"] = stats.median
        info["loop_over_population"] = loop.median_s / stats.median
        if "full_vmap_median_s" in info:
            info["full_vmap_over_population"] = info["full_vmap_median_s"] / stats.median
    benchmark.extra_info.update(info)
