"""Resolving a model reference: the one place that turns a name or "pkg.module:attr" into a
`Recipe`, a weights file into a `Model`, and a Model into the recipe its retrains use.

    get_recipe(ref)                 -> Recipe   a built-in name or "pkg.module:attr"
    model_for(ref, spec, cfg)       -> Model    the Model recipe `ref` builds for the data
    fit_model(ref, cfg, x, y, spec) -> (Model, params)
    load_model(path, model=None)    -> (Model, params, meta) from a weights file
    recipe_of(model, params, train) -> (recipe, hidden, user) for the detectors' retrains

A "pkg.module:attr" reference imports user code (`usermodels.import_ref`) only when the user
passed it (an option, an argument): a weights file naming one never imports it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.models import usermodels, weights, zoo
from mlshift_jax.models.recipes import RECIPES, Recipe, TrainConfig, resolve
from mlshift_jax.models.zoo import STUDY_SPEC, Model, Params, Spec, check_spec, guess_spec


def get_recipe(ref: str, hparams=None) -> Recipe:
    """The recipe `ref`: a built-in name (`RECIPES`), or a user ref "pkg.module:attr"
    (`usermodels.recipe`, with `hparams` for its factory). ConfigError naming the known
    ones otherwise."""
    if isinstance(ref, str) and ":" in ref:
        return usermodels.recipe(ref, hparams)
    try:
        return RECIPES[ref]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model {ref!r}; expected one of {sorted(RECIPES)} or "
                          "pkg.module:attr") from None


def builtin_recipe(arch: str) -> Recipe | None:
    """The default recipe of built-in architecture `arch` (the recipe named after it), None
    when `arch` is not a built-in (a user's model). ConfigError for a built-in without one."""
    if arch not in zoo.BUILTINS:
        return None
    recipe = RECIPES.get(arch)
    if recipe is None or recipe.arch != arch:
        raise ConfigError(f"model {arch!r}: expected a recipe named {arch!r} building it in "
                          f"models.RECIPES, found {recipe}")
    return recipe


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


def build_model(ref: str, *, input_shape=None, n_classes=None, input_range=None,
                hparams=None) -> Model:
    """The Model a weights file's metadata names: built-in or "pkg.module:attr", for the
    stored input shape, classes, range and hyper-parameters (None: MNIST's)."""
    spec = Spec(tuple(input_shape or STUDY_SPEC.input_shape),
                int(n_classes or STUDY_SPEC.n_classes),
                tuple(input_range or STUDY_SPEC.input_range))
    hparams = weights.check_hparams(ref, dict(hparams or {}), f"model {ref!r}")
    user = ":" in ref
    hidden = None if user else hparams.get("hidden")
    cfg = TrainConfig(**({"hidden": int(hidden)} if hidden else {}))
    return get_recipe(ref, hparams if user else None).build(spec, cfg)


def load_model(path: str | os.PathLike, model=None):
    """(Model, params, meta) from a weights file. Nothing the file holds is imported or called.

    model: None, a "pkg.module:attr" reference, or a built `models.Model` (e.g. from
    `wrap(obj).build(spec)`). The metadata's model reference is a string only: a built-in
    name is built from it (for the stored input shape, range, classes and hidden width); a
    "pkg.module:attr" reference is user code, used only when the caller passes that same
    reference as `model` (a different one is refused) - the file alone never makes the tool
    import a module. A built Model is used as it is. A metadata-free file is matched against
    the built-in layouts (`models.infer_model`). Hyper-parameters from the file are checked as
    data (`check_hparams`) before anything is built, and the arrays must have exactly the
    shapes the model built from the metadata initialises (a hidden width that disagrees with
    the arrays is refused).

    DataError when the file, its metadata or its arrays are bad (one line naming the field);
    ConfigError when the reference is user code not passed as `model`, differs from the
    one passed, or cannot be resolved.
    """
    if model is not None and not isinstance(model, str) and not hasattr(model, "apply"):
        raise ConfigError(f"load_model: expected model=None, a 'pkg.module:attr' string or a "
                          f"built Model, found {type(model).__name__}")
    shown = str(path)
    params, meta = weights.load(path)
    ref = (meta.get("model") or {}).get("ref")
    if isinstance(model, str):
        given = model
        if ref is None:
            raise ConfigError(f"{shown}: the model {given!r} was given, but the file's "
                              "metadata names no model; load it without the option")
        if given != ref:
            raise ConfigError(f"{shown}: its model is {ref!r}, not {given!r} as given; pass "
                              f"the reference the file was saved with, or another file")
        if ":" not in given:
            model = None  # a built-in name: built below, as without the option
    if model is None and ref is None:
        if not isinstance(params, dict):
            raise DataError(f"{shown}: expected metadata naming the model, or the arrays of a "
                            "built-in model; found neither")
        return zoo.infer_model(params), params, meta
    if model is None or isinstance(model, str):
        if model is None and ":" in ref:
            raise ConfigError(f"{shown}: its model is {ref!r}, user code that is never "
                              "imported because a file names it; to run it, pass it yourself: "
                              f"--model {ref} (API: load_model(path, model={ref!r}))")
        if ":" not in ref and ref not in RECIPES:
            raise ConfigError(f"{shown}: its model {ref!r} is neither a built-in name "
                              f"({', '.join(sorted(RECIPES))}) nor a pkg.module:attr "
                              "reference; pass the model: load_model(path, model=...)")
        hparams = weights.check_hparams(ref, (meta.get("model") or {}).get("hparams"), shown)
        model = build_model(ref, input_shape=meta.get("input_shape"),
                            n_classes=meta.get("n_classes"),
                            input_range=meta.get("input_range"), hparams=hparams)
        _same_shapes(model, params, shown)
    usermodels.fit_check(model, params, where=shown)
    return model, params, meta


def _same_shapes(model, params, shown: str) -> None:
    """DataError unless params have exactly the arrays (names, shapes) model.init makes."""
    try:
        expected = jax.eval_shape(model.init, jax.random.key(0))
    except Exception:  # noqa: BLE001 - an init that needs more than a key: fit_check decides
        return
    want = {k: tuple(v.shape) for k, v in _shape_flat(expected).items()}
    got = {k: tuple(np.shape(v)) for k, v in _shape_flat(params).items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[:3]
        shown_diff = ", ".join(f"{k}: metadata gives {want.get(k)}, arrays {got.get(k)}"
                               for k in diff)
        raise DataError(f"{shown}: the weights do not fit the model its metadata describes "
                        f"(model.hparams / input_shape / n_classes): {shown_diff}")


def _shape_flat(tree) -> dict:
    return {weights.path_name(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def recipe_of(model: Model, params: Params,
              train: TrainConfig | None = None) -> tuple[str | None, int, bool]:
    """(recipe, hidden, user) of a model as the detectors retrain it (`scan.calibrate_null`,
    `change.calibrate`): a built-in architecture's own recipe (`builtin_recipe`) and its
    penultimate width; a user model "pkg.module:attr" its ref and the TrainConfig's hidden
    (unused by the model), None for a user's Model without a ref; user True for a user's
    model."""
    recipe = builtin_recipe(model.name)
    if recipe is not None:
        return recipe.name, zoo.hidden_size(model, params), False
    ref = model.name if ":" in model.name else None
    return ref, (train or TrainConfig()).hidden, True
