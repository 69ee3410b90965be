"""STRIP: superimposition, and triggered inputs of a planted backdoor scored above clean ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.detection.detect import roc_auc
from mlshift_jax.detection.strip import strip_scores, superimpose
from mlshift_jax.models.population import member, train_poisoned
from mlshift_jax.models.zoo import SEED_MLP
from mlshift_jax.poisoning import poison


def test_superimpose_saturates_at_the_top_of_the_range():
    x = jnp.array([0.01, 0.5, 0.9])
    c = jnp.array([0.01, 0.3, 0.9])
    np.testing.assert_allclose(superimpose(x, c, 0.01, 1.0), [0.01, 0.79, 1.0], atol=1e-6)


def test_triggered_inputs_score_above_clean_ones(mnist):
    x, y = mnist.x_train[:3000], mnist.y_train[:3000]
    config = poison.make_config("mixture", fraction=0.1, patch=4, target=3)
    pop = train_poisoned("seed-mlp", [config], x, y, seeds=[0])
    params = member(pop.params, 0)
    clean_x = jnp.asarray(mnist.x_test[:200])
    triggered = poison.apply_trigger(clean_x, poison.trigger_of(config))
    held_out = jnp.asarray(mnist.x_test[1000:1200])
    key = jax.random.key(0)
    s_clean = strip_scores(SEED_MLP, params, clean_x, held_out, key=key)
    s_trig = strip_scores(SEED_MLP, params, triggered, held_out, key=key)
    assert s_clean.shape == (200,)
    labels = np.r_[np.zeros(200), np.ones(200)]
    assert roc_auc(np.r_[s_clean, s_trig], labels) > 0.9


def test_same_key_same_scores_and_bad_inputs(mnist):
    params = SEED_MLP.init(jax.random.key(0), n_hidden=16)
    x, clean = jnp.asarray(mnist.x_test[:8]), jnp.asarray(mnist.x_test[100:140])
    a = strip_scores(SEED_MLP, params, x, clean, key=jax.random.key(3))
    b = strip_scores(SEED_MLP, params, x, clean, key=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="at least n_blends"):
        strip_scores(SEED_MLP, params, x, clean[:5], key=jax.random.key(0))
    with pytest.raises(ConfigError, match="finite"):
        strip_scores(SEED_MLP, params, x.at[0, 0].set(jnp.nan), clean, key=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"float \[n, 784\]"):
        strip_scores(SEED_MLP, params, x[:, :10], clean, key=jax.random.key(0))
