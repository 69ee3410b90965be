"""The public Python API in a few calls (re-exported by `mlshift_jax`); every `mlshift`
command is one or two of them:

    ds = load_dataset("mnist" or "data.npz")          -> datasets.Dataset
    model, params = fit(Net(), ds, epochs=2)           built-in name, "pkg.mod:attr", a flax /
                                                       equinox / Model / Recipe object, or a Model
    model, params = adv_fit("mlp-ce", ds, eps=0.1, steps=7)   PGD adversarial training
    x_adv = attack("fgsm", model, params, x, y, eps=0.1)
    evaluate(model, params, x, y)                      accuracy, P/R/F1 (macro), confidence
    defended, params = defend("median", model, params, ds, key=key)
    attack_table(model, params, x, y, ["fgsm", "pgd"], [0.1, 0.3])   rows + obfuscation flags
    poison_dataset(ds, "mixture", fraction=0.1, patch=4, target=3) -> (Dataset, mask)
    poison_and_fit(ds, "mixture", ...) / poison_sweeps(ds)           one poisoned model / E4-E7
    detect_inputs(model, params, x)                    per-input detector scores
    detect_change(model, reference, suspect, ds)       changed? how? (model-level test)
    scan_model(model, params, ds) / scan_data(model, params, x, y, eps=0.1)   backdoor scans
    stability(ds, samples=10)                          E2: models on random training samples
    save_weights(path, params, metadata(model, ...)); load_model(path)
    run_matrix("bench/matrix.toml", out_dir="results/mine")

Every function takes the model's input shape, classes and range from the `Model`, so none
assumes MNIST. Errors are `ConfigError` / `DataError` in one line. The heavier subpackages
(bench, detection) are imported on first use, so `mlshift --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from mlshift_jax.attacks import attack_key, defenses, get_attack, gradient_report
from mlshift_jax.attacks.evaluate import Column, evaluate_under_attack, obfuscation_flags, timed
from mlshift_jax.data import datasets
from mlshift_jax.models import (
    Model,
    Params,
    Recipe,
    TrainConfig,
    builtin_recipe,
    get_recipe,
    model_for,
    usermodels,
)
from mlshift_jax.models.recipes import fill
from mlshift_jax.poisoning import poison as _poison


def load_dataset(name: str = "mnist", data_dir=None, **kw):
    """`datasets.load`: a built-in dataset name, or a path to a keras-style .npz, an IDX
    folder or CSVs. Returns a `datasets.Dataset`."""
    return datasets.load(name, data_dir, **kw)


def _recipe_for(model) -> Recipe:
    """The recipe that builds and trains `model`: a built-in name or "pkg.module:attr"
    (`models.get_recipe`); a Recipe as it is; a `Model` by its name: a built-in
    architecture is trained by the recipe of its name ("seed-mlp", "mlp-ce", "cnn"; pass
    "mlp-sgd" or "seed-mlp-numpy" to train the seed MLP their way), a "pkg.module:attr"
    model by that reference's recipe (already imported when the Model was built), any other
    Model record by the harness's minibatch trainer (`usermodels.wrap`); any other object
    `usermodels.wrap(obj)`. ConfigError for an unknown name or an object of no accepted type.
    """
    if isinstance(model, str):
        return get_recipe(model)
    if isinstance(model, Model):
        builtin = builtin_recipe(model.name)
        if builtin is not None:
            return builtin
        if ":" in model.name:
            return usermodels.recipe(model.name, dict(model.hparams))
        return usermodels.wrap(model, name=model.name)
    if isinstance(model, tuple) and callable(getattr(model, "build", None)):
        return model
    return usermodels.wrap(model)


def train_config(model, cfg: TrainConfig | None = None, **settings) -> TrainConfig:
    """The TrainConfig `fit(model, ...)` trains with: cfg and settings, their None fields
    filled with the recipe's defaults (`recipes.fill`). ConfigError for an unknown model
    or a bad setting."""
    recipe = _recipe_for(model)
    return fill(getattr(recipe, "defaults", None) or {},
                dataclasses.replace(cfg or TrainConfig(), **settings))


def build(model, ds, cfg: TrainConfig | None = None) -> Model:
    """The Model of `model` (a name, ref, object or Recipe; a Model is returned as it is)
    for dataset `ds`'s shape, with cfg's settings (hidden; None: TrainConfig())."""
    if isinstance(model, Model):
        return model
    recipe = _recipe_for(model)
    return recipe.build(usermodels.spec_of(ds), train_config(recipe, cfg))


def fit(model, ds, cfg: TrainConfig | None = None, **settings) -> tuple[Model, Params]:
    """Build `model` for `ds` and train it on ds.x_train / ds.y_train: (Model, params).

    model: a built-in name ("mlp-ce"), "pkg.module:attr", a flax linen Module instance, an
    nnx class, an equinox factory, a models.Model, a Recipe, or a Model returned earlier
    (retrained by `_recipe_for(model)`). cfg / settings: TrainConfig fields (epochs, lr,
    batch_size, optimizer, seed, hidden); None fields take the recipe's defaults
    (`recipes.fill`). ConfigError for a bad setting.
    """
    recipe = _recipe_for(model)
    cfg = train_config(recipe, cfg, **settings)
    built = build(model, ds, cfg)
    params = recipe.fit(built, cfg, ds.x_train, ds.y_train)
    return built, jax.block_until_ready(params)


def adv_fit(model: str, ds, cfg: TrainConfig | None = None, *, eps: float, steps: int,
            warmup: float = 0.0, **settings) -> tuple[Model, Params]:
    """Train built-in recipe `model` adversarially on ds's training split: PGD-`steps` at
    L∞ `eps` on every batch, eps ramped up over the first `warmup` share of training
    (`defenses.adv_fit`; Madry et al., ICLR 2018). Epochs left None take twice the recipe's.
    -> (the architecture, params)."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **settings)
    params = defenses.adv_fit(model, cfg, ds.x_train, ds.y_train, eps=eps, steps=steps,
                              warmup=warmup, spec=ds.spec)
    return model_for(model, ds.spec, cfg), jax.block_until_ready(params)


def attack(name: str, model: Model, params: Params, x, y, *, eps: float, seed: int = 0,
           **kw) -> jax.Array:
    """Attack `name` ("fgsm", "pgd", "noise-sign", ...; `attacks.ATTACKS`) at L∞ budget eps,
    clipped to the model's input range; random attacks draw from `attacks.attack_key(seed)`.
    x: [n, D], y: [n] -> x_adv: [n, D]."""
    lo, hi = model.input_range
    kw.setdefault("lo", lo)
    kw.setdefault("hi", hi)
    fn = get_attack(name)
    if fn.needs_key:
        kw.setdefault("key", attack_key(seed))
    return fn.fn(model, params, x, y, eps=eps, **kw)


def defend(name: str, model: Model, params: Params, ds, *, key: jax.Array,
           recipe: str | None = None, cfg: TrainConfig | None = None,
           eps: float | None = None) -> tuple[Model, Params]:
    """`model` behind defense `name` (`defenses.DEFENSES`) and the params it runs with: a
    preprocessing defense wraps the model (`denoise-ae` first fits its denoiser on
    ds.x_train with `key`); adv-train retrains built-in recipe `recipe` with `cfg` on ds's
    training split at L∞ `eps` (`defenses.adv_fit`). ConfigError for an unknown name."""
    defense = defenses.get_defense(name)
    if defense.kind == "training":
        params = defenses.adv_fit(recipe, cfg or TrainConfig(), ds.x_train, ds.y_train,
                                  eps=eps, spec=ds.spec)
        return defenses.build(name, model), params
    state = defenses.fit_state(name, model, ds.x_train, key=key)
    return defenses.build(name, model, state=state), params


def attack_options(attack, options: dict) -> dict:
    """The keywords of `options` (steps, restarts, queries, loss; None: the attack's own)
    that attack `attack` takes (APGD's iterations are `steps`)."""
    given = {k: v for k, v in options.items() if v is not None}
    kw = {k: v for k, v in given.items() if attack.accepts(k) and k != "target"}
    if "steps" in given and attack.accepts("iterations"):
        kw["iterations"] = given["steps"]
    if attack.targeted and "target" in given:
        kw["target"] = given["target"]
    return kw


def attack_table(model: Model, params: Params, x, y, attacks: Sequence[str],
                 eps: Sequence[float], *, seed: int = 0, rounds: int = 3,
                 options: dict | None = None, undefended: Params | None = None,
                 flags: bool = False) -> dict:
    """Each attack of `attacks` at each eps on (x: [n, D], y: [n]), one call per (attack,
    eps) timed over `rounds` calls after a compiling one, scored by `evaluate`
    (`attacks.evaluate_under_attack`). options: steps, restarts, queries, loss, target
    (None: each attack's own); undefended: the weights `transfer` crafts on (a model whose
    defense changed its weights); flags: also probe the model for obfuscated gradients.

    Returns {"rows": [{attack, eps, accuracy, precision, recall, f1, confidence,
    attack_seconds, compile_seconds, n_images, and for the gradient attacks zero_grad_frac,
    gradient_flag}], "flags": [one line per warning]}. The gradient report warns
    (`evasion.GradientMaskingWarning`) when most input gradients are zero.
    """
    from mlshift_jax.models.metrics import evaluate as _evaluate  # pandas: on first use

    options = dict(options or {})
    chosen = [get_attack(name) for name in attacks]
    key = attack_key(seed)
    grads = None
    if any(a.uses_gradient for a in chosen):  # warns in one line when flagged
        grads = gradient_report(model, params, x, y, key=jax.random.fold_in(key, 5))
    columns = [Column(a.name, a, attack_options(a, options)) for a in chosen]
    eval_key = jax.random.fold_in(key, 7)
    result = evaluate_under_attack(
        model, params, x, y, columns, list(eps), key=key, sweep=False,
        timer=lambda fn: timed(fn, rounds=rounds),
        score=lambda x_adv, i: _evaluate(model, params, x_adv, y, key=eval_key),
        source_params=undefended)
    n = int(x.shape[0])
    rows = []
    for r in result.rows:
        row = {"attack": r["attack"], "eps": r["eps"],
               **{k: v for k, v in r.items() if k not in (
                   "column", "attack", "eps", "median_s", "compile_s", "rounds")},
               "attack_seconds": r["median_s"], "compile_seconds": r["compile_s"],
               "n_images": n}
        if grads is not None and get_attack(r["attack"]).uses_gradient:
            row.update(zero_grad_frac=grads["zero_grad_frac"],
                       gradient_flag=grads["gradient_flag"])
        rows.append(row)
    raised = []
    if flags:
        _, raised = obfuscation_flags(model, params, x, y, result, key=key, eps=max(eps),
                                      steps=options.get("steps") or 10)
    return {"rows": rows, "flags": list(raised)}


def evaluate(model: Model, params: Params, x, y, *, clip: bool = False) -> dict[str, float]:
    """accuracy, precision, recall, f1 (macro over the model's classes) and confidence.
    Inputs outside the model's input range are a ConfigError; clip=True clips and counts
    them."""
    from mlshift_jax.models.metrics import evaluate as _evaluate

    return _evaluate(model, params, x, y, n_classes=model.n_classes, clip=clip)


def poison_dataset(ds, kind: str, *, seed: int = 0, **settings):
    """ds with its training split poisoned: (Dataset, mask: bool [n]) (`poison.make_config`
    settings: fraction, patch, target, mode, ...). The test split is left clean."""
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
    against a null of benign models (retrains, pruning, quantization, fine-tuning,
    distillation) on ds: verdict, p_value, category, fingerprint."""
    from mlshift_jax.detection.change import detect_pair

    return detect_pair(reference, suspect, ds, model=model, **kw)


def roc_auc(scores, labels) -> float:
    """ROC-AUC of scores against 0/1 labels (`detect.roc_auc`)."""
    from mlshift_jax.detection.detect import roc_auc as _roc_auc

    return _roc_auc(scores, labels)


def stability(ds, *, samples: int = 10, size: int = 10_000, hidden: int = 200,
              lr: float = 0.1, epochs: int = 1, seed: int = 0):
    """E2: `samples` seed-mlp models, model i trained on random subsample i of `size`
    training images, as one population (`bench.stability`). -> (table: one row per sample
    then mean / std / min / max, train_seconds)."""
    from mlshift_jax.bench.stability import stability as _stability

    return _stability(ds, samples=samples, size=size, hidden=hidden, lr=lr, epochs=epochs,
                      seed=seed)


def poison_and_fit(ds, kind: str, *, model: str = "seed-mlp", seed: int = 0,
                   **settings) -> dict:
    """Poison ds's training split (`kind`, `settings`: fraction, patch, target, mode,
    source), train `model` on it and score it on the clean and the triggered test set
    (`sweeps.poison_one`). -> {the scores, ..., "params": the trained weights}."""
    from mlshift_jax.bench import sweeps

    return sweeps.poison_one(ds, kind=kind, model=model, seed=seed, keep_params=True,
                             **settings)


def poison_sweeps(ds, *, model: str = "seed-mlp", log: Callable[[str], None] | None = None,
                  **settings):
    """The study's poisoning sweeps (E4-E7 and BadNets) on ds, each trained as one
    population: ({name: table}, findings table) (`sweeps.run_all`, `sweeps.findings`)."""
    from mlshift_jax.bench import sweeps

    tables = sweeps.run_all(ds, badnets_models=(model,), log=log, model=model, **settings)
    return tables, sweeps.findings(tables)


def scan_model(model: Model, params: Params, ds, **kw) -> dict:
    """Is there a backdoor in this model? Neural Cleanse (Wang et al. 2019) and MM-BD (Wang
    et al. 2024) in one verdict, calibrated on benign models of its recipe
    (`detection.scan.scan_model`; kw: config, null_config, train, log)."""
    from mlshift_jax.detection.scan import scan_model as _scan_model

    return _scan_model(model, params, ds, **kw)


def scan_data(model: Model, params: Params, x, y, *, eps: float, seed: int = 0,
              methods: Sequence[str] | None = None, reference=None) -> dict:
    """Which training samples (x: [n, D], y: [n], the data params were trained on) look
    poisoned? {method: Detection(score [n], flag [n], classes)} of every training-data
    detector in `methods` (`detect_data.scan`; eps: the assumed poisoned fraction;
    reference: a clean (x, y) for the detectors that take one)."""
    from mlshift_jax.detection import detect_data

    kw = {} if methods is None else {"methods": list(methods)}
    return detect_data.scan(model, params, x, y, eps=eps, key=attack_key(seed),
                            reference=reference, **kw)


def run_matrix(path, *, out_dir, only: str | None = None, force: bool = False, **kw):
    """Run an experiment matrix (TOML) into out_dir; its records as a DataFrame
    (`bench.runner.run`; kw: data_dir, dataset, sample_out_dir, reuse_stale, tiny,
    allow_code)."""
    from mlshift_jax.bench.runner import run

    return run(path, out_dir=out_dir, only=only, force=force, **kw)
