"""Neural Cleanse: the anomaly index, the threshold calibration, and the trigger search on a
planted backdoor (a 10% BadNets mixture on the study's MLP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.neural_cleanse import (
    ScanConfig,
    anomaly_index,
    anomaly_indices,
    calibrate_threshold,
    reverse_triggers,
    scan_population,
    stamp,
    verdict,
)
from mlshift_jax.models.population import member, train_poisoned
from mlshift_jax.models.zoo import SEED_MLP
from mlshift_jax.poisoning import poison

FAST = ScanConfig(steps=120, batch=128)


def test_anomaly_index_is_the_robust_z_of_the_smallest_norm():
    norms = np.array([10.0, 11, 9, 10, 12, 8, 10, 2.0])
    med = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - med))
    idx, cls = anomaly_index(norms)
    assert cls == 7 and idx == pytest.approx((med - 2.0) / mad)
    assert anomaly_indices(norms)[4] < 0  # larger than the median: negative


def test_threshold_never_below_the_textbook_two_and_keeps_the_null_unflagged():
    null = np.array([0.5, 1.0, 1.2, 1.5, 1.7, 2.4, 2.6, 3.1, 1.1, 0.9, 1.3, 1.4, 1.6, 1.8,
                     2.0, 2.2, 0.7, 0.8, 1.9, 2.1])
    t = calibrate_threshold(null, alpha=0.05)
    assert t.value >= 2.0 and np.mean(null > t.value) <= 0.05 and t.n_null == 20
    assert 0.0 <= t.fpr_loo <= 0.1
    low = calibrate_threshold(np.full(10, 0.3))
    assert low.value == 2.0 and low.fpr_loo == 0.0
    with pytest.raises(ConfigError, match="at least 2"):
        calibrate_threshold([1.0])
    with pytest.raises(ConfigError, match="alpha"):
        calibrate_threshold([1.0, 2.0], alpha=1.5)


def test_verdict_names_the_target_only_when_flagged():
    norms = [10.0, 11, 9, 10, 12, 8, 10, 2.0]
    assert verdict(norms, 2.0)["verdict"] == "backdoor" and verdict(norms, 2.0)["target"] == 7
    clean = verdict(norms, 100.0)
    assert clean["verdict"] == "clean" and clean["target"] is None


def test_stamp_mixes_mask_and_pattern_per_pixel_for_any_shape():
    x = jnp.zeros((2, 4 * 5 * 3))
    mask = jnp.zeros((4, 5)).at[1, 2].set(1.0)
    pattern = jnp.full((4, 5, 3), 0.7)
    out = stamp(x, mask, pattern, (4, 5, 3)).reshape(2, 4, 5, 3)
    assert out.shape == (2, 4, 5, 3)
    assert np.allclose(out[:, 1, 2], 0.7) and float(jnp.sum(out)) == pytest.approx(2 * 3 * 0.7)


@pytest.mark.parametrize("shape", [(28, 28, 1), (4, 5, 3)])
def test_stamp_on_flat_images_equals_the_image_form_exactly(shape):
    """The flat layout computes (1 - m) * img + m * p as on [N, H, W, C] images: random mask,
    pattern and images, jitted or not, equal to float32 rounding (XLA may fuse a multiply-add
    differently in either form)."""
    h, w, c = shape
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    x = jax.random.uniform(k1, (6, h * w * c))
    mask = jax.random.uniform(k2, (h, w))
    pattern = jax.random.uniform(k3, (h, w, c))
    img = x.reshape(-1, h, w, c)
    expected = ((1.0 - mask[..., None]) * img + mask[..., None] * pattern).reshape(x.shape)
    for fn in (stamp, jax.jit(stamp, static_argnums=3)):
        np.testing.assert_allclose(np.asarray(fn(x, mask, pattern, shape)),
                                   np.asarray(expected), rtol=3e-7, atol=3e-7)


@pytest.fixture(scope="module")
def planted(mnist):
    x, y = mnist.x_train[:3000], mnist.y_train[:3000]
    configs = [poison.make_config("clean"),
               poison.make_config("mixture", fraction=0.1, patch=4, target=3)]
    pop = train_poisoned("seed-mlp", configs, x, y, seeds=[0, 1])
    return pop, jnp.asarray(mnist.x_test[:300]), jnp.asarray(mnist.y_test[:300])


@pytest.mark.slow
def test_reverse_triggers_finds_the_planted_target(planted):
    pop, x, y = planted
    clean, backdoor = (reverse_triggers(SEED_MLP, member(pop.params, i), x, y,
                                        key=jax.random.key(0), config=FAST) for i in (0, 1))
    assert backdoor.masks.shape == (10, 28, 28) and backdoor.patterns.shape == (10, 28, 28, 1)
    norms = np.asarray(backdoor.norms)
    assert int(np.argmin(norms)) == 3 and norms[3] < 0.5 * np.median(norms)
    assert float(backdoor.rates[3]) > 0.9
    (idx, cls), (clean_idx, _) = anomaly_index(norms), anomaly_index(np.asarray(clean.norms))
    assert cls == 3 and idx > clean_idx
    lo, hi = SEED_MLP.input_range
    assert float(backdoor.patterns.min()) >= lo and float(backdoor.patterns.max()) <= hi


@pytest.mark.slow
def test_population_scan_equals_one_model_at_a_time(planted):
    pop, x, y = planted
    cfg = ScanConfig(steps=20, batch=64)
    both = scan_population(SEED_MLP, pop.params, x[:100], y[:100], key=jax.random.key(1),
                           config=cfg, chunk=2)
    mapped = scan_population(SEED_MLP, pop.params, x[:100], y[:100], key=jax.random.key(1),
                             config=cfg, chunk=1)
    np.testing.assert_allclose(both.norms, mapped.norms, rtol=1e-4, atol=1e-4)
    one = reverse_triggers(SEED_MLP, member(pop.params, 1), x[:100], y[:100],
                           key=jax.random.key(1), config=cfg)
    assert both.norms.shape == (2, 10)
    np.testing.assert_allclose(both.norms[1], one.norms, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,fragment", [
    ({"x": np.zeros((5, 10), np.float32)}, "float [N, 784]"),
    ({"y": np.zeros(4, np.int32)}, "int [5]"),
    ({"x": np.full((5, 784), np.nan, np.float32)}, "finite"),
    ({"config": ScanConfig(steps=0)}, "steps"),
    ({"config": ScanConfig(target_rate=0.0)}, "target_rate"),
])
def test_bad_inputs_raise_config_error(kw, fragment):
    args = {"x": np.zeros((5, 784), np.float32), "y": np.zeros(5, np.int32),
            "config": ScanConfig()}
    args.update(kw)
    params = SEED_MLP.init(jax.random.key(0), n_hidden=8)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        reverse_triggers(SEED_MLP, params, args["x"], args["y"], key=jax.random.key(0),
                         config=args["config"])
