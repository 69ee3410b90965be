"""The torch peer computes what the numpy baseline and the JAX code compute (float64), so the
speed table compares like with like. Skipped where torch (the `peers` extra) is absent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import evasion
from mlshift_jax.bench import torch_peer
from mlshift_jax.models import baseline
from mlshift_jax.models.train import train_minibatch
from mlshift_jax.models.zoo import MLP_CE, SEED_MLP

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def small(mnist):
    rng = np.random.default_rng(0)
    wih = rng.normal(0, 32**-0.5, (32, 784))
    who = rng.normal(0, 10**-0.5, (10, 32))
    return wih, who, np.asarray(mnist.x_test[:200], np.float64), np.asarray(mnist.y_test[:200])


@pytest.mark.parametrize("fn", [torch_peer.fgsm_autograd, torch_peer.fgsm_analytic])
def test_fgsm_equals_numpy_in_float64(small, fn):
    wih, who, x, y = small
    np.testing.assert_array_equal(fn(wih, who, x, y, 0.1),
                                  baseline.fgsm_batched(wih, who, x, y, 0.1))


def test_pgd_equals_jax_pgd_without_random_start(small):
    wih, who, x, y = small
    with jax.enable_x64(True):
        params = {"wih": jnp.asarray(wih), "who": jnp.asarray(who)}
        ours = np.asarray(evasion.pgd(SEED_MLP, params, x, y, eps=0.1, steps=5,
                                      random_start=False, loss="train"))  # the peer's loss
    theirs = torch_peer.pgd(wih, who, x, y, 0.1, steps=5)
    assert np.mean(ours == theirs) > 0.999


def test_per_sample_epoch_equals_the_study_loop(small):
    wih, who, x, y = small
    net = baseline.neuralNetwork(784, 32, 10, 0.1, wih=wih, who=who)
    net.train_epoch(x, y)
    out = torch_peer.seed_sgd_epoch(wih, who, x, y, 0.1)
    np.testing.assert_allclose(out["wih"], net.wih, atol=1e-12)
    np.testing.assert_allclose(out["who"], net.who, atol=1e-12)


@pytest.mark.parametrize("recipe,model,optimizer,lr", [
    ("mlp-sgd", SEED_MLP, "sgd", 1.0), ("mlp-ce", MLP_CE, "adam", 1e-3)])
def test_minibatch_epoch_equals_the_jax_trainer(small, recipe, model, optimizer, lr):
    _, _, x, y = small
    key = jax.random.key(0)
    with jax.enable_x64(True):
        params = model.init(jax.random.key(1), n_hidden=16, dtype=jnp.float64)
        ours = train_minibatch(key, params, jnp.asarray(x), jnp.asarray(y), model=model,
                               optimizer=optimizer, lr=lr, batch_size=16, epochs=1)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(y)))
    theirs = torch_peer.minibatch_epoch(recipe, {k: np.asarray(v) for k, v in params.items()},
                                        x, y, order, lr=lr, batch_size=16, optimizer=optimizer)
    for k in theirs:
        np.testing.assert_allclose(theirs[k], np.asarray(ours[k]), atol=1e-9, rtol=1e-7)


def test_prepared_forms_run(small):
    wih, who, x, y = small
    for p in (torch_peer.prepared_fgsm(wih, who, x, y, 0.1, 0.01, 1.0, analytic=True),
              torch_peer.prepared_pgd(wih, who, x, y, 0.1, 0.01, 1.0, steps=2),
              torch_peer.prepared_seed_epoch(wih, who, x[:20], y[:20], 0.1)):
        assert p.run().shape[-1] == 784 and p.name.startswith("torch:")


@pytest.mark.parametrize("name", ["seed-mlp", "mlp-ce"])
def test_port_gives_the_attack_logits(mnist, name):
    """The one torch port: its logits are the harness's attack logits (seed-mlp: the logit
    of the sigmoid scores), checked by `ported` itself and here in float32 on the images."""
    from mlshift_jax.attacks.losses import logits
    from mlshift_jax.models.zoo import build

    model = build(name, mnist, 16)
    params = model.init(jax.random.key(3))
    x, y = np.asarray(mnist.x_test[:50]), np.asarray(mnist.y_test[:50])
    net, xt, yt = torch_peer.ported(model, params, x, y)
    assert tuple(xt.shape) == (50, 1, 28, 28) and yt.dtype == torch_peer._torch().int64
    ours = jax.vmap(lambda v: logits(model, params, v))(jnp.asarray(x))
    np.testing.assert_allclose(net(xt).detach().numpy(), np.asarray(ours), atol=1e-3)


def test_port_refuses_a_wrong_port_and_other_models(mnist, monkeypatch):
    from mlshift_jax.core.errors import ConfigError
    from mlshift_jax.models.zoo import CNN, build

    model = build("mlp-ce", mnist, 16)
    params = model.init(jax.random.key(3))
    x, y = np.asarray(mnist.x_test[:10]), np.asarray(mnist.y_test[:10])
    with pytest.raises(ConfigError, match="no torch port of 'cnn'"):
        torch_peer.torch_model(CNN, CNN.init(jax.random.key(0)))
    shifted = dict(params, b2=np.asarray(params["b2"]) + 1e-3)  # the port sees other weights
    real = torch_peer.torch_model
    monkeypatch.setattr(torch_peer, "torch_model",
                        lambda m, p, dtype=np.float32: real(m, shifted, dtype))
    with pytest.raises(ConfigError, match="expected logits equal to 0.0001"):
        torch_peer.ported(model, params, x, y)


@pytest.mark.slow
def test_agreement_script_writes_its_table(tmp_path):
    """scripts/autoattack_agreement.py end to end on 10 images: a row per harness box, the
    markdown table and the JSON rows (with the harness's per-attack counts)."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("torchattacks")
    path = Path(__file__).parent.parent / "scripts" / "autoattack_agreement.py"
    spec = importlib.util.spec_from_file_location("autoattack_agreement", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    assert script.main(["--models", "mlp-ce", "--eps", "0.1", "--n", "10", "--box", "both",
                        "--out", str(md), str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["harness box"] for r in rows] == ["[0, 1]", "[0.01, 1]"]
    for r in rows:
        assert 0.0 <= r["harness AA"] <= r["clean acc"] and 0.0 <= r["agreement"] <= 1.0
        assert sum(r["harness counts"].values()) == 10 and r["speed ratio"] > 0
    assert md.read_text().count("| mlp-ce | 0.1 |") == 2
