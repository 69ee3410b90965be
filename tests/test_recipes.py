import jax
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.recipes import RECIPES, TrainConfig, resolve
from mlshift_jax.models.registry import fit, fit_model, get_recipe, model_for


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_a_usable_model(mnist, name):
    model, params = fit_model(name, TrainConfig(hidden=32), mnist.x_train[:3000],
                              mnist.y_train[:3000], mnist.spec)
    assert model is model_for(name, mnist, TrainConfig(hidden=32))  # cached: one object
    assert model.spec == mnist.spec
    expected = model.init(jax.random.key(0))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected)
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())
    scores = evaluate(model, params, mnist.x_test[:1000], mnist.y_test[:1000])
    assert scores["accuracy"] > 0.6, scores


def test_numpy_and_jax_recipes_agree_on_the_study_model(mnist):
    """Different initial draws (numpy vs JAX RNG), same rule: close accuracy."""
    cfg = TrainConfig(hidden=64)
    x, y = mnist.x_train[:3000], mnist.y_train[:3000]
    acc = {n: evaluate(model_for(n, mnist, cfg), fit(n, cfg, x, y, mnist), mnist.x_test,
                       mnist.y_test)["accuracy"] for n in ("seed-mlp", "seed-mlp-numpy")}
    assert abs(acc["seed-mlp"] - acc["seed-mlp-numpy"]) < 0.03, acc


def test_defaults_fill_only_what_is_left_open():
    cfg = resolve(get_recipe("mlp-ce"), TrainConfig(lr=0.5))
    assert cfg.lr == 0.5 and cfg.optimizer == "adam" and cfg.epochs >= 1


@pytest.mark.parametrize("bad", [dict(lr=-0.1), dict(lr=float("nan")), dict(epochs=0),
                                 dict(hidden=0), dict(batch_size=-4)])
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        resolve(get_recipe("seed-mlp"), TrainConfig(**bad))


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ConfigError, match="seed-mlp-numpy"):
        get_recipe("vgg")


def test_user_refs_go_to_usermodels():
    """A ref with ":" is a user model: importing a missing module is one ConfigError."""
    with pytest.raises(ConfigError, match="no module named 'mypkg'"):
        get_recipe("mypkg.models:net")


def test_fit_checks_data_against_spec(mnist):
    with pytest.raises(ConfigError, match=r"expected x \[n, 64\]"):
        fit("seed-mlp", TrainConfig(hidden=4), mnist.x_train[:10], mnist.y_train[:10],
            ((8, 8, 1), 10, (0.0, 1.0)))
    with pytest.raises(ConfigError, match="expected labels 0..4"):
        fit("seed-mlp", TrainConfig(hidden=4), mnist.x_train[:50], mnist.y_train[:50],
            ((28, 28, 1), 5, (0.0, 1.0)))
