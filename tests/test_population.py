"""Populations: a member equals the model trained alone; chunked == full vmap; the chunk rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import population
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import fit
from mlshift_jax.poisoning import poison
from mlshift_jax.poisoning.poison import Clean, Mixture, Patch, Trigger, WrongLabel

N = 1200
CONFIGS = [
    Clean(),
    WrongLabel(fraction=0.3, mode="shift"),
    Trigger(fraction=0.5, patch=Patch(size=3), source=1),
    Mixture(fraction=0.2, patch=Patch(size=4)),
]
TRAIN = {
    "seed-mlp": TrainConfig(hidden=16, seed=3),
    "mlp-ce": TrainConfig(hidden=16, epochs=2, batch_size=32, seed=3),
}
ATOL = {"seed-mlp": 1e-6, "mlp-ce": 1e-5}


@pytest.fixture(scope="module")
def xy(mnist):
    return mnist.x_train[:N], mnist.y_train[:N]


# chunks trained per recipe: the first is compared with single trainings, the second (full
# vmap) with the first. 1 is the CPU rule; 3 of 4 members is lax.map plus a remainder.
CHUNKS = {"seed-mlp": (3, len(CONFIGS)), "mlp-ce": (1, len(CONFIGS))}


@pytest.fixture(scope="module")
def trained(xy):
    """Each recipe's population at each of its CHUNKS (one compile each)."""
    return {(r, c): population.train_poisoned(r, CONFIGS, *xy, train=TRAIN[r], chunk=c)
            for r in TRAIN for c in CHUNKS[r]}


@pytest.mark.parametrize("recipe", sorted(TRAIN))
def test_member_equals_model_trained_alone(xy, trained, recipe):
    pop = trained[(recipe, CHUNKS[recipe][0])]
    for i, cfg in enumerate(CONFIGS):
        xp, yp, mask = poison.apply(population.poison_key(3), *xy, cfg)
        alone = fit(recipe, TRAIN[recipe], np.asarray(xp), np.asarray(yp))
        for k in alone:
            np.testing.assert_allclose(pop.params[k][i], alone[k], atol=ATOL[recipe],
                                       err_msg=f"{recipe} member {i} {k}")
        np.testing.assert_array_equal(pop.masks[i], np.asarray(mask))
        assert pop.counts[i] == poison.poison_count(cfg, xy[1])


@pytest.mark.parametrize("recipe", sorted(TRAIN))
def test_chunked_and_full_vmap_agree(trained, recipe):
    one, full = (trained[(recipe, c)] for c in CHUNKS[recipe])
    assert (one.chunk, full.chunk) == CHUNKS[recipe]
    np.testing.assert_array_equal(one.masks, full.masks)
    for k in one.params:
        np.testing.assert_allclose(one.params[k], full.params[k], atol=ATOL[recipe])


def test_map_chunks_equals_one_vmap():
    tree = {"a": jnp.arange(14.0).reshape(7, 2), "b": jnp.arange(7)}

    def fn(g):
        return {"s": g["a"].sum(axis=1) * g["b"], "b": g["b"] + 1}

    want = fn(tree)
    mapped = jax.jit(population.map_chunks, static_argnums=(0, 2))
    for chunk in (1, 2, 3, 7, 9):
        got = mapped(fn, tree, chunk)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_members_with_their_own_seeds(xy):
    cfgs = [Mixture(fraction=0.1)] * 4  # the fixture's shapes and chunk: no new compile
    pop = population.train_poisoned("seed-mlp", cfgs, *xy, train=TRAIN["seed-mlp"],
                                    seeds=[3, 4, 3, 4], chunk=3)
    assert not np.array_equal(pop.masks[0], pop.masks[1])
    np.testing.assert_array_equal(pop.masks[0], pop.masks[2])
    xp, yp, _ = poison.apply(population.poison_key(4), *xy, cfgs[1])
    alone = fit("seed-mlp", TrainConfig(hidden=16, seed=4), np.asarray(xp), np.asarray(yp))
    np.testing.assert_allclose(pop.params["wih"][1], alone["wih"], atol=1e-6)


def test_chunk_rule():
    n = 60_000
    assert population.chunk_size(21, n, 784, backend="cpu", memory=140 * 2**30) == 21
    assert population.chunk_size(21, n, 784, backend="gpu", memory=140 * 2**30) == 21
    per_member = 2 * n * 784 * 4
    small = population.chunk_size(21, n, 784, backend="gpu", memory=8 * per_member)
    assert small == 2
    assert population.chunk_size(21, n, 784, backend="tpu", memory=per_member) == 1
    # the rule counts the data's own size: 8x8x3 images take a sixteenth of MNIST's memory
    assert population.chunk_size(21, n, 192, backend="gpu", memory=8 * per_member) == 8
    with pytest.raises(ConfigError, match="at least 1 member"):
        population.chunk_size(0, n, 784)


@pytest.mark.parametrize("call,match", [
    (lambda xy: population.plan_for("seed-mlp-numpy"), "JAX recipe"),
    (lambda xy: population.plan_for("resnet"), "unknown model"),
    (lambda xy: population.train_poisoned("seed-mlp", [], *xy), "at least 1 poison config"),
    (lambda xy: population.train_poisoned("seed-mlp", CONFIGS, *xy, seeds=[1]),
     "one seed per config"),
    (lambda xy: population.train_poisoned("seed-mlp", CONFIGS, *xy, chunk=0), "chunk >= 1"),
])
def test_bad_population_arguments(xy, call, match):
    with pytest.raises(ConfigError, match=match):
        call(xy)


def test_prepared_run_is_repeatable(xy):
    prep = population.prepare("seed-mlp", CONFIGS, *xy, train=TRAIN["seed-mlp"], chunk=3)
    a, b = prep.run(), prep.run()
    np.testing.assert_array_equal(a[0]["wih"], b[0]["wih"])
    assert prep.counts.tolist() == [poison.poison_count(c, xy[1]) for c in CONFIGS]
    assert prep.counts[1] == round(0.3 * N)
