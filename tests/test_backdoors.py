"""The trigger-array backdoors (blended, sparse, sig, warp): shapes, counts, labels and the
stamp on non-MNIST images; the study's kinds unchanged beside them in one population; ASR
of a small backdoored model; STRIP on it; the detection bench's detector x attack table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mlshift_jax.bench import detection_bench, sweeps
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.spec import Spec
from mlshift_jax.detection.detect import roc_auc
from mlshift_jax.detection.strip import strip_scores
from mlshift_jax.models.population import member
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import model_for
from mlshift_jax.poisoning import poison, triggers

KEY = jax.random.key(0)
SPEC = Spec((10, 12, 3), 4, (0.0, 1.0))  # not 28x28, three channels, four classes
NEW = {"blended": poison.Blended(0.3, target=1), "sparse": poison.Sparse(0.3, target=1),
       "sig": poison.Sig(0.5, target=1), "warp": poison.Warp(0.3, target=1)}


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.9, (240, 360)).astype(np.float32)
    return x, rng.integers(0, 4, 240)


@pytest.mark.parametrize("kind", sorted(NEW))
def test_new_kinds_on_colour_images(xy, kind):
    x, y = xy
    config = NEW[kind]
    assert poison.get_poisoning(kind).config is type(config)
    assert poison.make_config(kind, fraction=0.3, target=1).kind == kind
    xp, yp, mask = (np.asarray(a) for a in poison.apply(KEY, x, y, config, SPEC))
    assert xp.shape == x.shape and xp.dtype == np.float32 and mask.shape == (240,)
    assert mask.sum() == poison.poison_count(config, y, 4) > 0
    assert xp.min() >= 0.0 and xp.max() <= 1.0
    np.testing.assert_array_equal(xp[~mask], x[~mask])  # nothing outside the mask changes
    np.testing.assert_array_equal(yp[~mask], y[~mask])
    assert (np.abs(xp[mask] - x[mask]).max(axis=1) > 0).all()
    if kind == "sig":  # clean-label: only the target class, labels kept
        assert (y[mask] == 1).all() and mask.sum() == round(0.5 * (y == 1).sum())
        np.testing.assert_array_equal(yp, y)
    else:
        assert (y[mask] != 1).all() and (yp[mask] == 1).all()
    # the test-time trigger is the training-time one
    np.testing.assert_allclose(np.asarray(poison.triggered(x[mask], config, SPEC)), xp[mask],
                               atol=1e-6)
    assert kind in poison.describe(config)


def test_warp_is_a_small_smooth_displacement():
    flow = poison.trigger_arrays(poison.Warp(strength=1.0), SPEC).flow
    assert flow.shape == (10, 12, 2)
    assert np.abs(flow).mean() == pytest.approx(1.0, rel=0.35) and np.abs(flow).max() < 4.0
    assert np.abs(np.diff(flow, axis=0)).max() < 1.5 and np.abs(np.diff(flow, axis=1)).max() < 1.5
    # a smooth image moves little; a zero flow moves nothing
    ii, jj = np.indices((10, 12))
    img = np.repeat(((np.sin(ii / 3) + np.cos(jj / 4)) / 4 + 0.5)[..., None], 3, -1)
    img = img.astype(np.float32)
    x = img.reshape(1, -1)
    warped = np.asarray(poison.triggered(x, poison.Warp(strength=1.0), SPEC))
    assert 0 < np.abs(warped - x).mean() < 0.1
    np.testing.assert_array_equal(np.asarray(triggers.bilinear(jnp.asarray(img),
                                                               jnp.zeros((10, 12, 2)))), img)


def test_warp_noise_mode_keeps_labels_outside_the_mask(xy):
    x, y = xy
    config = poison.Warp(0.2, target=1, noise=2.0)
    xp, yp, mask = (np.asarray(a) for a in poison.apply(KEY, x, y, config, SPEC))
    changed = (xp != x).any(axis=1)
    noise = changed & ~mask
    assert noise.sum() == round(2.0 * mask.sum()) and (y[noise] != 1).all()
    np.testing.assert_array_equal(yp[noise], y[noise])
    # the trigger rows are those of the plain warp with the same key
    xw, yw, mw = (np.asarray(a) for a in poison.apply(KEY, x, y, poison.Warp(0.2, target=1),
                                                      SPEC))
    np.testing.assert_array_equal(mw, mask)
    np.testing.assert_allclose(xw[mask], xp[mask], atol=1e-6)  # XLA may fuse differently


def test_study_kinds_are_unchanged_in_a_mixed_population(xy):
    """A mixture member poisoned beside trigger-array members gets exactly its own data."""
    x, y = xy
    configs = [poison.Mixture(0.3, patch=poison.Patch(size=3), target=2), *NEW.values(),
               poison.WrongLabel(0.2)]
    arrays = [poison.to_arrays(c, y, SPEC) for c in configs]
    assert arrays[0].trigger is None and arrays[-1].trigger is None
    stacked = jax.tree.map(jnp.asarray, poison.stack_arrays(arrays))
    keys = jnp.stack([jax.random.fold_in(KEY, i) for i in range(len(configs))])
    xs, ys, ms = jax.vmap(poison.poison_arrays, in_axes=(0, None, None, 0))(
        keys, jnp.asarray(x), jnp.asarray(y), stacked)
    for i, config in enumerate(configs):
        xa, ya, ma = (np.asarray(a) for a in poison.apply(keys[i], x, y, config, SPEC))
        np.testing.assert_array_equal(ya, np.asarray(ys[i]))
        np.testing.assert_array_equal(ma, np.asarray(ms[i]))
        if arrays[i].trigger is None:  # the study's kinds: bit for bit
            np.testing.assert_array_equal(xa, np.asarray(xs[i]))
        else:  # float rounding of the stamp may differ by an ulp between two compilations
            np.testing.assert_allclose(xa, np.asarray(xs[i]), atol=1e-6)
    assert poison.stack_arrays(arrays[:1] + arrays[-1:]).trigger is None


def test_new_kinds_validate():
    with pytest.raises(ConfigError, match="alpha"):
        poison.Blended(alpha=1.5)
    with pytest.raises(ConfigError, match="source != target"):
        poison.Sparse(source=3, target=3)
    with pytest.raises(ConfigError, match="noise"):
        poison.Warp(noise=-1.0)
    with pytest.raises(ConfigError, match="pixel count"):
        poison.apply(KEY, np.zeros((10, 16), np.float32), np.arange(10) % 2,
                     poison.Sparse(pixels=17, target=1), Spec((4, 4, 1), 2, (0, 1)))
    with pytest.raises(ConfigError, match="target to be a class 0..3"):
        poison.to_arrays(poison.Sig(target=7), np.arange(8) % 4, SPEC)
    with pytest.raises(ConfigError, match="SIG frequency in"):  # aliased: zero at every pixel
        poison.to_arrays(poison.Sig(frequency=6.0), np.arange(8) % 4, SPEC)
    with pytest.raises(ConfigError, match="with a trigger"):
        poison.triggered(np.zeros((2, 360), np.float32), poison.WrongLabel(), SPEC)
    assert sweeps.config_from("sig", {"fraction": 0.2, "patch": 4, "target": 2, "mode": "x",
                                      "source": None}) == poison.Sig(0.2, target=2)
    assert [c.kind for c in sweeps.sweep_configs("backdoors")[::2]] == list(
        sweeps.BACKDOOR_KINDS)


# --- a small backdoored model: ASR and STRIP -------------------------------------------------


@pytest.fixture(scope="module")
def backdoored(mnist):
    """seed-mlp (hidden 64, one epoch) on 4,000 images: blended and sparse at 10%."""
    configs = [poison.Blended(0.1), poison.Sparse(0.1)]
    kept: dict = {}
    table = sweeps.run_sweep(mnist, configs, hidden=64, n_train=4000, keep=kept)
    return configs, table, kept["params"]


def test_asr_of_blended_and_sparse_is_high(backdoored):
    _, table, _ = backdoored
    assert (table["asr"] > 0.8).all(), table[["cell", "asr"]]
    assert (table["clean_accuracy"] > 0.8).all(), table[["cell", "clean_accuracy"]]


def test_strip_separates_triggered_from_clean(mnist, backdoored):
    configs, _, params = backdoored
    model = model_for("seed-mlp", mnist.spec, TrainConfig(hidden=64))
    x, y = jnp.asarray(mnist.x_test[:200]), np.asarray(mnist.y_test[:200])
    pool = jnp.asarray(mnist.x_test[1000:1100])
    p = member(params, 1)  # sparse
    stamped = poison.triggered(x[jnp.asarray(y != 3)], configs[1], mnist.spec)
    s_clean = np.asarray(strip_scores(model, p, x, pool, key=KEY))
    s_trig = np.asarray(strip_scores(model, p, stamped, pool, key=KEY))
    labels = np.r_[np.zeros(len(s_clean), bool), np.ones(len(s_trig), bool)]
    assert roc_auc(np.r_[s_clean, s_trig], labels) > 0.8


# --- the detection bench's detector x attack table ---------------------------------------------

SMALL = detection_bench.BenchConfig(
    hidden=16, sample_size=1000, seeds=2, clean_per_seed=1, n_null=4, probes=100, n_patched=20,
    n_images=200, strip_images=100, attacks=(("fgsm", 0.2),),
    poisonings=(("wrong-label", 0.2), ("mixture", 0.2), ("sparse", 0.2)))


@pytest.mark.slow
def test_detector_by_attack_table(mnist):
    out = detection_bench.run(mnist, config=SMALL)
    t = out["detector_by_attack"]
    cols = ["fgsm 0.2", "wrong-label 20%", "mixture 20%", "sparse 20%"]
    assert list(t.columns) == ["detector", "metric", *cols]
    assert set(t["metric"]) == {"auc", "tpr@0.05fpr"}
    assert list(t["detector"].unique()) == list(detection_bench.ROWS)
    by = t.set_index(["detector", "metric"])
    strip = by.loc["strip"]
    assert strip[["fgsm 0.2", "mixture 20%", "sparse 20%"]].notna().all().all()
    assert strip["wrong-label 20%"].isna().all()  # no trigger
    assert by.loc["confidence", cols[1:]].isna().all().all()
    assert by.loc["activation clustering", "fgsm 0.2"].isna().all()
    assert by.loc["fingerprint test"].notna().all().all()
    values = t[cols].to_numpy(np.float64)
    assert np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0
    assert out["auc"].loc["strip", "sparse 20%"] == pytest.approx(strip.loc["auc", "sparse 20%"])
    assert isinstance(out["strip"], pd.DataFrame) and len(out["strip"]) == 3


def test_report_renders_the_detector_by_attack_table():
    from mlshift_jax.bench.experiments import detect as report

    t = pd.DataFrame({"detector": ["strip", "strip", "margin", "margin"],
                      "metric": ["auc", "tpr@0.05fpr"] * 2,
                      "fgsm 0.1": [0.6, 0.1, 0.8, 0.3], "sparse 10%": [0.99, 0.9, np.nan, np.nan]})
    text = report._detector_by_attack({"detector_by_attack": t})
    assert "Detector × attack kind" in text and "0.990" in text and "tpr@0.05fpr" in text
    assert report._detector_by_attack({}) == ""  # a record from before the table existed
