"""The model-level change test: KS helpers against scipy, fingerprint properties, exact
calibration of the max-statistic p-value, and a planted-backdoor trial over a population of
small models: the test's false positives on clean retrains stay within a binomial bound of
its stated rate (alpha = 0.05), and it detects planted backdoors in >= 90% of seeds.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection import change, fingerprint
from mlshift_jax.detection.fingerprint import FEATURES, Null, Responses, change_test
from mlshift_jax.models.population import member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import train_sampled
from mlshift_jax.models.zoo import SEED_MLP
from mlshift_jax.poisoning import poison

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


def _random_responses(key, p=50, k=3, q=10, c=10) -> Responses:
    k1, k2, k3 = jax.random.split(key, 3)
    return Responses(jax.random.uniform(k1, (p, c)), jax.random.uniform(k2, (k, q, c)),
                     jax.random.uniform(k3, (p,)))


def test_fingerprint_of_itself_is_zero():
    r = _random_responses(jax.random.key(0))
    y = jnp.zeros(50, jnp.int32)
    fp = jax.jit(fingerprint.fingerprint_arrays)(r, r, y)
    for name in FEATURES:
        assert float(fp[name]) == pytest.approx(0.0, abs=1e-6), name
    t = np.asarray(fp["transitions"])
    assert t.sum() == pytest.approx(1.0) and np.allclose(t, np.diag(np.diag(t)))


def test_fingerprint_by_hand():
    """Two probes, three classes: one flips 0 -> 2; every patched probe goes to class 1."""
    ref = Responses(jnp.asarray([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]),
                    jnp.asarray([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]]), jnp.zeros(2))
    sus = Responses(jnp.asarray([[0.2, 0.1, 0.7], [0.1, 0.8, 0.1]]),
                    jnp.asarray([[[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]]]), jnp.full(2, 0.5))
    fp = fingerprint.fingerprint_arrays(ref, sus, jnp.asarray([0, 1]))
    assert float(fp["disagreement"]) == 0.5
    assert float(fp["accuracy_drop"]) == 0.5
    assert float(fp["flip_concentration"]) == 1.0
    assert float(fp["squeeze_gap"]) == 0.5
    # reference: probe 0 stays 0 (rate 0 for class 1); suspect: probe 0 (called 2) -> 1
    assert float(fp["trigger_flip"]) == pytest.approx(1.0)
    assert float(fp["kl"]) == pytest.approx(0.5 * (0.9 * np.log(0.9 / 0.2) + 0.05 * np.log(
        0.05 / 0.1) + 0.05 * np.log(0.05 / 0.7)), rel=1e-5)
    assert float(fp["ks"]) == 0.5
    np.testing.assert_allclose(fp["transitions"], [[0, 0, 0.5], [0, 0.5, 0], [0, 0, 0]])
    assert json.dumps(fingerprint.to_json(fp))


def test_candidate_patches_and_probes(mnist):
    patches = fingerprint.candidate_patches((28, 28, 1))
    assert len(patches) == 8 and len({(p.size, p.corners((28, 28))[0]) for p in patches}) == 8
    assert poison.Patch(4).corners((28, 28))[0] == (23, 23)  # default trigger: in the 5x5 one
    assert any(p.size == 5 and p.corners((28, 28))[0] == (22, 22) for p in patches)
    small = fingerprint.candidate_patches((8, 8, 3))  # 3x3 and 5x5 in the corners of 8x8
    assert {p.corners((8, 8))[0] for p in small if p.size == 5} == {(1, 1), (1, 2), (2, 1),
                                                                    (2, 2)}
    probes = fingerprint.make_probes(mnist.x_test, mnist.y_test, n=100, n_patched=20, seed=3)
    assert probes.x.shape == (100, 784) and probes.patches.shape == (8, 784)
    assert np.array_equal(probes.index, fingerprint.make_probes(
        mnist.x_test, mnist.y_test, n=100, n_patched=20, seed=3).index)
    with pytest.raises(ConfigError, match="n_patched"):
        fingerprint.make_probes(mnist.x_test, mnist.y_test, n=10, n_patched=20)
    params = SEED_MLP.init(jax.random.key(0), n_hidden=8)
    with pytest.raises(ConfigError, match="one changed copy"):
        fingerprint.input_responses(SEED_MLP, params, jnp.zeros((2, 99, 784)), probes)
    r = fingerprint.responses(SEED_MLP, params, probes)
    assert r.probs.shape == (100, 10) and r.patched.shape == (8, 20, 10)
    assert r.squeeze.shape == (100,)


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
        p = change_test(draws[-1], Null(draws[:-1])).p_value[0]
        hits += p <= ALPHA
    lo, hi = stats.binom.ppf([1e-3, 1 - 1e-3], trials, ALPHA)
    assert lo <= hits <= hi


def test_change_test_values():
    rng = np.random.default_rng(1)
    null = Null(rng.normal(size=(24, len(FEATURES))))
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
        Null(np.zeros((1, len(FEATURES))))
    with pytest.raises(ConfigError, match="unknown test features"):
        change_test(far, null, ("nope",))


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
    4x4 patch, target 3). Every model has its own seed and random sample. Returns the
    p-values of the clean retrains and of the backdoored models against their reference."""
    configs = ([poison.Clean()] * (N_NULL + 2 * N_TRIALS)
               + [poison.Mixture(0.2, poison.Patch(4))] * N_BACKDOOR)
    plan = plan_for("seed-mlp", TrainConfig(hidden=HIDDEN))
    pop, _ = train_sampled(plan, configs, mnist.x_train, mnist.y_train,
                           seeds=range(5000, 5000 + len(configs)), size=SIZE)
    probes = fingerprint.make_probes(mnist.x_test, mnist.y_test, n=300, n_patched=100)
    resp = fingerprint.model_responses(SEED_MLP, pop.params, probes)

    def take(i):
        return jax.tree.map(lambda a: a[i], resp)

    null_resp = take(jnp.arange(N_NULL))
    p_clean, p_backdoor = [], []
    for t in range(N_TRIALS):
        ref = take(N_NULL + t)
        null = Null(fingerprint.feature_matrix(fingerprint.fingerprints(ref, null_resp,
                                                                        probes.y)))
        rows = [N_NULL + N_TRIALS + t] + ([N_NULL + 2 * N_TRIALS + t] if t < N_BACKDOOR else [])
        obs = fingerprint.feature_matrix(fingerprint.fingerprints(ref, take(jnp.asarray(rows)),
                                                                  probes.y))
        p = change_test(obs, null).p_value
        p_clean.append(p[0])
        if t < N_BACKDOOR:
            p_backdoor.append(p[1])
    return np.asarray(p_clean), np.asarray(p_backdoor)


def test_false_positives_within_stated_rate(trials):
    """Clean retrains: the count of p <= alpha over 40 trials (each its own reference and
    suspect) is at most the 1 - 1e-3 quantile of Binomial(40, alpha)."""
    p_clean, _ = trials
    bound = stats.binom.ppf(1 - 1e-3, N_TRIALS, ALPHA)
    false_positives = int(np.sum(p_clean <= ALPHA))
    print(f"\nfalse positives: {false_positives}/{N_TRIALS} at alpha {ALPHA} "
          f"(bound {bound:.0f}); mean p {p_clean.mean():.3f}")
    assert false_positives <= bound


def test_power_on_planted_backdoors(trials):
    _, p_backdoor = trials
    detected = int(np.sum(p_backdoor <= ALPHA))
    print(f"\nbackdoors detected: {detected}/{N_BACKDOOR} at alpha {ALPHA}")
    assert detected >= 0.9 * N_BACKDOOR


# --- detect_pair --------------------------------------------------------------------------------


def test_detect_pair(mnist, tmp_path):
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
    again = change.detect_pair(ref, clean, mnist, config=cfg, cache_path=tmp_path)
    assert again["verdict"] == "unchanged" and again["category"] == "none"
    assert again["calibration"]["n_null"] == 19
    with pytest.raises(ConfigError, match="shapes"):
        wide = SEED_MLP.init(jax.random.key(0), n_hidden=HIDDEN + 1)
        change.detect_pair(ref, wide, mnist, config=cfg, cache_path=tmp_path)
