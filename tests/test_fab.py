"""FAB-T (L∞): the box-constrained projection against a linear program, eps 0, the eps-ball
and the range, determinism, the pull toward the target, bad arguments, and agreement with
the reference (torchattacks' FAB, multi-targeted at AutoAttack's settings, the `peers`
extra) on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import fab
from mlshift_jax.bench.torch_peer import ported
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.zoo import MLP_CE, build, predict

KEY = jax.random.key(0)


def _accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(predict(MLP_CE, params, x), -1) == y))


# --- the projection ----------------------------------------------------------------------------


def _linprog_linf(t, w, b, lo, hi):
    """min s s.t. <w, t + d> = b, |d_i| <= s, lo <= t + d <= hi (scipy, float64);
    None where infeasible."""
    from scipy.optimize import linprog

    n = len(t)
    cost = np.r_[np.zeros(n), 1.0]
    eq = np.r_[w, 0.0][None]
    ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    bounds = [(lo - ti, hi - ti) for ti in t] + [(0, None)]
    r = linprog(cost, A_ub=ub, b_ub=np.zeros(2 * n), A_eq=eq, b_eq=[b - w @ t],
                bounds=bounds, method="highs")
    return r.x[-1] if r.status == 0 else None


def test_projection_is_the_smallest_linf_move_in_the_box():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    lo, hi, n, cases = 0.0, 1.0, 10, 200
    ts = rng.uniform(lo, hi, (cases, n))
    ws = rng.normal(0, 1, (cases, n)) * (rng.random((cases, n)) > 0.2)
    bs = np.sum(ws * ts, 1) + rng.normal(0, 1.5, cases)
    with jax.enable_x64(True):
        ds = np.asarray(jax.jit(jax.vmap(lambda t, w, b: fab.project(t, w, b, lo, hi)))(
            jnp.asarray(ts), jnp.asarray(ws), jnp.asarray(bs)))
    feasible = 0
    for t, w, b, d in zip(ts, ws, bs, ds, strict=True):
        assert np.all(t + d >= lo - 1e-12) and np.all(t + d <= hi + 1e-12)
        assert np.all(d[w == 0] == 0)
        best = _linprog_linf(t, w, b, lo, hi)
        if best is None:  # out of reach: the corner closest to the hyperplane
            corner = np.where(w * np.sign(w @ t - b) > 0, lo, hi)
            np.testing.assert_allclose((t + d)[w != 0], corner[w != 0], atol=1e-12)
            continue
        feasible += 1
        np.testing.assert_allclose(w @ (t + d), b, atol=1e-9)
        np.testing.assert_allclose(np.abs(d).max(), best, atol=1e-9)
    assert 50 < feasible < 200  # both cases drawn


# --- on a trained mlp-ce -----------------------------------------------------------------------


def test_eps_zero_returns_x(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    x_adv = fab.fab_t(MLP_CE, params, x[:64], y[:64], eps=0.0, steps=20, targets=3)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x[:64]))


@pytest.mark.parametrize("lo,hi", [(None, None), (0.2, 0.7)])
def test_stays_in_the_ball_and_the_range(trained_mlp_ce, lo, hi):
    params, x, y, _ = trained_mlp_ce
    x = np.asarray(x[:64])
    if lo is not None:
        x = np.clip(x, lo, hi)
    eps = 0.15
    x_adv = np.asarray(fab.fab_t(MLP_CE, params, x, y[:64], eps=eps, lo=lo, hi=hi, steps=30,
                                 targets=3))
    low, high = MLP_CE.input_range if lo is None else (lo, hi)
    assert x_adv.min() >= np.float32(low) and x_adv.max() <= np.float32(high)
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    moved = np.abs(x_adv - x).max(axis=1) > 0
    wrong = np.asarray(jnp.argmax(predict(MLP_CE, params, x_adv), -1) != y[:64])
    assert moved.any() and np.all(wrong[moved])  # a moved image is an adversarial one


def test_finds_adversarials_and_moves_toward_the_target(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    x, y = x[:100], y[:100]
    z = predict(MLP_CE, params, x)
    t = jnp.argsort(-z, axis=1)[:, 1]  # the one target of targets=1: the runner-up class
    x_adv = fab.fab_t(MLP_CE, params, x, y, eps=0.2, targets=1)
    clean, robust = _accuracy(params, x, y), _accuracy(params, x_adv, y)
    assert robust < clean - 0.5

    def gap(v):  # z_t - z_y per image
        s = predict(MLP_CE, params, v)
        return np.asarray(jnp.take_along_axis(s, t[:, None], 1)[:, 0]
                          - jnp.take_along_axis(s, y[:, None], 1)[:, 0])

    moved = np.abs(np.asarray(x_adv - x)).max(axis=1) > 0
    assert moved.sum() > 30 and np.all(gap(x_adv)[moved] > gap(x)[moved])
    pred = np.asarray(jnp.argmax(predict(MLP_CE, params, x_adv), -1))
    assert np.mean(pred[moved] == np.asarray(t)[moved]) > 0.9  # mostly the target itself


def test_deterministic_and_keyed_restarts(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    x, y = x[:40], y[:40]
    kw = {"eps": 0.08, "steps": 20, "targets": 2}
    a = fab.fab_t(MLP_CE, params, x, y, **kw)
    np.testing.assert_array_equal(a, fab.fab_t(MLP_CE, params, x, y, **kw))
    r7 = fab.fab_t(MLP_CE, params, x, y, key=jax.random.key(7), restarts=2, **kw)
    np.testing.assert_array_equal(
        r7, fab.fab_t(MLP_CE, params, x, y, key=jax.random.key(7), restarts=2, **kw))
    # a second restart fools at least the images the first one did
    assert _accuracy(params, r7, y) <= _accuracy(params, a, y)


def test_stepping_images_in_groups_changes_no_run(trained_mlp_ce, monkeypatch):
    params, x, y, _ = trained_mlp_ce
    x, y = x[:24], y[:24]
    kw = {"key": KEY, "lo": 0.0, "hi": 1.0, "steps": 15, "targets": 3}
    assert fab.images_per_group(9, 784) == (
        fab.LANE_BYTES // (4 * 784 * 9) if jax.default_backend() == "cpu" else 1 << 30)
    monkeypatch.setattr(fab, "images_per_group", lambda runs, d: 1 << 30)
    together = fab.runs(MLP_CE, params, x, y, **kw)
    monkeypatch.setattr(fab, "images_per_group", lambda runs, d: 5)  # 4 groups and a rest of 4
    grouped = fab.runs(MLP_CE, params, x, y, **kw)
    np.testing.assert_array_equal(together[2], grouped[2])
    # the same runs: only the matmuls' summation order differs between group sizes
    np.testing.assert_allclose(together[1], grouped[1], atol=1e-4)
    np.testing.assert_allclose(together[0], grouped[0], atol=1e-3)


def test_compiles_once_across_eps(trained_mlp_ce):
    params, x, y, _ = trained_mlp_ce
    fab.fab_t(MLP_CE, params, x[:16], y[:16], eps=0.1, steps=5, targets=2)
    before = fab._kernel._cache_size()
    for eps in (0.05, 0.2, 0.3):
        fab.fab_t(MLP_CE, params, x[:16], y[:16], eps=eps, steps=5, targets=2)
    assert fab._kernel._cache_size() == before


_x = np.full((4, 784), 0.5, np.float32)
_y = np.arange(4, dtype=np.int32)
_p = MLP_CE.init(jax.random.key(0), n_hidden=8)

BAD = {
    "steps=0": ({"steps": 0}, "steps"),
    "targets=0": ({"targets": 0}, "targets"),
    "targets=10": ({"targets": 10}, "targets"),
    "restarts=0": ({"restarts": 0}, "restarts"),
    "restarts without key": ({"restarts": 2}, "key"),
    "alpha_max>1": ({"alpha_max": 1.5}, "alpha_max"),
    "eta<1": ({"eta": 0.5}, "eta"),
    "beta>1": ({"beta": 2.0}, "beta"),
    "eps<0": ({"eps": -0.1}, "eps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_raise_config_error(case):
    kw, match = BAD[case]
    with pytest.raises(ConfigError, match=match):
        fab.fab_t(MLP_CE, _p, _x, _y, **{"eps": 0.1, **kw})


def test_fewer_classes_take_every_other_class():
    three = build("mlp-ce", MLP_CE.spec._replace(n_classes=3), 8)
    p = three.init(jax.random.key(0))
    out = fab.fab_t(three, p, _x, _y % 3, eps=0.1, steps=3)  # targets: the 2 other classes
    assert out.shape == _x.shape
    with pytest.raises(ConfigError, match="targets"):
        fab.fab_t(three, p, _x, _y % 3, eps=0.1, targets=3)


# --- the reference: torchattacks' FAB, multi-targeted, AutoAttack's settings -----------------


@pytest.mark.slow
def test_agrees_with_torchattacks_fab(trained_mlp_ce):
    """The harness's FAB-T and torchattacks' FAB (norm Linf, multi_targeted over 9 targets,
    100 steps, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9: the settings of Croce & Hein's
    AutoAttack standard version) on the same weights, 200 images, box [0, 1]: robust accuracy
    within 0.01 and per-image agreement on at least 95% of the images."""
    pytest.importorskip("torch")
    torchattacks = pytest.importorskip("torchattacks")
    from mlshift_jax.bench import torch_peer

    torch_peer._torch()  # passive OpenMP waiting, as the peers run
    params, x, y, _ = trained_mlp_ce
    x, y = np.asarray(x), np.asarray(y)
    net, xt, yt = ported(MLP_CE, params, x, y)
    eps = 0.06
    ref = torchattacks.FAB(net, norm="Linf", eps=eps, steps=100, n_restarts=1, alpha_max=0.1,
                           eta=1.05, beta=0.9, multi_targeted=True, n_classes=10, seed=0)
    theirs = (net(ref(xt, yt)).argmax(1) == yt).numpy()
    x_adv = fab.fab_t(MLP_CE, params, x, y, eps=eps, lo=0.0, hi=1.0)
    ours = np.asarray(jnp.argmax(predict(MLP_CE, params, x_adv), -1) == y)
    assert 0.1 < ours.mean() < 0.9  # a budget where the attack has work to do
    assert abs(ours.mean() - theirs.mean()) <= 0.01 + 1e-9
    assert np.mean(ours == theirs) >= 0.95

