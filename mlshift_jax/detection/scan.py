"""Is there a backdoor in this model? A reference-free scan with a calibrated verdict.

    scan_model(model, params, ds) -> {"verdict", "target", "combined_p", "detectors", ...}

1. **Two scans, two trigger assumptions.** Neural Cleanse (`neural_cleanse.reverse_triggers`;
   Wang et al., IEEE S&P 2019) finds the smallest mask and pattern that send clean images to
   each class (one jitted `vmap` over classes) on `NullConfig.images` clean test images. It
   assumes a small trigger. MM-BD (`mm_bd.max_margins`; Wang et al., IEEE S&P 2024)
   assumes no trigger shape and needs no data: per class, the largest margin any input in
   the valid range reaches (gradient ascent from random starts, vmapped). Each is scored
   class by class against the same class in the null (`class_null`: the robust z of the
   class's log mask norm, or log margin, centred on the model's median class), the score
   the largest z and the target its class (`detector_scores`). Neural Cleanse's textbook
   anomaly index (each class against the model's other classes) is still reported.
2. **The null knows benign change** (`calibrate_null`, `benign.benign_null`): `n_null`
   (default 104) models of the suspect's recipe (its trainer, hidden size and training
   settings), each one of 13 benign variants in turn, each with a fresh parent of its own:
   retrains (other seeds and data orders, half samples, one epoch more, half and twice the
   learning rate), magnitude pruning 10/30/50%, weight quantization to 8 and 4 bits,
   float16, one epoch of fine-tuning on clean data, hard-label distillation. They train
   group by group (`benign.train_chunk`: one group's data within its budget, so the first scan
   of full MNIST stays under 3 GB) and are scanned group by group, each group a progress
   line on stderr. Both scores of every member are cached on disk (`data.cache_dir("scan")`,
   named by the hash of everything they depend on).
3. **One calibrated verdict** (`min_p_threshold`): each detector's score becomes an
   empirical tail p-value against the null (`tail_p`), and the verdict is "backdoor" when
   the smaller of the two is at most a cut-off calibrated on the null itself (each member's
   min-p against the others), so that at most alpha of the null is flagged whatever the
   detectors' dependence. The target is the class named by the detector with the smaller
   p-value. The null must hold `min_null(alpha)` = ceil(5 / alpha) models (100 at alpha
   0.05): an alpha it cannot resolve is refused, naming that size. With fewer than
   MIN_CLASSES classes the verdict is "inconclusive" (`weak_classes`).

**How the false-positive rate is measured** (`threshold_fpr`, `heldout_verdict`): on held-out
benign models. The null's members are split into `NullConfig.folds` folds (each fold holds
whole cycles of the variants); each fold is scored against the other folds' class medians
and spreads and judged by their cut-off and tail p-values, exactly as a suspect is judged
by the whole null. The members are independent (each its own
parent), so the share flagged estimates the rate at which a fresh benign model of the
recipe is called a backdoor; `threshold_fpr_by_variant` gives it per benign variant.
Neural Cleanse's textbook anomaly index of the norms themselves and its own threshold (at
least 2, at most alpha of the null above; `threshold`) are still reported, for reading.

Measured once with the CLI (full MNIST, a study seed-mlp of hidden 200, defaults: 104-model
null, alpha 0.05, on this project's 2-core CPU under a load of ~10; scored then within
each model, before the class-conditional scores): the null trained in 308 s and scanned in
1,781 s, peak RSS 1.85 GB (was 7.6 GB with the one-jit null); held-out FPR of the
verdict 0.038. What the current rule finds on models it never saw, per benign variant and
per trigger family and rate, is the held-out table of `make bench` (`bench/scan_bench.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.core.files import atomic_path, cached_npz, config_hash
from mlshift_jax.data.datasets import Dataset, cache_dir, content_hash, subsample
from mlshift_jax.detection import benign, class_null, mm_bd
from mlshift_jax.detection import neural_cleanse as nc
from mlshift_jax.models.population import plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import recipe_of
from mlshift_jax.models.zoo import Model, Params

NULL_CACHE_VERSION = 3  # bump when the null's meaning changes: old caches are ignored
NULL_STREAM = 0x5CA7  # member seeds of a null start here (+ seed * 10,000)
SCAN_STREAM = 0x5CA8  # fold_in(key(seed), SCAN_STREAM): the trigger search's key
MARGIN_STREAM = 0x5CA9  # fold_in(key(seed), MARGIN_STREAM): MM-BD's random starts
DETECTORS = {"neural-cleanse": nc.SIGN, "mm-bd": mm_bd.SIGN}  # name: sign of a suspicious value
# (small mask norms, large margins), the detectors' column order in every score array
SCAN_GROUP = 4  # null models per compiled scan call (a progress line after each group)
MIN_TAIL = 5  # null models allowed above the threshold at the least (`min_null`)
MIN_CLASSES = 6  # below this the anomaly index has too few other classes: "inconclusive"


def min_null(alpha: float) -> int:
    """The smallest null that resolves a threshold at alpha: MIN_TAIL of its models may lie
    above it (ceil(MIN_TAIL / alpha); 1 / alpha would leave the threshold on one model)."""
    return int(np.ceil(MIN_TAIL / alpha - 1e-9))


@dataclass(frozen=True)
class NullConfig:
    """How the null of clean models is built and the scan is run.

    n_null: clean models (>= 2; the threshold's false-positive rate moves in steps of
    1/n_null); sample_size: training images of each (None: all, each model in its own random
    order); images: clean test images the triggers are searched on (a fixed random subset);
    alpha: the share of the null allowed above the threshold (the null must hold at least
    `min_null(alpha)` models); epochs: of every null model (None: the suspect's training
    settings, else the recipe's default); seed: of the null's members, the images and the
    search; benign: members are the benign variants of `benign.VARIANTS` in turn (False:
    clean retrains only); folds: of the held-out false-positive rate (`heldout_fpr`).
    """

    n_null: int = 104
    sample_size: int | None = None
    images: int = 300
    alpha: float = 0.05
    epochs: int | None = None
    seed: int = 0
    benign: bool = True
    folds: int = 5

    def validate(self, where: str = "scan", flags: dict[str, str] | None = None) -> NullConfig:
        """Raise ConfigError for settings that cannot work; return self. where: the message's
        first word; flags: how the caller names a field (the CLI: {"n_null": "--null-models"});
        unnamed fields go by their own name."""
        name = {f: f for f in ("n_null", "images", "sample_size", "alpha", "folds")}
        name.update(flags or {})
        for f, lo in (("n_null", 2), ("images", 2)):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ConfigError(f"{where}: expected {name[f]} an integer >= {lo}, found "
                                  f"{value!r}")
        if self.sample_size is not None and (not isinstance(self.sample_size, (int, np.integer))
                                             or self.sample_size < 1):
            raise ConfigError(f"{where}: expected {name['sample_size']} >= 1 or None, found "
                              f"{self.sample_size!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"{where}: expected {name['alpha']} in (0, 1), found "
                              f"{self.alpha!r}")
        need = min_null(self.alpha)
        if self.n_null < need:
            raise ConfigError(f"{where}: {name['alpha']} {self.alpha:g} needs a null of at "
                              f"least {need} models, so that {MIN_TAIL} of them can lie above "
                              f"its threshold; found {name['n_null']} {self.n_null}: raise "
                              f"{name['n_null']} to {need}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or not (
                2 <= self.folds <= self.n_null):
            raise ConfigError(f"{where}: expected {name['folds']} an integer in 2.."
                              f"{name['n_null']}, found {self.folds!r}")
        period = len(benign.VARIANTS) if self.benign else 1
        others = self.n_null - int(np.bincount(folds_of(self.n_null, period, self.folds)).max())
        if others < class_null.MIN_REFERENCE + 1:  # a held-out fold's others, scored LOO
            raise ConfigError(f"{where}: expected every held-out fold to leave at least "
                              f"{class_null.MIN_REFERENCE + 1} other null models ({self.folds} "
                              f"folds of a null of {self.n_null} leave {others}); raise "
                              f"{name['n_null']}")
        return self


@dataclass(frozen=True, eq=False)
class Null:
    """The scanned clean models. norms, rates: [n_null, K] mask norms and attack rates;
    indices: [n_null] their anomaly indices; threshold: calibrated on them; recipe, hidden:
    what they were trained as; seconds: training and scanning time (0 when loaded)."""

    norms: np.ndarray = field(repr=False)
    rates: np.ndarray = field(repr=False)
    indices: np.ndarray
    threshold: nc.Threshold
    log_threshold: nc.Threshold
    recipe: str
    hidden: int
    config: NullConfig
    scan: nc.ScanConfig
    seconds: dict
    variants: tuple = ()
    heldout: dict = field(default_factory=dict)
    margins: np.ndarray | None = field(default=None, repr=False)
    margin: mm_bd.MarginConfig = mm_bd.DEFAULT
    scores: np.ndarray | None = field(default=None, repr=False)
    combined: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-able summary, for the report of a verdict."""
        counts = {v: self.variants.count(v) for v in dict.fromkeys(self.variants)}
        return {"n_null": int(self.indices.size), "recipe": self.recipe, "hidden": self.hidden,
                "sample_size": self.config.sample_size, "images": self.config.images,
                "alpha": self.config.alpha, "variants": counts,
                "heldout_fpr_by_variant": self.combined.get("by_variant", {}),
                "neural_cleanse_heldout_fpr": self.combined.get("nc_fpr"),
                "mm_bd_heldout_fpr": self.combined.get("mm_bd_fpr"),
                "anomaly_indices": self.indices.tolist(),
                "smallest_class": np.argmin(self.norms, -1).tolist(), **self.seconds}


def _progress(log, what: str):
    """progress(done, m, seconds) -> one log line ("null: trained 4 of 20 models, 31 s"), or
    None without a log."""
    if log is None:
        return None
    return lambda done, m, s: log(f"null: {what} {done} of {m} models, {s:.0f} s")


def scan_images(ds: Dataset, n: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """The clean images every model of a scan is searched on: a fixed random subset of n of
    the test images (x [n, D], y [n]). ConfigError when the test set has fewer."""
    m = len(ds.y_test)
    if n > m:
        raise ConfigError(f"scan: expected at most the {m} test images of {ds.name}, found "
                          f"images {n}")
    idx = np.sort(subsample(seed, m, n))
    return jnp.asarray(ds.x_test[idx], jnp.float32), jnp.asarray(ds.y_test[idx], jnp.int32)


def scan_key(seed: int) -> jax.Array:
    """The key of the trigger search (the suspect and its null share it)."""
    return jax.random.fold_in(jax.random.key(seed), SCAN_STREAM)


def margin_key(seed: int) -> jax.Array:
    """The key of MM-BD's random starts (the suspect and its null share it)."""
    return jax.random.fold_in(jax.random.key(seed), MARGIN_STREAM)


def _cache_key(recipe: str | None, hidden: int, ds: Dataset, cfg: NullConfig,
               scan: nc.ScanConfig, model: Model | None, train: TrainConfig | None,
               margin: mm_bd.MarginConfig = mm_bd.DEFAULT) -> str:
    """sha256 (12 hex) of everything the null depends on (a user model adds its name and
    hyper-parameters; the user's code itself is not hashed: clear the cache after editing)."""
    payload = {"version": NULL_CACHE_VERSION, "recipe": recipe, "hidden": hidden,
               "dataset": ds.name, "data": content_hash(ds), "null": asdict(cfg),
               "scan": scan._asdict(), "margin": margin._asdict(),
               "train": None if train is None else asdict(train)}
    if model is not None:
        payload["model"] = [model.name, repr(model.hparams), list(model.input_shape),
                            model.n_classes, list(model.input_range)]
    return config_hash(payload)


def detector_profiles(norms, margins) -> list[np.ndarray]:
    """Each detector's class profile (`class_null.profile`), in DETECTORS order: norms,
    margins [..., K] -> [[..., K], [..., K]]."""
    return [class_null.profile(norms), class_null.profile(margins)]


def null_scores(norms, margins) -> np.ndarray:
    """Each null member's detector scores against the other members (`class_null.loo_scores`):
    norms, margins [n, K] -> [n, len(DETECTORS)]."""
    return np.stack([class_null.loo_scores(prof, sign) for prof, sign in
                     zip(detector_profiles(norms, margins), DETECTORS.values(), strict=True)], 1)


def detector_scores(null_norms, null_margins, norms, margins) -> tuple[np.ndarray, np.ndarray]:
    """M suspects' detector scores against a null (`class_null.score`): -> (scores [M, d],
    targets [M, d]), d = len(DETECTORS)."""
    found = [class_null.score(ref, prof, sign) for ref, prof, sign in zip(
        detector_profiles(null_norms, null_margins), detector_profiles(norms, margins),
        DETECTORS.values(), strict=True)]
    return np.stack([f[0] for f in found], 1), np.stack([f[1] for f in found], 1).astype(int)


def log_norms(norms) -> np.ndarray:
    """log of the mask norms (floored at 1e-6): the anomaly index of these is scale-free,
    so one class with a very large norm (a hard-to-reach class) does not widen the MAD."""
    return np.log(np.maximum(np.asarray(norms, np.float64), 1e-6))


def folds_of(n: int, period: int, folds: int) -> np.ndarray:
    """The held-out fold of each of n null members: whole cycles of `period` members (one of
    each benign variant) go to one fold, so every fold holds every variant."""
    if n < period * folds:  # too few for whole cycles in every fold: deal members round
        return np.arange(n) % folds
    return (np.arange(n) // max(1, period)) % folds


def _rates(flagged: np.ndarray, variants: Sequence[str]) -> dict:
    """{"fpr": share flagged, "by_variant": {variant: share}} of flagged [n] bool."""
    names = np.asarray(list(variants))
    return {"fpr": float(flagged.mean()),
            "by_variant": {v: float(flagged[names == v].mean()) for v in dict.fromkeys(variants)}}


def _held_folds(n: int, variants: Sequence[str], folds: int, period: int | None):
    """(others, held) index masks of each fold with members on both sides (`folds_of`)."""
    period = len(dict.fromkeys(variants)) if period is None else period
    fold = folds_of(n, period, folds)
    for f in range(folds):
        held = fold == f
        if held.any() and not held.all():
            yield ~held, held


def heldout_fpr(scores, variants: Sequence[str], *, alpha: float, folds: int,
                floor: float = nc.TEXTBOOK_THRESHOLD, period: int | None = None) -> dict:
    """The false-positive rate on held-out benign models: the null's members are split
    into `folds` folds (`folds_of`); each fold is judged by the threshold set at alpha on
    the other folds, as the verdict's is on the whole null. scores: [n] (higher = more
    suspicious). -> {"fpr": share of held-out members flagged, "by_variant": {variant:
    share}, "folds": folds}. The members are independent (each its own parent), so this
    estimates the rate at which a fresh benign model is called a backdoor."""
    scores = np.asarray(scores, np.float64)
    flagged = np.zeros(len(scores), bool)
    for others, held in _held_folds(len(scores), variants, folds, period):
        flagged[held] = scores[held] > nc._threshold(scores[others], alpha, floor)
    return {**_rates(flagged, variants), "folds": folds}


def tail_p(null_scores, scores) -> np.ndarray:
    """Empirical upper-tail p-value of each detector's score against the null: (1 + #{null
    >= s}) / (n + 1). null_scores: [n, d]; scores: [d] -> [d]."""
    null_scores = np.asarray(null_scores, np.float64)
    ge = null_scores >= np.asarray(scores, np.float64)[None]
    return (1.0 + ge.sum(0)) / (len(null_scores) + 1.0)


def null_min_p(null_scores) -> np.ndarray:
    """Each null member's min-p against the OTHER members: min over detectors of (1 +
    #{others >= its score}) / n. null_scores: [n, d] -> [n]."""
    s = np.asarray(null_scores, np.float64)
    ge = (s[None, :, :] >= s[:, None, :]).sum(1) - 1  # [i, d]: others at least as high
    return ((1.0 + ge) / len(s)).min(-1)


def min_p_threshold(null_scores, alpha: float) -> float:
    """The calibrated min-p cut-off: the largest value t with at most a share alpha of the
    null's min-p (`null_min_p`) at or below t (0.0: none qualifies, nothing is flagged). A
    suspect is flagged when min over detectors of `tail_p` <= t: the rule's false-positive
    rate on the null is at most alpha whatever the detectors' dependence (calibrated min-p,
    Westfall & Young 1993)."""
    t_null = null_min_p(null_scores)
    ok = [t for t in np.unique(t_null) if np.mean(t_null <= t) <= alpha]
    return float(max(ok)) if ok else 0.0


def heldout_verdict(norms, margins, variants: Sequence[str], *, alpha: float, folds: int,
                    period: int | None = None) -> dict:
    """The verdict's false-positive rate on held-out benign models: the null's members are
    split into `folds` folds (`folds_of`); each fold's members are scored against the other
    folds' members only (`detector_scores`) and judged by the cut-off and tail p-values of
    those others' leave-one-out scores (`null_scores`), exactly as a suspect is judged by
    the whole null. norms, margins: [n, K]. -> {"fpr", "by_variant", "folds"} of the
    combined verdict, plus "nc_fpr" and "mm_bd_fpr": each detector alone, flagged above
    the largest score that keeps at most alpha of the others' scores above it."""
    norms, margins = np.asarray(norms, np.float64), np.asarray(margins, np.float64)
    flagged = np.zeros((len(norms), 1 + len(DETECTORS)), bool)
    for others, held in _held_folds(len(norms), variants, folds, period):
        ref = null_scores(norms[others], margins[others])
        mine = detector_scores(norms[others], margins[others], norms[held], margins[held])[0]
        cut = min_p_threshold(ref, alpha)
        flagged[held, 0] = [tail_p(ref, row).min() <= cut for row in mine]
        for j in range(len(DETECTORS)):
            flagged[held, 1 + j] = mine[:, j] > nc._threshold(ref[:, j], alpha, -np.inf)
    return {**_rates(flagged[:, 0], variants), "folds": folds,
            "nc_fpr": float(flagged[:, 1].mean()), "mm_bd_fpr": float(flagged[:, 2].mean())}


def _null(norms, rates, recipe, hidden, cfg, scan, seconds, variants, margins,
          margin=mm_bd.DEFAULT) -> Null:
    norms, rates = np.asarray(norms, np.float64), np.asarray(rates, np.float64)
    indices = nc.anomaly_index(norms)[0]
    threshold = nc.calibrate_threshold(indices, alpha=cfg.alpha)
    log_threshold = nc.calibrate_threshold(nc.anomaly_index(log_norms(norms))[0],
                                           alpha=cfg.alpha)
    variants = tuple(variants)
    held = heldout_fpr(indices, variants, alpha=cfg.alpha, folds=cfg.folds)
    margins = np.asarray(margins, np.float64)
    scores = null_scores(norms, margins)
    combined = heldout_verdict(norms, margins, variants, alpha=cfg.alpha, folds=cfg.folds)
    combined["cut"] = min_p_threshold(scores, cfg.alpha)
    threshold = threshold._replace(fpr_loo=held["fpr"])
    return Null(norms, rates, indices, threshold, log_threshold, recipe, hidden, cfg, scan,
                seconds, variants, held, margins, margin, scores, combined)


def calibrate_null(recipe: str | None, hidden: int, ds: Dataset,
                   config: NullConfig | None = None, *, scan: nc.ScanConfig = nc.DEFAULT,
                   margin: mm_bd.MarginConfig = mm_bd.DEFAULT,
                   model: Model | None = None, train: TrainConfig | None = None,
                   cache: bool = True, cache_path=None,
                   log: Callable[[str], None] | None = None) -> Null:
    """Train (or load from the cache) and scan the null of `recipe` at width `hidden`.

    recipe: a built-in JAX recipe or a user ref "pkg.module:attr" (`population.plan_for`), or
    None with `model` (a user's Model without a ref); model: the Model to retrain (None: the
    recipe's for `ds`); train: the suspect's TrainConfig (lr, epochs, batch size, optimizer;
    None: the recipe's defaults; `config.epochs`, when set, wins); cache / cache_path: read
    and write the cache in that folder (default `data.cache_dir("scan")`); log: called with
    one line before a null is trained (not when it is read from the cache). The null is
    trained as one population (one jit) and scanned as one (`scan_population`). Returns a
    `Null` whose threshold is calibrated as the module docstring says. ConfigError for bad
    settings (see `NullConfig.validate`, `ScanConfig.validate`).
    """
    cfg = config or NullConfig()
    cfg.validate()
    scan.validate()
    size = len(ds.y_train) if cfg.sample_size is None else cfg.sample_size
    if size > len(ds.y_train):
        raise ConfigError(f"scan: expected sample_size at most the {len(ds.y_train)} training "
                          f"images of {ds.name}, found {size}")
    x, y = scan_images(ds, cfg.images, cfg.seed)
    name = recipe if recipe is not None else getattr(model, "name", None)
    folder = Path(cache_path) if cache_path is not None else cache_dir("scan")
    path = folder / f"null-{_cache_key(recipe, hidden, ds, cfg, scan, model, train, margin)}.npz"
    seconds = {"train_s": 0.0, "scan_s": 0.0, "cached": True}
    made = []

    def null_of(f) -> Null:  # ConfigError / KeyError for a damaged entry
        made.append(_null(f["norms"], f["rates"], name, hidden, cfg, scan, seconds,
                          [benign.VARIANTS[int(i)] for i in f["variants"]], f["margins"],
                          margin))
        return made[-1]

    def compute() -> dict:
        base = train if train is not None else TrainConfig()
        epochs = cfg.epochs if cfg.epochs is not None else base.epochs
        plan = plan_for(recipe, replace(base, hidden=hidden, epochs=epochs, seed=0), ds.spec,
                        model=model)
        seeds = NULL_STREAM + cfg.seed * 10_000 + np.arange(cfg.n_null)
        variants = benign.VARIANTS if cfg.benign else ("retrain",)
        if log is not None:
            log(f"calibrating: training and scanning {cfg.n_null} clean models on {size:,} "
                f"images each ({len(variants)} benign variants in turn), once for this recipe "
                f"and data (cached in {folder})")
        start = time.perf_counter()
        chunk = benign.train_chunk(cfg.n_null, size, ds.spec.n_inputs)
        params, names = benign.benign_null(plan, ds.x_train, ds.y_train, seeds=seeds.tolist(),
                                           size=size, chunk=chunk, variants=variants, log=log)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        found = nc.scan_in_groups(plan.arch, params, x, y, key=scan_key(cfg.seed),
                                  config=scan, group=SCAN_GROUP,
                                  progress=_progress(log, "scanned"))
        start_mm = time.perf_counter()
        margins = (np.asarray(jax.block_until_ready(mm_bd.margins_population(
            plan.arch, params, key=margin_key(cfg.seed), config=margin)))
            if plan.arch.n_classes >= 3 else np.zeros((cfg.n_null, plan.arch.n_classes)))
        scan_s = time.perf_counter() - start
        mm_s = time.perf_counter() - start_mm
        seconds.update(train_s=train_s, scan_s=scan_s, mm_bd_s=mm_s, cached=False)
        if log is not None:
            log(f"null: {cfg.n_null} models trained in {train_s:.0f} s and scanned in "
                f"{scan_s:.0f} s (MM-BD {mm_s:.0f} s of it)")
        return {"norms": np.asarray(found.norms), "rates": np.asarray(found.rates),
                "margins": margins,
                "variants": np.asarray([benign.VARIANTS.index(v) for v in names], np.int64)}

    arrays = cached_npz(path, compute, what="a cached scan null", read=cache, write=cache,
                        check=null_of)
    return made[-1] if made and seconds["cached"] else null_of(arrays)


def _check_params(model: Model, params: Params, ds: Dataset) -> Params:
    if (tuple(model.input_shape), model.n_classes) != (tuple(ds.image_shape), ds.n_classes):
        raise ConfigError(f"scan: {model.name} takes images {tuple(model.input_shape)} with "
                          f"{model.n_classes} classes; {ds.name} has {tuple(ds.image_shape)} "
                          f"with {ds.n_classes}: pass the dataset the model was trained on")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    if not all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params)):
        raise DataError("scan: expected finite weights, found NaN or inf")
    return params


class Judged(NamedTuple):
    """The calibrated verdict of M scanned models (`judge`). scores: [M, 2] each detector's
    class-conditional score (DETECTORS order, `detector_scores`); targets: [M, 2] the class
    each names; p: [M, 2] their tail p-values against the null; flagged: [M] min p <= the
    null's cut-off; target: [M] the class of the detector with the smaller p (ties: Neural
    Cleanse's, which names the smallest trigger), named whether flagged or not."""

    scores: np.ndarray
    targets: np.ndarray
    p: np.ndarray
    flagged: np.ndarray
    target: np.ndarray


def judge(null: Null, norms, margins) -> Judged:
    """The one verdict rule (module docstring, 3.) on M models: norms [M, K] their Neural
    Cleanse mask norms, margins [M, K] their MM-BD maximum margins (zeros below 3 classes),
    both searched as the null's were (its images, keys and settings). -> `Judged`."""
    scores, targets = detector_scores(null.norms, null.margins, norms, margins)
    p = np.stack([tail_p(null.scores, row) for row in scores])
    best = np.argmin(p, 1)
    return Judged(scores, targets, p, p.min(1) <= null.combined["cut"],
                  targets[np.arange(len(p)), best])


def scan_model(model: Model, params: Params, ds: Dataset, *, null: Null | None = None,
               config: nc.ScanConfig = nc.DEFAULT, null_config: NullConfig | None = None,
               train: TrainConfig | None = None, cache: bool = True,
               cache_path=None, log: Callable[[str], None] | None = None) -> dict:
    """Scan one model for a backdoor, with no reference model (module docstring).

    model: its `models.Model` (e.g. from `registry.load_model`); params: its weights; ds: the
    dataset it was trained on (test images for the search, training images for the null);
    null: a `Null` (None: `calibrate_null` for the model's recipe, cached); config: the
    trigger search's settings; null_config: the null's (n_null, images, alpha, seed, ...);
    train: the model's TrainConfig, so the null trains as it did (None: recipe defaults);
    log: passed to `calibrate_null` (one line before training a null).

    Returns a JSON-able dict: verdict ("backdoor" / "clean", or "inconclusive" with a note
    for fewer than MIN_CLASSES classes), target (the suspected class or None), combined_p
    (the smaller detector p-value) and combined_threshold (its calibrated cut-off),
    detectors ({"neural-cleanse": {score, p_value, target, threshold, heldout_fpr}, "mm-bd":
    {score, p_value, target, max_margins [K], seconds, heldout_fpr}}), flagged_by (the
    detectors at or below the cut-off), threshold_fpr and threshold_fpr_by_variant (the
    verdict's false-positive rate on held-out benign models, module docstring), alpha,
    n_null, Neural Cleanse's anomaly_index, threshold (its own, for reading), mask_norms
    [K], attack_rates [K], reached [K], class_anomaly_indices [K], log_anomaly_index,
    log_threshold, log_threshold_fpr, scan_seconds (the compiled trigger search, ended by
    block_until_ready), compile_seconds, architecture, null (its summary: size, variants,
    recipe, training and scanning seconds), and "trigger": {"mask" [K, H, W], "pattern" [K,
    H, W, C]} as numpy arrays (popped by the CLI, which writes them as files). ConfigError
    for a model that does not fit the data, bad settings or a null of another recipe;
    DataError for NaN weights.
    """
    params = _check_params(model, params, ds)
    cfg = (null_config or (null.config if null is not None else NullConfig())).validate()
    recipe, hidden, user = recipe_of(model, params, train)
    if null is None:
        null = calibrate_null(recipe, hidden, ds, cfg, scan=config,
                              model=model if user else None, train=train, cache=cache,
                              cache_path=cache_path, log=log)
    if null.hidden != hidden or null.recipe != (recipe or model.name):
        raise ConfigError(f"scan: expected a null of {recipe or model.name} with hidden "
                          f"{hidden}, found {null.recipe} with hidden {null.hidden}")
    cfg, config = null.config, null.scan
    x, y = scan_images(ds, cfg.images, cfg.seed)
    start = time.perf_counter()
    search = nc.compile_triggers(model, params, x, y, key=scan_key(cfg.seed), config=config)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    found = jax.block_until_ready(search())
    seconds = time.perf_counter() - start
    norms = np.asarray(found.norms, np.float64)
    result = nc.verdict(norms, null.threshold.value)
    start = time.perf_counter()
    if model.n_classes >= 3:
        margins = np.asarray(jax.block_until_ready(mm_bd.max_margins(
            model, params, key=margin_key(cfg.seed), config=null.margin)), np.float64)
    else:
        margins = np.zeros(model.n_classes)
    mm_s = time.perf_counter() - start
    judged = judge(null, norms[None], margins[None])
    scores, p = judged.scores[0], judged.p[0]
    nc_target, mm_target = (int(v) for v in judged.targets[0])
    mm_score = float(scores[1])
    cut = null.combined["cut"]
    flagged = bool(judged.flagged[0])
    result["verdict"] = "backdoor" if flagged else "clean"
    result["target"] = int(judged.target[0]) if flagged else None
    result.update(weak_classes(result, model.n_classes))
    unreached = np.flatnonzero(~np.asarray(found.reached)).tolist()
    if unreached:
        result["note"] = "; ".join(n for n in (result.get("note"), (
            f"Neural Cleanse's search did not reach its attack rate for class(es) {unreached}: "
            f"their mask norms are upper bounds, not the smallest trigger")) if n)
    result.update({
        "combined_p": float(p.min()),
        "combined_threshold": cut,
        "detectors": {
            "neural-cleanse": {"score": float(scores[0]), "p_value": float(p[0]),
                               "target": nc_target, "threshold": null.log_threshold.value,
                               "heldout_fpr": null.combined.get("nc_fpr")},
            "mm-bd": {"score": mm_score, "p_value": float(p[1]), "target": mm_target,
                      "max_margins": margins.tolist(), "seconds": mm_s,
                      "heldout_fpr": null.combined.get("mm_bd_fpr")}},
        "flagged_by": [d for d, pd in zip(DETECTORS, p, strict=True) if pd <= cut],
        "threshold_fpr": null.combined.get("fpr"),
        "threshold_fpr_by_variant": null.combined.get("by_variant", {}),
        "alpha": null.threshold.alpha,
        "n_null": null.threshold.n_null,
        "textbook_threshold": nc.TEXTBOOK_THRESHOLD,
        "smallest_class": int(np.argmin(norms)),
        "mask_norms": norms.tolist(),
        "attack_rates": np.asarray(found.rates, np.float64).tolist(),
        "reached": np.asarray(found.reached).tolist(),
        "class_anomaly_indices": nc.anomaly_indices(norms).tolist(),
        "log_anomaly_index": float(nc.anomaly_index(log_norms(norms))[0]),
        "log_threshold": null.log_threshold.value,
        "log_threshold_fpr": null.log_threshold.fpr_loo,
        "scan_seconds": seconds,
        "compile_seconds": compile_s,
        "architecture": model.name,
        "null": null.describe(),
        "trigger": {"mask": np.asarray(found.masks), "pattern": np.asarray(found.patterns)},
    })
    return result


def weak_classes(result: dict, n_classes: int) -> dict:
    """The verdict's fields rewritten when the class count makes the scan weak: with fewer
    than MIN_CLASSES classes the anomaly index scores one class against the median and MAD
    of at most 4 others, whose spread is no estimate at all (a 4-class backdoor with ASR
    0.995 scored as its clean twin did), so neither "clean" nor "backdoor" is
    supported: verdict "inconclusive", target None, the would-be target as
    "smallest_class" and a note. {} when the count suffices."""
    if n_classes >= MIN_CLASSES:
        return {}
    return {"verdict": "inconclusive", "target": None,
            "note": f"{n_classes} classes: each class is scored against the model's median "
                    f"class among {n_classes}, too few to judge "
                    f"(this scan needs at least {MIN_CLASSES} classes); "
                    f"would-be verdict {result['verdict']!r}"}


def save_triggers(trigger: dict, out_dir, *, target: int | None, input_range) -> tuple[
        list[str], str]:
    """Write the reversed triggers into out_dir, each file atomically; -> (paths, note).

    trigger: {"mask": [K, H, W], "pattern": [K, H, W, C]} (`scan_model`'s). Writes
    triggers.npz (mask, pattern of every class) and, when a target is named,
    target-mask.npy [H, W] and target-pattern.npy [H, W, C]; with matplotlib (the `plots`
    extra) also triggers.png (per class: the mask, and the stamped pattern mask * pattern)
    and target.png. note: "" or why no PNG was drawn.
    """
    out = Path(out_dir)
    mask, pattern = np.asarray(trigger["mask"]), np.asarray(trigger["pattern"])
    paths = []

    def put(name, write):
        path = out / name
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
        paths.append(str(path))

    put("triggers.npz", lambda f: np.savez(f, mask=mask, pattern=pattern))
    if target is not None:
        put("target-mask.npy", lambda f: np.save(f, mask[target]))
        put("target-pattern.npy", lambda f: np.save(f, pattern[target]))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return paths, "PNG images need matplotlib: pip install 'mlshift_jax[plots]'"
    lo, hi = (float(v) for v in input_range)

    def picture(k):  # the trigger as stamped on a blank (lo) image, in [0, 1]
        img = mask[k][..., None] * (pattern[k] - lo) / (hi - lo)
        return np.clip(img if img.shape[-1] == 3 else img[..., 0], 0.0, 1.0)

    def figure(classes):
        fig = Figure(figsize=(1.2 * len(classes), 2.6), layout="constrained")
        axes = fig.subplots(2, len(classes), squeeze=False)
        for j, k in enumerate(classes):
            axes[0, j].imshow(mask[k], cmap="gray_r", vmin=0, vmax=1)
            axes[1, j].imshow(picture(k), cmap="gray_r", vmin=0, vmax=1)
            axes[0, j].set_title(f"class {k}\n|m|={mask[k].sum():.1f}", fontsize=7)
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("mask", fontsize=7)
        axes[1, 0].set_ylabel("m * pattern", fontsize=7)
        return fig

    def png(fig):
        return lambda f: fig.savefig(f, format="png", dpi=110)

    put("triggers.png", png(figure(list(range(len(mask))))))
    if target is not None:
        put("target.png", png(figure([target])))
    return paths, ""
