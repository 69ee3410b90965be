"""MI-FGSM (Dong et al., CVPR 2018) against a float64 numpy reference of Algorithm 1 and
against torchattacks' MIFGSM on the same weights (skipped without torch / torchattacks).
The registry-driven properties (tests/test_attacks.py, tests/test_attack_registry.py) cover
it like every other attack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlshift_jax.attacks import evasion, get_attack
from mlshift_jax.attacks.mifgsm import mifgsm
from mlshift_jax.bench.torch_peer import ported
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models.train import train_minibatch
from mlshift_jax.models.zoo import MLP_CE, build, predict

EPS = 0.1


@pytest.fixture(scope="module")
def small_ce(mnist):
    """A small mlp-ce (hidden 32, 1 epoch on 3,000 images) and 200 test images."""
    model = build("mlp-ce", MLP_CE.spec, 32)
    params = train_minibatch(jax.random.key(2), model.init(jax.random.key(1)),
                             jnp.asarray(mnist.x_train[:3000]),
                             jnp.asarray(mnist.y_train[:3000]), model=model,
                             optimizer="adam", lr=1e-3, batch_size=64, epochs=1)
    return model, params, np.asarray(mnist.x_test[:200]), np.asarray(mnist.y_test[:200])


def _numpy_mifgsm(p, x, y, eps, steps=10, decay=1.0, lo=0.01, hi=1.0):
    """Algorithm 1 of Dong et al. in float64 on the mlp-ce (relu hidden layer, CE on logits),
    the gradient written out by hand."""
    w1, b1, w2, b2 = (np.asarray(p[k], np.float64) for k in ("w1", "b1", "w2", "b2"))
    x = np.asarray(x, np.float64)
    onehot = np.eye(w2.shape[0])[y]
    alpha = eps / steps
    xa, g = x.copy(), np.zeros_like(x)
    for _ in range(steps):
        pre = xa @ w1.T + b1
        z = np.maximum(pre, 0) @ w2.T + b2
        s = np.exp(z - z.max(1, keepdims=True))
        s /= s.sum(1, keepdims=True)
        grad = (((s - onehot) @ w2) * (pre > 0)) @ w1
        g = decay * g + grad / np.abs(grad).sum(1, keepdims=True)
        xa = np.clip(np.clip(xa + alpha * np.sign(g), x - eps, x + eps), lo, hi)
    return xa


def test_matches_a_float64_reference(small_ce):
    model, params, x, y = small_ce
    ours = np.asarray(mifgsm(model, params, x, y, eps=EPS))
    ref = _numpy_mifgsm(params, x, y, EPS)
    # float32 vs float64: a sign may flip where the momentum is ~0; nearly every pixel agrees
    assert np.mean(np.abs(ours - ref) <= 1e-5) >= 0.995
    acc = [float(np.mean(np.argmax(predict(model, params, a), -1) == y)) for a in (ours, ref)]
    assert abs(acc[0] - acc[1]) <= 0.01
    assert acc[0] < float(np.mean(np.argmax(predict(model, params, x), -1) == y))


def test_one_step_is_fgsm(small_ce):
    """T = 1, alpha = eps: one sign step of the normalised gradient, which is FGSM's."""
    model, params, x, y = small_ce
    np.testing.assert_array_equal(mifgsm(model, params, x, y, eps=EPS, steps=1),
                                  evasion.fgsm(model, params, x, y, eps=EPS))


def test_registered_with_the_papers_defaults():
    a = get_attack("mi-fgsm")
    assert a.fn is mifgsm and a.uses_gradient and not a.needs_key and not a.targeted
    assert "Dong" in a.source and "Momentum" in a.source


def test_bad_arguments(small_ce):
    model, params, x, y = small_ce
    for kw, what in (({"steps": 0}, "steps"), ({"decay": -1.0}, "decay"),
                     ({"loss": "hinge"}, "loss"), ({"step_size": -0.1}, "step_size")):
        with pytest.raises(ConfigError, match=what):
            mifgsm(model, params, x, y, eps=EPS, **kw)


def test_agrees_with_torchattacks_mifgsm(small_ce):
    """torchattacks.MIFGSM (eps, alpha = eps / 10, 10 steps, decay 1.0; box [0, 1]) on the
    same weights: the same adversarial images up to float rounding."""
    pytest.importorskip("torch")
    torchattacks = pytest.importorskip("torchattacks")
    model, params, x, y = small_ce
    net, xt, yt = ported(model, params, x, y)
    ref = torchattacks.MIFGSM(net, eps=EPS, alpha=EPS / 10, steps=10, decay=1.0)(xt, yt)
    theirs = ref.detach().numpy().reshape(len(x), -1)
    ours = np.asarray(mifgsm(model, params, x, y, eps=EPS, lo=0.0, hi=1.0))
    assert np.mean(np.abs(ours - theirs) <= 1e-5) >= 0.995
    acc = [float(np.mean(np.argmax(predict(model, params, a), -1) == y))
           for a in (ours, theirs)]
    assert abs(acc[0] - acc[1]) <= 0.01
