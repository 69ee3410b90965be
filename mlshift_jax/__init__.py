"""mlshift_jax: a JAX benchmarking harness for detecting and categorizing changes in the
behaviour of ML models (the study "Detection of ML Behavior Changes", at full speed).

The public API (imported on first use, so `import mlshift_jax` stays light):

    load_dataset(name_or_path)                         -> Dataset
    wrap(obj) / recipe("pkg.mod:attr") / get_recipe     -> Recipe (build + fit)
    fit(model, ds, epochs=...)                         -> (Model, params)
    attack(name, model, params, x, y, eps=...)         -> x_adv
    evaluate(model, params, x, y)                      -> {accuracy, precision, ...}
    poison_dataset(ds, kind, fraction=..., ...)        -> (Dataset, mask)
    detect_inputs(model, params, x) / detect_change(...) -> detector scores / verdict
    save_weights / load_weights / load_model / metadata   safetensors with metadata
    run_matrix(path, out_dir=...)                      -> records (DataFrame)

(`fit`, `poison_dataset`, `detect_inputs`: the submodules `train`, `poison` and `detect`
keep their names.) See the README section "Use it on your own model and data".
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_dataset": ("mlshift_jax.api", "load_dataset"),
    "build": ("mlshift_jax.api", "build"),
    "fit": ("mlshift_jax.api", "fit"),
    "attack": ("mlshift_jax.api", "attack"),
    "evaluate": ("mlshift_jax.api", "evaluate"),
    "poison_dataset": ("mlshift_jax.api", "poison_dataset"),
    "detect_inputs": ("mlshift_jax.api", "detect_inputs"),
    "detect_change": ("mlshift_jax.api", "detect_change"),
    "roc_auc": ("mlshift_jax.api", "roc_auc"),
    "run_matrix": ("mlshift_jax.api", "run_matrix"),
    "wrap": ("mlshift_jax.models.usermodels", "wrap"),
    "recipe": ("mlshift_jax.models.usermodels", "recipe"),
    "get_recipe": ("mlshift_jax.models.registry", "get_recipe"),
    "Spec": ("mlshift_jax.models.usermodels", "Spec"),
    "save_weights": ("mlshift_jax.models.weights", "save"),
    "load_weights": ("mlshift_jax.models.weights", "load"),
    "load_model": ("mlshift_jax.models.registry", "load_model"),
    "metadata": ("mlshift_jax.models.weights", "metadata"),
    "Model": ("mlshift_jax.models.zoo", "Model"),
    "Dataset": ("mlshift_jax.data.datasets", "Dataset"),
    "TrainConfig": ("mlshift_jax.models.recipes", "TrainConfig"),
    "ConfigError": ("mlshift_jax.core.errors", "ConfigError"),
    "DataError": ("mlshift_jax.core.errors", "DataError"),
    "MlshiftError": ("mlshift_jax.core.errors", "MlshiftError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import the entry point `name` on first use (PEP 562)."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'mlshift_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
