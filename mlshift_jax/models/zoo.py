"""JAX models: pure `init(key) -> params` and `apply(params, x) -> scores` on ONE example.

Batch at the call site with `jax.vmap(model.apply, in_axes=(None, 0))(params, x)`.

A dataset tells a model what it needs through a `Spec` (input shape, classes, input range);
`build(name, spec, hidden)` makes a built-in model for it. Builds are cached, so the same
arguments give the very same `Model` object (a static argument of jit: an equal object, no
recompile). `MODELS` holds the built-ins built for the study's MNIST (`STUDY_SPEC`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.study import TARGET_HIGH, TARGET_LOW
from mlshift_jax.data.spec import STUDY_SPEC, Spec, check_spec, guess_spec, square_shape  # noqa: F401  (re-exported: models.Spec)

Params = Any  # a pytree (dict) of arrays



class Model(NamedTuple):
    """A model: pure functions on ONE flat example, plus what the harness must know of it.

    init(key, **kw) -> params   (built-ins: bound to the spec; n_in / n_hidden / n_out / dtype
                                 override it, any other keyword is ignored)
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

    @property
    def spec(self) -> Spec:
        """The Spec this model was built for."""
        return Spec(tuple(self.input_shape), int(self.n_classes), tuple(self.input_range))

    @property
    def n_inputs(self) -> int:
        """D = H * W * C."""
        return math.prod(self.input_shape)



def study_targets(y: jax.Array, n_out: int = 10, dtype=jnp.float32) -> jax.Array:
    """The study's targets: 0.99 at the label, 0.01 elsewhere. y: [...] int -> [..., n_out]."""
    return jnp.where(jax.nn.one_hot(y, n_out, dtype=bool), TARGET_HIGH, TARGET_LOW).astype(dtype)


# --- the study's MLP: D-hidden-K, sigmoid, no biases, squared error ---------------------------


def seed_mlp_init(key, *, n_in: int, n_hidden: int = 200, n_out: int,
                  dtype=jnp.float32) -> Params:
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


def mlp_ce_init(key, *, n_in: int, n_hidden: int = 200, n_out: int,
                dtype=jnp.float32) -> Params:
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


def cnn_flat_size(input_shape: tuple[int, ...]) -> int:
    """Values out of the two stride-2 SAME convolutions: c2 * ceil(ceil(H/2)/2) * same(W)."""
    def out(n):  # one stride-2 SAME convolution: ceil(n / 2)
        return -(-n // 2)

    h, w, _ = input_shape
    return CNN_CHANNELS[1] * out(out(h)) * out(out(w))


def cnn_init(key, *, input_shape: tuple[int, ...], n_hidden: int = 128, n_out: int,
             n_in: int | None = None, dtype=jnp.float32) -> Params:
    """He-normal conv kernels (OIHW) and dense weights, zero biases, for images input_shape
    (H, W, C); n_in, when given, must be H * W * C."""
    if n_in is not None and n_in != math.prod(input_shape):
        raise ConfigError(f"cnn: expected n_in = {math.prod(input_shape)} for images "
                          f"{tuple(input_shape)}, found n_in={n_in}")
    c1, c2 = CNN_CHANNELS
    k1, k2, k3, k4 = jax.random.split(key, 4)
    channels = input_shape[2]
    flat = cnn_flat_size(input_shape)

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape, dtype) * (2.0 / fan_in) ** 0.5

    return {
        "c1": he(k1, (c1, channels, 3, 3), 9 * channels), "cb1": jnp.zeros((c1,), dtype),
        "c2": he(k2, (c2, c1, 3, 3), 9 * c1), "cb2": jnp.zeros((c2,), dtype),
        "w1": he(k3, (n_hidden, flat), flat), "b1": jnp.zeros((n_hidden,), dtype),
        "w2": he(k4, (n_out, n_hidden), n_hidden) / 2**0.5, "b2": jnp.zeros((n_out,), dtype),
    }


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 convolution, stride 2, SAME padding, ReLU. x: [C, H, W] -> [O, H/2, W/2]."""
    y = jax.lax.conv_general_dilated(x[None], kernel, window_strides=(2, 2), padding="SAME",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
    return jax.nn.relu(y + bias[:, None, None])


def cnn_hidden(params: Params, x: jax.Array, *, input_shape: tuple[int, ...]) -> jax.Array:
    """Dense-layer activations. x: [H * W * C] -> [n_hidden]."""
    img = x.reshape(input_shape).transpose(2, 0, 1)  # (H, W, C) -> [C, H, W]
    h = _conv(img, params["c1"], params["cb1"])  # [8, H/2, W/2]
    h = _conv(h, params["c2"], params["cb2"])  # [16, H/4, W/4]
    return jax.nn.relu(params["w1"] @ h.reshape(-1) + params["b1"])


def cnn_apply(params: Params, x: jax.Array, *, input_shape: tuple[int, ...]) -> jax.Array:
    """x: [H * W * C] -> logits [n_out]."""
    return params["w2"] @ cnn_hidden(params, x, input_shape=input_shape) + params["b2"]


def cnn_loss(params: Params, x: jax.Array, y: jax.Array, *,
             input_shape: tuple[int, ...]) -> jax.Array:
    """Softmax cross-entropy against the integer label y."""
    return -jax.nn.log_softmax(cnn_apply(params, x, input_shape=input_shape))[y]


def _identity(scores: jax.Array) -> jax.Array:
    return scores


# --- the affine first layer, for attacks that change a few pixels at a time -------------------


def _seed_mlp_split(params: Params):
    return params["wih"], None, lambda pre: jax.nn.sigmoid(params["who"] @ jax.nn.sigmoid(pre))


def _mlp_ce_split(params: Params):
    return params["w1"], params["b1"], lambda pre: params["w2"] @ jax.nn.relu(pre) + params["b2"]


_AFFINE_SPLITS = {seed_mlp_apply: _seed_mlp_split, mlp_ce_apply: _mlp_ce_split}


def affine_split(model: Model) -> Callable[[Params], tuple] | None:
    """split(params) -> (w [H, D], b [H] or None, rest) with model.apply(params, x) ==
    rest(w @ x + b) for x: [D], where the model's first layer is affine in its input; None
    otherwise (a CNN, a user's model, a defended model: any other `apply`). Keyed by `apply`
    itself, so a wrapper that replaces apply (`attacks.defenses`) never inherits it. Square
    Attack uses it to update w @ x for the few pixels a query changes (`adaptive.square`)."""
    return _AFFINE_SPLITS.get(model.apply)


def outputs_are_probabilities(model: Model) -> bool:
    """Whether `model.apply` gives probabilities (the seed MLP's sigmoid outputs: its `probs`
    is the identity) rather than logits (`probs` a softmax). The attacks' losses take the
    logit of probabilities (`attacks.losses.to_logits`)."""
    return model.probs is _identity


# --- building models for a spec ---------------------------------------------------------------


def _bound_init(raw: Callable[..., Params], accepted: frozenset, **bound) -> Callable:
    """init(key, **kw): raw(key, **bound) with the keywords in `accepted` overriding the
    bound ones; any other keyword is ignored (callers written for other models)."""

    def init(key, **kw):
        return raw(key, **{**bound, **{k: v for k, v in kw.items() if k in accepted}})

    init.__doc__ = f"{raw.__name__} bound to {bound}; overridable: {sorted(accepted)}"
    return init


_MLP_KW = frozenset({"n_in", "n_hidden", "n_out", "dtype"})


def _build_seed_mlp(spec: Spec, hidden: int) -> Model:
    init = _bound_init(seed_mlp_init, _MLP_KW, n_in=spec.n_inputs, n_hidden=hidden,
                       n_out=spec.n_classes)
    return Model("seed-mlp", init, seed_mlp_apply, seed_mlp_loss, _identity, *spec,
                 features=seed_mlp_hidden, hparams=(("hidden", hidden),))


def _build_mlp_ce(spec: Spec, hidden: int) -> Model:
    init = _bound_init(mlp_ce_init, _MLP_KW, n_in=spec.n_inputs, n_hidden=hidden,
                       n_out=spec.n_classes)
    return Model("mlp-ce", init, mlp_ce_apply, mlp_ce_loss, jax.nn.softmax, *spec,
                 features=mlp_ce_hidden, hparams=(("hidden", hidden),))


def _build_cnn(spec: Spec, hidden: int) -> Model:
    shape = spec.input_shape
    init = _bound_init(cnn_init, _MLP_KW | {"input_shape"}, input_shape=shape,
                       n_hidden=hidden, n_out=spec.n_classes)
    return Model("cnn", init, functools.partial(cnn_apply, input_shape=shape),
                 functools.partial(cnn_loss, input_shape=shape), jax.nn.softmax, *spec,
                 features=functools.partial(cnn_hidden, input_shape=shape),
                 hparams=(("hidden", hidden),))


def _place_mlp(first: str, last: str) -> Callable[[Params], Spec]:
    """place(params) for an MLP whose first weight is [hidden, D] and last [K, hidden]: the
    study's MNIST for 784 inputs and 10 classes, else a square single-channel image in
    [0, 1]."""
    def place(params: Params) -> Spec:
        n_in, k = int(np.shape(params[first])[1]), int(np.shape(params[last])[0])
        if (n_in, k) == (STUDY_SPEC.n_inputs, STUDY_SPEC.n_classes):
            return STUDY_SPEC
        return check_spec((square_shape(n_in, "params"), k, (0.0, 1.0)))
    return place


def _place_cnn(params: Params) -> Spec:
    """The study's MNIST when the CNN's params fit it; ConfigError otherwise (the image size
    cannot be read off a CNN's weights)."""
    k, channels = int(np.shape(params["w2"])[0]), int(np.shape(params["c1"])[1])
    if channels == 1 and np.shape(params["w1"])[1] == cnn_flat_size(STUDY_SPEC.input_shape) \
            and k == STUDY_SPEC.n_classes:
        return STUDY_SPEC
    raise ConfigError("cnn params: the image size cannot be read off the weights; "
                      "expected the input shape to be given (a dataset or spec)")


class Builtin(NamedTuple):
    """A built-in architecture. build(spec, hidden) -> Model; hidden: the default hidden
    size; width(params) -> the hidden size of a params pytree; place(params) -> the Spec of
    metadata-free params (ConfigError when the arrays cannot tell it)."""

    build: Callable[[Spec, int], Model]
    hidden: int
    width: Callable[[Params], int]
    place: Callable[[Params], Spec]


BUILTINS: dict[str, Builtin] = {
    "seed-mlp": Builtin(_build_seed_mlp, 200, lambda p: p["wih"].shape[0],
                        _place_mlp("wih", "who")),
    "mlp-ce": Builtin(_build_mlp_ce, 200, lambda p: p["w1"].shape[0], _place_mlp("w1", "w2")),
    "cnn": Builtin(_build_cnn, 128, lambda p: p["w1"].shape[0], _place_cnn),
}


@functools.cache
def _build(name: str, spec: Spec, hidden: int) -> Model:
    return BUILTINS[name].build(spec, hidden)


def build(name: str, spec: Any = STUDY_SPEC, hidden: int | None = None) -> Model:
    """The built-in model `name` for `spec` (a Spec, Dataset or Model) with `hidden` units
    (None: the model's default). Cached: the same arguments return the same object.
    ConfigError for an unknown name, a bad spec or hidden < 1."""
    if name not in BUILTINS:
        raise ConfigError(f"unknown model {name!r}; expected one of {sorted(BUILTINS)}")
    hidden = BUILTINS[name].hidden if hidden is None else hidden
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ConfigError(f"hidden: expected an integer >= 1, found {hidden!r}")
    return _build(name, check_spec(spec), int(hidden))


SEED_MLP = build("seed-mlp")
MLP_CE = build("mlp-ce")
CNN = build("cnn")

# the built-ins, built for the study's MNIST with their default hidden sizes
MODELS: dict[str, Model] = {m.name: m for m in (SEED_MLP, MLP_CE, CNN)}


def _shapes(tree) -> dict:
    return {k: tuple(np.shape(v)) for k, v in tree.items()} if isinstance(tree, dict) else {}


def arrays_of(name: str) -> set[str]:
    """The top-level array names of built-in `name`'s params (whatever the spec)."""
    probe = build(name, STUDY_SPEC, 8)
    return set(jax.eval_shape(lambda m=probe: m.init(jax.random.key(0))))


def arch_of(params: Params) -> str | None:
    """The built-in whose params have exactly these array names, or None."""
    names = set(params) if isinstance(params, dict) else None
    return next((name for name in BUILTINS if arrays_of(name) == names), None)


def infer_model(params: Params, spec: Any = None) -> Model:
    """The built-in architecture whose arrays are exactly params' (names and shapes), built
    for `spec` (a Spec, Dataset or Model) with the hidden size the params have.

    For metadata-free weights. spec None: the inputs and classes are read off the params
    (`Builtin.place`: the study's MNIST when they are 784 and 10, else a square
    single-channel image in [0, 1]). ConfigError when no built-in matches, naming what was
    found."""
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a dict of arrays, found {type(params).__name__}")
    name = arch_of(params)
    if name is None:
        raise ConfigError(f"params with arrays {sorted(params)} match no model in "
                          f"{sorted(BUILTINS)}")
    entry = BUILTINS[name]
    shapes = _shapes(params)
    model_spec = check_spec(spec) if spec is not None else entry.place(params)
    model = build(name, model_spec, int(entry.width(params)))
    expected = _shapes(jax.eval_shape(lambda m=model: m.init(jax.random.key(0))))
    if expected != shapes:
        raise ConfigError(
            f"params for {name} with shapes {shapes} do not fit inputs "
            f"{model_spec.input_shape} and {model_spec.n_classes} classes: expected "
            f"{expected}")
    return model


def hidden_size(model: Model, params: Params) -> int:
    """The width of the penultimate layer of `params` (what `model.features` returns).
    ConfigError for a model without features."""
    if model.features is None:
        raise ConfigError(f"detect: expected a model with features, found {model.name}")
    x = jax.ShapeDtypeStruct((model.n_inputs,), jnp.float32)
    return int(jax.eval_shape(model.features, params, x).shape[-1])


def predict(model: Model, params: Params, x: jax.Array) -> jax.Array:
    """Batched scores. x: [batch, D] -> [batch, n_classes]."""
    return jax.vmap(model.apply, in_axes=(None, 0))(params, x)
