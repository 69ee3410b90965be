"""Poisonings: masks, counts, labels, patch pixels, validation, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import INPUT_RANGE
from mlshift_jax.models.zoo import STUDY_SPEC
from mlshift_jax.poisoning import poison
from mlshift_jax.poisoning.poison import (
    POISONINGS,
    Clean,
    Mixture,
    Patch,
    Trigger,
    WrongLabel,
    apply_trigger,
    make_config,
    patch_pixels,
)

N = 2000
KEY = jax.random.key(0)

# one representative config per kind, driven from the registry
EXAMPLES = {
    "clean": Clean(),
    "wrong-label": WrongLabel(fraction=0.3, mode="uniform"),
    "trigger": Trigger(fraction=0.5, patch=Patch(size=3), source=None),
    "mixture": Mixture(fraction=0.2, patch=Patch(size=4), target=3),
    "blended": poison.Blended(fraction=0.2, target=3),
    "sparse": poison.Sparse(fraction=0.2, target=3),
    "sig": poison.Sig(fraction=0.5, target=3),
    "warp": poison.Warp(fraction=0.2, target=3),
}


@pytest.fixture(scope="module")
def xy(mnist):
    return mnist.x_train[:N], mnist.y_train[:N]


def _run(cfg, xy, key=KEY):
    x, y = xy
    return tuple(np.asarray(a) for a in POISONINGS[cfg.kind].apply(key, x, y, cfg))


def _expected_count(cfg, y):
    return int(round(getattr(cfg, "fraction", 0.0) * poison.eligible_classes(cfg, 10)[y].sum()))


def test_registry_covers_every_kind():
    assert set(POISONINGS) == {"clean", "wrong-label", "trigger", "mixture", "blended",
                               "sparse", "sig", "warp"} == set(EXAMPLES)
    for name, p in POISONINGS.items():
        assert p.name == name and p.config.kind == name


@pytest.mark.parametrize("kind", sorted(POISONINGS))
def test_shapes_counts_and_inputs_untouched(xy, kind):
    x, y = xy
    x_before, y_before = x.copy(), y.copy()
    cfg = EXAMPLES[kind]
    xp, yp, mask = _run(cfg, xy)
    assert xp.shape == x.shape and xp.dtype == np.float32
    assert yp.shape == y.shape and yp.dtype == y.dtype
    assert mask.shape == (N,) and mask.dtype == bool
    assert mask.sum() == _expected_count(cfg, y) == poison.poison_count(cfg, y)
    assert xp.min() >= INPUT_RANGE[0] and xp.max() <= INPUT_RANGE[1]
    assert ((yp >= 0) & (yp < 10)).all()
    # nothing outside the mask changes; something inside it does
    np.testing.assert_array_equal(xp[~mask], x[~mask])
    np.testing.assert_array_equal(yp[~mask], y[~mask])
    if mask.any():
        changed = (yp[mask] != y[mask]) | (xp[mask] != x[mask]).any(axis=1)
        assert changed.all()
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


def test_wrong_label_uniform_draws_every_other_label(xy):
    x, y = xy
    xp, yp, mask = _run(WrongLabel(fraction=1.0, mode="uniform"), xy)
    assert mask.all() and (yp != y).all()
    np.testing.assert_array_equal(xp, x)
    offsets = np.bincount((yp - y) % 10, minlength=10)
    assert offsets[0] == 0 and (offsets[1:] > N / 9 * 0.6).all(), offsets


def test_wrong_label_shift_and_target(xy):
    _, y = xy
    _, yp, mask = _run(WrongLabel(fraction=0.4, mode="shift"), xy)
    np.testing.assert_array_equal(yp[mask], (y[mask] + 1) % 10)
    _, yp, mask = _run(WrongLabel(fraction=0.4, mode="target", target=7), xy)
    assert (yp[mask] == 7).all() and (y[mask] != 7).all()
    assert mask.sum() == round(0.4 * (y != 7).sum())


def test_trigger_stamps_the_patch_and_keeps_labels(xy):
    x, y = xy
    cfg = Trigger(fraction=0.5, patch=Patch(size=3, value=0.7), source=2)
    xp, yp, mask = _run(cfg, xy)
    np.testing.assert_array_equal(yp, y)
    assert (y[mask] == 2).all() and mask.sum() == round(0.5 * (y == 2).sum())
    img = xp[mask].reshape(-1, 28, 28)
    # bottom-right corner, 1 px margin: rows/cols 24..26
    np.testing.assert_allclose(img[:, 24:27, 24:27], 0.7)
    pix = patch_pixels(cfg.patch, STUDY_SPEC)[0]
    assert pix.sum() == 9
    np.testing.assert_array_equal(xp[mask][:, ~pix], x[mask][:, ~pix])


def test_per_class_patch_places_are_distinct_and_inside():
    patch = Patch(size=6, position="per-class")
    pix = patch_pixels(patch, STUDY_SPEC)
    assert pix.shape == (10, 784) and (pix.sum(axis=1) == 36).all()
    assert len({tuple(np.flatnonzero(p)) for p in pix}) == 10
    # no two classes share a pixel at the largest size the study used
    assert pix.sum(axis=0).max() == 1


def test_default_trigger_is_per_class(xy):
    x, y = xy
    xp, yp, mask = _run(Trigger(), xy)
    assert mask.all()
    pix = patch_pixels(Trigger().patch, STUDY_SPEC)
    for c in range(10):
        rows = xp[y == c]
        assert (rows[:, pix[c]] == 1.0).all()


def test_mixture_relabels_to_target_with_the_patch(xy):
    x, y = xy
    cfg = Mixture(fraction=0.2, patch=Patch(size=4), target=3)
    xp, yp, mask = _run(cfg, xy)
    assert (yp[mask] == 3).all() and (y[mask] != 3).all()
    assert mask.sum() == round(0.2 * (y != 3).sum())
    np.testing.assert_array_equal(xp[mask].reshape(-1, 28, 28)[:, 23:27, 23:27], 1.0)


def test_apply_trigger_on_test_images(mnist):
    x = mnist.x_test[:50]
    patch = Patch(size=5, position=(2, 3), value=0.5)
    xt = np.asarray(apply_trigger(x, patch))
    img = xt.reshape(-1, 28, 28)
    np.testing.assert_allclose(img[:, 2:7, 3:8], 0.5)
    pix = patch_pixels(patch, STUDY_SPEC)[0]
    np.testing.assert_array_equal(xt[:, ~pix], x[:, ~pix])
    np.testing.assert_array_equal(np.asarray(apply_trigger(x[0], patch)), xt[0])
    per_class = Patch(size=3, position="per-class")
    with pytest.raises(ConfigError, match="needs y"):
        apply_trigger(x, per_class)
    y = mnist.y_test[:50]
    xc = np.asarray(apply_trigger(x, per_class, y))
    pc = patch_pixels(per_class, STUDY_SPEC)
    assert all((xc[i, pc[y[i]]] == 1.0).all() for i in range(50))


def test_same_key_same_result_and_nested_fractions(xy):
    cfg = WrongLabel(fraction=0.3, mode="uniform")
    a, b = _run(cfg, xy), _run(cfg, xy)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = _run(cfg, xy, key=jax.random.key(1))
    assert not np.array_equal(a[2], c[2])
    small = _run(Mixture(fraction=0.1), xy)[2]
    large = _run(Mixture(fraction=0.3), xy)[2]
    assert (large[small]).all() and large.sum() > small.sum()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_fraction_edges(xy, fraction):
    x, y = xy
    xp, yp, mask = _run(Mixture(fraction=fraction, target=5), xy)
    assert mask.sum() == (0 if fraction == 0 else (y != 5).sum())
    if fraction == 0:
        np.testing.assert_array_equal(xp, x)


def test_poison_arrays_is_jittable_and_vmappable(xy):
    x, y = (jnp.asarray(a) for a in xy)
    cfgs = [WrongLabel(fraction=0.1, mode="shift"), Mixture(fraction=0.2)]
    arrays = jax.tree.map(jnp.asarray, poison.stack_arrays([poison.to_arrays(c, xy[1], STUDY_SPEC)
                                                            for c in cfgs]))
    keys = jnp.stack([KEY, KEY])
    xs, ys, masks = jax.jit(jax.vmap(poison.poison_arrays, in_axes=(0, None, None, 0)))(
        keys, x, y, arrays)
    for i, cfg in enumerate(cfgs):
        xp, yp, mask = _run(cfg, xy)
        np.testing.assert_array_equal(np.asarray(xs[i]), xp)
        np.testing.assert_array_equal(np.asarray(ys[i]), yp)
        np.testing.assert_array_equal(np.asarray(masks[i]), mask)


@pytest.mark.parametrize("build,match", [
    (lambda: WrongLabel(fraction=-0.1), "fraction in \\[0, 1\\], found -0.1"),
    (lambda: WrongLabel(fraction=1.5), "fraction in \\[0, 1\\], found 1.5"),
    (lambda: Mixture(fraction=float("nan")), "fraction in \\[0, 1\\], found nan"),
    (lambda: Trigger(fraction="0.5"), "fraction"),
    (lambda: Patch(size=0), "size an integer >= 1, found 0"),
    (lambda: Patch(size=4, position="top-left"), "position None, \\(row, col\\)"),
    (lambda: Patch(value=float("inf")), "a finite number"),
    (lambda: WrongLabel(mode="target", target=-1), "target to be a class .*, found -1"),
    (lambda: WrongLabel(mode="swap"), "mode one of uniform, shift, target, found 'swap'"),
    (lambda: Mixture(source=3, target=3), "source != target"),
    (lambda: Mixture(patch=Patch(position="per-class")), "one patch position"),
    (lambda: make_config("label-noise"), "kind one of clean, wrong-label, trigger, mixture"),
    (lambda: make_config("mixture", ratio=0.1), "found \\['ratio'\\]"),
])
def test_bad_configs_raise(build, match):
    with pytest.raises(ConfigError, match=match) as err:
        build()
    assert "expected" in str(err.value) and "found" in str(err.value)


@pytest.mark.parametrize("cfg,match", [
    (Trigger(patch=Patch(size=29)), "size an integer in 1..28 \\(the 28x28 image\\), found 29"),
    (Trigger(patch=Patch(size=4, position=(25, 25))), "inside the 28x28 image"),
    (Trigger(patch=Patch(size=4, position=(-1, 0))), "inside the 28x28 image"),
    (Trigger(patch=Patch(value=2.0)), "value in \\[0.01, 1.0\\]"),
    (Mixture(target=10), "target to be a class 0..9, found 10"),
    (Trigger(source=12), "source to be None or a class 0..9, found 12"),
])
def test_configs_that_do_not_fit_the_data_raise(xy, cfg, match):
    """Checked against the data they poison: its image size, input range and classes."""
    with pytest.raises(ConfigError, match=match) as err:
        poison.apply(KEY, *xy, cfg, STUDY_SPEC)
    assert "expected" in str(err.value) and "found" in str(err.value)


def test_wrong_config_type_raises(xy):
    with pytest.raises(ConfigError, match="expected a config of type Mixture"):
        poison.mixture(KEY, *xy, WrongLabel())


def test_make_config_patch_size_keeps_the_kind_default():
    assert make_config("trigger", patch=6).patch == Patch(size=6, position="per-class")
    assert make_config("mixture", patch=5, fraction=0.1).patch == Patch(size=5)
    assert poison.describe(make_config("mixture", patch=5, fraction=0.1)) == (
        "mixture 10% 5x5 -> 3")
