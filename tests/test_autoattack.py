"""APGD, the attacks' losses and AutoAttack: the step schedule, DLR against numpy, targeted
APGD's pull toward its target, the per-image record, bad arguments, and agreement with the
reference (torchattacks' AutoAttack at the reference's settings, the `peers` extra)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import adaptive, apgd, autoattack, evasion, losses
from mlshift_jax.bench.torch_peer import ported
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.train import train_minibatch
from mlshift_jax.models.zoo import MLP_CE, SEED_MLP, build, predict

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def small_ce(mnist):
    """A small mlp-ce (hidden 32, 2 epochs on 6,000 images) and 300 test images."""
    model = build("mlp-ce", MLP_CE.spec, 32)
    params = model.init(jax.random.key(1))
    x = jnp.asarray(mnist.x_train[:6000])
    y = jnp.asarray(mnist.y_train[:6000])
    params = train_minibatch(jax.random.key(2), params, x, y, model=model, optimizer="adam",
                             lr=1e-3, batch_size=64, epochs=2)
    return model, params, np.asarray(mnist.x_test[:300]), np.asarray(mnist.y_test[:300])


def accuracy(model, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(predict(model, params, x), -1) == y))


# --- the schedule and the losses ---------------------------------------------------------------


def test_checkpoints_follow_the_papers_recurrence():
    assert apgd.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_0 = 0, p_1 = 0.22
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-9:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert [round(100 * v) for v in p[1:]] == apgd.checkpoints(100)
    assert apgd.checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert apgd.checkpoints(1) == [1]


def _dlr_numpy(z, y):
    s = np.sort(z)[::-1]
    other = np.max(np.delete(z, y))
    return -(z[y] - other) / (s[0] - s[2] + 1e-12)


def _dlr_t_numpy(z, y, t):
    s = np.sort(z)[::-1]
    return -(z[y] - z[t]) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12)


def test_dlr_matches_numpy_float64():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for _ in range(50):
            z = rng.normal(0, 3, 10)
            y, t = rng.integers(10), rng.integers(10)
            np.testing.assert_allclose(float(losses.dlr(jnp.asarray(z), y)), _dlr_numpy(z, y),
                                       rtol=1e-12)
            np.testing.assert_allclose(float(losses.dlr_targeted(jnp.asarray(z), y, t)),
                                       _dlr_t_numpy(z, y, t), rtol=1e-12, atol=1e-15)
            # shift and scale invariant; the margin is not
            np.testing.assert_allclose(float(losses.dlr(jnp.asarray(3 * z + 7), y)),
                                       _dlr_numpy(z, y), rtol=1e-9)
        z = jnp.asarray([1.0, 5.0, 2.0, 0.0])
        assert float(losses.margin(z, 1)) == 3.0 and float(losses.margin(z, 0)) == -4.0
        np.testing.assert_allclose(float(losses.ce(z, 1)),
                                   -float(jax.nn.log_softmax(z)[1]), rtol=1e-12)


def test_logits_of_sigmoid_outputs_are_the_pre_sigmoid_activations():
    with jax.enable_x64(True):
        params = SEED_MLP.init(jax.random.key(3), n_hidden=16, dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(4), (784,), jnp.float64, 0.01, 1.0)
        want = params["who"] @ jax.nn.sigmoid(params["wih"] @ x)
        np.testing.assert_allclose(losses.logits(SEED_MLP, params, x), want, rtol=1e-9)
    mp = MLP_CE.init(jax.random.key(3), n_hidden=16)
    xf = jnp.full((784,), 0.5)
    np.testing.assert_array_equal(losses.logits(MLP_CE, mp, xf), MLP_CE.apply(mp, xf))


# --- APGD --------------------------------------------------------------------------------------


def test_apgd_is_at_least_as_strong_as_pgd(small_ce):
    model, params, x, y = small_ce
    acc_pgd = accuracy(model, params, evasion.pgd(model, params, x, y, eps=0.05, key=KEY), y)
    acc_apgd = accuracy(model, params, apgd.apgd_ce(model, params, x, y, eps=0.05, key=KEY), y)
    acc_dlr = accuracy(model, params, apgd.apgd_dlr(model, params, x, y, eps=0.05, key=KEY), y)
    clean = accuracy(model, params, x, y)
    assert acc_apgd <= acc_pgd and acc_apgd < clean - 0.1
    assert acc_dlr < clean - 0.1


def test_targeted_apgd_moves_toward_its_target(small_ce):
    model, params, x, y = small_ce
    x, y = jnp.asarray(x[:100]), jnp.asarray(y[:100])
    t = (y + 1) % 10
    lo, hi = (jnp.float32(v) for v in model.input_range)
    x_adv, _ = apgd.run(model, params, x, y, t, loss="dlr-t", eps=jnp.float32(0.2), key=KEY,
                        lo=lo, hi=hi, iterations=20)

    def gap(v):  # z_t - z_y per image
        z = predict(model, params, v)
        return np.asarray(jnp.take_along_axis(z, t[:, None], 1)[:, 0]
                          - jnp.take_along_axis(z, y[:, None], 1)[:, 0])

    assert np.mean(gap(x_adv) > gap(x)) > 0.95
    hit = np.mean(np.asarray(jnp.argmax(predict(model, params, x_adv), -1) == t))
    assert hit > np.mean(np.asarray(jnp.argmax(predict(model, params, x), -1) == t)) + 0.2


@pytest.mark.parametrize("defense", [None, pytest.param("randomize", marks=pytest.mark.slow)])
def test_dropping_fooled_images_keeps_each_images_outcome(small_ce, defense):
    """`_on_host` (fooled images dropped every CHUNK steps, the batch re-cut) against
    `_kernel` (every step on every image): the same images fooled, and where an image is not
    fooled, the same point of highest loss."""
    from mlshift_jax.attacks import defenses

    model, params, x, y = small_ce
    model = model if defense is None else defenses.build(defense, model)
    eot = 1 if defense is None else 2
    x, y = jnp.asarray(x[:120]), jnp.asarray(y[:120])
    eps, lo, hi = (jnp.asarray(v, x.dtype) for v in (0.06, 0.01, 1.0))
    a, fa = apgd._kernel(model, "ce", 30, eot, params, x, y, y, eps, lo, hi, KEY)
    b, fb = apgd._on_host(model, "ce", 30, eot, params, x, y, y, eps, lo, hi, KEY)
    fa, fb = np.asarray(fa), np.asarray(fb)
    assert 0.2 < fa.mean() < 0.95  # some fooled early, some never: both paths exercised
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_allclose(np.asarray(a)[~fa], np.asarray(b)[~fa], atol=1e-5)
    if defense is None:  # a deterministic model: every point reported fooled is wrong
        assert np.all(np.asarray(jnp.argmax(predict(model, params, b[fb]), -1)) != y[fb])


def test_apgd_compiles_once_per_model_across_eps(small_ce):
    model, params, x, y = small_ce
    x, y = x[:32], y[:32]
    apgd.apgd_ce(model, params, x, y, eps=0.1, key=KEY, iterations=5)
    before = apgd._kernel._cache_size()
    for eps in (0.05, 0.2, 0.3):
        apgd.apgd_ce(model, params, x, y, eps=eps, key=KEY, iterations=5)
    assert apgd._kernel._cache_size() == before


# --- Square at the standard setting -------------------------------------------------------------


@pytest.mark.parametrize("lo,hi", [(0.01, 1.0), (0.2, 0.7)])
def test_square_standard_stays_in_the_ball_and_range(small_ce, lo, hi):
    model, params, x, y = small_ce
    x = np.clip(x[:64], lo, hi)
    x_adv = np.asarray(adaptive.square(model, params, x, y[:64], eps=0.1, key=KEY, lo=lo,
                                       hi=hi, queries=200, p_init=0.8))
    assert x_adv.min() >= np.float32(lo) and x_adv.max() <= np.float32(hi)
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6
    assert np.abs(x_adv - x).max() > 0


@pytest.mark.parametrize("name", ["mlp-ce", "seed-mlp"])
def test_square_updates_the_first_layer_in_place_as_the_full_forward_would(small_ce, name):
    """The incremental Square (a square's pixels times their weight columns added to the
    stored pre-activations) against the full forward pass on every query: the same squares
    are drawn, so the same images are fooled and the final margins agree to float rounding
    (a near-tie may send one image down another path; at most 1 in 50 here)."""
    from mlshift_jax.models.zoo import affine_split

    model, params, x, y = small_ce
    if name == "seed-mlp":
        model = build("seed-mlp", SEED_MLP.spec, 32)
        params = model.init(jax.random.key(3))
    assert affine_split(model) is not None
    x, y = jnp.asarray(x[:100]), jnp.asarray(y[:100])
    eps, lo, hi = jnp.float32(0.1), jnp.float32(0.01), jnp.float32(1.0)
    sides = adaptive.square_sides(0.8, 300, 28, 28)
    assert any(s * s <= adaptive.INCREMENTAL_SHARE * 784 for _, s in sides)  # both paths run
    assert any(s * s > adaptive.INCREMENTAL_SHARE * 784 for _, s in sides)
    fast, full = (adaptive.square_kernel(model, 300, 1, params, x, y, eps, KEY, lo, hi, 0.8,
                                         incremental=inc) for inc in (True, False))
    margins = [np.asarray(adaptive._margin(model, params, a, y, None)) for a in (fast, full)]
    assert np.mean((margins[0] < 0) == (margins[1] < 0)) >= 0.98
    same = np.all(np.abs(np.asarray(fast) - np.asarray(full)) < 1e-6, axis=1)
    assert same.mean() >= 0.5  # most images took the very same squares
    np.testing.assert_allclose(margins[0][same], margins[1][same], rtol=1e-4, atol=1e-4)
    for a in (fast, full):
        assert float(jnp.max(jnp.abs(a - x))) <= 0.1 + 1e-6
        assert float(a.min()) >= np.float32(0.01) and float(a.max()) <= 1.0


def test_square_never_updates_in_place_on_a_model_whose_first_layer_it_cannot_see():
    """A defended model replaces `apply`: the affine split is keyed by apply itself, so a
    wrapper (here a preprocessing defense) never inherits the undefended model's."""
    from mlshift_jax.attacks import defenses
    from mlshift_jax.models.zoo import affine_split

    model = build("mlp-ce", MLP_CE.spec, 8)
    assert affine_split(model) is not None
    assert affine_split(build("cnn", MLP_CE.spec, 8)) is None
    assert affine_split(defenses.build("quantize", model)) is None
    assert affine_split(defenses.build("randomize", model)) is None
    # adversarial training keeps the model's functions (its robustness is in the weights)
    assert affine_split(defenses.build("adv-train", model)) is not None


def test_square_standard_schedule():
    # p halves at the reference's marks, rescaled to the query budget: 0.8 for queries 0-5,
    # 0.4 for 6-25, 0.2 for 26-100, 0.1 for 101-250, ...; side round(sqrt(p * 784))
    sides = adaptive.square_sides(0.8, 5000, 28, 28)
    assert sides[:4] == ((6, 25), (20, 18), (75, 13), (150, 9))
    assert sum(n for n, _ in sides) == 5000 and sides[-1][1] == 1
    # the cheap setting of 1,000 queries stretches the same marks over fewer iterations
    assert adaptive.square_sides(0.3, 1000, 28, 28)[0] == (2, 15)


# --- AutoAttack --------------------------------------------------------------------------------


@pytest.mark.slow
def test_autoattack_report_is_consistent(small_ce):
    model, params, x, y = small_ce
    x, y = x[:200], y[:200]
    r = autoattack.report(model, params, x, y, eps=0.08, key=KEY, iterations=20, targets=3,
                          queries=300)
    assert r.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    x_adv = np.asarray(r.x_adv)
    assert np.abs(x_adv - x).max() <= 0.08 + 1e-6
    ok = np.asarray(jnp.argmax(predict(model, params, x_adv), -1) == y)
    clean_ok = np.asarray(jnp.argmax(predict(model, params, x), -1) == y)
    np.testing.assert_array_equal(ok, r.robust)  # robust: exactly the images still right
    np.testing.assert_array_equal(r.broken_by == autoattack.CLEAN, ~clean_ok)
    counts = r.counts()
    assert sum(counts.values()) == 200 and counts["apgd-ce"] > 0
    # the same robust accuracy as the registered attack gives
    again = autoattack.autoattack(model, params, x, y, eps=0.08, key=KEY, iterations=20,
                                  targets=3, queries=300)
    assert accuracy(model, params, again, y) == pytest.approx(r.robust.mean())


def test_fab_runs_shared_across_eps_give_each_eps_its_own_result(small_ce):
    """FAB-T reads no eps until its final test: a sweep over eps computes each image's runs
    once (`fab_runs`), with the same per-image outcome as a fresh AutoAttack per eps."""
    from mlshift_jax.attacks import fab

    model, params, x, y = small_ce
    x, y = jnp.asarray(x[:96]), jnp.asarray(y[:96])
    lo, hi = model.input_range
    runs = fab.runs(model, params, x, y, key=KEY, lo=lo, hi=hi, steps=10, targets=2)
    fooled_any = 0
    for eps in (0.03, 0.1):
        want_x, want_f = fab.targeted(model, params, x, y, eps=eps, key=KEY, lo=lo, hi=hi,
                                      steps=10, targets=2)
        got_x, got_f = fab.pick(x, *runs, eps)
        np.testing.assert_array_equal(np.asarray(got_f), np.asarray(want_f))
        np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=1e-6)
        fooled_any += int(np.sum(np.asarray(got_f)))
    assert fooled_any > 0
    kw = {"key": KEY, "iterations": 3, "targets": 2, "queries": 20}
    shared: dict = {}
    for eps in (0.03, 0.1, 0.05):
        alone = autoattack.report(model, params, x, y, eps=eps, **kw)
        swept = autoattack.report(model, params, x, y, eps=eps, fab_runs=shared, **kw)
        np.testing.assert_array_equal(swept.broken_by, alone.broken_by)
        # equal up to float rounding (other batch sizes vectorize differently)
        np.testing.assert_allclose(np.asarray(swept.x_adv), np.asarray(alone.x_adv), atol=1e-6)
    assert 0 < len(shared) <= 96  # FAB-T ran, each image once


@pytest.mark.slow
def test_autoattack_inside_jit_agrees_with_the_host_picked_run(small_ce):
    model, params, x, y = small_ce
    x, y = x[:100], y[:100]
    kw = {"key": KEY, "iterations": 10, "targets": 2, "queries": 100}
    host = autoattack.report(model, params, x, y, eps=0.08, **kw).robust.mean()
    traced = jax.jit(lambda e: autoattack.autoattack(model, params, x, y, eps=e, **kw))(0.08)
    assert abs(accuracy(model, params, traced, y) - host) <= 0.03


@pytest.mark.slow
def test_autoattack_rand_version_on_a_randomized_defense(small_ce):
    from mlshift_jax.attacks import defenses

    model, params, x, y = small_ce
    noisy = defenses.build("randomize", model)
    r = autoattack.report(noisy, params, x[:64], y[:64], eps=0.1, key=KEY, version="rand",
                          iterations=5, eot=2)
    assert r.attacks == ("apgd-ce", "apgd-dlr")
    assert np.abs(np.asarray(r.x_adv) - x[:64]).max() <= 0.1 + 1e-6


def test_worst_case_is_taken_per_image():
    a = np.array([True, True, False, True])
    b = np.array([False, True, True, True])
    robust = autoattack.robust_per_image({"a": a, "b": b})
    np.testing.assert_array_equal(robust, [False, True, False, True])
    assert robust.mean() < min(a.mean(), b.mean())  # min over accuracies would say 0.75


_x = np.full((4, 784), 0.5, np.float32)
_y = np.arange(4, dtype=np.int32)
_p = MLP_CE.init(jax.random.key(0), n_hidden=8)

BAD = {
    "iterations=0": (functools.partial(apgd.apgd_ce, eps=0.1, key=KEY, iterations=0),
                     "iterations"),
    "restarts=0": (functools.partial(apgd.apgd_ce, eps=0.1, key=KEY, restarts=0), "restarts"),
    "no key": (functools.partial(apgd.apgd_dlr, eps=0.1), "key"),
    "eps<0": (functools.partial(apgd.apgd_ce, eps=-0.1, key=KEY), "eps"),
    "eps inf": (functools.partial(autoattack.autoattack, eps=float("inf"), key=KEY), "eps"),
    "targets=0": (functools.partial(apgd.apgd_t, eps=0.1, key=KEY, targets=0), "targets"),
    "targets=10": (functools.partial(apgd.apgd_t, eps=0.1, key=KEY, targets=10), "targets"),
    "queries=0": (functools.partial(autoattack.autoattack, eps=0.1, key=KEY, queries=0),
                  "queries"),
    "square queries=0": (functools.partial(adaptive.square, eps=0.1, key=KEY, queries=0),
                         "queries"),
    "p_init=0": (functools.partial(adaptive.square, eps=0.1, key=KEY, p_init=0.0), "p_init"),
    "version": (functools.partial(autoattack.autoattack, eps=0.1, key=KEY, version="plus"),
                "version"),
    "eot=0": (functools.partial(autoattack.autoattack, eps=0.1, key=KEY, eot=0), "eot"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_raise_config_error(case):
    fn, match = BAD[case]
    with pytest.raises(ConfigError, match=match):
        fn(MLP_CE, _p, _x, _y)


def test_too_few_classes_for_dlr():
    three = build("mlp-ce", MLP_CE.spec._replace(n_classes=3), 8)
    p = three.init(jax.random.key(0))
    with pytest.raises(ConfigError, match="4 classes"):
        apgd.apgd_t(three, p, _x, _y % 3, eps=0.1, key=KEY)
    with pytest.raises(ConfigError, match="4 classes"):
        autoattack.autoattack(three, p, _x, _y % 3, eps=0.1, key=KEY)


# --- the reference: torchattacks at AutoAttack's standard settings ----------------------------


@pytest.mark.slow
def test_agrees_with_torchattacks_autoattack(small_ce):
    """The harness's AutoAttack and the reference's (torchattacks' APGD-CE and APGD-T at 100
    iterations and Square at 5,000 queries, the settings of Croce & Hein's
    `AutoAttack(version='standard')`; torchattacks' own `AutoAttack` class runs 10) on the
    same weights, 200 images and box [0, 1]: robust accuracy within 0.005, and per-image
    agreement on at least 97% of the images. The reference's FAB-T is left out here to keep
    the test CI-sized (torch's FAB-T is its slowest part); tests/test_fab.py checks the
    harness's FAB-T against it alone."""
    pytest.importorskip("torch")
    torchattacks = pytest.importorskip("torchattacks")
    from mlshift_jax.bench import torch_peer

    torch_peer._torch()  # passive OpenMP waiting, as the peers run
    model, params, x, y = small_ce
    x, y = x[:200], y[:200]
    net, xt, yt = ported(model, params, x, y)
    eps = 0.06
    ref = torchattacks.MultiAttack([
        torchattacks.APGD(net, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(net, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        torchattacks.Square(net, eps=eps, n_queries=5000, n_restarts=1, seed=0)])
    adv = ref(xt, yt)
    theirs = (net(adv).argmax(1) == yt).numpy()
    ours = autoattack.report(model, params, x, y, eps=eps, key=KEY, lo=0.0, hi=1.0).robust
    assert 0.1 < ours.mean() < 0.9  # a budget where the attacks have work to do
    assert abs(ours.mean() - theirs.mean()) <= 0.005 + 1e-9
    assert np.mean(ours == theirs) >= 0.97
