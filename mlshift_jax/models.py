"""JAX models: pure `init(key, ...) -> params` and `apply(params, x) -> scores` on ONE example.

Batch at the call site with `jax.vmap(model.apply, in_axes=(None, 0))(params, x)`.

Every model is a `Model` record in `MODELS`; the trainers, attacks, runner and CLI look
models up there, so adding an architecture is adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlshift_jax.errors import ConfigError

Params = Any  # a pytree (dict) of arrays

TARGET_LOW, TARGET_HIGH = 0.01, 0.99  # the study's one-hot targets


class Model(NamedTuple):
    """A model: pure functions on ONE flat example, plus what the harness must know of it.

    init(key, *, n_in, n_hidden, n_out, dtype) -> params
    apply(params, x: [D]) -> scores: [n_classes]   (sigmoid outputs or logits)
    loss(params, x: [D], y: int) -> scalar          the training loss on one example
    probs(scores: [n_classes]) -> [n_classes]       what "confidence" is read from

    Inputs are flat: D = prod(input_shape), the image flattened row-major as (H, W, C)
    (`x.reshape(input_shape)` gives the image back).

    input_shape: (H, W, C) of one example; n_classes: K; input_range: (lo, hi), the valid
    input values (attacks clip to it); features: features(params, x: [D]) -> [F], the
    penultimate activations (training-data detectors), or None; stochastic: True when
    apply and loss draw randomness and so take a keyword `key` (a randomized defense);
    hparams: ((name, value), ...) the hyper-parameters the model was built with (metadata).
    """

    name: str
    init: Callable[..., Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    loss: Callable[[Params, jax.Array, jax.Array], jax.Array]
    probs: Callable[[jax.Array], jax.Array]
    input_shape: tuple[int, ...] = (28, 28, 1)
    n_classes: int = 10
    input_range: tuple[float, float] = (0.01, 1.0)
    features: Callable[[Params, jax.Array], jax.Array] | None = None
    stochastic: bool = False
    hparams: tuple = ()


def study_targets(y: jax.Array, n_out: int = 10, dtype=jnp.float32) -> jax.Array:
    """The study's targets: 0.99 at the label, 0.01 elsewhere. y: [...] int -> [..., n_out]."""
    return jnp.where(jax.nn.one_hot(y, n_out, dtype=bool), TARGET_HIGH, TARGET_LOW).astype(dtype)


# --- the study's MLP: 784-hidden-10, sigmoid, no biases, squared error -----------------------


def seed_mlp_init(key, *, n_in=784, n_hidden=200, n_out=10, dtype=jnp.float32) -> Params:
    """Weights ~ Normal(0, nodes^-0.5) as the study's `neuralNetwork.__init__` draws them.

    The study's orientation: wih [n_hidden, n_in] (std n_hidden^-0.5), who [n_out, n_hidden]
    (std n_out^-0.5).
    """
    k1, k2 = jax.random.split(key)
    return {
        "wih": jax.random.normal(k1, (n_hidden, n_in), dtype) * n_hidden**-0.5,
        "who": jax.random.normal(k2, (n_out, n_hidden), dtype) * n_out**-0.5,
    }


def seed_mlp_hidden(params: Params, x: jax.Array) -> jax.Array:
    """Hidden activations of the study's MLP. x: [n_in] -> [n_hidden]."""
    return jax.nn.sigmoid(params["wih"] @ x)


def seed_mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """The study's `query` on one example. x: [n_in] -> sigmoid outputs [n_out]."""
    return jax.nn.sigmoid(params["who"] @ seed_mlp_hidden(params, x))


def seed_mlp_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared error 0.5 * sum((t - out)^2) against the study's 0.01/0.99 targets."""
    out = seed_mlp_apply(params, x)
    t = study_targets(y, out.shape[-1], out.dtype)
    return 0.5 * jnp.sum((t - out) ** 2)


# --- ReLU MLP with biases, softmax cross-entropy ---------------------------------------------


def mlp_ce_init(key, *, n_in=784, n_hidden=200, n_out=10, dtype=jnp.float32) -> Params:
    """He-normal weights, zero biases."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (n_hidden, n_in), dtype) * (2.0 / n_in) ** 0.5,
        "b1": jnp.zeros((n_hidden,), dtype),
        "w2": jax.random.normal(k2, (n_out, n_hidden), dtype) * (1.0 / n_hidden) ** 0.5,
        "b2": jnp.zeros((n_out,), dtype),
    }


def mlp_ce_hidden(params: Params, x: jax.Array) -> jax.Array:
    """Hidden ReLU activations. x: [n_in] -> [n_hidden]."""
    return jax.nn.relu(params["w1"] @ x + params["b1"])


def mlp_ce_apply(params: Params, x: jax.Array) -> jax.Array:
    """x: [n_in] -> logits [n_out]."""
    return params["w2"] @ mlp_ce_hidden(params, x) + params["b2"]


def mlp_ce_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy against the integer label y."""
    logits = mlp_ce_apply(params, x)
    return -jax.nn.log_softmax(logits)[y]


# --- a small CNN: two strided convolutions + a dense layer, softmax cross-entropy ---------

CNN_CHANNELS = (8, 16)
_SIDE = 28


def cnn_init(key, *, n_in=784, n_hidden=128, n_out=10, dtype=jnp.float32) -> Params:
    """He-normal conv kernels (OIHW) and dense weights, zero biases. n_in must be 28*28."""
    if n_in != _SIDE * _SIDE:
        raise ConfigError(f"cnn expects 28x28 images (n_in=784); got n_in={n_in}")
    c1, c2 = CNN_CHANNELS
    k1, k2, k3, k4 = jax.random.split(key, 4)
    flat = c2 * 7 * 7

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape, dtype) * (2.0 / fan_in) ** 0.5

    return {
        "c1": he(k1, (c1, 1, 3, 3), 9), "cb1": jnp.zeros((c1,), dtype),
        "c2": he(k2, (c2, c1, 3, 3), 9 * c1), "cb2": jnp.zeros((c2,), dtype),
        "w1": he(k3, (n_hidden, flat), flat), "b1": jnp.zeros((n_hidden,), dtype),
        "w2": he(k4, (n_out, n_hidden), n_hidden) / 2**0.5, "b2": jnp.zeros((n_out,), dtype),
    }


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 convolution, stride 2, SAME padding, ReLU. x: [C, H, W] -> [O, H/2, W/2]."""
    y = jax.lax.conv_general_dilated(x[None], kernel, window_strides=(2, 2), padding="SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
    return jax.nn.relu(y + bias[:, None, None])


def cnn_hidden(params: Params, x: jax.Array) -> jax.Array:
    """Dense-layer activations. x: [784] -> [n_hidden]."""
    h = _conv(x.reshape(1, _SIDE, _SIDE), params["c1"], params["cb1"])  # [8, 14, 14]
    h = _conv(h, params["c2"], params["cb2"])  # [16, 7, 7]
    return jax.nn.relu(params["w1"] @ h.reshape(-1) + params["b1"])


def cnn_apply(params: Params, x: jax.Array) -> jax.Array:
    """x: [784] -> logits [n_out]."""
    return params["w2"] @ cnn_hidden(params, x) + params["b2"]


def cnn_loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy against the integer label y."""
    return -jax.nn.log_softmax(cnn_apply(params, x))[y]


def _identity(scores: jax.Array) -> jax.Array:
    return scores


SEED_MLP = Model("seed-mlp", seed_mlp_init, seed_mlp_apply, seed_mlp_loss, _identity,
                 features=seed_mlp_hidden)
MLP_CE = Model("mlp-ce", mlp_ce_init, mlp_ce_apply, mlp_ce_loss, jax.nn.softmax,
               features=mlp_ce_hidden)

CNN = Model("cnn", cnn_init, cnn_apply, cnn_loss, jax.nn.softmax, features=cnn_hidden)

MODELS: dict[str, Model] = {m.name: m for m in (SEED_MLP, MLP_CE, CNN)}

# the penultimate-layer activations of each architecture (for training-data detectors)
HIDDEN = {"seed-mlp": seed_mlp_hidden, "mlp-ce": mlp_ce_hidden, "cnn": cnn_hidden}


def get_model(name: str) -> Model:
    """The registered model called `name`; ConfigError naming the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None


def infer_model(params: Params) -> Model:
    """The registered architecture whose parameter names are exactly params' keys."""
    names = set(params)
    for model in MODELS.values():
        if set(jax.eval_shape(lambda m=model: m.init(jax.random.key(0)))) == names:
            try:  # the arrays must fit together and take 784-pixel images
                jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((784,), jnp.float32))
            except (TypeError, ValueError) as e:
                shapes = {k: tuple(jnp.shape(v)) for k, v in params.items()}
                raise ConfigError(f"params for {model.name} with shapes {shapes} do not take "
                                  f"784-pixel images ({str(e).splitlines()[0]})") from None
            return model
    raise ConfigError(f"params with arrays {sorted(names)} match no model in {sorted(MODELS)}")


def predict(model: Model, params: Params, x: jax.Array) -> jax.Array:
    """Batched scores. x: [batch, n_in] -> [batch, n_out]."""
    return jax.vmap(model.apply, in_axes=(None, 0))(params, x)
