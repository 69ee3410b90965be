"""Benign change for the scan's null: the weight transforms against numpy references, the
variants cycled over the members, the held-out false-positive rate on known scores, and a
small benign null trained end to end (every variant, finite, as many models as asked)."""

import jax
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import benign
from mlshift_jax.detection.scan import folds_of, heldout_fpr
from mlshift_jax.models.population import plan_for
from mlshift_jax.models.recipes import TrainConfig

RNG = np.random.default_rng(0)
PARAMS = {"w": RNG.normal(size=(20, 30)).astype(np.float32),
          "b": RNG.normal(size=(20,)).astype(np.float32)}


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_prune_zeroes_the_smallest_weights_like_numpy(share):
    out = jax.jit(lambda p: benign.prune(p, share))(PARAMS)
    w = PARAMS["w"]
    k = int(np.floor(share * w.size))
    cut = np.sort(np.abs(w).ravel())[k - 1]
    want = np.where(np.abs(w) <= cut, 0.0, w)
    np.testing.assert_array_equal(np.asarray(out["w"]), want)
    assert np.sum(np.asarray(out["w"]) == 0) == k  # no ties in random normals
    np.testing.assert_array_equal(np.asarray(out["b"]), PARAMS["b"])  # biases kept


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rounds_to_symmetric_levels_like_numpy(bits):
    out = np.asarray(benign.quantize(PARAMS, bits)["w"], np.float64)
    w = PARAMS["w"].astype(np.float64)
    scale = np.abs(w).max() / (2 ** (bits - 1) - 1)
    np.testing.assert_allclose(out, np.round(w / scale) * scale, rtol=1e-6, atol=1e-6)
    assert len(np.unique(out)) <= 2 ** bits - 1
    assert np.abs(out - w).max() <= scale / 2 + 1e-6


def test_float16_and_bad_arguments():
    out = benign.to_float16(PARAMS)
    np.testing.assert_array_equal(np.asarray(out["w"]), PARAMS["w"].astype(np.float16)
                                  .astype(np.float32))
    for call, fragment in ((lambda: benign.prune(PARAMS, 1.0), "share"),
                           (lambda: benign.quantize(PARAMS, 1), "bits"),
                           (lambda: benign.transform(PARAMS, "retrain"), "prune-10"),
                           (lambda: benign.variants_of(3, ("sharpen",)), "sharpen")):
        with pytest.raises(ConfigError, match=fragment):
            call()


def test_variants_cycle_and_folds_hold_every_variant():
    names = benign.variants_of(5 * len(benign.VARIANTS) + 3)
    assert names[: len(benign.VARIANTS)] == list(benign.VARIANTS)
    assert names[len(benign.VARIANTS)] == benign.VARIANTS[0]
    folds = folds_of(5 * 13, 13, 5)
    for f in range(5):
        assert sorted(np.asarray(names[:65])[folds == f]) == sorted(benign.VARIANTS)
    assert set(folds_of(7, 13, 2)) == {0, 1}  # too few for whole cycles: dealt round


def test_heldout_fpr_judges_each_fold_by_the_others():
    # 16 members "a" on [0, 1] and 4 "hot" at 10..13; 4 folds dealt round (member i in fold
    # i % 4): each fold holds 4 "a" and 1 hot; on the other 15 at alpha 0.2 three may lie
    # above, so the threshold is the largest "a" among them. Only "a" member 15 (1.0, the
    # largest) exceeds the threshold of its fold, and every held-out hot member does.
    scores = np.r_[np.linspace(0.0, 1.0, 16), [10.0, 11.0, 12.0, 13.0]]
    variants = ["a"] * 16 + ["hot"] * 4
    found = heldout_fpr(scores, variants, alpha=0.2, folds=4, floor=-np.inf, period=1)
    assert found == {"fpr": 5 / 20, "by_variant": {"a": 1 / 16, "hot": 1.0}, "folds": 4}
    floored = heldout_fpr(scores, variants, alpha=0.2, folds=4, floor=20.0, period=1)
    assert floored["fpr"] == 0.0  # the textbook floor above every score


@pytest.mark.slow
def test_a_small_benign_null_trains_every_variant(mnist):
    plan = plan_for("seed-mlp", TrainConfig(hidden=8), mnist.spec)
    n = len(benign.VARIANTS)
    params, names = benign.benign_null(plan, mnist.x_train[:800], mnist.y_train[:800],
                                       seeds=list(range(n)), size=400, chunk=2)
    assert names == list(benign.VARIANTS)
    w = np.asarray(params["wih"])
    assert w.shape[0] == n and np.all(np.isfinite(w))
    assert len({float(np.abs(w[i]).sum()) for i in range(n)}) == n  # all different models
    i = names.index("prune-50")
    assert np.mean(w[i] == 0) >= 0.5
    i = names.index("quant-4")
    assert len(np.unique(w[i])) <= 15
