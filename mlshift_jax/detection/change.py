"""Has this model changed compared with a reference, and how? `detect_pair`, for the CLI.

    detect_pair(reference_params, suspect_params, ds) -> {"verdict", "p_value", "category",
                                                          "fingerprint", ...}

1. The **calibration set** (`calibrate`): `n_null` (default 104) benign models of the
   reference's architecture (its recipe's trainer, its hidden size; a user model
   "pkg.module:attr" retrains its own Model, the one `registry.load_model` rebuilt, with the
   harness's minibatch trainer and the reference's training settings), each one of the 13
   benign variants of `benign.benign_null` in turn (retrains with other seeds, samples,
   epochs and learning rates; magnitude pruning; 8- and 4-bit and float16 weights; a clean
   fine-tune; distillation), each on its own random sample of `sample_size` training images
   with its own seed and parent, so what users do to clean models every day is part of "no
   change"; plus a few models trained on poisoned data (`poisonings` x `poison_seeds`,
   one population: `retrain.train_sampled`), all answering
   the probe set (`fingerprint.make_probes`), and each with its triggers reversed by a short
   Neural Cleanse search (`fingerprint.reverse`). Only their responses on the probes and the
   summaries of their smallest reversed triggers are kept, and cached on disk (`cache_dir`,
   by default `data.cache_dir("detect")`), named by the hash of everything they depend on;
   a second call with the same architecture and data loads them.
2. The **test** (`fingerprint.change_test`): the suspect's fingerprint against the reference,
   compared with the fingerprints of the null's benign models against the same reference; verdict
   "changed" when the combined (min-p) p-value <= alpha. The reference's and the suspect's
   triggers are reversed here (`model_triggers`; the reference's are cached by its weights,
   the null's come with the calibration). An alpha the null cannot reach
   (alpha < 1 / (n_null + 1)) is refused before anything is trained.
3. The **category** (`categorize`): a categorizer fitted, for this reference, on the
   fingerprints of the calibration models (benign models = "none", poisoned models = their
   kind) and of the reference behind input changes of the probes (`attacks`: noise and
   adversarial inputs; `input_change_features`, cached by the reference's weights), its
   abstention threshold chosen by leave-one-group-out over them
   (the benign models in 4 groups, each poisoning and attack its own). The category agrees
   with the verdict (`categorize.decide`): "unchanged" reports "none"; "changed" reports
   the most probable category, or "uncertain" (changed, kind uncertain) when that is "none"
   or below the threshold. `category_probabilities` has the full picture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.attacks import attack_key, get_attack
from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.core.files import cached_npz, config_hash, tree_digest
from mlshift_jax.data.datasets import Dataset, cache_dir, content_hash
from mlshift_jax.detection import benign, categorize, fingerprint
from mlshift_jax.models.population import plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import recipe_of
from mlshift_jax.models.retrain import train_sampled
from mlshift_jax.models.zoo import STUDY_SPEC, Model, Params, arch_of, check_spec, infer_model
from mlshift_jax.poisoning.poison import make_config

CALIBRATION_CACHE_VERSION = 3  # bump when a calibration's meaning changes: old caches ignored
CALIBRATION_STREAM = 0xC0FFEE  # member seeds of a calibration start here (+ seed * 10,000)
TRIGGER_STREAM = 0x7217  # the trigger search's key: fold_in(key(seed), this)


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration set is built. n_null: the null's models; benign: they are the
    benign variants of `benign.VARIANTS` in turn (retrains, pruned, quantized, fine-tuned,
    distilled; False: clean retrains only); poisonings, attacks: (kind, fraction or eps);
    epochs: of every calibration model (None: the recipe's default); probes, n_patched: the
    probe set's size and how many of them the trigger search uses; trigger_steps,
    trigger_batch: the search's Adam steps per class and images per step (the suspect's
    search at detect time uses the same)."""

    n_null: int = 104
    sample_size: int = 10_000
    poisonings: tuple[tuple[str, float], ...] = (
        ("wrong-label", 0.1), ("wrong-label", 0.3), ("trigger", 0.1), ("trigger", 0.3),
        ("mixture", 0.05), ("mixture", 0.2))
    poison_seeds: int = 2
    attacks: tuple[tuple[str, float], ...] = (
        ("noise-sign", 0.1), ("noise-sign", 0.2), ("fgsm", 0.1), ("fgsm", 0.2),
        ("pgd", 0.1), ("pgd", 0.2))
    probes: int = 1000
    n_patched: int = 200
    epochs: int | None = None
    seed: int = 0
    trigger_steps: int = fingerprint.TRIGGER_SCAN.steps
    trigger_batch: int = fingerprint.TRIGGER_SCAN.batch
    benign: bool = True

    @property
    def trigger_scan(self):
        """The trigger search's `neural_cleanse.ScanConfig`."""
        return fingerprint.TRIGGER_SCAN._replace(steps=self.trigger_steps,
                                                 batch=self.trigger_batch)

    def validate(self) -> CalibrationConfig:
        """Raise ConfigError for settings that cannot work; return self."""
        if self.n_null < 2:
            raise ConfigError(f"calibration: expected n_null >= 2, found {self.n_null}")
        if self.sample_size < 1 or self.poison_seeds < 0:
            raise ConfigError(f"calibration: expected sample_size >= 1 and poison_seeds >= 0, "
                              f"found {self.sample_size} and {self.poison_seeds}")
        for kind, fraction in self.poisonings:
            make_config(kind, fraction=fraction)
        for kind, _ in self.attacks:
            get_attack(kind)
        self.trigger_scan.validate()
        return self


@dataclass(frozen=True, eq=False)
class Calibration:
    """Responses on `probes` of the null's benign models (`null`, leading axis n_null) and of the
    changed models (`changed`, leading axis m, kinds in `changed_kinds`), and the summaries
    of their smallest reversed triggers (`null_triggers`, `changed_triggers`); recipe and
    hidden: what they were trained as."""

    probes: fingerprint.ProbeSet
    null: fingerprint.Responses = field(repr=False)
    changed: fingerprint.Responses = field(repr=False)
    null_triggers: fingerprint.TriggerSummary = field(repr=False)
    changed_triggers: fingerprint.TriggerSummary = field(repr=False)
    changed_kinds: tuple[str, ...]
    recipe: str
    hidden: int
    config: CalibrationConfig

    def describe(self) -> dict:
        """JSON-able summary, for the report of a verdict."""
        return {"n_null": int(self.null.probs.shape[0]), "recipe": self.recipe,
                "hidden": self.hidden, "sample_size": self.config.sample_size,
                "probes": self.probes.size, "n_changed_models": len(self.changed_kinds)}


def changed_inputs(model: Model, params: Params, probes: fingerprint.ProbeSet,
                   attacks: tuple[tuple[str, float], ...], key: jax.Array) -> jax.Array:
    """Each input change (attack, eps) of `attacks` applied to the probes, against `params`,
    with the probes' labels: -> [len(attacks), P, D]."""
    out = []
    for i, (kind, eps) in enumerate(attacks):
        attack = get_attack(kind)
        kw = {"key": jax.random.fold_in(key, i)} if attack.needs_key else {}
        out.append(attack.fn(model, params, probes.x, probes.y, eps=eps, **kw))
    return jnp.stack(out)


def _cache_key(recipe: str, hidden: int, ds: Dataset, cfg: CalibrationConfig,
               model: Model | None = None, train: TrainConfig | None = None) -> str:
    """sha256 (12 hex digits) of the canonical JSON of everything a calibration depends on
    (a user model adds its name and hyper-parameters, a given TrainConfig its fields; the
    user's code itself is not hashed: clear the cache after editing it)."""
    payload = {"version": CALIBRATION_CACHE_VERSION, "recipe": recipe, "hidden": hidden,
               "dataset": ds.name, "source": ds.source, "n_train": len(ds.y_train),
               "n_test": len(ds.y_test), "config": asdict(cfg)}
    if model is not None:
        payload["model"] = [model.name, repr(model.hparams), list(model.input_shape),
                            model.n_classes, list(model.input_range)]
    if train is not None:
        payload["train"] = asdict(train)
    if tuple(ds.spec) != tuple(STUDY_SPEC):  # MNIST keys as before; other data by content
        payload["data"] = [content_hash(ds), list(ds.image_shape), ds.n_classes,
                           list(ds.input_range)]
    return config_hash(payload)


_CACHED = (("null", fingerprint.Responses), ("changed", fingerprint.Responses),
           ("null_trig", fingerprint.TriggerSummary),
           ("changed_trig", fingerprint.TriggerSummary))  # cache key prefixes, in field order


def trigger_key(seed: int) -> jax.Array:
    """The key of every trigger search of a calibration (and of the detect call using it):
    the same search for the null's models, the reference and the suspect."""
    return _trigger_key(np.uint32(seed))


@jax.jit
def _trigger_key(seed):  # one program rather than four eager ones
    return jax.random.fold_in(jax.random.key(seed), TRIGGER_STREAM)


def _reference_payload(model: Model, params: Params, null: Calibration) -> dict:
    """What a per-model cache entry depends on: the model, its weights, the probes, the
    trigger search and the calibration's seed."""
    cfg = null.config
    return {"version": CALIBRATION_CACHE_VERSION, "model": model.name,
            "params": tree_digest(params),
            "probes": tree_digest(null.probes.index), "n_patched": null.probes.n_patched,
            "scan": list(cfg.trigger_scan), "seed": cfg.seed}


def _folder(cache_path) -> Path:
    return Path(cache_path) if cache_path is not None else cache_dir("detect")


def model_triggers(model: Model, params: Params, null: Calibration, *, cache: bool = True,
                   cache_path: str | os.PathLike | None = None) -> fingerprint.TriggerSummary:
    """The smallest reversed trigger of one model (`fingerprint.reverse`, the calibration's
    search, key and probes), cached on disk by the model's weights when `cache`: a
    reference tested against many suspects is searched once. -> TriggerSummary (no leading
    axis, host arrays)."""
    def search():
        one = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[None], params))
        found = fingerprint.reverse(model, one, null.probes, key=trigger_key(null.config.seed),
                                    config=null.config.trigger_scan)
        return {k: np.asarray(v)[0] for k, v in found._asdict().items()}

    key = config_hash(_reference_payload(model, params, null))
    path = _folder(cache_path) / f"triggers-{key}.npz"
    found = cached_npz(path, search, what="cached reversed triggers", read=cache, write=cache)
    return fingerprint.TriggerSummary(**{k: found[k] for k in fingerprint.TriggerSummary._fields})


def input_change_features(model: Model, reference: Params, null: Calibration, *,
                          ref: fingerprint.Responses, ref_triggers: fingerprint.TriggerSummary,
                          seed: int, cache: bool = True,
                          cache_path: str | os.PathLike | None = None) -> np.ndarray:
    """The fingerprints of the reference behind each input change of the calibration's
    `attacks` (`changed_inputs` on the probes, key `attack_key(seed)`), against itself:
    float64 [len(attacks), len(FEATURES)], the categorizer's rows for input changes.
    ref, ref_triggers: the reference's responses and reversed trigger. Cached on disk by the
    reference's weights when `cache`: a reference tested against many suspects attacks its
    probes once."""
    probes = null.probes

    def compute():
        xs = changed_inputs(model, reference, probes, null.config.attacks, attack_key(seed))
        return {"features": fingerprint.feature_matrix({
            **fingerprint.fingerprints(ref, fingerprint.input_responses(
                model, reference, xs, probes), probes.y),
            **fingerprint.input_trigger_features(model, reference, ref_triggers, xs,
                                                 probes)})}

    payload = {**_reference_payload(model, reference, null), "attack_seed": seed,
               "attacks": [list(a) for a in null.config.attacks]}
    path = _folder(cache_path) / f"input-changes-{config_hash(payload)}.npz"
    return cached_npz(path, compute, what="cached input-change fingerprints", read=cache,
                      write=cache)["features"]


def _one(tree):
    """A leading axis of 1 on every leaf (host-side: no programs)."""
    return jax.tree.map(lambda a: np.asarray(a)[None], tree)


def _rows(*trees):
    """Trees of the same structure concatenated along their leading axis (host-side)."""
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *trees)


def _within(config, n_classes: int):
    """config with its target class (the study's 3 by default) moved to the last class where
    the data has fewer classes (a 3-class dataset has no class 3)."""
    target = getattr(config, "target", None)
    if target is not None and target >= n_classes:
        return replace(config, target=n_classes - 1)
    return config


def calibrate(recipe: str | None, hidden: int, ds: Dataset,
              config: CalibrationConfig | None = None, *, model: Model | None = None,
              train: TrainConfig | None = None, cache: bool = True,
              cache_path: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> Calibration:
    """Train (or load from the cache) the calibration set of `recipe` at width `hidden`.

    recipe: a built-in JAX recipe or a user ref "pkg.module:attr" (`population.plan_for`), or
    None for a user's Model without a ref (then `model` is required and the calibration's
    recipe is its name); model: the Model to retrain (None: the one the recipe builds for
    `ds`), e.g. the
    reference's from `registry.load_model`, so its hyper-parameters carry over; train: the
    TrainConfig the retrains use (lr, batch size, optimizer, epochs; None: the recipe's
    defaults; `config.epochs`, when set, wins). cache: read and write the cache; cache_path:
    its folder (default `data.cache_dir("detect")`); log: called with one line before a
    calibration is trained (not when it is read from the cache), e.g. to tell a CLI user.
    The population is one jit. The probes are min(config.probes, test images); the patched
    ones at most that many.
    """
    cfg = (config or CalibrationConfig()).validate()
    name = recipe if recipe is not None else getattr(model, "name", None)
    n_probes = min(cfg.probes, len(ds.y_test))
    probes = fingerprint.make_probes(ds.x_test, ds.y_test, n=n_probes,
                                     n_patched=min(cfg.n_patched, n_probes), seed=cfg.seed,
                                     spec=ds.spec)
    kinds = tuple([f"{k} {f:g}" for k, f in cfg.poisonings] * cfg.poison_seeds)
    key = _cache_key(recipe, hidden, ds, cfg, model, train)
    path = _folder(cache_path) / f"calibration-{key}.npz"

    def parts_of(arrays):
        return [record(*(arrays[f"{what}_{k}"] for k in record._fields))
                for what, record in _CACHED]

    def compute():
        changed = [_within(make_config(k, fraction=f), ds.n_classes)
                   for k, f in cfg.poisonings] * cfg.poison_seeds
        seeds = (CALIBRATION_STREAM + cfg.seed * 10_000
                 + np.arange(cfg.n_null + len(changed))).tolist()
        size = min(cfg.sample_size, len(ds.y_train))
        variants = benign.VARIANTS if cfg.benign else ("retrain",)
        if log is not None:
            log(f"calibrating: training {cfg.n_null} benign models ({len(variants)} variants "
                f"in turn) and {len(changed)} changed models on {size:,} images each, once "
                f"for this architecture and data (cached in {path.parent})")
        base = train if train is not None else TrainConfig()
        epochs = cfg.epochs if cfg.epochs is not None else base.epochs
        plan = plan_for(recipe, replace(base, hidden=hidden, epochs=epochs, seed=0), ds.spec,
                        model=model)
        null_params, _ = benign.benign_null(
            plan, ds.x_train, ds.y_train, seeds=seeds[:cfg.n_null], size=size,
            chunk=benign.train_chunk(cfg.n_null, size, ds.spec.n_inputs), variants=variants,
            log=log)
        params = null_params
        if changed:  # group by group within the null's memory budget, as its members train
            pop, _ = train_sampled(
                plan, changed, ds.x_train, ds.y_train, seeds=seeds[cfg.n_null:], size=size,
                chunk=benign.train_chunk(len(changed), size, ds.spec.n_inputs),
                progress=None if log is None else lambda done, m, s: log(
                    f"calibration: trained {done} of {m} changed models, {s:.0f} s"))
            params = jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), b]),
                                  null_params, pop.params)
        resp = fingerprint.model_responses(plan.arch, params, probes)
        found = fingerprint.reverse(plan.arch, params, probes, key=trigger_key(cfg.seed),
                                    config=cfg.trigger_scan)
        parts = [jax.tree.map(lambda a: a[:cfg.n_null], resp),
                 jax.tree.map(lambda a: a[cfg.n_null:], resp),
                 jax.tree.map(lambda a: a[:cfg.n_null], found),
                 jax.tree.map(lambda a: a[cfg.n_null:], found)]
        return {f"{what}_{k}": np.asarray(v)
                for (what, _), part in zip(_CACHED, parts, strict=True)
                for k, v in part._asdict().items()}

    arrays = cached_npz(path, compute, what="a cached calibration", read=cache, write=cache,
                        check=parts_of)
    parts = parts_of(arrays)
    return Calibration(probes, *parts, kinds, name, hidden, cfg)


def check_pair(reference: Params, suspect: Params, spec=None, *, model: Model | None = None,
               suspect_model: Model | None = None,
               names: tuple[str, str] = ("the reference", "the suspect")) -> str:
    """The name of the architecture both params are for; ConfigError if they are not the
    same model. spec (a models.Spec or Dataset): the data's, checked against the params'
    shapes; None checks the params alone (before the data is loaded).

    model, suspect_model: the Models the files name (`registry.load_model`; suspect_model
    defaults to model). Given, params of any pytree (flax, equinox) are compared by their
    structure and shapes, and the models by name and input spec; None infers a built-in
    architecture from the arrays' names (`models.infer_model`). names: how the messages
    call the two (the CLI passes its options and paths).
    """
    ref, sus = names
    if model is not None:
        return _check_models(reference, suspect, spec, model, suspect_model or model, names)
    model, other = (_arch(p, spec) for p in (reference, suspect))
    if other != model:
        raise ConfigError(f"detect: expected {sus} to be a {model} like {ref}, found a "
                          f"{other}")
    if _shapes(reference) != _shapes(suspect):
        raise ConfigError(f"detect: expected {sus}'s arrays to have {ref}'s shapes, found "
                          f"{_differing(reference, suspect, ref)}")
    _check_finite(reference, suspect, names)
    return model


def _check_models(reference: Params, suspect: Params, spec, model: Model,
                  other: Model, names: tuple[str, str]) -> str:
    """check_pair for given Models: same name and spec, same pytree shapes, finite weights."""
    ref, sus = names
    if (model.name, model.spec) != (other.name, other.spec):
        raise ConfigError(f"detect: expected {sus} to be a {model.name} on images "
                          f"{tuple(model.input_shape)} with {model.n_classes} classes like "
                          f"{ref}, found a {other.name} on {tuple(other.input_shape)} with "
                          f"{other.n_classes}")
    if spec is not None:
        spec = check_spec(spec)
        if (tuple(spec.input_shape), spec.n_classes) != (tuple(model.input_shape),
                                                         model.n_classes):
            raise ConfigError(f"detect: {model.name} takes images {tuple(model.input_shape)} "
                              f"with {model.n_classes} classes; the data has "
                              f"{tuple(spec.input_shape)} with {spec.n_classes}: pass the "
                              "--dataset the models were trained on")
    shapes_r = jax.tree.map(np.shape, reference)
    shapes_s = jax.tree.map(np.shape, suspect)
    if jax.tree.structure(reference) != jax.tree.structure(suspect) or shapes_r != shapes_s:
        raise ConfigError(f"detect: expected {sus}'s arrays to have {ref}'s structure and "
                          f"shapes, found {_differing(reference, suspect, ref)}")
    _check_finite(reference, suspect, names)
    return model.name


def _check_finite(reference: Params, suspect: Params, names: tuple[str, str]) -> None:
    for name, params in zip(names, (reference, suspect), strict=True):
        if not all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(params)):
            raise DataError(f"detect: expected finite weights in {name}, found NaN or inf")


def _differing(reference: Params, suspect: Params, ref: str) -> str:
    """The suspect's arrays whose shapes differ from the reference's (or that one side
    lacks): 'name (suspect's shape; ref has (its shape))' joined by ', '."""
    r, s = _shapes(reference), _shapes(suspect)
    return ", ".join(f"{k} {s.get(k, '(absent)')} ({ref} has {r.get(k, 'none')})"
                     for k in sorted(set(r) | set(s)) if r.get(k) != s.get(k))


def _shapes(params: Params) -> dict:
    from mlshift_jax.models.weights import path_name

    return {path_name(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _arch(params: Params, spec) -> str:
    """The built-in architecture of params; without a spec, by array names alone (shapes
    the params alone cannot place, e.g. a CNN's image size, are checked once data is
    given)."""
    if spec is not None:
        return infer_model(params, spec).name
    try:
        return infer_model(params).name
    except ConfigError:
        name = arch_of(params)
        if name is None:
            raise
        return name


def detect_pair(reference_params: Params, suspect_params: Params, ds: Dataset, *,
                null: Calibration | None = None, seed: int = 0, alpha: float | None = None,
                config: CalibrationConfig | None = None, cache: bool = True,
                cache_path: str | os.PathLike | None = None, model: Model | None = None,
                recipe: str | None = None, train: TrainConfig | None = None,
                suspect_model: Model | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Test whether `suspect_params` behaves as a changed version of `reference_params`.

    reference_params, suspect_params: params of the same architecture (e.g. from
    `registry.load_model`); ds: the dataset they were trained on (training images for the
    clean retrains, test images for the probes); null: a `Calibration` (None: `calibrate`
    one, cached); seed: of the calibration set and of the random input changes; alpha: the
    test's level, its false-positive rate on benign models (None: `fingerprint.ALPHA`,
    0.05); ConfigError when the null is too small for it (alpha < 1 / (n_null + 1),
    `fingerprint.check_alpha`), before any training.

    model: the reference's Model (`registry.load_model`); None infers a built-in from the
    arrays' names. recipe: the recipe its retrains use (default: the model's name for a user
    model "pkg.module:attr", the built-in trainer of its architecture otherwise); train: the
    reference's TrainConfig, for the retrains (see `calibrate`); suspect_model: the suspect's
    Model, checked against model; log: passed to `calibrate` (one line before training a
    calibration). A user model (any name but the built-in architectures
    seed-mlp, mlp-ce, cnn) retrains that very Model with the harness's minibatch trainer
    (`usermodels.DEFAULTS` where `train` leaves a setting None); its calibration reports
    hidden = the TrainConfig's (unused by the model).

    Returns a JSON-able dict: verdict ("changed" / "unchanged"), p_value and p_resolution
    (1 / (n_null + 1), the smallest p-value this null gives), alpha, statistic,
    category, category_probabilities, changed_probability, feature_p_values, fingerprint
    (features, transition matrix, KS p-value), architecture, calibration.
    """
    n_null = (config or CalibrationConfig()).n_null if null is None else int(
        null.null.probs.shape[0])
    alpha = fingerprint.check_alpha(fingerprint.ALPHA if alpha is None else alpha,
                                    n_null)  # before any training: one line
    reference = jax.device_put(reference_params)  # transfers, not programs
    suspect = jax.device_put(suspect_params)
    check_pair(reference, suspect, ds.spec, model=model, suspect_model=suspect_model)
    if model is None:
        model = infer_model(reference, ds.spec)
    own, hidden, user = recipe_of(model, reference, train)  # a user's: retrain the Model
    recipe = own if recipe is None else recipe
    if null is None:
        cfg = config or CalibrationConfig(seed=seed)
        null = calibrate(recipe, hidden, ds, cfg, cache=cache, cache_path=cache_path,
                         model=model if user else None, train=train, log=log)
    wrong = (null.recipe != (recipe or model.name) if user else
             plan_for(null.recipe, spec=ds.spec).arch.name != model.name)
    if null.hidden != hidden or wrong:
        raise ConfigError(f"detect: expected a calibration for {model.name} with hidden "
                          f"{hidden}, found {null.recipe} with hidden {null.hidden}")
    probes = null.probes
    ref = fingerprint.responses(model, reference, probes)
    sus = fingerprint.responses(model, suspect, probes)
    ref_t = model_triggers(model, reference, null, cache=cache, cache_path=cache_path)
    sus_t = model_triggers(model, suspect, null, cache=False)

    # every fingerprint against the reference in one call each (one program, not one per
    # group): rows = the null's benign models, the calibration's changed models, the suspect
    n, k = int(null.null.probs.shape[0]), len(null.changed_kinds)
    fp = fingerprint.fingerprints(ref, _rows(null.null, null.changed, _one(sus)), probes.y)
    fp.update(fingerprint.trigger_features(model, reference, ref_t, _rows(
        null.null_triggers, null.changed_triggers, _one(sus_t)), probes))
    every = fingerprint.feature_matrix(fp)
    null_fp = fingerprint.FeatureNull(every[:n])
    observed = every[n + k:]
    test = fingerprint.change_test(observed, null_fp)
    p_value = float(test.p_value[0])

    # the categorizer, fitted for this reference
    inputs_changed = input_change_features(model, reference, null, ref=ref, ref_triggers=ref_t,
                                           seed=seed, cache=cache, cache_path=cache_path)
    train_features = np.concatenate([every[:n + k], inputs_changed])
    labels = (["none"] * n
              + [categorize.category_of(kind.split()[0]) for kind in null.changed_kinds]
              + [categorize.category_of(kind) for kind, _ in null.config.attacks])
    groups = ([f"clean {i % 4}" for i in range(n)] + list(null.changed_kinds)
              + [f"{kind} {e:g}" for kind, e in null.config.attacks])
    model_c = categorize.fit(categorize.categorizer_inputs(train_features, null_fp), labels,
                             groups=groups)
    probs = model_c.predict_proba(categorize.categorizer_inputs(observed, null_fp))[0]
    verdict = "changed" if p_value <= alpha else "unchanged"
    category = categorize.decide(probs[None], [verdict], threshold=model_c.threshold,
                                 categories=model_c.categories)[0]
    one = {name: np.asarray(v)[n + k] for name, v in fp.items()}
    conf_r = np.asarray(ref.probs).max(-1)
    print_fp = fingerprint.to_json(one)
    print_fp["ks_pvalue"] = float(fingerprint.ks_pvalue(print_fp["ks"], len(conf_r),
                                                         len(conf_r)))
    print_fp["trigger_target"] = int(sus_t.target)  # the suspect's smallest trigger's class
    result = {
        "verdict": verdict,
        "p_value": p_value,
        "p_resolution": test.resolution,
        "alpha": alpha,
        "statistic": float(test.statistic[0]),
        "changed_probability": float(fingerprint.changed_probability(p_value)),
        "category": category,
        "category_probabilities": {c: float(p) for c, p in zip(model_c.categories, probs,
                                                                strict=True)},
        "feature_p_values": {n: float(p) for n, p in zip(null_fp.names, test.feature_p[0],
                                                          strict=True)},
        "fingerprint": print_fp,
        "architecture": model.name,
        "calibration": null.describe(),
    }
    json.dumps(result)  # fail here, not in the CLI, if anything is not JSON-able
    return result
