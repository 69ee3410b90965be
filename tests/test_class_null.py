"""The class-conditional score (`detection.class_null`): each class of a model against the
same class over a null of benign models, by hand, leave-one-out, scale-free, and the case it
exists for: a target class that is only as easy as the model's naturally easy class."""

import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import DETECTORS, class_null, scan
from mlshift_jax.detection import neural_cleanse as nc


def _null(n=60, k=10, seed=0):
    """Benign mask norms: class 8 always about e^-1 times the others (a naturally easy
    class), every class jittered by 10% log-normal noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros(k)
    base[8] = -1.0
    return np.exp(base + 0.1 * rng.normal(size=(n, k)))


def test_class_z_by_hand():
    ref = class_null.profile(_null())
    suspect = class_null.profile(_null(n=1, seed=9))
    centre = np.median(ref, 0)
    spread = class_null.MAD_SCALE * np.median(np.abs(ref - centre), 0)
    np.testing.assert_allclose(class_null.class_z(ref, suspect, -1.0),
                               -(suspect - centre) / spread)
    assert np.allclose(class_null.profile([[1.0, 2.0, 4.0]]), np.log([[0.5, 1.0, 2.0]]))


def test_a_target_as_easy_as_the_easy_class_is_named_where_the_anomaly_index_is_not():
    norms = _null()
    suspect = _null(n=1, seed=5)
    suspect[0, 3] *= np.exp(-1.0)  # class 3 now as easy as class 8 always is
    ref = class_null.profile(norms)
    score, target = class_null.score(ref, class_null.profile(suspect), -1.0)
    assert target[0] == 3 and score[0] > 5.0
    # the within-model anomaly index sees two equally small classes: no outlier to name
    null_idx = nc.anomaly_index(norms)[0]
    assert nc.anomaly_index(suspect)[0][0] < np.quantile(null_idx, 0.99)
    # a fresh benign model scores within the null's leave-one-out scores
    fresh = class_null.score(ref, class_null.profile(_null(n=1, seed=6)), -1.0)[0][0]
    assert fresh <= np.max(class_null.loo_scores(ref, -1.0))


def test_loo_scores_and_scale_freedom():
    ref = class_null.profile(_null(n=20))
    brute = [class_null.score(np.delete(ref, i, 0), ref[i], 1.0)[0][0] for i in range(20)]
    np.testing.assert_allclose(class_null.loo_scores(ref, 1.0), brute)
    suspect = _null(n=2, seed=3)
    a = class_null.score(ref, class_null.profile(suspect), -1.0)
    b = class_null.score(ref, class_null.profile(7.5 * suspect), -1.0)  # uniformly harder
    np.testing.assert_allclose(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_the_registry_records_score_as_scan_model_does():
    norms, margins = _null(n=30), _null(n=30, seed=1)
    suspects = (_null(n=3, seed=7), _null(n=3, seed=8))
    scores, targets = scan.detector_scores(norms, margins, *suspects)
    for j, (name, null, suspect) in enumerate(zip(scan.DETECTORS, (norms, margins), suspects,
                                                  strict=True)):
        mine = DETECTORS[name].score(null, suspect)
        np.testing.assert_allclose(mine[0], scores[:, j])
        np.testing.assert_array_equal(mine[1], targets[:, j])


def test_bad_reference_is_refused():
    with pytest.raises(ConfigError, match="at least 3 reference models"):
        class_null.class_z(np.zeros((2, 10)), np.zeros(10), 1.0)
    with pytest.raises(ConfigError, match="expected 10 classes"):
        class_null.class_z(np.zeros((5, 10)), np.zeros(4), 1.0)
