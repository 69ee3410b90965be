"""User models by reference: flax linen, flax nnx and equinox modules (and mlshift Model
records and Recipes) defined in a module of the test's own folder, each through
build -> fit -> save -> load -> FGSM -> evaluate on a small 8x8x3, 4-class dataset."""

from __future__ import annotations

import itertools
import sys
import textwrap

import jax
import numpy as np
import pytest

from mlshift_jax.attacks import evasion
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import registry, usermodels, weights
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.recipes import TrainConfig

pytest.importorskip("flax")
pytest.importorskip("equinox")

SHAPE, K = (8, 8, 3), 4
SPEC = usermodels.Spec(SHAPE, K, (0.0, 1.0))
CFG = TrainConfig(lr=1e-2, epochs=8, batch_size=32, seed=0)

USER_MODULE = '''
import jax, jax.numpy as jnp, math
import flax.linen as nn
from flax import nnx
import equinox as eqx
from mlshift_jax.models.zoo import Model

class Linen(nn.Module):
    width: int = 16
    @nn.compact
    def __call__(self, x):                       # x: [batch, H, W, C]
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
        return nn.Dense(4)(x)

linen = Linen()

class Nnx(nnx.Module):
    def __init__(self, input_shape, n_classes, *, rngs):
        self.l1 = nnx.Linear(math.prod(input_shape), 16, rngs=rngs)
        self.l2 = nnx.Linear(16, n_classes, rngs=rngs)
    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x.reshape(x.shape[0], -1))))

class _Eqx(eqx.Module):
    conv: eqx.nn.Conv2d
    mlp: eqx.nn.MLP
    def __call__(self, x):                       # ONE image [H, W, C]
        x = jax.nn.relu(self.conv(x.transpose(2, 0, 1)))
        return self.mlp(x.reshape(-1))

def equinox(key, input_shape, n_classes, width=16):
    h, w, c = input_shape
    k1, k2 = jax.random.split(key)
    return _Eqx(eqx.nn.Conv2d(c, 4, 3, padding=1, key=k1),
                eqx.nn.MLP(4 * h * w, n_classes, width, 1, key=k2))

def _init(key, *, n_in, n_out):
    return {"w": jax.random.normal(key, (n_out, n_in)) * 0.01, "b": jnp.zeros(n_out)}

def _apply(p, x):
    return p["w"] @ x + p["b"]

record = Model("linear", _init, _apply, lambda p, x, y: -jax.nn.log_softmax(_apply(p, x))[y],
               jax.nn.softmax)

wrong_classes = Linen().clone()   # 4 outputs; used with a 3-class spec
not_a_model = 42

def takes_5_inputs(key, input_shape, n_classes):   # fails on an [8, 8, 3] image
    return eqx.nn.Linear(5, n_classes, key=key)

from mlshift_jax.models.recipes import Recipe
import numpy as np

def _means_model(spec, cfg):                      # a nearest-class-mean classifier
    init = lambda key: _init(key, n_in=math.prod(spec.input_shape), n_out=spec.n_classes)
    return Model("means", init, _apply, record.loss, jax.nn.softmax,
                 spec.input_shape, spec.n_classes, spec.input_range)

def _means_fit(model, cfg, x, y):                 # its own trainer: no gradient steps
    w = np.stack([x[y == k].mean(0) for k in range(model.n_classes)])
    return {"w": jnp.asarray(w), "b": jnp.asarray(-0.5 * (w ** 2).sum(1))}

own_fit = Recipe("means", _means_model, _means_fit, {"hidden": 1, "lr": 1.0, "epochs": 1},
                 "nearest class means, fitted in closed form")
'''

_counter = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module written to tmp_path, put on the Python path as PYTHONPATH would; its
    name (unique per test). The working folder is elsewhere: it is never searched."""
    name = f"user_models_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.setattr(sys, "path", [str(tmp_path),
                                      *(p for p in sys.path if p not in ("", str(tmp_path)))])
    yield name
    sys.modules.pop(name, None)


def _data(seed=0, n=512):
    """Images [n, 192] in [0, 1]; the label is the brightest quadrant of channel 0."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.5, (n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, K, n).astype(np.int32)
    for i, c in enumerate(y):
        r, s = divmod(int(c), 2)
        x[i, 4 * r:4 * r + 4, 4 * s:4 * s + 4, 0] += 0.5
    return x.reshape(n, -1), y


@pytest.mark.parametrize("attr", ["linen", "Nnx", "equinox", "record"])
@pytest.mark.parametrize("suffix", ["w.safetensors", "w.npz"])
def test_user_model_build_fit_save_load_attack_evaluate(user_module, tmp_path, attr, suffix):
    ref = f"{user_module}:{attr}"
    recipe = usermodels.recipe(ref)
    model = recipe.build(SPEC, CFG)
    assert model is recipe.build(SPEC, CFG)  # cached: a static jit argument, built once
    assert model is usermodels.recipe(ref).build(SPEC, None)
    assert (model.name, model.input_shape, model.n_classes) == (ref, SHAPE, K)
    x, y = _data()
    x_test, y_test = _data(seed=1, n=256)
    params = recipe.fit(model, CFG, x, y)
    clean = evaluate(model, params, x_test, y_test, n_classes=K)
    assert clean["accuracy"] > 0.7, clean

    meta = weights.metadata(model, train=CFG)
    weights.save(tmp_path / suffix, params, meta)
    with pytest.raises(ConfigError, match=f"never imported.*--model {ref}"):
        registry.load_model(tmp_path / suffix)  # the file alone: not imported, one line
    loaded_model, loaded, got = registry.load_model(tmp_path / suffix, model=ref)
    assert loaded_model is model and got["model"]["ref"] == ref
    assert got["input_shape"] == list(SHAPE) and got["train"]["lr"] == CFG.lr
    assert evaluate(loaded_model, loaded, x_test, y_test, n_classes=K) == clean

    x_adv = evasion.fgsm(loaded_model, loaded, x_test, y_test, eps=0.25, lo=0.0, hi=1.0)
    assert float(np.abs(np.asarray(x_adv) - x_test).max()) <= 0.25 + 1e-6
    attacked = evaluate(loaded_model, loaded, x_adv, y_test, n_classes=K)
    assert attacked["accuracy"] < clean["accuracy"], (clean, attacked)


def test_params_are_plain_nested_dicts_of_arrays(user_module):
    model = usermodels.recipe(f"{user_module}:equinox").build(SPEC)
    params = model.init(jax.random.key(0))
    assert sorted(weights.flatten(params)) == [
        "conv/bias", "conv/weight", "mlp/layers/0/bias", "mlp/layers/0/weight",
        "mlp/layers/1/bias", "mlp/layers/1/weight"]
    assert isinstance(params["mlp"]["layers"], list)


def test_hyper_parameters_reach_the_factory_and_the_metadata(user_module, tmp_path):
    ref = f"{user_module}:equinox"
    model = usermodels.recipe(ref, {"width": 7}).build(SPEC)
    assert model.hparams == (("width", 7),)
    params = model.init(jax.random.key(0))
    assert params["mlp"]["layers"][0]["weight"].shape == (7, 4 * 8 * 8)
    weights.save(tmp_path / "w.safetensors", params, weights.metadata(model))
    loaded_model, _, meta = registry.load_model(tmp_path / "w.safetensors", model=ref)
    assert meta["model"]["hparams"] == {"width": 7} and loaded_model is model
    linen = usermodels.recipe(f"{user_module}:linen", {"width": 5}).build(SPEC)
    assert linen.init(jax.random.key(0))["params"]["Dense_0"]["kernel"].shape[1] == 5


def test_a_user_loss_replaces_cross_entropy(user_module):
    obj = usermodels.import_ref(f"{user_module}:linen")
    calls = []

    def loss(logits, y):
        calls.append(logits.shape)
        return -jax.nn.log_softmax(logits)[y] * 2.0

    model = usermodels.wrap(obj, name="twice", loss=loss).build(SPEC)
    params = model.init(jax.random.key(0))
    x, y = _data(n=4)
    assert float(model.loss(params, x[0], y[0])) == pytest.approx(
        2.0 * float(-jax.nn.log_softmax(model.apply(params, x[0]))[y[0]]), rel=1e-6)
    assert calls == [(K,)]


def test_a_recipe_is_used_as_it_is(user_module):
    inner = usermodels.recipe(f"{user_module}:record")
    outer = usermodels.wrap(inner, name="mine")
    model = outer.build(SPEC, CFG)
    assert model.name == "mine" and outer.fit is inner.fit and model is outer.build(SPEC, CFG)


@pytest.mark.parametrize("ref, match", [
    ("no_such_module_xyz:model", "no module named 'no_such_module_xyz'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:not_a_model", "expected an mlshift_jax Model record.*found int"),
    ("{mod}:Linen", "Module instance .*found the class Linen"),
    ("{mod}", "expected a built-in name or 'pkg.module:attr'"),
    ("{mod}:a b", "expected a built-in name or 'pkg.module:attr'"),
])
def test_bad_references_are_one_line_config_errors(user_module, ref, match):
    with pytest.raises(ConfigError, match=match) as info:
        usermodels.recipe(ref.format(mod=user_module)).build(SPEC)
    assert "\n" not in str(info.value)


def test_output_shape_is_checked_against_the_classes(user_module):
    with pytest.raises(ConfigError, match=r"expected outputs of shape \(3,\).*found \(4,\)"):
        usermodels.recipe(f"{user_module}:wrong_classes").build(SPEC._replace(n_classes=3))


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_user_mod.py").write_text("import not_installed_pkg_xyz\n")
    (tmp_path / "syntax_user_mod.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the working folder is not searched"):
        usermodels.recipe("broken_user_mod:f")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs the module 'not_installed_pkg_xyz'"):
        usermodels.recipe("broken_user_mod:f")
    with pytest.raises(ConfigError, match="importing syntax_user_mod failed: SyntaxError"):
        usermodels.recipe("syntax_user_mod:f")


def test_a_model_that_fails_on_the_input_shape_is_a_config_error(user_module):
    with pytest.raises(ConfigError, match=r"fails on one input of shape \(8, 8, 3\)") as info:
        usermodels.recipe(f"{user_module}:takes_5_inputs").build(SPEC)
    assert "\n" not in str(info.value)


def test_fit_checks_the_data_width(user_module):
    recipe = usermodels.recipe(f"{user_module}:linen")
    model = recipe.build(SPEC)
    with pytest.raises(ConfigError, match=r"expected inputs \[n, 192\]"):
        recipe.fit(model, CFG, np.zeros((64, 784), np.float32), np.zeros(64, np.int32))


def test_a_recipe_with_its_own_fit_trains_as_a_population(user_module):
    """Members of a user's own trainer are fitted one by one on data poisoned as in the jit."""
    from mlshift_jax.models import population
    from mlshift_jax.poisoning import poison

    x, y = _data()
    configs = [poison.Clean(), poison.Mixture(fraction=0.3, patch=poison.Patch(size=3),
                                              target=1)]
    pop = population.train_poisoned(f"{user_module}:own_fit", configs, x, y, spec=SPEC,
                                    seeds=[3, 4])
    assert pop.plan.kind == population.OWN_FIT
    assert pop.params["w"].shape == (2, K, x.shape[1]) and pop.counts[0] == 0 < pop.counts[1]
    xp, yp, mask = poison.apply(population.poison_key(4), x, y, configs[1], SPEC)
    assert int(np.sum(mask)) == pop.counts[1]
    model = usermodels.recipe(f"{user_module}:own_fit").build(SPEC, CFG)
    direct = usermodels.recipe(f"{user_module}:own_fit").fit(model, CFG, np.asarray(xp),
                                                             np.asarray(yp))
    np.testing.assert_allclose(pop.params["w"][1], direct["w"], rtol=1e-6)

