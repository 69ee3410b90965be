"""The built-in recipes: an architecture plus the way it is trained.

`RECIPES` drives the CLI, the runner and the parametrized tests. A recipe builds its Model
for the data's `zoo.Spec` (input shape, classes, input range) and trains params for it; the
numpy baseline's params fit the JAX seed-mlp, so the JAX attacks and metrics work on them
too. Adding a built-in model is one `zoo.Builtin` (the architecture, and how its
metadata-free weights are placed) plus one `Recipe` here named after it (its default
trainer); `registry` resolves every reference (a name or a user's "pkg.module:attr").
"""

from __future__ import annotations

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
from mlshift_jax.models.zoo import Model, Params, Spec


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


# what a recipe's fit is, so a population can train many in one jit (`population.plan_for`)
SEED_SGD = "seed-sgd"  # the study's per-sample rule, `train.train_seed_sgd`
MINIBATCH = "minibatch"  # `train.train_minibatch` on the Model's loss
NUMPY = "numpy"  # the numpy baseline: no population
OWN_FIT = "own-fit"  # a user Recipe's own fit: members train one after another
TRAINERS = (SEED_SGD, MINIBATCH, NUMPY, OWN_FIT)


class Recipe(NamedTuple):
    """How a model is built for a dataset and trained.

    name: "seed-mlp" or a user ref "pkg.module:attr"; build(spec, cfg) -> the Model for data
    of that `zoo.Spec` (built-ins: cached, so the same object comes back); fit(model, cfg,
    x: [n, D], y: int [n]) -> params; defaults: the TrainConfig fields it fills in when the
    user leaves them None; about: one line; arch: the `zoo.BUILTINS` architecture it builds
    (None: a user's model); trainer: what fit is, one of TRAINERS (a population trains
    SEED_SGD and MINIBATCH recipes in one jit, OWN_FIT one member at a time).
    """

    name: str
    build: Callable[[Spec, TrainConfig], Model]
    fit: Callable[[Model, TrainConfig, np.ndarray, np.ndarray], Params]
    defaults: dict
    about: str
    arch: str | None = None
    trainer: str = OWN_FIT

    def place(self, params: Params) -> Spec:
        """The Spec of metadata-free `params` of this recipe's architecture
        (`zoo.Builtin.place`). ConfigError for a user's model or params it cannot place."""
        if self.arch is None:
            raise ConfigError(f"model {self.name!r}: a user's model; expected metadata "
                              "naming its input shape")
        return zoo.BUILTINS[self.arch].place(params)


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


def builtin(name: str, arch: str, trainer: str, defaults: dict, about: str) -> Recipe:
    """A built-in Recipe: zoo architecture `arch` trained by `trainer` (SEED_SGD, MINIBATCH
    or NUMPY)."""
    fit = {SEED_SGD: _fit_seed_sgd, MINIBATCH: _fit_minibatch, NUMPY: _fit_numpy}[trainer]
    return Recipe(name, _builder(arch), fit, defaults, about, arch=arch, trainer=trainer)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    builtin("seed-mlp-numpy", "seed-mlp", NUMPY, {"lr": 0.1, "epochs": 1},
            "the study's numpy neuralNetwork, per-sample SGD (float64, the baseline)"),
    builtin("seed-mlp", "seed-mlp", SEED_SGD, {"lr": 0.1, "epochs": 1},
            "the study's MLP and per-sample rule in JAX, one lax.scan per epoch"),
    builtin("mlp-sgd", "seed-mlp", MINIBATCH,
            {"lr": 1.0, "epochs": 5, "optimizer": "sgd", "batch_size": 16},
            "the study's sigmoid MLP, minibatch SGD on the mean squared error (optax)"),
    builtin("mlp-ce", "mlp-ce", MINIBATCH,
            {"lr": 1e-3, "epochs": 5, "optimizer": "adam", "batch_size": 64},
            "ReLU MLP with biases, softmax cross-entropy, Adam (optax)"),
    builtin("cnn", "cnn", MINIBATCH,
            {"lr": 1e-3, "epochs": 2, "optimizer": "adam", "batch_size": 64},
            "two strided 3x3 convolutions (8, 16 channels) + dense, cross-entropy, Adam"),
)}


def fill(defaults: dict, cfg: TrainConfig | None) -> TrainConfig:
    """cfg (None: TrainConfig()) with `defaults` where it left None, validated (a default
    naming no TrainConfig field is not used). The one place that fills defaults."""
    cfg = cfg if cfg is not None else TrainConfig()
    filled = {k: v for k, v in defaults.items() if hasattr(cfg, k) and getattr(cfg, k) is None}
    return replace(cfg, **filled).validate()


def resolve(recipe: Recipe, cfg: TrainConfig | None) -> TrainConfig:
    """cfg with the recipe's defaults filled in where cfg left None (`fill`), validated."""
    return fill(recipe.defaults, cfg)

