"""Metrics against scikit-learn, each run jitted and unjitted (chex's `variants` habit)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import metrics
from mlshift_jax.models.zoo import MODELS, predict

N = 10
ATOL = 1e-6  # float32 against sklearn's float64
LABELS = list(range(N))


def _plain(fn, **_):
    return fn


def _jitted(fn, static_argnames=()):
    return jax.jit(fn, static_argnames=static_argnames)


variants = pytest.mark.parametrize("variant", [_plain, _jitted], ids=["nojit", "jit"])


def _check_against_sklearn(variant, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    cm = variant(metrics.confusion_matrix, static_argnames=("n_classes",))(
        jnp.asarray(y_true), jnp.asarray(y_pred), n_classes=N
    )
    assert cm.shape == (N, N) and cm.dtype == jnp.int32
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=LABELS))

    acc = variant(metrics.accuracy)(jnp.asarray(y_true), jnp.asarray(y_pred))
    np.testing.assert_allclose(acc, skm.accuracy_score(y_true, y_pred), rtol=0, atol=ATOL)

    p, r, f = variant(metrics.macro_prf)(cm)
    sp, sr, sf, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0, labels=LABELS
    )
    np.testing.assert_allclose([p, r, f], [sp, sr, sf], rtol=0, atol=ATOL)

    pc = variant(metrics.per_class_prf)(cm)
    sk_pc = skm.precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0, labels=LABELS
    )[:3]
    np.testing.assert_allclose(np.stack(pc), np.stack(sk_pc), rtol=0, atol=ATOL)

    recall = variant(metrics.class_recall)
    sk_recall = skm.recall_score(y_true, y_pred, average=None, zero_division=0, labels=LABELS)
    for c in range(N):
        np.testing.assert_allclose(recall(cm, c), sk_recall[c], rtol=0, atol=ATOL)


@variants
@pytest.mark.parametrize("seed", range(5))
def test_random_labels_match_sklearn(variant, seed):
    rng = np.random.default_rng(seed)
    n_seen = [10, 10, 7, 3, 10][seed]  # some seeds leave classes out of both arrays
    y_true = rng.integers(0, n_seen, size=300)
    # mostly right, as a trained model is, so precision and recall are not all ~0.1
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, n_seen, size=300))
    _check_against_sklearn(variant, y_true, y_pred)


DEGENERATE = {
    "one-class-in-true": (np.full(50, 3), np.random.default_rng(0).integers(0, N, 50)),
    "one-class-in-pred": (np.random.default_rng(1).integers(0, N, 50), np.full(50, 7)),
    "absent-from-both": (
        np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]),
        np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 1, 2]),
    ),
    "perfect": (np.arange(40) % N, np.arange(40) % N),
    "all-wrong": (np.arange(40) % N, (np.arange(40) + 1) % N),
    "single-example": (np.array([4]), np.array([4])),
}


@variants
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_labels_match_sklearn(variant, case):
    y_true, y_pred = DEGENERATE[case]
    _check_against_sklearn(variant, y_true, y_pred)


def test_perfect_predictions_score_one_only_over_present_classes():
    y = jnp.arange(40) % N
    p, r, f = metrics.macro_prf(metrics.confusion_matrix(y, y, 10))
    np.testing.assert_allclose([p, r, f], 1.0, rtol=0, atol=ATOL)
    y5 = jnp.arange(40) % 5  # classes 5..9 absent from both: they count as 0 in the mean
    p, r, f = metrics.macro_prf(metrics.confusion_matrix(y5, y5, 10))
    np.testing.assert_allclose([p, r, f], 0.5, rtol=0, atol=ATOL)


def test_confusion_matrix_ignores_out_of_range_labels():
    cm = metrics.confusion_matrix(jnp.array([0, 1, 10, -1]), jnp.array([0, 1, 1, 1]), 10)
    assert int(cm.sum()) == 2


@variants
def test_mean_confidence(variant):
    probs = np.random.default_rng(0).random((64, N)).astype(np.float32)
    got = variant(metrics.mean_confidence)(jnp.asarray(probs))
    np.testing.assert_allclose(got, probs.max(axis=1).mean(), rtol=0, atol=ATOL)


@variants
@pytest.mark.parametrize("target", [0, 7])
def test_attack_success_rate(variant, target):
    rng = np.random.default_rng(target)
    y_true = rng.integers(0, N, 200)
    y_pred = np.where(rng.random(200) < 0.5, target, y_true)
    eligible = y_true != target
    expected = np.mean(y_pred[eligible] == target)
    got = variant(metrics.attack_success_rate)(jnp.asarray(y_true), jnp.asarray(y_pred), target)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@variants
def test_attack_success_rate_is_nan_without_eligible_examples(variant):
    y = jnp.full(20, 5)
    got = variant(metrics.attack_success_rate)(y, y, 5)
    assert np.isnan(float(got))  # nothing to measure: not a 0 that reads as "no backdoor"


# --- evaluate on real (tiny) models ------------------------------------------------------------

N_IN, N_HIDDEN, BATCH = 784, 16, 256


def _numpy_outputs(name: str, params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, probs) of the registered models, in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    if name == "seed-mlp":
        out = sigmoid(sigmoid(x @ p["wih"].T) @ p["who"].T)
        return out, out
    if name == "mlp-ce":
        logits = np.maximum(x @ p["w1"].T + p["b1"], 0) @ p["w2"].T + p["b2"]
    else:  # no numpy twin (the CNN): its JAX forward pass in float64
        with jax.enable_x64(True):
            logits = np.asarray(predict(MODELS[name], jax.tree.map(jnp.asarray, p),
                                        jnp.asarray(x)))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = (0.01 + 0.99 * rng.random((BATCH, N_IN))).astype(np.float32)  # the models' range
    return x, rng


@pytest.mark.parametrize("name", list(MODELS))
def test_evaluate_matches_numpy(name, data):
    x, rng = data
    model = MODELS[name]
    params = model.init(jax.random.key(0), n_hidden=N_HIDDEN)
    scores, probs = _numpy_outputs(name, params, x.astype(np.float64))
    pred = scores.argmax(axis=1)
    y = np.where(rng.random(BATCH) < 0.6, pred, rng.integers(0, N, BATCH))

    got = metrics.evaluate(model, params, jnp.asarray(x), jnp.asarray(y))
    assert set(got) == set(metrics.SCORE_NAMES)
    assert all(isinstance(v, float) for v in got.values())
    sp, sr, sf, _ = skm.precision_recall_fscore_support(
        y, pred, average="macro", zero_division=0, labels=LABELS
    )
    expected = {
        "accuracy": np.mean(y == pred),
        "precision": sp,
        "recall": sr,
        "f1": sf,
        "confidence": probs.max(axis=1).mean(),
    }
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=ATOL, err_msg=k)


def test_evaluate_compiles_once_per_shape(data):
    x, rng = data
    model = MODELS["seed-mlp"]
    y = jnp.asarray(rng.integers(0, N, BATCH))
    before = metrics.evaluate_arrays._cache_size()
    for seed in range(3):
        metrics.evaluate(model, model.init(jax.random.key(seed), n_hidden=8), x, y)
    assert metrics.evaluate_arrays._cache_size() - before <= 1


def test_scores_from_outputs_matches_evaluate(data):
    x, rng = data
    model = MODELS["mlp-ce"]
    params = model.init(jax.random.key(1), n_hidden=N_HIDDEN)
    y = jnp.asarray(rng.integers(0, N, BATCH))
    outputs = jax.vmap(model.apply, in_axes=(None, 0))(params, jnp.asarray(x))
    fn = jax.jit(functools.partial(metrics.scores_from_outputs, probs_fn=model.probs))
    got = jax.device_get(fn(outputs, y))
    expected = metrics.evaluate(model, params, x, y)
    for k in metrics.SCORE_NAMES:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=ATOL, err_msg=k)


@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_evaluate_many_matches_loop(name, batch_size, data):
    x, rng = data
    model = MODELS[name]
    keys = jax.random.split(jax.random.key(3), 5)
    stacked = jax.vmap(lambda k: model.init(k, n_hidden=N_HIDDEN))(keys)
    y = jnp.asarray(rng.integers(0, N, BATCH))
    many = jax.device_get(
        metrics.evaluate_many(model, stacked, jnp.asarray(x), y, batch_size=batch_size)
    )
    for k in metrics.SCORE_NAMES:
        assert many[k].shape == (5,)
    for i in range(5):
        params = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
        one = metrics.evaluate(model, params, x, y)
        for k in metrics.SCORE_NAMES:
            np.testing.assert_allclose(many[k][i], one[k], rtol=0, atol=ATOL, err_msg=k)


def test_summarize():
    values = {"accuracy": np.array([0.5, 0.7, 0.9]), "f1": np.array([0.4])}
    df = metrics.summarize(values)
    assert list(df.columns) == ["mean", "std", "min", "max", "n"]
    np.testing.assert_allclose(
        df.loc["accuracy", ["mean", "std", "min", "max"]], [0.7, 0.2, 0.5, 0.9], rtol=0, atol=1e-12
    )
    assert df.loc["accuracy", "n"] == 3 and np.isnan(df.loc["f1", "std"])
    with pytest.raises(ConfigError, match="no values"):
        metrics.summarize({"accuracy": np.array([])})


def test_jitted_core_works_under_vmap(data):
    x, rng = data
    model = MODELS["seed-mlp"]
    stacked = jax.vmap(lambda k: model.init(k, n_hidden=8))(jax.random.split(jax.random.key(4), 3))
    y = jnp.asarray(rng.integers(0, N, BATCH))
    core = functools.partial(metrics.evaluate_arrays, model)
    got = jax.vmap(core, in_axes=(0, None, None))(stacked, jnp.asarray(x), y)
    expected = metrics.evaluate_many(model, stacked, jnp.asarray(x), y)
    assert set(got) == set(expected)
    for k in metrics.SCORE_NAMES:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=ATOL, err_msg=k)
