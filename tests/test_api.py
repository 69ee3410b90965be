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
