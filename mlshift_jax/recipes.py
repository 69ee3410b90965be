"""The registry of trainable models: an architecture plus the way it is trained.

`RECIPES` drives the CLI, the runner and the parametrized tests: adding a model to the
harness is adding one `Recipe` here. Every recipe returns params for its `arch`, so the JAX
attacks and metrics work on the numpy baseline's weights too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.baseline import neuralNetwork
from mlshift_jax.errors import ConfigError
from mlshift_jax.models import CNN, MLP_CE, SEED_MLP, Model, Params
from mlshift_jax.train import train_minibatch, train_seed_sgd


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
    """name; arch: the Model its params are for; fit(cfg, x, y) -> params; defaults: the
    TrainConfig fields it fills in when the user leaves them None; about: one line."""

    name: str
    arch: Model
    fit: Callable[[TrainConfig, np.ndarray, np.ndarray], Params]
    defaults: dict
    about: str


def _fit_numpy(cfg: TrainConfig, x, y) -> Params:
    net = neuralNetwork(x.shape[1], cfg.hidden, 10, cfg.lr, rng=np.random.default_rng(cfg.seed))
    x, y = np.asarray(x, np.float64), np.asarray(y)
    for _ in range(cfg.epochs):
        net.train_epoch(x, y)
    return net.params()


def _fit_seed_sgd(cfg: TrainConfig, x, y) -> Params:
    params = SEED_MLP.init(jax.random.key(cfg.seed), n_in=x.shape[1], n_hidden=cfg.hidden)
    return train_seed_sgd(params, jnp.asarray(x), jnp.asarray(y), lr=cfg.lr, epochs=cfg.epochs)


def _minibatch_fit(arch: Model) -> Callable[[TrainConfig, np.ndarray, np.ndarray], Params]:
    def fit(cfg: TrainConfig, x, y) -> Params:
        key_init, key_shuffle = jax.random.split(jax.random.key(cfg.seed))
        params = arch.init(key_init, n_in=x.shape[1], n_hidden=cfg.hidden)
        return train_minibatch(
            key_shuffle, params, jnp.asarray(x), jnp.asarray(y), model=arch,
            optimizer=cfg.optimizer, lr=float(cfg.lr), batch_size=cfg.batch_size,
            epochs=cfg.epochs)
    return fit


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("seed-mlp-numpy", SEED_MLP, _fit_numpy, {"lr": 0.1, "epochs": 1},
           "the study's numpy neuralNetwork, per-sample SGD (float64, the baseline)"),
    Recipe("seed-mlp", SEED_MLP, _fit_seed_sgd, {"lr": 0.1, "epochs": 1},
           "the study's MLP and per-sample rule in JAX, one lax.scan per epoch"),
    Recipe("mlp-sgd", SEED_MLP, _minibatch_fit(SEED_MLP),
           {"lr": 1.0, "epochs": 5, "optimizer": "sgd", "batch_size": 16},
           "the study's sigmoid MLP, minibatch SGD on the mean squared error (optax)"),
    Recipe("mlp-ce", MLP_CE, _minibatch_fit(MLP_CE),
           {"lr": 1e-3, "epochs": 5, "optimizer": "adam", "batch_size": 64},
           "ReLU MLP with biases, softmax cross-entropy, Adam (optax)"),
    Recipe("cnn", CNN, _minibatch_fit(CNN),
           {"lr": 1e-3, "epochs": 2, "optimizer": "adam", "batch_size": 64},
           "two strided 3x3 convolutions (8, 16 channels) + dense, cross-entropy, Adam"),
)}


def get_recipe(name: str) -> Recipe:
    """The registered recipe `name`; ConfigError naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; expected one of {sorted(RECIPES)}") from None


def resolve(recipe: Recipe, cfg: TrainConfig) -> TrainConfig:
    """cfg with the recipe's defaults filled in where cfg left None, validated."""
    filled = {k: v for k, v in recipe.defaults.items() if getattr(cfg, k) is None}
    return replace(cfg, **filled).validate()


def fit(name: str, cfg: TrainConfig, x: np.ndarray, y: np.ndarray) -> Params:
    """Train recipe `name` on x: [n, 784], y: int [n]; params ready on the host or device."""
    recipe = get_recipe(name)
    return recipe.fit(resolve(recipe, cfg), x, y)
