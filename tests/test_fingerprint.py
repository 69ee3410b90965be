"""The model-level change test: KS helpers against scipy, fingerprint properties, exact
calibration of the min-p combination, one extreme feature not diluted, p-values at their
resolution, the alpha refusal, reversed-trigger features raised by a scattered-pixel trigger,
and a planted-backdoor trial over a population of small models: the test's false positives
on clean retrains stay within a binomial bound of its stated rate (alpha = 0.05), and it
detects planted backdoors in >= 90% of seeds.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import change, fingerprint, neural_cleanse
from mlshift_jax.detection.fingerprint import FEATURES, FeatureNull, Responses, change_test
from mlshift_jax.models.population import member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import train_sampled
from mlshift_jax.models.zoo import SEED_MLP
from mlshift_jax.poisoning import poison, triggers

ALPHA = fingerprint.ALPHA


# --- KS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,shift,rounding", [(500, 500, 0.0, None), (300, 200, 0.2, 1),
                                                (1000, 1000, 0.05, None), (40, 70, 0.5, 1)])
def test_ks_matches_scipy(n, m, shift, rounding):
    rng = np.random.default_rng(n + m)
    a, b = rng.normal(size=n), rng.normal(shift, size=m)
    if rounding is not None:  # ties within and across the samples
        a, b = np.round(a, rounding), np.round(b, rounding)
    ref = stats.ks_2samp(a, b, method="asymp")
    d = jax.jit(fingerprint.ks_statistic)(jnp.asarray(a), jnp.asarray(b))
    assert float(d) == pytest.approx(ref.statistic, abs=1e-6)
    assert float(fingerprint.ks_statistic(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(
        float(d), abs=1e-6)
    assert float(fingerprint.ks_pvalue(ref.statistic, n, m)) == pytest.approx(ref.pvalue,
                                                                             abs=0.02)


def test_ks_extremes():
    a = jnp.arange(10.0)
    assert float(fingerprint.ks_statistic(a, a)) == 0.0
    assert float(fingerprint.ks_statistic(a, a + 100)) == 1.0
    assert float(fingerprint.ks_pvalue(0.0, 100, 100)) == 1.0
    assert float(fingerprint.ks_pvalue(1.0, 100, 100)) < 1e-20


# --- the fingerprint ------------------------------------------------------------------------------


def _random_responses(key, p=50, c=10) -> Responses:
    k1, k2 = jax.random.split(key)
    return Responses(jax.random.uniform(k1, (p, c)), jax.random.uniform(k2, (p,)))


def test_fingerprint_of_itself_is_zero():
    r = _random_responses(jax.random.key(0))
    y = jnp.zeros(50, jnp.int32)
    fp = jax.jit(fingerprint.fingerprint_arrays)(r, r, y)
    for name in set(FEATURES) - set(fingerprint.TRIGGER_FEATURES):
        assert float(fp[name]) == pytest.approx(0.0, abs=1e-6), name
    t = np.asarray(fp["transitions"])
    assert t.sum() == pytest.approx(1.0) and np.allclose(t, np.diag(np.diag(t)))


def test_fingerprint_by_hand():
    """Two probes, three classes: one flips 0 -> 2."""
    ref = Responses(jnp.asarray([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]), jnp.zeros(2))
    sus = Responses(jnp.asarray([[0.2, 0.1, 0.7], [0.1, 0.8, 0.1]]), jnp.full(2, 0.5))
    fp = fingerprint.fingerprint_arrays(ref, sus, jnp.asarray([0, 1]))
    assert float(fp["disagreement"]) == 0.5
    assert float(fp["accuracy_drop"]) == 0.5
    assert float(fp["flip_concentration"]) == 1.0
    assert float(fp["squeeze_gap"]) == 0.5
    assert float(fp["kl"]) == pytest.approx(0.5 * (0.9 * np.log(0.9 / 0.2) + 0.05 * np.log(
        0.05 / 0.1) + 0.05 * np.log(0.05 / 0.7)), rel=1e-5)
    assert float(fp["ks"]) == 0.5
    np.testing.assert_allclose(fp["transitions"], [[0, 0, 0.5], [0, 0.5, 0], [0, 0, 0]])
    fp.update(trigger_flip=jnp.asarray(0.5), trigger_norm=jnp.asarray(1.0))
    assert json.dumps(fingerprint.to_json(fp))
    with pytest.raises(ConfigError, match="trigger_features"):
        fingerprint.feature_matrix({k: v for k, v in fp.items() if k != "trigger_norm"})


def test_probes_and_responses(mnist):
    probes = fingerprint.make_probes(mnist.x_test, mnist.y_test, n=100, n_patched=20, seed=3)
    assert probes.x.shape == (100, 784) and probes.n_patched == 20
    assert np.array_equal(probes.index, fingerprint.make_probes(
        mnist.x_test, mnist.y_test, n=100, n_patched=20, seed=3).index)
    with pytest.raises(ConfigError, match="n_patched"):
        fingerprint.make_probes(mnist.x_test, mnist.y_test, n=10, n_patched=20)
    params = SEED_MLP.init(jax.random.key(0), n_hidden=8)
    with pytest.raises(ConfigError, match="one changed copy"):
        fingerprint.input_responses(SEED_MLP, params, jnp.zeros((2, 99, 784)), probes)
    r = fingerprint.responses(SEED_MLP, params, probes)
    assert r.probs.shape == (100, 10) and r.squeeze.shape == (100,)


def test_summarize_takes_each_models_smallest_trigger():
    k, h, w, c = 4, 3, 5, 2
    norms = jnp.asarray([[5.0, 1.0, 4.0, 6.0], [2.0, 3.0, 8.0, 0.5]])
    masks = jnp.arange(2 * k * h * w, dtype=jnp.float32).reshape(2, k, h, w)
    found = neural_cleanse.Triggers(masks, jnp.ones((2, k, h, w, c)), norms,
                                    jnp.asarray([[0.1, 0.9, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]),
                                    jnp.ones((2, k), bool))
    s = fingerprint.summarize(found)
    assert s.target.tolist() == [1, 3] and s.mask.shape == (2, h, w)
    assert s.pattern.shape == (2, h, w, c)
    np.testing.assert_array_equal(s.mask[0], masks[0, 1])
    np.testing.assert_allclose(s.rate, [0.9, 0.7])
    np.testing.assert_array_equal(s.norms, norms)
    one = fingerprint.summarize(jax.tree.map(lambda a: a[1], found))
    assert int(one.target) == 3 and one.mask.shape == (h, w)


# --- the null, the p-values -----------------------------------------------------------------------


def test_change_test_is_exact_under_exchangeability():
    """Null and suspect drawn alike (correlated features): P(p <= alpha) = alpha exactly for
    n_null = 19, so the count over 3000 independent trials sits inside its binomial
    1e-3 quantiles on both sides."""
    rng = np.random.default_rng(0)
    n_null, trials, f = 19, 3000, len(FEATURES)
    hits = 0
    for _ in range(trials):
        common = rng.normal(size=(n_null + 1, 1))
        draws = common + 0.5 * rng.normal(size=(n_null + 1, f))
        p = change_test(draws[-1], FeatureNull(draws[:-1])).p_value[0]
        hits += p <= ALPHA
    lo, hi = stats.binom.ppf([1e-3, 1 - 1e-3], trials, ALPHA)
    assert lo <= hits <= hi


def test_change_test_values():
    rng = np.random.default_rng(1)
    null = FeatureNull(rng.normal(size=(24, len(FEATURES))))
    far = np.full(len(FEATURES), 100.0)
    result = change_test(np.stack([far, -far]), null)
    assert result.p_value[0] == pytest.approx(1 / 25)
    assert result.p_value[1] == 1.0
    np.testing.assert_allclose(result.feature_p[0], 1 / 25)
    np.testing.assert_allclose(result.feature_p[1], 1.0)
    mid = null.features[0]
    want = (1 + (null.features >= mid).sum(0)) / 25
    np.testing.assert_allclose(change_test(mid, null).feature_p[0], want)
    with pytest.raises(ConfigError):
        FeatureNull(np.zeros((1, len(FEATURES))))
    with pytest.raises(ConfigError, match="expected test features"):
        change_test(far, null, ("nope",))
    assert result.resolution == pytest.approx(1 / 25)


def _max_z_p(observed, null: FeatureNull, cols) -> float:
    """The max-z combination this test replaced (pooled standardization, largest z)."""
    pool = np.concatenate([null.features[:, cols], np.asarray(observed)[None, cols]])
    z = (pool - pool.mean(0)) / np.where(pool.std(0) > 0, pool.std(0), 1.0)
    t = z.max(1)
    return (1 + np.sum(t[:-1] >= t[-1] - 1e-12)) / len(pool)


def test_one_extreme_feature_is_not_diluted():
    """A targeted label flip: disagreement far beyond every clean retrain, the other features
    ordinary. One null member alone answers in a sparse feature (trigger_flip 0 elsewhere).
    Pooled z-scores cap every member at sqrt(n), so max-z ties the two (p = 2/25 = 0.08, the
    miss of issue 12); the min-p of rank tails still gives the smallest p, 1/25."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(24, len(FEATURES)))
    flip = FEATURES.index("trigger_flip")
    features[:, flip] = 0.0
    features[7, flip] = 0.3  # one clean retrain that happens to answer the trigger search
    null = FeatureNull(features)
    suspect = rng.normal(size=len(FEATURES))
    suspect[flip] = 0.0
    suspect[FEATURES.index("disagreement")] = 40.0
    cols = [FEATURES.index(f) for f in fingerprint.TEST_FEATURES]
    assert _max_z_p(suspect, null, cols) == pytest.approx(2 / 25)
    result = change_test(suspect, null)
    assert result.p_value[0] == pytest.approx(1 / 25) and 1 / 25 <= ALPHA
    assert result.feature_p[0, FEATURES.index("disagreement")] == pytest.approx(1 / 25)
    assert result.feature_p[0, flip] == 1.0


def test_p_values_sit_on_their_resolution():
    """Every p-value (combined or per feature) is a multiple of 1/(n+1), at least 1/(n+1),
    never 0, whatever the features (ties, constants, huge values)."""
    rng = np.random.default_rng(4)
    for n in (2, 5, 24):
        null = FeatureNull(np.round(rng.standard_t(2, size=(n, len(FEATURES))), 1))
        obs = np.concatenate([np.round(rng.standard_t(2, size=(30, len(FEATURES))), 1),
                              np.full((1, len(FEATURES)), 1e30), null.features[:2]])
        result = change_test(obs, null)
        for p in (result.p_value, result.feature_p.ravel()):
            steps = p * (n + 1)
            assert np.all(p >= 1 / (n + 1)) and np.allclose(steps, np.round(steps))
        assert np.all(np.isfinite(result.statistic))


def test_alpha_the_null_cannot_reach_is_refused():
    assert fingerprint.check_alpha(0.05, 19) == 0.05
    assert fingerprint.min_null_size(0.05) == 19 and fingerprint.min_null_size(0.01) == 99
    with pytest.raises(ConfigError, match=r"least 99 models.*n_null 24.*raise n_null to 99"):
        fingerprint.check_alpha(0.01, 24)
    for bad in (0.0, 1.0, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match=r"alpha in \(0, 1\)"):
            fingerprint.check_alpha(bad, 24)


def test_changed_probability():
    p = fingerprint.changed_probability([1.0, 0.5, 1 / np.e, 0.04, 1e-6])
    assert p[0] == p[1] == 0.5
    assert p[3] == pytest.approx(1 / (1 - np.e * 0.04 * np.log(0.04)))
    assert np.all(np.diff(p[2:]) > 0) and p[-1] < 1.0


# --- planted backdoors over a population of small models ------------------------------------------

N_NULL, N_TRIALS, N_BACKDOOR, HIDDEN, SIZE = 24, 40, 20, 32, 2000


@pytest.fixture(scope="module")
def trials(mnist):
    """124 small seed-mlp models (32 hidden, 2000 random images, one epoch) in one jit: a
    null pool of 24, 40 references, 40 clean retrains, 20 BadNets models (20% poisoned,
    4x4 patch, target 3). Every model has its own seed and random sample and its triggers
    reversed (one call, `fingerprint.TRIGGER_SCAN`, as detect does). Returns the p-values
    of the clean retrains and of the backdoored models against their reference."""
    configs = ([poison.Clean()] * (N_NULL + 2 * N_TRIALS)
               + [poison.Mixture(0.2, poison.Patch(4))] * N_BACKDOOR)
    plan = plan_for("seed-mlp", TrainConfig(hidden=HIDDEN))
    pop, _ = train_sampled(plan, configs, mnist.x_train, mnist.y_train,
                           seeds=range(5000, 5000 + len(configs)), size=SIZE)
    probes = fingerprint.make_probes(mnist.x_test, mnist.y_test, n=300, n_patched=100)
    resp = fingerprint.model_responses(SEED_MLP, pop.params, probes)
    found = fingerprint.reverse(SEED_MLP, pop.params, probes, key=jax.random.key(0))

    def take(tree, i):
        return jax.tree.map(lambda a: a[jnp.asarray(i)], tree)

    def features(ref_i, rows):
        ref_p, ref_t = member(pop.params, ref_i), take(found, ref_i)
        return fingerprint.feature_matrix({
            **fingerprint.fingerprints(take(resp, ref_i), take(resp, rows), probes.y),
            **fingerprint.trigger_features(SEED_MLP, ref_p, ref_t, take(found, rows), probes)})

    p_clean, p_backdoor = [], []
    for t in range(N_TRIALS):
        null = FeatureNull(features(N_NULL + t, np.arange(N_NULL)))
        rows = [N_NULL + N_TRIALS + t] + ([N_NULL + 2 * N_TRIALS + t] if t < N_BACKDOOR else [])
        p = change_test(features(N_NULL + t, rows), null).p_value
        p_clean.append(p[0])
        if t < N_BACKDOOR:
            p_backdoor.append(p[1])
    return np.asarray(p_clean), np.asarray(p_backdoor)


@pytest.mark.slow
def test_false_positives_within_stated_rate(trials):
    """Clean retrains: the count of p <= alpha over 40 trials (each its own reference and
    suspect) is at most the 1 - 1e-3 quantile of Binomial(40, alpha)."""
    p_clean, _ = trials
    bound = stats.binom.ppf(1 - 1e-3, N_TRIALS, ALPHA)
    false_positives = int(np.sum(p_clean <= ALPHA))
    print(f"\nfalse positives: {false_positives}/{N_TRIALS} at alpha {ALPHA} "
          f"(bound {bound:.0f}); mean p {p_clean.mean():.3f}")
    assert false_positives <= bound


@pytest.mark.slow
def test_power_on_planted_backdoors(trials):
    _, p_backdoor = trials
    detected = int(np.sum(p_backdoor <= ALPHA))
    print(f"\nbackdoors detected: {detected}/{N_BACKDOOR} at alpha {ALPHA}")
    assert detected >= 0.9 * N_BACKDOOR


# --- detect_pair --------------------------------------------------------------------------------


@pytest.mark.slow
def test_detect_pair(mnist, tmp_path, monkeypatch):
    """End to end on small models: a backdoored suspect is "changed" and named a backdoor; a
    clean retrain is not flagged; the calibration is cached and reused."""
    cfg = change.CalibrationConfig(n_null=19, sample_size=SIZE, poison_seeds=1, probes=300,
                                   n_patched=100)
    configs = [poison.Clean(), poison.Clean(), poison.Mixture(0.2, poison.Patch(4))]
    pop, _ = train_sampled(plan_for("seed-mlp", TrainConfig(hidden=HIDDEN)), configs,
                           mnist.x_train, mnist.y_train, seeds=[91, 92, 93], size=SIZE)
    ref, clean, bad = (member(pop.params, i) for i in range(3))
    result = change.detect_pair(ref, bad, mnist, config=cfg, cache_path=tmp_path)
    assert json.loads(json.dumps(result)) == result
    assert result["verdict"] == "changed" and result["p_value"] <= ALPHA
    probs = result["category_probabilities"]
    assert max(probs, key=probs.get) == "backdoor"
    assert result["category"] in ("backdoor", "uncertain")  # named, or abstained on
    assert set(result["fingerprint"]) >= set(FEATURES) | {"transitions", "ks_pvalue"}
    assert len(list(tmp_path.glob("calibration-*.npz"))) == 1
    assert len(list(tmp_path.glob("triggers-*.npz"))) == 1  # the reference's, reused below
    assert len(list(tmp_path.glob("input-changes-*.npz"))) == 1  # its attacked probes too
    monkeypatch.setattr(change, "changed_inputs",  # the second call reads them back
                        lambda *a, **kw: pytest.fail("attacked the cached reference again"))
    again = change.detect_pair(ref, clean, mnist, config=cfg, cache_path=tmp_path)
    assert again["verdict"] == "unchanged" and again["category"] == "none"
    assert again["calibration"]["n_null"] == 19
    with pytest.raises(ConfigError, match="shapes"):
        wide = SEED_MLP.init(jax.random.key(0), n_hidden=HIDDEN + 1)
        change.detect_pair(ref, wide, mnist, config=cfg, cache_path=tmp_path)
    assert result["p_resolution"] == pytest.approx(1 / 20)
    assert result["p_value"] >= result["p_resolution"]
    with pytest.raises(ConfigError, match="at least 99 models"):  # before any training
        change.detect_pair(ref, clean, mnist, config=cfg, alpha=0.01, cache_path=tmp_path)


@pytest.mark.slow
def test_a_scattered_pixel_trigger_raises_the_trigger_features(mnist):
    """BadNets-style poisoning with `triggers.sparse` (10 pixels scattered over the image, no
    corner square): the suspect's reversed trigger flips it and not the reference, beyond
    every clean retrain, and its smallest mask stands out; the combined p-value is the
    smallest the null allows. Small models: 32 hidden units, 3000 images, 3 epochs."""
    n_null, size = 8, 3000
    plan = plan_for("seed-mlp", TrainConfig(hidden=HIDDEN, epochs=3))
    clean, _ = train_sampled(plan, [poison.Clean()] * (n_null + 1), mnist.x_train,
                             mnist.y_train, seeds=range(700, 701 + n_null), size=size)
    x, y = np.asarray(mnist.x_train[:size]), np.asarray(mnist.y_train[:size]).copy()
    trig = triggers.sparse(mnist.image_shape, mnist.input_range, pixels=10, seed=3)
    rows = np.random.default_rng(0).choice(size, size // 5, replace=False)
    x = x.copy()
    x[rows] = np.asarray(triggers.stamp(x[rows], trig, mnist.image_shape, mnist.input_range))
    y[rows] = 7
    bad, _ = train_sampled(plan, [poison.Clean()], x, y, seeds=[800], size=size)
    probes = fingerprint.make_probes(mnist.x_test, mnist.y_test, n=300, n_patched=100)
    pop = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), clean.params, bad.params)
    found = fingerprint.reverse(SEED_MLP, pop, probes, key=jax.random.key(1))
    resp = fingerprint.model_responses(SEED_MLP, pop, probes)
    ref_i = n_null  # members 0..n_null-1: the null; n_null: the reference; last: the suspect

    def take(tree, i):
        return jax.tree.map(lambda a: a[jnp.asarray(i)], tree)

    rows = np.r_[np.arange(n_null), n_null + 1]
    f = fingerprint.feature_matrix({
        **fingerprint.fingerprints(take(resp, ref_i), take(resp, rows), probes.y),
        **fingerprint.trigger_features(SEED_MLP, member(pop, ref_i), take(found, ref_i),
                                       take(found, rows), probes)})
    null, suspect = FeatureNull(f[:-1]), f[-1]
    flip, norm = (FEATURES.index(k) for k in fingerprint.TRIGGER_FEATURES)
    print(f"\ntrigger_flip null max {null.features[:, flip].max():.3f} suspect "
          f"{suspect[flip]:.3f}; trigger_norm null max {null.features[:, norm].max():.3f} "
          f"suspect {suspect[norm]:.3f}; target {int(found.target[-1])}")
    assert int(found.target[-1]) == 7
    assert suspect[flip] > null.features[:, flip].max()
    assert suspect[norm] > null.features[:, norm].max()
    result = change_test(suspect, null)
    assert result.p_value[0] == pytest.approx(1 / (n_null + 1))
