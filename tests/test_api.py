"""The public API: every export resolves, `import mlshift_jax` stays light, and the entry
points run on a built-in model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import mlshift_jax as ms


def test_import_is_light_and_every_export_resolves():
    code = ("import sys, mlshift_jax as ms; assert 'jax' not in sys.modules, 'jax imported'; "
            "[getattr(ms, n) for n in ms.__all__]; print(ms.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no_such_thing"):
        ms.no_such_thing  # noqa: B018


def test_submodules_import_beside_the_api():
    from mlshift_jax.detection import detect  # noqa: F401
    from mlshift_jax.models import train  # noqa: F401
    from mlshift_jax.poisoning import poison  # noqa: F401

    assert callable(ms.poison_dataset) and callable(ms.detect_inputs) and callable(ms.fit)


def test_entry_points_on_a_builtin_model(mnist):
    small = ms.Dataset("mnist-small", mnist.x_train[:1000], mnist.y_train[:1000],
                       mnist.x_test[:200], mnist.y_test[:200], mnist.source)
    model, params = ms.fit("mlp-ce", small, hidden=16, epochs=1)
    assert model.name == "mlp-ce"
    x_adv = ms.attack("pgd", model, params, small.x_test, small.y_test, eps=0.1)
    assert ms.evaluate(model, params, x_adv, small.y_test)["accuracy"] < \
        ms.evaluate(model, params, small.x_test, small.y_test)["accuracy"]
    poisoned, mask = ms.poison_dataset(small, "wrong-label", fraction=0.5, mode="shift")
    assert mask.sum() == 500 and (poisoned.y_train[mask] != small.y_train[mask]).all()
    assert (poisoned.x_test is small.x_test) and "wrong-label" in poisoned.name
    scores = ms.detect_inputs(model, params, small.x_test)
    assert set(scores) >= {"confidence", "squeezing"} and scores["squeezing"].shape == (200,)
    _, again = ms.fit(model, poisoned, hidden=16, epochs=1)
    assert np.asarray(again["w1"]).shape == np.asarray(params["w1"]).shape


def test_a_model_is_retrained_by_its_name_s_recipe_and_api_keeps_no_table(mnist):
    from mlshift_jax import api
    from mlshift_jax.models.zoo import Model

    small = ms.Dataset("mnist-small", mnist.x_train[:300], mnist.y_train[:300],
                       mnist.x_test[:50], mnist.y_test[:50], mnist.source)
    model, params = ms.fit("mlp-ce", small, hidden=16, epochs=1)
    assert 16 in np.asarray(params["w1"]).shape  # cfg's hidden builds the model
    assert api._recipe_for(model).name == "mlp-ce"
    assert api.train_config("mlp-sgd").optimizer == "sgd"
    assert api.train_config(model, epochs=3) == ms.TrainConfig(
        lr=1e-3, epochs=3, batch_size=64, optimizer="adam")
    record = model._replace(name="mine")
    assert api._recipe_for(record).build(small.spec, ms.TrainConfig()).name == "mine"
    assert ms.build(record, small) is record  # a Model is used as it is
    with pytest.raises(ms.ConfigError, match="resnet"):
        api.train_config("resnet")
    tables = [k for k, v in vars(api).items() if isinstance(v, dict) and not k.startswith("__")]
    assert tables == [] and not any(isinstance(v, Model) for v in vars(api).values())


def test_attack_table_rows_and_flags(mnist):
    from mlshift_jax import api

    small = ms.Dataset("mnist-small", mnist.x_train[:300], mnist.y_train[:300],
                       mnist.x_test[:80], mnist.y_test[:80], mnist.source)
    model, params = ms.fit("mlp-ce", small, hidden=16, epochs=1)
    table = api.attack_table(model, params, small.x_test, small.y_test, ["fgsm", "noise-sign"],
                            [0.0, 0.2], rounds=1)
    assert [(r["attack"], r["eps"]) for r in table["rows"]] == [
        ("fgsm", 0.0), ("fgsm", 0.2), ("noise-sign", 0.0), ("noise-sign", 0.2)]
    clean = ms.evaluate(model, params, small.x_test, small.y_test)
    first = table["rows"][0]
    assert {k: first[k] for k in clean} == clean and first["n_images"] == 80
    assert "zero_grad_frac" in first and "zero_grad_frac" not in table["rows"][2]
    assert table["rows"][1]["accuracy"] < clean["accuracy"] and table["flags"] == []
    masked, same = api.defend("quantize", model, params, small, key=None)
    assert same is params
    from mlshift_jax.attacks.evasion import GradientMaskingWarning

    with pytest.warns(GradientMaskingWarning):
        flagged = api.attack_table(masked, params, small.x_test, small.y_test, ["fgsm"], [0.2],
                                  rounds=1, flags=True)
    assert any(line.startswith("zero-gradient") for line in flagged["flags"])
