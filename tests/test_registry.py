"""The model registry: a built-in is one `zoo.Builtin` plus one `Recipe` named after it, and
every layer (detection's recipe choice, the population's trainer, metadata-free weights)
reads those records: none spells the built-in names again."""

import jax
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import population, recipes, registry, weights, zoo
from mlshift_jax.models.recipes import MINIBATCH, RECIPES, TRAINERS, TrainConfig


def test_every_builtin_has_its_recipe_and_every_recipe_its_facts():
    for name in zoo.BUILTINS:
        assert registry.builtin_recipe(name) is RECIPES[name]
        assert RECIPES[name].arch == name
    for r in RECIPES.values():
        assert r.arch in zoo.BUILTINS and r.trainer in TRAINERS
        assert r.build(zoo.STUDY_SPEC, recipes.resolve(r, None)).name == r.arch


def test_a_builtin_without_its_recipe_fails_loudly(monkeypatch):
    monkeypatch.setitem(zoo.BUILTINS, "orphan", zoo.BUILTINS["mlp-ce"])
    with pytest.raises(ConfigError, match="expected a recipe named 'orphan'"):
        registry.builtin_recipe("orphan")


def _build_tiny(spec, hidden):
    """mlp-ce's functions under another name and other array names."""
    inner = zoo.build("mlp-ce", spec, hidden)

    def rename(params):
        return {"a1": params["w1"], "c1": params["b1"], "a2": params["w2"], "c2": params["b2"]}

    def back(params):
        return {"w1": params["a1"], "b1": params["c1"], "w2": params["a2"], "b2": params["c2"]}

    return inner._replace(
        name="tiny", init=lambda key, **kw: rename(inner.init(key, **kw)),
        apply=lambda p, x: inner.apply(back(p), x),
        loss=lambda p, x, y: inner.loss(back(p), x, y),
        features=lambda p, x: inner.features(back(p), x))


@pytest.fixture
def tiny(monkeypatch):
    """A new built-in 'tiny' registered the way a contributor adds one: a zoo.Builtin and
    a Recipe named after it, nowhere else."""
    monkeypatch.setitem(zoo.BUILTINS, "tiny", zoo.Builtin(
        _build_tiny, 16, lambda p: p["a1"].shape[0], zoo._place_mlp("a1", "a2")))
    monkeypatch.setitem(RECIPES, "tiny", recipes.builtin(
        "tiny", "tiny", MINIBATCH,
        {"lr": 1e-3, "epochs": 1, "optimizer": "adam", "batch_size": 32}, "a test model"))
    return zoo.build("tiny", zoo.STUDY_SPEC, 16)


def test_a_new_builtin_takes_the_builtin_path_everywhere(tiny, tmp_path):
    params = tiny.init(jax.random.key(0))
    # detection retrains it with its own recipe and its width (not as a user's model)
    assert registry.recipe_of(tiny, params) == ("tiny", 16, False)
    # the population trains it with the recipe's trainer
    plan = population.plan_for("tiny", TrainConfig(hidden=16))
    assert (plan.kind, plan.arch) == (MINIBATCH, tiny)
    # metadata-free weights are placed by its Builtin
    path = tmp_path / "bare.npz"
    weights.save(path, params, {})
    assert zoo.infer_model(params) is tiny
    model, loaded, _ = registry.load_model(path)
    assert model is tiny and np.array_equal(loaded["a1"], params["a1"])


def test_detect_pair_retrains_a_new_builtin_with_its_recipe(tiny, monkeypatch, mnist):
    from mlshift_jax.detection import change

    seen = {}

    def fake_calibrate(recipe, hidden, ds, cfg, *, model=None, **kw):
        seen.update(recipe=recipe, hidden=hidden, model=model)
        raise RuntimeError("stop")

    monkeypatch.setattr(change, "calibrate", fake_calibrate)
    params = tiny.init(jax.random.key(0))
    with pytest.raises(RuntimeError, match="stop"):
        change.detect_pair(params, params, mnist, model=tiny)
    assert seen == {"recipe": "tiny", "hidden": 16, "model": None}


def test_plan_for_reads_the_trainer_off_the_recipe():
    assert population.plan_for("seed-mlp").kind == recipes.SEED_SGD
    assert population.plan_for("mlp-sgd").kind == MINIBATCH
    with pytest.raises(ConfigError, match="expected a JAX recipe"):
        population.plan_for("seed-mlp-numpy")
