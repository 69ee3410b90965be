"""The registry of trainable models: an architecture plus the way it is trained.

`RECIPES` drives the CLI, the runner and the parametrized tests: adding a model to the
harness is adding one `Recipe` here. A recipe builds its Model for the data's `zoo.Spec`
(input shape, classes, input range) and trains params for it; the numpy baseline's params
fit the JAX seed-mlp, so the JAX attacks and metrics work on them too. A ref with ":" names
a user's recipe ("pkg.module:attr"), resolved by `mlshift_jax.models.usermodels`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.models import zoo
from mlshift_jax.models.baseline import neuralNetwork
from mlshift_jax.models.train import train_minibatch, train_seed_sgd
from mlshift_jax.models.zoo import Model, Params, Spec, check_spec, guess_spec


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Fields left as None take the recipe's defaults."""

    hidden: int = 200
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values no trainer accepts; return self."""
        for name in ("hidden", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        if self.lr is not None and not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0; got {self.lr!r}")
        return self


class Recipe(NamedTuple):
    """How a model is built for a dataset and trained.

    name: "seed-mlp" or a user ref "pkg.module:attr"; build(spec, cfg) -> the Model for data
    of that `zoo.Spec` (built-ins: cached, so the same object comes back); fit(model, cfg,
    x: [n, D], y: int [n]) -> params; defaults: the TrainConfig fields it fills in when the
    user leaves them None; about: one line.
    """

    name: str
    build: Callable[[Spec, TrainConfig], Model]
    fit: Callable[[Model, TrainConfig, np.ndarray, np.ndarray], Params]
    defaults: dict
    about: str


def _builder(arch: str) -> Callable[[Spec, TrainConfig], Model]:
    def build(spec: Spec, cfg: TrainConfig) -> Model:
        return zoo.build(arch, spec, cfg.hidden)
    return build


def _fit_numpy(model: Model, cfg: TrainConfig, x, y) -> Params:
    net = neuralNetwork(x.shape[1], cfg.hidden, model.n_classes, cfg.lr,
                        rng=np.random.default_rng(cfg.seed))
    x, y = np.asarray(x, np.float64), np.asarray(y)
    for _ in range(cfg.epochs):
        net.train_epoch(x, y)
    return net.params()


def _fit_seed_sgd(model: Model, cfg: TrainConfig, x, y) -> Params:
    params = model.init(jax.random.key(cfg.seed))
    return train_seed_sgd(params, jnp.asarray(x), jnp.asarray(y), lr=cfg.lr, epochs=cfg.epochs)


def _fit_minibatch(model: Model, cfg: TrainConfig, x, y) -> Params:
    key_init, key_shuffle = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(key_init)
    return train_minibatch(
        key_shuffle, params, jnp.asarray(x), jnp.asarray(y), model=model,
        optimizer=cfg.optimizer, lr=float(cfg.lr), batch_size=cfg.batch_size,
        epochs=cfg.epochs)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("seed-mlp-numpy", _builder("seed-mlp"), _fit_numpy, {"lr": 0.1, "epochs": 1},
           "the study's numpy neuralNetwork, per-sample SGD (float64, the baseline)"),
    Recipe("seed-mlp", _builder("seed-mlp"), _fit_seed_sgd, {"lr": 0.1, "epochs": 1},
           "the study's MLP and per-sample rule in JAX, one lax.scan per epoch"),
    Recipe("mlp-sgd", _builder("seed-mlp"), _fit_minibatch,
           {"lr": 1.0, "epochs": 5, "optimizer": "sgd", "batch_size": 16},
           "the study's sigmoid MLP, minibatch SGD on the mean squared error (optax)"),
    Recipe("mlp-ce", _builder("mlp-ce"), _fit_minibatch,
           {"lr": 1e-3, "epochs": 5, "optimizer": "adam", "batch_size": 64},
           "ReLU MLP with biases, softmax cross-entropy, Adam (optax)"),
    Recipe("cnn", _builder("cnn"), _fit_minibatch,
           {"lr": 1e-3, "epochs": 2, "optimizer": "adam", "batch_size": 64},
           "two strided 3x3 convolutions (8, 16 channels) + dense, cross-entropy, Adam"),
)}


def get_recipe(ref: str) -> Recipe:
    """The recipe `ref`: a built-in name, or a user ref "pkg.module:attr" (handed to
    `usermodels.recipe`). ConfigError naming the known ones otherwise."""
    if isinstance(ref, str) and ":" in ref:
        try:
            usermodels = importlib.import_module("mlshift_jax.models.usermodels")
        except ModuleNotFoundError as e:
            if e.name != "mlshift_jax.models.usermodels":
                raise
            raise ConfigError(f"model {ref!r}: user models (pkg.module:attr) need "
                              "mlshift_jax.models.usermodels, which this install lacks") from None
        return usermodels.recipe(ref)
    try:
        return RECIPES[ref]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {ref!r}; expected one of {sorted(RECIPES)} or "
                          "pkg.module:attr") from None


def resolve(recipe: Recipe, cfg: TrainConfig) -> TrainConfig:
    """cfg with the recipe's defaults filled in where cfg left None, validated."""
    filled = {k: v for k, v in recipe.defaults.items() if getattr(cfg, k) is None}
    return replace(cfg, **filled).validate()


def model_for(ref: str, spec, cfg: TrainConfig | None = None) -> Model:
    """The Model recipe `ref` builds for data of `spec` (a zoo.Spec, Dataset or Model)
    with `cfg`'s settings (recipe defaults filled)."""
    recipe = get_recipe(ref)
    return recipe.build(check_spec(spec), resolve(recipe, cfg or TrainConfig()))


def fit_model(ref: str, cfg: TrainConfig, x: np.ndarray, y: np.ndarray,
              spec=None) -> tuple[Model, Params]:
    """Build and train recipe `ref` on x: [n, D], y: int [n] -> (model, params).

    spec: the data's zoo.Spec (or its Dataset); None guesses it from the arrays
    (`zoo.guess_spec`: square single-channel images, K = max(y) + 1). ConfigError when
    x does not have the spec's D values per example or y holds a label outside 0..K-1."""
    recipe = get_recipe(ref)
    spec = guess_spec(x, y) if spec is None else check_spec(spec)
    y = np.asarray(y)
    if len(np.shape(x)) != 2 or np.shape(x)[1] != spec.n_inputs:
        raise ConfigError(f"train: expected x [n, {spec.n_inputs}] (images "
                          f"{spec.input_shape}), found shape {tuple(np.shape(x))}")
    if y.size and (y.min() < 0 or y.max() >= spec.n_classes):
        raise ConfigError(f"train: expected labels 0..{spec.n_classes - 1}, found "
                          f"{int(y.min())}..{int(y.max())}")
    cfg = resolve(recipe, cfg)
    model = recipe.build(spec, cfg)
    return model, recipe.fit(model, cfg, x, y)


def fit(name: str, cfg: TrainConfig, x: np.ndarray, y: np.ndarray, spec=None) -> Params:
    """Train recipe `name` on x: [n, D], y: int [n] (see `fit_model`) -> params."""
    return fit_model(name, cfg, x, y, spec)[1]
