"""Input-level and training-data detectors.

The ROC helpers against scikit-learn, the squeezers against scipy.ndimage, the detectors run
jitted and unjitted; on a small trained MLP feature squeezing separates FGSM images from
clean ones; a planted backdoor (BadNets mixture, 5% of the data, 4x4 patch) is found in the
training data by activation clustering and spectral signatures; k-means and the per-class
blocks against plain numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from mlshift_jax.attacks.evasion import fgsm
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import detect, detect_data
from mlshift_jax.models.population import member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import poisoned_sample, train_sampled
from mlshift_jax.models.train import train_seed_sgd
from mlshift_jax.models.zoo import MLP_CE, SEED_MLP, predict
from mlshift_jax.poisoning import poison

RNG = np.random.default_rng(0)


# --- ROC helpers against scikit-learn ---------------------------------------------------------


def _cases():
    rng = np.random.default_rng(1)
    for n, ties in ((50, False), (400, True), (1000, False), (7, True)):
        y = rng.random(n) < 0.3
        y[:2] = [True, False]
        s = rng.normal(size=n) + 0.8 * y
        if ties:
            s = np.round(s, 0)
        yield s, y


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"n{len(c[0])}")
def test_roc_helpers_match_sklearn(case):
    s, y = case
    assert detect.roc_auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    f, t, th = detect.roc_points(s, y)
    np.testing.assert_allclose(f, fpr)
    np.testing.assert_allclose(t, tpr)
    np.testing.assert_allclose(th[1:], thr[1:])
    for budget in (0.0, 0.05, 0.1, 0.5, 1.0):
        assert detect.tpr_at_fpr(s, y, budget) == pytest.approx(tpr[fpr <= budget].max())
    p = 1 / (1 + np.exp(-s))
    assert detect.binary_cross_entropy(p, y) == pytest.approx(skm.log_loss(y, p), rel=1e-9)


def test_roc_auc_extremes_and_errors():
    y = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    assert detect.roc_auc(np.arange(10), y) == 1.0
    assert detect.roc_auc(-np.arange(10), y) == 0.0
    assert detect.roc_auc(np.ones(10), y) == 0.5
    with pytest.raises(ConfigError, match="both positives and negatives"):
        detect.roc_auc(np.arange(4), np.ones(4, bool))
    with pytest.raises(ConfigError, match="same length"):
        detect.roc_auc(np.arange(4), np.ones(3, bool))
    with pytest.raises(ConfigError, match="finite"):
        detect.roc_auc([0.0, np.nan], [True, False])
    with pytest.raises(ConfigError, match="fpr"):
        detect.tpr_at_fpr(np.arange(10), y, 1.5)


# --- squeezers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3])
def test_median_smooth_matches_scipy(size):
    x = RNG.random((6, 784)).astype(np.float32)
    x[:3] = np.round(x[:3], 1)  # ties
    got = jax.jit(jax.vmap(lambda a: detect.median_smooth(a, size)))(jnp.asarray(x))
    want = np.stack([ndimage.median_filter(a.reshape(28, 28), size=size, mode="reflect").ravel()
                     for a in x])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bit_depth():
    x = jnp.asarray([0.01, 0.2, 0.5, 0.51, 0.99, 1.0])
    np.testing.assert_allclose(detect.bit_depth(x, 1, 0.01, 1.0), [0.01, 0.01, 0.01, 1.0, 1.0, 1.0])
    levels = np.unique(np.asarray(detect.bit_depth(jnp.asarray(RNG.random(1000)) * 0.99 + 0.01,
                                                   3)))
    assert len(levels) == 8


# --- input-level detectors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mlp(mnist):
    """The study's MLP, 64 hidden units, one epoch on 3000 images; 500 test images."""
    params = SEED_MLP.init(jax.random.key(0), n_hidden=64)
    params = train_seed_sgd(params, jnp.asarray(mnist.x_train[:3000]),
                            jnp.asarray(mnist.y_train[:3000]), lr=0.1)
    return params, jnp.asarray(mnist.x_test[:500]), jnp.asarray(mnist.y_test[:500])


def test_input_scores_shapes_jit_and_definitions(small_mlp):
    params, x, _ = small_mlp
    jitted = detect.input_scores(SEED_MLP, params, x)
    plain = jax.vmap(lambda xi: detect._one(SEED_MLP, params, xi, detect.SQUEEZERS))(x)
    assert set(jitted) == {d.name for d in detect.DETECTORS}
    out = predict(SEED_MLP, params, x)
    top = jnp.sort(out, axis=-1)
    d = out / out.sum(-1, keepdims=True)
    for name in jitted:
        assert jitted[name].shape == (500,)
        np.testing.assert_allclose(jitted[name], plain[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jitted["confidence"], -top[:, -1], rtol=1e-6)
    np.testing.assert_allclose(jitted["margin"], -(top[:, -1] - top[:, -2]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(jitted["entropy"], -(d * jnp.log(d)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(jitted["squeezing"],
                               detect.squeezing_score(SEED_MLP, params, x), rtol=1e-5)
    assert np.all(np.asarray(jitted["squeezing"]) >= 0)


def test_entropy_and_softmax_model():
    assert float(detect.entropy(jnp.full(10, 0.1))) == pytest.approx(np.log(10), rel=1e-6)
    assert float(detect.entropy(jnp.eye(10)[3])) == 0.0
    params = MLP_CE.init(jax.random.key(1), n_hidden=16)
    x = 0.01 + 0.99 * RNG.random((4, 784))  # inside the model's input range [0.01, 1]
    scores = detect.input_scores(MLP_CE, params, jnp.asarray(x, jnp.float32))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in scores.values())


def test_squeezing_detects_fgsm(small_mlp):
    """Xu et al.'s claim on a small MLP: squeezing separates FGSM (eps 0.2) from clean."""
    params, x, y = small_mlp
    x_adv = fgsm(SEED_MLP, params, x, y, eps=0.2)
    clean = detect.input_scores(SEED_MLP, params, x)["squeezing"]
    adv = detect.input_scores(SEED_MLP, params, x_adv)["squeezing"]
    labels = np.r_[np.zeros(500, bool), np.ones(500, bool)]
    result = detect.score_detector(np.r_[clean, adv], labels)
    assert result["auc"] > 0.75
    assert result["tpr_at_fpr"] > 0.2


# --- training-data detectors ----------------------------------------------------------------------


def test_class_blocks_cover_every_sample_once():
    y = RNG.integers(0, 10, 1234)
    idx, valid = detect_data.class_blocks(y)
    assert idx.shape[1] in (256, 384)  # the largest class (about 150) padded to a bucket
    assert np.array_equal(np.sort(idx[valid]), np.arange(1234))
    for c in range(10):
        assert np.all(y[idx[c][valid[c]]] == c)


def test_spectral_scores_match_numpy_svd():
    h = RNG.normal(size=(600, 12)).astype(np.float32)
    y = RNG.integers(0, 10, 600)
    got = np.asarray(detect_data.spectral_scores(h, y))
    for c in range(10):
        hc = h[y == c].astype(np.float64)
        centred = hc - hc.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        want = (centred @ vt[0]) ** 2 / (s[0] ** 2 / len(hc))
        np.testing.assert_allclose(got[y == c], want, rtol=2e-3, atol=1e-4)


def test_top_fraction_per_class():
    scores = jnp.asarray(np.arange(40, dtype=np.float32))
    y = jnp.asarray(np.repeat(np.arange(4), 10))
    flag = np.asarray(detect_data.top_fraction_per_class(scores, y, 0.2))
    assert flag.sum() == 8
    assert set(np.flatnonzero(flag)) == {8, 9, 18, 19, 28, 29, 38, 39}


def test_top_fraction_per_class_matches_a_per_class_sort():
    """Shuffled classes of unequal sizes, some ties: each class's round(f * n_c) highest."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 997)
    scores = rng.integers(0, 40, 997).astype(np.float32)  # many ties
    flag = detect_data.top_fraction_per_class(scores, y, 0.15, n_classes=6)
    assert flag.dtype == bool and flag.shape == y.shape
    for c in range(6):
        rows = np.flatnonzero(y == c)
        keep = round(0.15 * rows.size)
        assert flag[rows].sum() == keep
        if 0 < keep < rows.size:  # every flagged score is at least every unflagged one
            assert scores[rows][flag[rows]].min() >= scores[rows][~flag[rows]].max()


def test_planted_clusters_found():
    """Synthetic activations: class 0 holds a small distinct cluster (15%), class 1 none.

    Activation clustering flags exactly it; spectral signatures ranks it first in its class."""
    rng = np.random.default_rng(2)
    n = 400
    h = rng.normal(size=(2 * n, 20)).astype(np.float32)
    y = np.repeat([0, 1], n)
    planted = np.zeros(2 * n, bool)
    planted[:60] = True
    h[:60] += 10.0 * np.eye(20, dtype=np.float32)[3]
    ac = detect_data.activation_clustering(h, y, key=jax.random.key(0))
    assert np.array_equal(np.asarray(ac.flag), planted)
    ss = detect_data.spectral_signatures(h, y, eps=0.15)
    assert detect_data.precision_recall_auc(ss, planted)["recall"] == 1.0
    in0 = y == 0
    assert detect.roc_auc(np.asarray(ss.score)[in0], planted[in0]) == 1.0
    with pytest.raises(ConfigError):
        detect_data.activation_clustering(h, y, key=jax.random.key(0), size_threshold=0.9)
    with pytest.raises(ConfigError):
        detect_data.spectral_signatures(h, y, eps=2.0)


def test_kmeans_matches_lloyd_optimum():
    """2-means on two separated blobs recovers them (any labelling), seeded and repeatable."""
    rng = np.random.default_rng(3)
    z = np.r_[rng.normal(size=(30, 2)), rng.normal(size=(70, 2)) + 6].astype(np.float32)
    w = np.ones(100, np.float32)
    a1, inertia = detect_data._two_means(jnp.asarray(z), jnp.asarray(w), jax.random.key(0))
    a2, _ = detect_data._two_means(jnp.asarray(z), jnp.asarray(w), jax.random.key(0))
    a1 = np.asarray(a1)
    assert np.array_equal(a1, np.asarray(a2))
    truth = np.r_[np.zeros(30), np.ones(70)]
    assert np.array_equal(a1, truth) or np.array_equal(a1, 1 - truth)
    want = sum(((z[a1 == k] - z[a1 == k].mean(0)) ** 2).sum() for k in (0, 1))
    assert float(inertia) == pytest.approx(want, rel=1e-4)


@pytest.fixture(scope="module")
def backdoored(mnist):
    """A small MLP (100 hidden) trained on 8000 images, 5% of them BadNets-poisoned (4x4
    patch, label -> 3); its poisoned training set and mask."""
    config = poison.Mixture(0.05, poison.Patch(4))
    plan = plan_for("seed-mlp", TrainConfig(hidden=100))
    pop, idx = train_sampled(plan, [config], mnist.x_train, mnist.y_train, seeds=[7], size=8000)
    params = member(pop.params, 0)
    x, y, mask = poisoned_sample(mnist.x_train, mnist.y_train, idx[0], 7, config, plan.arch)
    assert np.array_equal(np.asarray(mask), pop.masks[0])
    return params, x, y, mask


def test_training_data_detectors_find_planted_backdoor(backdoored):
    params, x, y, mask = backdoored
    h = detect_data.activations(SEED_MLP, params, x)
    assert h.shape == (8000, 100)
    predicted = jnp.argmax(predict(SEED_MLP, params, x), -1)
    ac = detect_data.precision_recall_auc(
        detect_data.activation_clustering(h, predicted, key=jax.random.key(0)), mask)
    assert ac["auc"] > 0.85 and ac["recall"] > 0.8 and ac["precision"] > 0.3
    share = detect_data.poisoned_share(y, mask)
    assert 0.2 < share < 0.4  # the 5% lands in class 3, about a third of it
    ss = detect_data.precision_recall_auc(detect_data.spectral_signatures(h, y, eps=share), mask)
    assert ss["auc"] > 0.6 and ss["recall"] > 0.3
