"""The public Python API in a few calls (re-exported by `mlshift_jax`):

    ds = load_dataset("mnist" or "data.npz")          -> datasets.Dataset
    model, params = fit(Net(), ds, epochs=2)           built-in name, "pkg.mod:attr", a flax /
                                                       equinox / Model / Recipe object, or a Model
    x_adv = attack("fgsm", model, params, x, y, eps=0.1)
    evaluate(model, params, x, y)                      accuracy, P/R/F1 (macro), confidence
    poisoned, mask = poison_dataset(ds, "mixture", fraction=0.1, patch=4, target=3)
    detect_inputs(model, params, x)                    per-input detector scores
    detect_change(model, reference, suspect, ds)       changed? how? (model-level test)
    save_weights(path, params, metadata(model, ...)); load_model(path)
    run_matrix("bench/matrix.toml", out_dir="results/mine")

Every function takes the model's input shape, classes and range from the `Model`, so none
assumes MNIST. Errors are `ConfigError` / `DataError` in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from mlshift_jax.models import recipes, registry, usermodels
from mlshift_jax.models.zoo import Model, Params

# the recipe each Model built here came from, so fit(model, ...) retrains it the same way
_RECIPE_OF: dict[Model, Any] = {}


def load_dataset(name: str = "mnist", data_dir=None, **kw):
    """`datasets.load`: a built-in dataset name (or, with the contract's data readers, a path to
    a keras-style .npz, an IDX folder or CSVs). Returns a `datasets.Dataset`."""
    from mlshift_jax.data import datasets

    return datasets.load(name, data_dir, **kw)


def _recipe_of(model) -> tuple[Any, Model | None]:
    """(recipe, built Model or None) for anything `fit` accepts."""
    if isinstance(model, str):
        return registry.get_recipe(model), None
    if isinstance(model, Model) and model in _RECIPE_OF:
        return _RECIPE_OF[model], model
    if isinstance(model, Model) and ":" not in model.name and model.name in recipes.RECIPES:
        return registry.get_recipe(model.name), model
    return (model if isinstance(model, tuple) and hasattr(model, "build")
            else usermodels.wrap(model)), None


def build(model, ds) -> Model:
    """The Model of `model` (a name, ref, object or Recipe) for dataset `ds`'s shape."""
    recipe, built = _recipe_of(model)
    if built is not None:
        return built
    built = recipe.build(usermodels.spec_of(ds), recipes.TrainConfig())
    _RECIPE_OF[built] = recipe
    return built


def fit(model, ds, cfg: recipes.TrainConfig | None = None, **settings) -> tuple[Model, Params]:
    """Build `model` for `ds` and train it on ds.x_train / ds.y_train: (Model, params).

    model: a built-in name ("mlp-ce"), "pkg.module:attr", a flax linen Module instance, an
    nnx class, an equinox factory, a models.Model, a Recipe, or a Model returned earlier
    (retrained with the same recipe). cfg / settings: TrainConfig fields (epochs, lr,
    batch_size, optimizer, seed, hidden); None fields take the recipe's defaults.
    """
    cfg = dataclasses.replace(cfg or recipes.TrainConfig(), **settings)
    recipe, _ = _recipe_of(model)
    built = build(model, ds)
    x, y = ds.x_train, ds.y_train
    params = recipe.fit(built, recipes.fill(getattr(recipe, "defaults", {}) or {}, cfg), x, y)
    return built, jax.block_until_ready(params)


def attack(name: str, model: Model, params: Params, x, y, *, eps: float, seed: int = 0,
           **kw) -> jax.Array:
    """Attack `name` ("fgsm", "pgd", "noise-sign", ...; `attacks.ATTACKS`) at L∞ budget eps,
    clipped to the model's input range; random attacks draw from `attacks.attack_key(seed)`.
    x: [n, D], y: [n] -> x_adv: [n, D]."""
    from mlshift_jax.attacks import attack_key, get_attack

    lo, hi = model.input_range
    kw.setdefault("lo", lo)
    kw.setdefault("hi", hi)
    fn = get_attack(name)
    if fn.needs_key:
        kw.setdefault("key", attack_key(seed))
    return fn.fn(model, params, x, y, eps=eps, **kw)


def evaluate(model: Model, params: Params, x, y, *, clip: bool = False) -> dict[str, float]:
    """accuracy, precision, recall, f1 (macro over the model's classes) and confidence.
    Inputs outside the model's input range are a ConfigError; clip=True clips and counts
    them."""
    from mlshift_jax.models.metrics import evaluate as _evaluate

    return _evaluate(model, params, x, y, n_classes=model.n_classes, clip=clip)


def poison_dataset(ds, kind: str, *, seed: int = 0, **settings):
    """ds with its training split poisoned: (Dataset, mask: bool [n]) (`poison.make_config`
    settings: fraction, patch, target, mode, ...). The test split is left clean."""
    from mlshift_jax.poisoning import poison as _poison

    config = _poison.make_config(kind, **settings)
    x, y, mask = _poison.apply(jax.random.key(seed), ds.x_train, ds.y_train, config)
    x, y = np.asarray(x), np.asarray(y)
    x.flags.writeable = y.flags.writeable = False
    out = dataclasses.replace(ds, name=f"{ds.name}+{_poison.describe(config)}",
                              x_train=x, y_train=y)
    return out, np.asarray(mask)


def detect_inputs(model: Model, params: Params, x) -> dict[str, np.ndarray]:
    """Per-input detector scores {confidence, margin, entropy, squeezing: [n]}, higher =
    more likely adversarial or noisy (`detect.input_scores`; squeezing: Xu et al. 2018)."""
    from mlshift_jax.detection.detect import input_scores

    return {k: np.asarray(v) for k, v in input_scores(model, params, x).items()}


def detect_change(model: Model, reference: Params, suspect: Params, ds, **kw) -> dict:
    """Has `suspect` changed from `reference` (same model), and how? `change.detect_pair`
    against a null of clean retrains on ds: verdict, p_value, category, fingerprint."""
    from mlshift_jax.detection.change import detect_pair

    return detect_pair(reference, suspect, ds, model=model, **kw)


def roc_auc(scores, labels) -> float:
    """ROC-AUC of scores against 0/1 labels (`detect.roc_auc`)."""
    from mlshift_jax.detection.detect import roc_auc as _roc_auc

    return _roc_auc(scores, labels)


def run_matrix(path, *, out_dir, only: str | None = None, force: bool = False):
    """Run an experiment matrix (TOML) into out_dir; its records as a DataFrame."""
    from mlshift_jax.bench.runner import run

    return run(path, out_dir=out_dir, only=only, force=force)
