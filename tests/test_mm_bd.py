"""MM-BD's maximum-margin statistic and the calibrated min-p verdict that combines it with
Neural Cleanse: the margin against numpy, the search beats random points and grows when one
class is made easy to reach, the min-p calibration against
brute force and its false-positive rate on the null at most alpha."""

import jax
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import mm_bd
from mlshift_jax.detection.scan import (
    heldout_verdict,
    min_p_threshold,
    null_min_p,
    tail_p,
)
from mlshift_jax.models.zoo import SEED_MLP, build

FAST = mm_bd.MarginConfig(steps=60, starts=4, lr=0.1)


@pytest.fixture(scope="module")
def mlp():
    model = build("mlp-ce", hidden=16)
    params = model.init(jax.random.key(0))
    return model, jax.tree.map(np.asarray, params)


def test_margin_is_the_logit_margin_of_a_softmax_model(mlp):
    model, params = mlp
    x = np.random.default_rng(0).uniform(*model.input_range, model.n_inputs).astype(np.float32)
    z = np.asarray(model.apply(params, x), np.float64)
    logp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
    for c in (0, 3, 9):
        want = logp[c] - np.max(np.delete(logp, c))
        assert float(mm_bd.margin(model, params, x, c)) == pytest.approx(want, abs=1e-4)


def test_the_search_beats_random_points_and_finds_an_easy_class(mlp):
    model, params = mlp
    key = jax.random.key(1)
    found = np.asarray(mm_bd.max_margins(model, params, key=key, config=FAST))
    assert found.shape == (10,) and np.all(np.isfinite(found))
    xs = np.random.default_rng(1).uniform(*model.input_range, (64, model.n_inputs))
    for c in range(10):
        rand = max(float(mm_bd.margin(model, params, x.astype(np.float32), c)) for x in xs)
        assert found[c] >= rand - 1e-4
    # class 4 made easy to reach with a large margin (a backdoor-like shortcut)
    boosted = dict(params)
    last = [k for k in params if np.ndim(params[k]) == 2][-1]
    w = np.array(params[last])
    w[4] *= 8.0 if w.shape[0] == 10 else 1.0
    if w.shape[0] != 10:
        w[:, 4] *= 8.0
    boosted[last] = w
    again = np.asarray(mm_bd.max_margins(model, boosted, key=key, config=FAST))
    assert int(np.argmax(again)) == 4 and again[4] > 2 * np.median(again)
    pop = np.asarray(mm_bd.margins_population(
        model, jax.tree.map(lambda a, b: np.stack([a, b]), params, boosted), key=key,
        config=FAST))
    np.testing.assert_allclose(pop, np.stack([found, again]), rtol=1e-4, atol=1e-4)


def test_bad_settings_and_two_classes_are_refused(mlp):
    model, params = mlp
    with pytest.raises(ConfigError, match="starts"):
        mm_bd.max_margins(model, params, key=jax.random.key(0),
                          config=mm_bd.MarginConfig(starts=0))
    with pytest.raises(ConfigError, match="3 classes"):
        mm_bd.max_margins(SEED_MLP._replace(n_classes=2), params, key=jax.random.key(0))


def test_min_p_calibration_against_brute_force():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(30, 2))
    brute = np.array([min((1 + np.sum(np.delete(s[:, d], i) >= s[i, d])) / 30
                          for d in range(2)) for i in range(30)])
    np.testing.assert_allclose(null_min_p(s), brute)
    np.testing.assert_allclose(tail_p(s, [10.0, -10.0]), [1 / 31, 1.0])
    for alpha in (0.05, 0.1, 0.3):
        cut = min_p_threshold(s, alpha)
        assert np.mean(null_min_p(s) <= cut) <= alpha
        larger = [t for t in np.unique(null_min_p(s)) if t > cut]
        assert not larger or np.mean(null_min_p(s) <= min(larger)) > alpha


def test_combined_heldout_fpr_on_exchangeable_nulls_is_near_alpha():
    rng = np.random.default_rng(3)
    rates = []
    for _ in range(20):
        norms, margins = np.exp(rng.normal(size=(2, 104, 10)))
        rates.append(heldout_verdict(norms, margins, [f"v{i % 13}" for i in range(104)],
                                     alpha=0.1, folds=4)["fpr"])
    assert 0.02 <= np.mean(rates) <= 0.16  # exchangeable draws: about alpha held out

