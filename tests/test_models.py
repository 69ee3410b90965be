import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.baseline import neuralNetwork
from mlshift_jax.models.zoo import MODELS, SEED_MLP, build, infer_model, predict, study_targets


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_and_apply_shapes(name):
    model = MODELS[name]
    params = model.init(jax.random.key(0), n_in=784, n_hidden=32, n_out=10)
    assert infer_model(params) is build(name, model.spec, hidden=32)
    x = jnp.full((5, 784), 0.5)
    assert predict(model, params, x).shape == (5, 10)
    assert jax.jit(model.apply)(params, x[0]).shape == (10,)
    assert model.loss(params, x[0], 3).shape == ()


def test_seed_mlp_init_follows_study_scale():
    params = SEED_MLP.init(jax.random.key(1), n_hidden=200)
    assert params["wih"].shape == (200, 784) and params["who"].shape == (10, 200)
    np.testing.assert_allclose(np.std(params["wih"]), 200**-0.5, rtol=0.02)
    np.testing.assert_allclose(np.std(params["who"]), 10**-0.5, rtol=0.1)


def test_seed_mlp_apply_matches_numpy_query():
    rng = np.random.default_rng(0)
    net = neuralNetwork(784, 30, 10, 0.1, rng=rng)
    x = rng.uniform(0.01, 1.0, (7, 784))
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in net.params().items()}
        out = np.asarray(predict(SEED_MLP, params, jnp.asarray(x)))
    np.testing.assert_allclose(out, net.query_batch(x), rtol=0, atol=1e-14)
    np.testing.assert_allclose(out[0], net.query(x[0])[:, 0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_gradient_matches_finite_differences(name):
    model = MODELS[name]
    with jax.enable_x64(True):
        params = model.init(jax.random.key(2), n_hidden=16, dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(3), (784,), jnp.float64, 0.01, 1.0)
        grad = jax.grad(model.loss)(params, x, 4)
        leaf = next(iter(params))
        shape = params[leaf].shape
        for flat in (0, params[leaf].size // 3, params[leaf].size - 1):
            idx = np.unravel_index(flat, shape)
            h = 1e-6
            plus = {**params, leaf: params[leaf].at[idx].add(h)}
            minus = {**params, leaf: params[leaf].at[idx].add(-h)}
            fd = (model.loss(plus, x, 4) - model.loss(minus, x, 4)) / (2 * h)
            np.testing.assert_allclose(grad[leaf][idx], fd, rtol=1e-6, atol=1e-10)


def test_study_targets():
    t = study_targets(jnp.array([0, 9]))
    np.testing.assert_allclose(t[0], [0.99] + [0.01] * 9, rtol=1e-6)
    assert int(jnp.argmax(t[1])) == 9


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError, match="seed-mlp"):
        build("resnet")
