"""Models and their training: the built-in zoo, users' models (flax, equinox, records),
recipes, the trainers, populations trained in one jit, weights files, metrics and the numpy
baseline. Imports `core`, `data`, `poisoning`.

The public names are re-exported here; a module inside `models` imports its siblings
directly (`from mlshift_jax.models import zoo`), never a name from this file.
"""

from mlshift_jax.models.recipes import RECIPES, Recipe, TrainConfig, resolve
from mlshift_jax.models.registry import (
    build_model,
    builtin_recipe,
    fit,
    fit_model,
    get_recipe,
    load_model,
    model_for,
    recipe_of,
)
from mlshift_jax.models.usermodels import recipe, wrap
from mlshift_jax.models.weights import load, metadata, save
from mlshift_jax.models.zoo import (
    BUILTINS,
    MODELS,
    STUDY_SPEC,
    Builtin,
    Model,
    Params,
    Spec,
    build,
    infer_model,
    predict,
)

__all__ = [
    "BUILTINS", "MODELS", "RECIPES", "STUDY_SPEC", "Builtin", "Model", "Params", "Recipe",
    "Spec", "TrainConfig", "build", "build_model", "builtin_recipe", "fit", "fit_model",
    "get_recipe", "infer_model", "load", "load_model", "metadata", "model_for", "predict",
    "recipe", "recipe_of", "resolve", "save", "wrap",
]
