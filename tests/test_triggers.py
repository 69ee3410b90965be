"""Trigger families as arrays: each does what its paper says, on any image shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.poisoning import triggers

SHAPES = [((28, 28, 1), (0.01, 1.0)), ((8, 8, 3), (0.0, 1.0)), ((5, 7, 2), (-1.0, 1.0))]


def _images(shape, rng_range, n=4):
    lo, hi = rng_range
    return np.random.default_rng(0).uniform(lo, hi, (n, int(np.prod(shape)))).astype(np.float32)


@pytest.mark.parametrize("shape,rng_range", SHAPES)
def test_identity_changes_nothing(shape, rng_range):
    x = _images(shape, rng_range)
    out = triggers.stamp(x, triggers.identity(shape), shape, rng_range)
    np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.parametrize("shape,rng_range", SHAPES)
@pytest.mark.parametrize("family", triggers.FAMILIES)
def test_every_family_stays_in_range_and_changes_the_image(shape, rng_range, family):
    kw = {"size": 3} if family in ("patch", "checkerboard") else {}
    kw.update({"pixels": 5} if family == "sparse" else {})
    t = triggers.make(family, shape, rng_range, **kw)
    x = _images(shape, rng_range)
    out = np.asarray(triggers.stamp(x, t, shape, rng_range))
    assert out.shape == x.shape
    assert out.min() >= rng_range[0] - 1e-6 and out.max() <= rng_range[1] + 1e-6
    assert np.abs(out - x).max() > 1e-3


def test_patch_sets_a_square_in_the_corner_and_keeps_the_rest():
    shape = (8, 8, 3)
    t = triggers.patch(shape, (0.0, 1.0), size=2, position="bottom-right", margin=1)
    x = np.zeros((1, 192), np.float32)
    out = np.asarray(triggers.stamp(x, t, shape, (0.0, 1.0))).reshape(8, 8, 3)
    assert np.all(out[5:7, 5:7] == 1.0) and out.sum() == 2 * 2 * 3


def test_blended_is_the_convex_mix_and_sparse_sets_k_pixels():
    shape, rng_range = (6, 6, 1), (0.0, 1.0)
    b = triggers.blended(shape, rng_range, alpha=0.25, seed=1)
    x = _images(shape, rng_range, 2)
    want = 0.75 * x + 0.25 * b.pattern.reshape(-1)
    np.testing.assert_allclose(np.asarray(triggers.stamp(x, b, shape, rng_range)), want,
                               atol=1e-6)
    s = triggers.sparse(shape, rng_range, pixels=7, seed=2)
    assert int(s.mask.sum()) == 7


def test_sig_is_a_horizontal_sinusoid_and_warp_a_small_smooth_shift():
    shape, rng_range = (10, 12, 1), (0.0, 1.0)
    s = triggers.sig(shape, rng_range, delta=0.1, frequency=3)
    assert np.allclose(s.additive[0], s.additive[5]) and abs(s.additive.max() - 0.1) < 1e-2
    w = triggers.warp(shape, rng_range, strength=0.5, seed=0)
    assert w.flow.shape == (10, 12, 2) and 0 < np.abs(w.flow).mean() <= 1.0
    x = _images(shape, rng_range, 1)
    out = np.asarray(triggers.stamp(x, w, shape, rng_range))
    assert 0 < np.abs(out - x).mean() < 0.3


def test_stamp_is_jittable_and_vmappable_over_triggers():
    shape, rng_range = (8, 8, 1), (0.0, 1.0)
    stacked = jax.tree.map(lambda *a: np.stack(a),
                           *[triggers.patch(shape, rng_range, size=2, position=p)
                             for p in ("top-left", "bottom-right")])
    x = jnp.zeros((3, 64))
    out = jax.jit(jax.vmap(lambda t: triggers.stamp(x, triggers.TriggerArrays(*t), shape,
                                                    rng_range)))(tuple(stacked))
    assert out.shape == (2, 3, 64) and float(out[0, 0].reshape(8, 8)[1, 1]) == 1.0


@pytest.mark.parametrize("call,fragment", [
    (lambda: triggers.patch((8, 8, 1), (0, 1), size=9), "patch size"),
    (lambda: triggers.patch((8, 8, 1), (0, 1), position="middle"), "position"),
    (lambda: triggers.blended((8, 8, 1), (0, 1), alpha=0), "alpha"),
    (lambda: triggers.sparse((8, 8, 1), (0, 1), pixels=100), "pixel count"),
    (lambda: triggers.make("rainbow", (8, 8, 1), (0, 1)), "family"),
    (lambda: triggers.make("patch", (8, 8), (0, 1)), "image_shape"),
    (lambda: triggers.make("patch", (8, 8, 1), (1, 0)), "lo < hi"),
    (lambda: triggers.stamp(np.zeros((2, 10)), triggers.identity((8, 8, 1)), (8, 8, 1),
                            (0, 1)), "images"),
])
def test_bad_settings_raise_config_error(call, fragment):
    with pytest.raises(ConfigError, match=fragment):
        call()
