import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.baseline import neuralNetwork
from mlshift_jax.models.metrics import evaluate
from mlshift_jax.models.train import (
    init_population,
    make_optimizer,
    seed_sgd_step,
    train_minibatch,
    train_minibatch_population,
    train_seed_sgd,
    train_seed_sgd_population,
)
from mlshift_jax.models.zoo import MLP_CE, SEED_MLP, predict


def _numpy_net(hidden, seed=0):
    return neuralNetwork(784, hidden, 10, 0.1, rng=np.random.default_rng(seed))


def test_per_sample_scan_matches_numpy_baseline_float64(mnist):
    """Same initial weights, same order: the JAX scan reproduces the study's loop."""
    x, y = mnist.x_train[:1500].astype(np.float64), mnist.y_train[:1500]
    net = _numpy_net(64)
    start = net.params()
    net.train_epoch(x, y)
    with jax.enable_x64(True):
        params = train_seed_sgd({k: jnp.asarray(v) for k, v in start.items()},
                                jnp.asarray(x), jnp.asarray(y), lr=0.1)
        assert params["wih"].dtype == jnp.float64
    for k, v in net.params().items():
        assert np.max(np.abs(np.asarray(params[k]) - v)) <= 1e-12, k
    # and the weights did move: the comparison is not vacuous
    assert np.max(np.abs(net.wih - start["wih"])) > 1e-3


def test_per_sample_scan_float32_tracks_float64(mnist):
    x, y = mnist.x_train[:500], mnist.y_train[:500]
    net = _numpy_net(32)
    start = net.params()
    net.train_epoch(x.astype(np.float64), y)
    params = train_seed_sgd({k: jnp.asarray(v, jnp.float32) for k, v in start.items()},
                            jnp.asarray(x), jnp.asarray(y), lr=0.1)
    for k, v in net.params().items():
        np.testing.assert_allclose(np.asarray(params[k]), v, atol=1e-4)


@pytest.mark.parametrize("block", [7, np.int64(64), 1000])
def test_blocked_rule_equals_per_step_loop_float64(mnist, block):
    """The blocked form (`_seed_sgd_block`) is the per-step rule in another order: 450
    samples leave a remainder at block 7 and 64, and none fill a block of 1000."""
    x, y = mnist.x_train[:450].astype(np.float64), mnist.y_train[:450]
    with jax.enable_x64(True):
        params = SEED_MLP.init(jax.random.key(2), n_hidden=40, dtype=jnp.float64)
        per_step = train_seed_sgd(params, jnp.asarray(x), jnp.asarray(y), lr=0.1, block=1,
                                  epochs=2)
        blocked = train_seed_sgd(params, jnp.asarray(x), jnp.asarray(y), lr=0.1,
                                 block=block, epochs=2)
        for k in per_step:
            assert np.max(np.abs(np.asarray(blocked[k] - per_step[k]))) <= 1e-12, k
        assert np.max(np.abs(np.asarray(per_step["wih"] - params["wih"]))) > 1e-3


@pytest.mark.parametrize("block", [0, -3, 2.5, True])
def test_block_must_be_a_positive_int(mnist, block):
    x, y = jnp.asarray(mnist.x_train[:20]), jnp.asarray(mnist.y_train[:20])
    with pytest.raises(ConfigError, match="block"):
        train_seed_sgd(SEED_MLP.init(jax.random.key(0), n_hidden=8), x, y, lr=0.1, block=block)


def test_study_rule_is_gradient_descent_only_for_output_weights():
    """The study's `who` update is -lr * dL/dwho; its `wih` update is not -lr * dL/dwih."""
    with jax.enable_x64(True):
        params = SEED_MLP.init(jax.random.key(0), n_hidden=20, dtype=jnp.float64)
        x = jax.random.uniform(jax.random.key(1), (784,), jnp.float64, 0.01, 1.0)
        t = jnp.full((10,), 0.01).at[3].set(0.99)
        stepped = seed_sgd_step(params, x, t, 0.1)
        grad = jax.grad(SEED_MLP.loss)(params, x, 3)
        np.testing.assert_allclose(stepped["who"], params["who"] - 0.1 * grad["who"], atol=1e-14)
        assert np.max(np.abs(stepped["wih"] - (params["wih"] - 0.1 * grad["wih"]))) > 1e-6


def test_epochs_run_the_loop_again(mnist):
    x, y = jnp.asarray(mnist.x_train[:200]), jnp.asarray(mnist.y_train[:200])
    params = SEED_MLP.init(jax.random.key(0), n_hidden=16)
    twice = train_seed_sgd(train_seed_sgd(params, x, y, lr=0.1), x, y, lr=0.1)
    np.testing.assert_allclose(train_seed_sgd(params, x, y, lr=0.1, epochs=2)["wih"],
                               twice["wih"], atol=1e-6)


def test_seed_sgd_population_member_equals_model_trained_alone(mnist):
    x = jnp.asarray(mnist.x_train[:900].reshape(3, 300, 784))
    y = jnp.asarray(mnist.y_train[:900].reshape(3, 300))
    keys = jax.random.split(jax.random.key(5), 3)
    params = init_population(SEED_MLP, keys, n_hidden=24)
    many = train_seed_sgd_population(params, x, y, lr=0.1)
    for i in range(3):
        alone = train_seed_sgd(jax.tree.map(lambda a, i=i: a[i], params), x[i], y[i], lr=0.1)
        for k in alone:
            np.testing.assert_allclose(many[k][i], alone[k], atol=1e-6)


@pytest.mark.parametrize("model,optimizer,lr,batch", [
    (SEED_MLP, "sgd", 1.0, 16), (SEED_MLP, "adam", 3e-3, 32), (MLP_CE, "adam", 1e-3, 32),
    (MLP_CE, "sgd", 0.1, 32)])
def test_minibatch_training_learns(mnist, model, optimizer, lr, batch):
    x, y = jnp.asarray(mnist.x_train[:3000]), jnp.asarray(mnist.y_train[:3000])
    params = model.init(jax.random.key(0), n_hidden=64)
    before = evaluate(model, params, mnist.x_test[:1000], mnist.y_test[:1000])["accuracy"]
    trained = train_minibatch(jax.random.key(1), params, x, y, model=model,
                              optimizer=optimizer, lr=lr, batch_size=batch, epochs=3)
    after = evaluate(model, trained, mnist.x_test[:1000], mnist.y_test[:1000])["accuracy"]
    assert before < 0.3 and after > 0.8, (before, after)


def test_minibatch_population_member_equals_model_trained_alone(mnist):
    x, y = jnp.asarray(mnist.x_train[:640]), jnp.asarray(mnist.y_train[:640])
    keys = jax.random.split(jax.random.key(3), 4)
    params = init_population(MLP_CE, keys, n_hidden=16)
    kw = dict(model=MLP_CE, optimizer="adam", lr=1e-3, batch_size=32, epochs=2)
    many = train_minibatch_population(keys, params, x, y, **kw)
    i = 2
    alone = train_minibatch(keys[i], jax.tree.map(lambda a: a[i], params), x, y, **kw)
    for k in alone:
        np.testing.assert_allclose(many[k][i], alone[k], atol=1e-5)


def test_same_key_same_result(mnist):
    x, y = jnp.asarray(mnist.x_train[:320]), jnp.asarray(mnist.y_train[:320])
    params = MLP_CE.init(jax.random.key(0), n_hidden=16)
    kw = dict(model=MLP_CE, optimizer="adam", lr=1e-3, batch_size=32, epochs=1)
    a = train_minibatch(jax.random.key(9), params, x, y, **kw)
    b = train_minibatch(jax.random.key(9), params, x, y, **kw)
    c = train_minibatch(jax.random.key(10), params, x, y, **kw)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["w1"], c["w1"])


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="adam"):
        make_optimizer("lbfgs2", 0.1)


STUDY_E1 = {"accuracy": 0.9576, "precision": 0.9585, "recall": 0.9576, "f1": 0.9577}


def _check_reproduction(scores):
    for k, study in STUDY_E1.items():
        assert abs(scores[k] - study) <= 0.006, (k, scores[k], study)


@pytest.mark.slow
def test_reproduces_study_e1_in_jax(full_mnist):
    """hidden=200, lr=0.1, 1 epoch, file order, full MNIST -> the study's clean row."""
    params = train_seed_sgd(SEED_MLP.init(jax.random.key(0), n_hidden=200),
                            jnp.asarray(full_mnist.x_train), jnp.asarray(full_mnist.y_train),
                            lr=0.1)
    _check_reproduction(evaluate(SEED_MLP, params, full_mnist.x_test, full_mnist.y_test))


@pytest.mark.slow
def test_reproduces_study_e1_in_numpy(full_mnist):
    net = _numpy_net(200, seed=0)
    net.train_epoch(full_mnist.x_train.astype(np.float64), full_mnist.y_train)
    pred = net.query_batch(full_mnist.x_test).argmax(1)
    assert abs((pred == full_mnist.y_test).mean() - STUDY_E1["accuracy"]) <= 0.006
    out = predict(SEED_MLP, {k: jnp.asarray(v, jnp.float32) for k, v in net.params().items()},
                  jnp.asarray(full_mnist.x_test))
    assert (np.asarray(out).argmax(1) == pred).mean() >= 0.999  # float32 JAX, same weights


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_population_equals_one_vmap(mnist, chunk):
    """lax.map over groups of `chunk` models (the CPU path) gives the one-vmap result."""
    x, y = jnp.asarray(mnist.x_train[:400]), jnp.asarray(mnist.y_train[:400])
    keys = jax.random.split(jax.random.key(7), 5)
    params = init_population(SEED_MLP, keys, n_hidden=12)
    whole = train_seed_sgd_population(params, x, y, lr=0.1)
    parts = train_seed_sgd_population(params, x, y, lr=0.1, chunk=chunk)
    stacked = train_seed_sgd_population(params, jnp.stack([x] * 5), jnp.stack([y] * 5), lr=0.1,
                                        chunk=chunk)
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], atol=1e-6)
        np.testing.assert_allclose(stacked[k], whole[k], atol=1e-6)
    kw = dict(model=MLP_CE, optimizer="adam", lr=1e-3, batch_size=40, epochs=1)
    ce = init_population(MLP_CE, keys, n_hidden=8)
    a = train_minibatch_population(keys, ce, x, y, **kw)
    b = train_minibatch_population(keys, ce, x, y, chunk=chunk, **kw)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5)


def test_minibatch_needs_at_least_one_batch(mnist):
    x, y = jnp.asarray(mnist.x_train[:10]), jnp.asarray(mnist.y_train[:10])
    params = MLP_CE.init(jax.random.key(0), n_hidden=8)
    with pytest.raises(ConfigError, match="batch_size=64.*found 10"):
        train_minibatch(jax.random.key(1), params, x, y, model=MLP_CE, batch_size=64)
