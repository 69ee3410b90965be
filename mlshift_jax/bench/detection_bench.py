"""The detection benchmark: every detector scored on every change kind, and the categorizer's
confusion matrix, as pandas tables for the runner and the report.

One population (`retrain.train_sampled`, one jit) holds, for each of `seeds` seeds: a clean
reference, `clean_per_seed` clean retrains (the negatives), and one model per poisoning in
`poisonings`; plus `n_null` clean retrains shared as the null pool. Every member has its own
seed and its own random training sample (`sample_size` images). Per seed, the input changes
in `attacks` are applied to the probe images and fed to that seed's reference (the suspect
system "reference model behind a changed input channel", see `fingerprint`).

Tables (`run` returns them by name):

- "auc": ROC-AUC, detector x change kind, one row per detector of `ROWS`. Image-level
  detectors (`INPUT`: confidence, margin, entropy, squeezing) on the test images attacked
  vs clean, with the first seed's reference; the fingerprint test on systems (changed
  systems vs clean retrains, statistic = -log of the smallest per-feature tail,
  `fingerprint.change_test`); the training-data detectors (`DATA`: every "sample" detector
  of `detection.DETECTORS`) on training samples (poisoned vs not, mean over the first
  `data_seeds` seeds); STRIP on attacked vs clean test images (the first seed's reference)
  and on triggered vs clean test images (the first seed's model backdoored with that
  trigger). NaN where a detector does not apply. The poisonings include the trigger-array
  backdoors (blended, sparse, sig, warp; `poison.py`).
- "input_detectors": per attack, eps and detector: ROC-AUC and TPR at `fpr` FPR.
- "change_test": per change kind: ROC-AUC, detection rate at `alpha`, mean p-value and the
  cross-entropy of the "changed" probability (`fingerprint.changed_probability`), as NIST
  TrojAI scores its rounds; the "clean" row is the false-positive rate.
- "confusion": the categorizer's confusion matrix (rows true, columns predicted), every cell
  predicted by a categorizer trained without its seed (`categorize.cross_validate`).
- "categorizer_in_family": the same changes, each decided by a categorizer that knew every
  family but not the change's reference (with lofo_refs >= 3): how often it names, abstains
  and errs on the kinds of change it was trained on;
- "categorizer_lofo": the categorizer on change families it never saw
  (`change_generator.lofo`): `lofo_per_family` changes of each of the generator's families
  (random triggers, label flips, benign retrains, pruning, quantization, input channels) for
  each of `lofo_refs` references of this configuration's recipe and width, each change tested
  against a null of `lofo_null` benign models (as `detect`'s calibration), every family
  decided by a categorizer trained without its group; rows the held-out family, columns its
  decisions (the categories and "uncertain"). Absent when lofo_refs is 0.
- "training_data": per training-data detector (`DATA`) and poisoning: precision, recall,
  ROC-AUC over all samples and ROC-AUC within the class holding the poison
  ("auc_in_class"), means over the first `data_seeds` seeds, against the poison mask. The
  spectral methods get the member's true poisoned fraction as eps (they remove 1.5 * eps of
  each class; the papers assume a known bound), and TPR at `fpr`.
- "detector_by_attack": detector x attack kind, two rows per detector (metric "auc" and
  "tpr@<fpr>fpr"), one column per change: the input detectors and STRIP on input attacks
  (attacked vs clean test images, the first seed's reference) and STRIP on triggers
  (triggered test images of the non-target classes vs clean test images, the first seed's
  model backdoored with that trigger); the training-data detectors on poisonings (poisoned vs
  clean training samples, means over the first `data_seeds` seeds); the fingerprint test on
  systems (changed vs clean retrains). NaN where a detector does not apply.
- "strip": STRIP (Gao et al., ACSAC 2019) per change: ROC-AUC and TPR at `fpr`.
- "cells": every (seed, change) cell of the change test: its p-value, statistic, category,
  the categorizer's held-out prediction and its fingerprint features.
- "detectors": every detector of `detection.DETECTORS` (the scan-model part's too): what it
  scores, its unit and its source.
- "timing": wall seconds per stage (and the population's size, and its members per vmap).
- "scan_model", "scan_model_summary": the reference-free backdoor scan's verdict (Neural
  Cleanse and MM-BD, calibrated on a benign null) on held-out clean, benign and backdoored
  models, `scan_bench.scan_table` with the config's `scan_model` (FULL and QUICK have one;
  None leaves the tables out).

`run` has three parts (`PARTS`), each with its own population, and the bench runs each as its
own cell: "scan-model" ("scan_model", "scan_model_summary"), "categorizer-lofo"
("categorizer_lofo") and "detectors" (every other table above). The timing table of each
cell says where its time went.

Memory: the population trains `population_chunk` members per vmap, so that their training
data (the shared training set, and each member's gathered sample and poisoned copy, float32)
fits in `memory_cap` bytes (default 1 GiB): without it, `population.chunk_size` would size
the vmap by the machine's RAM alone, and each member's copies of its sample come on top. The
cap changes how many members train at once, not what they train on or what is measured.

Time: `run` holds the BLAS libraries (OpenBLAS, which jaxlib's CPU `eigh` calls through
scipy's LAPACK) to one thread (threadpoolctl). Their worker threads otherwise compete with
XLA's own thread pool for the cores, which slows the batched `jnp.linalg.eigh` that activation
clustering and spectral signatures each take per poisoned member by an order of magnitude
on a busy 2-core machine. XLA's own kernels do not use these libraries.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from mlshift_jax.attacks import attack_key, get_attack
from mlshift_jax.bench import scan_bench
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.data.datasets import Dataset
from mlshift_jax.detection import DETECTORS as DETECTORS_BY_NAME
from mlshift_jax.detection import (
    categorize,
    change_generator,
    detect,
    detect_data,
    fingerprint,
    of_unit,
    scan,
)
from mlshift_jax.detection.change import changed_inputs
from mlshift_jax.detection.strip import strip_scores
from mlshift_jax.models.population import member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.retrain import poisoned_sample, train_sampled
from mlshift_jax.models.zoo import predict
from mlshift_jax.poisoning.poison import has_trigger, make_config, triggered

CLEAN = "clean"
UNIT_TITLES = {"input": "image", "sample": "training sample", "model": "model"}
STRIP = DETECTORS_BY_NAME["strip"].label
FINGERPRINT = DETECTORS_BY_NAME["fingerprint"].label
INPUT = tuple(d for d in of_unit("input") if d.name != "strip")  # `detect.input_scores`
DATA = of_unit("sample")  # `detect_data.scan`
ROWS = tuple(d.label for d in DETECTORS_BY_NAME.values() if d.name not in scan.DETECTORS)
# the rows of the "auc" and "detector_by_attack" tables: every detector but the scan-model
# part's (Neural Cleanse and MM-BD: `scan_bench`'s tables)
DETECTORS = pd.DataFrame(
    [(d.label, UNIT_TITLES[d.unit], d.summary, d.source) for d in DETECTORS_BY_NAME.values()],
    columns=["detector", "unit", "score", "source"]).set_index("detector")


@dataclass(frozen=True)
class BenchConfig:
    """What `run` trains and scores. attacks / poisonings: (kind, eps or fraction) pairs."""

    recipe: str = "seed-mlp"
    hidden: int = 200
    sample_size: int = 10_000
    seeds: int = 6
    clean_per_seed: int = 2
    n_null: int = 24  # clean retrains of the detectors' null (the change-test tables)
    probes: int = 1000
    n_patched: int = 200
    n_images: int = 10_000
    attacks: tuple[tuple[str, float], ...] = (
        ("noise-sign", 0.1), ("noise-sign", 0.2), ("fgsm", 0.1), ("fgsm", 0.2),
        ("pgd", 0.1), ("pgd", 0.2))
    poisonings: tuple[tuple[str, float], ...] = (
        ("wrong-label", 0.1), ("wrong-label", 0.3), ("trigger", 0.1), ("trigger", 0.3),
        ("mixture", 0.05), ("mixture", 0.2), ("blended", 0.1), ("sparse", 0.1),
        ("sig", 0.5), ("warp", 0.1))  # sig: of the target class (clean-label), ~5% of all
    strip_images: int = 500  # STRIP: clean and triggered / attacked test images per column
    data_seeds: int = 3  # the training-data detectors scan the poisoned members of these seeds
    alpha: float = 0.05
    fpr: float = 0.05
    memory_cap: int = 2**30  # bytes for the population's training data (`population_chunk`)
    lofo_refs: int = 4  # references of the leave-one-family-out table (0: no table)
    lofo_null: int = 104  # benign models of the generator's null (as `detect`'s calibration)
    lofo_per_family: int = 2  # changes of each family per reference
    scan_model: scan_bench.ScanBenchConfig | None = None  # None: no scan-model table

    def validate(self) -> BenchConfig:
        """Raise ConfigError for settings the benchmark cannot run; return self."""
        if self.seeds < 2:
            raise ConfigError(f"detection bench: expected seeds >= 2 (the categorizer holds "
                              f"one out), found {self.seeds}")
        if self.n_null < 2 or self.clean_per_seed < 1:
            raise ConfigError(f"detection bench: expected n_null >= 2 and clean_per_seed >= 1,"
                              f" found {self.n_null} and {self.clean_per_seed}")
        for kind, _ in self.attacks:
            get_attack(kind)
        for kind, fraction in self.poisonings:
            make_config(kind, fraction=fraction)
        if self.lofo_null < 2:
            raise ConfigError(f"detection bench: expected lofo_null >= 2, found "
                              f"{self.lofo_null}")
        if self.lofo_refs < 0 or self.lofo_per_family < 1:
            raise ConfigError(f"detection bench: expected lofo_refs >= 0 and lofo_per_family "
                              f">= 1, found {self.lofo_refs} and {self.lofo_per_family}")
        if isinstance(self.data_seeds, bool) or not isinstance(self.data_seeds, int) \
                or self.data_seeds < 1:
            raise ConfigError(f"detection bench: expected data_seeds an int >= 1, found "
                              f"{self.data_seeds!r}")
        if isinstance(self.strip_images, bool) or not isinstance(self.strip_images, int) \
                or self.strip_images < 2:
            raise ConfigError(f"detection bench: expected strip_images an int >= 2, found "
                              f"{self.strip_images!r}")
        if self.memory_cap < 1:
            raise ConfigError(f"detection bench: expected memory_cap >= 1 byte, found "
                              f"{self.memory_cap}")
        return self


FULL = BenchConfig(scan_model=scan_bench.FULL)
# QUICK (CI's bench-quick): one rate per poisoning kind, so that the four trigger-array
# backdoors cost about what the second rates of wrong-label, trigger and mixture did.
QUICK = BenchConfig(hidden=64, sample_size=3000, seeds=4, n_null=20, probes=500,
                    n_patched=100, n_images=2000, strip_images=200, lofo_refs=2,
                    lofo_null=26, lofo_per_family=1, scan_model=scan_bench.QUICK,
                    poisonings=(("wrong-label", 0.1), ("trigger", 0.1), ("mixture", 0.05),
                                ("blended", 0.1), ("sparse", 0.1), ("sig", 0.5),
                                ("warp", 0.1)))


def population_chunk(m: int, size: int, n: int, d: int, memory_cap: int) -> int:
    """Members per vmap so that the population's training data fits in memory_cap bytes.

    m members, each training on `size` of the n shared training images of d float32 values:
    the shared set (n * d * 4 bytes) is there once; each member of a group adds its gathered
    sample and its poisoned copy (2 * size * d * 4). Returns the largest chunk in 1..m with
    n * d * 4 + chunk * 2 * size * d * 4 <= memory_cap, at least 1 (one member then needs
    what it needs).
    """
    if min(m, size, n, d) < 1:
        raise ConfigError(f"detection bench: expected m, size, n, d >= 1, found "
                          f"{(m, size, n, d)}")
    per_member = 2 * size * d * 4
    return int(max(1, min(m, (memory_cap - n * d * 4) // per_member)))


def attack_label(kind: str, eps: float) -> str:
    """Column name of an input change: "fgsm 0.1"."""
    return f"{kind} {eps:g}"


def poison_label(kind: str, fraction: float) -> str:
    """Column name of a poisoning: "mixture 20%"."""
    return f"{kind} {fraction:.0%}"


class _Members:
    """Who is who in the population: rows of (role, seed index, kind, label, member seed)."""

    def __init__(self, cfg: BenchConfig, seed: int):
        rows, counter = [], seed * 100_000
        for s in range(cfg.seeds):
            rows.append(("reference", s, CLEAN, CLEAN))
            rows += [("suspect", s, CLEAN, CLEAN)] * cfg.clean_per_seed
            rows += [("suspect", s, k, poison_label(k, f)) for k, f in cfg.poisonings]
        rows += [("null", -1, CLEAN, CLEAN)] * cfg.n_null
        self.table = pd.DataFrame(rows, columns=["role", "seed", "kind", "label"])
        self.table["member_seed"] = counter + np.arange(len(rows))
        fractions = {poison_label(k, f): (k, f) for k, f in cfg.poisonings}
        self.configs = [make_config("clean") if lab == CLEAN
                        else make_config(fractions[lab][0], fraction=fractions[lab][1])
                        for lab in self.table["label"]]

    def rows(self, role: str, s: int | None = None) -> np.ndarray:
        t = self.table
        pick = t["role"] == role
        if s is not None:
            pick &= t["seed"] == s
        return np.flatnonzero(pick.to_numpy())


def _take(tree, rows):
    return jax.tree.map(lambda a: a[jnp.asarray(rows)], tree)


def _input_detector_table(cfg: BenchConfig, ds: Dataset, model, params, key) -> pd.DataFrame:
    """ROC-AUC and TPR at cfg.fpr of each image-level detector, per attack and eps."""
    n = min(cfg.n_images, len(ds.y_test))
    x, y = jnp.asarray(ds.x_test[:n]), jnp.asarray(ds.y_test[:n])
    clean = jax.device_get(detect.input_scores(model, params, x))
    rows = []
    for i, (kind, eps) in enumerate(cfg.attacks):
        attack = get_attack(kind)
        kw = {"key": jax.random.fold_in(key, i)} if attack.needs_key else {}
        x_adv = attack.fn(model, params, x, y, eps=eps, **kw)
        changed = jax.device_get(detect.input_scores(model, params, x_adv))
        accuracy = float(jnp.mean(jnp.argmax(predict(model, params, x_adv), -1) == y))
        labels = np.r_[np.zeros(n, bool), np.ones(n, bool)]
        for d in INPUT:
            scores = np.r_[clean[d.name], changed[d.name]]
            rows.append({"attack": kind, "eps": eps, "detector": d.label,
                         "auc": detect.roc_auc(scores, labels),
                         f"tpr@{cfg.fpr:g}fpr": detect.tpr_at_fpr(scores, labels, cfg.fpr),
                         "accuracy_under_attack": accuracy})
    return pd.DataFrame(rows)


def _training_data_table(cfg: BenchConfig, ds: Dataset, members: _Members, pop, idx,
                         key) -> pd.DataFrame:
    """Every training-data detector (`DATA`; Mahalanobis against the first `n_images` clean
    test images) on each poisoned member's data.

    The detectors are told the member's true poisoned fraction as eps (their removal counts:
    1.5 * eps * class size). One class-block size for every member (the largest class, by
    label or by prediction, of any member, rounded up to a power of two), so that each
    detector compiles once for the whole table instead of once per block size."""
    model = pop.plan.arch
    poisoned = [int(i) for i in members.rows("suspect")
                if members.table.at[i, "label"] != CLEAN
                and members.table.at[i, "seed"] < cfg.data_seeds]

    def data(i):
        return poisoned_sample(ds.x_train, ds.y_train, idx[i],
                               int(members.table.at[i, "member_seed"]), members.configs[i],
                               model)

    largest = 0
    for i in poisoned:  # first pass: class sizes (by label and by prediction) only
        x_p, y_p, _ = data(i)
        predicted = jnp.argmax(predict(model, member(pop.params, i), x_p), -1)
        for labels in (y_p, predicted):
            largest = max(largest, int(np.bincount(np.asarray(labels)).max()))
    block = detect_data.block_size(largest)
    n_ref = min(cfg.n_images, len(ds.y_test))  # clean test images: Mahalanobis's reference
    reference = (ds.x_test[:n_ref], ds.y_test[:n_ref])
    rows = []
    for i in poisoned:
        x_p, y_p, mask = data(i)
        mask = np.asarray(mask, bool)
        found = detect_data.scan(model, member(pop.params, i), x_p, y_p,
                                 eps=float(mask.mean()), key=jax.random.fold_in(key, i),
                                 block=block, reference=reference)
        tpr = f"tpr@{cfg.fpr:g}fpr"
        for d in DATA:
            scores = detect_data.precision_recall_auc(found[d.name], mask, y_p)
            scores[tpr] = _tpr(found[d.name].score, mask, cfg.fpr)
            rows.append({"detector": d.label, "change": members.table.at[i, "label"],
                         "seed": int(members.table.at[i, "seed"]), **scores})
    table = pd.DataFrame(rows)
    return (table.groupby(["detector", "change"], sort=False)
            [["precision", "recall", "auc", "auc_in_class", tpr, "flagged", "poisoned"]]
            .mean().reset_index())


def _tpr(scores, truth, fpr: float) -> float:
    """TPR at `fpr` FPR of scores [n] against truth bool [n]; NaN unless both classes occur."""
    truth = np.asarray(truth, bool)
    if not 0 < truth.sum() < truth.size:
        return float("nan")
    return detect.tpr_at_fpr(np.asarray(scores, np.float64), truth, fpr)


def _strip_table(cfg: BenchConfig, ds: Dataset, members: _Members, pop, key) -> pd.DataFrame:
    """STRIP (Gao et al., ACSAC 2019), one row per change it applies to: ROC-AUC and TPR at
    cfg.fpr. Negatives: the first n = min(strip_images, tests / 2) clean test images; the
    next n are the clean images superimposed on them (N_BLENDS each). Input attacks: those n
    images attacked, on the first seed's reference. Triggers (poisonings with a target):
    those of the n whose class is not the target, stamped with the trigger, on the first
    seed's model poisoned with it (its own clean images the negatives); "asr": that model's
    attack success rate on those triggered images (STRIP can only see a trigger the model
    learnt)."""
    model = pop.plan.arch
    n = min(cfg.strip_images, len(ds.y_test) // 2)
    x, y = jnp.asarray(ds.x_test[:n]), jnp.asarray(ds.y_test[:n])
    pool = jnp.asarray(ds.x_test[n:2 * n])
    tpr = f"tpr@{cfg.fpr:g}fpr"
    rows = []

    def score(params, changed, j, keep=None):
        # every call scores [n, D] (one compilation); keep: the changed rows that count
        k = jax.random.fold_in(key, j)
        clean = np.asarray(strip_scores(model, params, x, pool, key=k))
        hit = np.asarray(strip_scores(model, params, changed, pool, key=k))
        hit = hit if keep is None else hit[keep]
        both, truth = np.r_[clean, hit], np.r_[np.zeros(len(clean), bool), np.ones(len(hit), bool)]
        return {"auc": detect.roc_auc(both, truth), tpr: detect.tpr_at_fpr(both, truth, cfg.fpr),
                "n_clean": len(clean), "n_changed": len(hit)}

    ref0 = member(pop.params, int(members.rows("reference", 0)[0]))
    for j, (kind, eps) in enumerate(cfg.attacks):
        attack = get_attack(kind)
        kw = {"key": jax.random.fold_in(key, 10**5 + j)} if attack.needs_key else {}
        x_adv = attack.fn(model, ref0, x, y, eps=eps, **kw)
        rows.append({"change": attack_label(kind, eps), "model": "reference",
                     **score(ref0, x_adv, j)})
    for i in members.rows("suspect", 0):
        label, config = members.table.at[i, "label"], members.configs[i]
        target = getattr(config, "target", None)
        if label == CLEAN or not has_trigger(config) or target is None:
            continue
        keep = np.asarray(ds.y_test[:n]) != target
        params = member(pop.params, int(i))
        stamped = triggered(x, config, ds.spec)
        hits = np.asarray(jnp.argmax(predict(model, params, stamped), -1)) == target
        rows.append({"change": label, "model": "backdoored",
                     **score(params, stamped, 10**4 + int(i), keep),
                     "asr": float(hits[keep].mean())})
    return pd.DataFrame(rows, columns=["change", "model", "auc", tpr, "n_clean", "n_changed",
                                       "asr"])


def _detector_by_attack(cfg: BenchConfig, columns: list[str], input_table: pd.DataFrame,
                        strip_table: pd.DataFrame, data_table: pd.DataFrame,
                        cells: pd.DataFrame) -> pd.DataFrame:
    """Detector x attack kind: rows (detector, metric in {"auc", "tpr@<fpr>fpr"}), one column
    per change label; NaN where the detector does not apply (module docstring)."""
    tpr = f"tpr@{cfg.fpr:g}fpr"
    out = {(d, m): {} for d in ROWS for m in ("auc", tpr)}
    for _, r in input_table.iterrows():
        for m in ("auc", tpr):
            out[(r["detector"], m)][attack_label(r["attack"], r["eps"])] = r[m]
    for _, r in strip_table.iterrows():
        for m in ("auc", tpr):
            out[(STRIP, m)][r["change"]] = r[m]
    for _, r in data_table.iterrows():
        for m in ("auc", tpr):
            out[(r["detector"], m)][r["change"]] = r[m]
    clean = cells.loc[cells["change"] == CLEAN, "statistic"].to_numpy(np.float64)
    for label, group in cells.groupby("change", sort=False):
        if label == CLEAN:
            continue
        stat = group["statistic"].to_numpy(np.float64)
        both = np.r_[clean, stat]
        truth = np.r_[np.zeros(len(clean), bool), np.ones(len(stat), bool)]
        out[(FINGERPRINT, "auc")][label] = detect.roc_auc(both, truth)
        out[(FINGERPRINT, tpr)][label] = detect.tpr_at_fpr(both, truth, cfg.fpr)
    rows = [{"detector": d, "metric": m, **{c: vals.get(c, np.nan) for c in columns}}
            for (d, m), vals in out.items()]
    return pd.DataFrame(rows, columns=["detector", "metric", *columns])


def _one_blas_thread(fn):
    """fn with the BLAS libraries held to one thread while it runs (module docstring)."""

    @functools.wraps(fn)
    def inner(*args, **kw):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kw)

    return inner


PARTS = ("detectors", "scan-model", "categorizer-lofo")  # one bench cell each (`run`)


@_one_blas_thread
def run(ds: Dataset, *, quick: bool = False, seed: int = 0,
        config: BenchConfig | None = None,
        parts: tuple[str, ...] = PARTS) -> dict[str, pd.DataFrame]:
    """Train, change, detect and categorize; return the tables named in the module docstring.

    quick: the small configuration (`QUICK`: hidden 64, 3,000-image samples, 4 seeds) instead
    of `FULL`; config overrides both. parts: which of `PARTS` to run (a name or a tuple of
    names), each with its own population: "scan-model" ("scan_model", "scan_model_summary";
    none when the config's scan_model is None), "categorizer-lofo" ("categorizer_lofo"; none
    when lofo_refs is 0) and "detectors" (every other table of the module docstring). The
    bench runs each part as its own cell.
    "timing" has the stages of the parts run. Same seed, same tables. ConfigError for an
    unknown part.
    """
    cfg = (config or (QUICK if quick else FULL)).validate()
    if isinstance(parts, str):
        parts = (parts,)
    if not isinstance(parts, (tuple, list)):
        raise ConfigError(f"detection bench: expected parts a tuple of names from "
                          f"{list(PARTS)}, found {parts!r}")
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"detection bench: expected parts among {list(PARTS)}, found "
                          f"{unknown or 'none'}")
    timing: dict[str, float] = {}
    out: dict[str, pd.DataFrame] = {}
    if "detectors" in parts:
        out.update(_detectors(cfg, ds, seed, timing))
    if "categorizer-lofo" in parts and cfg.lofo_refs:
        clock = time.perf_counter()
        out.update(_categorizer_lofo(cfg, ds, seed))
        timing["categorizer leave-one-family-out"] = time.perf_counter() - clock
    if "scan-model" in parts and cfg.scan_model is not None:
        clock = time.perf_counter()  # the reference-free scan (scan_bench.py)
        out.update(scan_bench.scan_table(ds, seed=seed, config=cfg.scan_model))
        timing["scan-model table"] = time.perf_counter() - clock
    out["timing"] = pd.DataFrame({"seconds": timing}).rename_axis("stage")
    return out


def _detectors(cfg: BenchConfig, ds: Dataset, seed: int,
               timing: dict[str, float]) -> dict[str, pd.DataFrame]:
    """The "detectors" part of `run`: its tables; its stages' seconds added to timing."""
    clock = time.perf_counter()
    key = attack_key(seed)  # input changes and detector draws: apart from training keys
    members = _Members(cfg, seed)
    sample = min(cfg.sample_size, len(ds.y_train))
    plan = plan_for(cfg.recipe, TrainConfig(hidden=cfg.hidden), ds.spec)
    model = plan.arch
    chunk = population_chunk(len(members.configs), sample, len(ds.y_train),
                             int(np.prod(np.shape(ds.x_train)[1:])), cfg.memory_cap)
    pop, idx = train_sampled(plan, members.configs, ds.x_train, ds.y_train,
                             seeds=members.table["member_seed"].tolist(), size=sample,
                             chunk=chunk)
    timing["train population"] = time.perf_counter() - clock
    timing["population members"] = float(len(members.configs))
    timing["members per vmap"] = float(chunk)

    clock = time.perf_counter()
    probes = fingerprint.make_probes(ds.x_test, ds.y_test, n=cfg.probes,
                                     n_patched=cfg.n_patched, seed=seed, spec=ds.spec)
    resp = fingerprint.model_responses(model, pop.params, probes)
    found = fingerprint.reverse(model, pop.params, probes,  # every member's triggers, one jit
                                key=jax.random.fold_in(key, 10**6 + 2))
    null_resp = _take(resp, members.rows("null"))
    cells, feats, inputs = [], [], []
    for s in range(cfg.seeds):
        ref_i = int(members.rows("reference", s)[0])
        ref, ref_p, ref_t = _take(resp, ref_i), member(pop.params, ref_i), _take(found, ref_i)
        null = fingerprint.FeatureNull(fingerprint.feature_matrix({
            **fingerprint.fingerprints(ref, null_resp, probes.y),
            **fingerprint.trigger_features(model, ref_p, ref_t,
                                           _take(found, members.rows("null")), probes)}))
        sus_rows = members.rows("suspect", s)
        xs = changed_inputs(model, ref_p, probes, cfg.attacks, jax.random.fold_in(key, s))
        sus = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _take(resp, sus_rows),
                           fingerprint.input_responses(model, ref_p, xs, probes))
        trig = jax.tree.map(
            lambda a, b: jnp.concatenate([a, b]),
            fingerprint.trigger_features(model, ref_p, ref_t, _take(found, sus_rows), probes),
            fingerprint.input_trigger_features(model, ref_p, ref_t, xs, probes))
        f = fingerprint.feature_matrix({**fingerprint.fingerprints(ref, sus, probes.y),
                                        **trig})
        test = fingerprint.change_test(f, null)
        kinds = list(members.table.loc[sus_rows, "kind"]) + [k for k, _ in cfg.attacks]
        labels = list(members.table.loc[sus_rows, "label"]) + [
            attack_label(k, e) for k, e in cfg.attacks]
        for j, (kind, label) in enumerate(zip(kinds, labels, strict=True)):
            cells.append({"seed": s, "kind": kind, "change": label,
                          "category": categorize.category_of(kind),
                          "p_value": test.p_value[j], "statistic": test.statistic[j]})
        feats.append(f)
        inputs.append(categorize.categorizer_inputs(f, null))
    cells = pd.DataFrame(cells)
    feats, inputs = np.concatenate(feats), np.concatenate(inputs)
    timing["fingerprints and tests"] = time.perf_counter() - clock

    clock = time.perf_counter()
    predicted = categorize.cross_validate(inputs, cells["category"].tolist(),
                                          cells["seed"].to_numpy())
    cells["predicted"] = predicted
    confusion = categorize.confusion_table(cells["category"], predicted)
    timing["categorizer"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ref0 = member(pop.params, int(members.rows("reference", 0)[0]))
    input_table = _input_detector_table(cfg, ds, model, ref0, jax.random.fold_in(key, 10**6))
    timing["input detectors"] = time.perf_counter() - clock

    clock = time.perf_counter()
    data_table = _training_data_table(cfg, ds, members, pop, idx,
                                      jax.random.fold_in(key, 10**6 + 1))
    timing["training-data detectors"] = time.perf_counter() - clock

    clock = time.perf_counter()
    strip_table = _strip_table(cfg, ds, members, pop, jax.random.fold_in(key, 10**6 + 2))
    timing["strip"] = time.perf_counter() - clock

    change_table = _change_table(cfg, cells)
    columns = [attack_label(k, e) for k, e in cfg.attacks] + [
        poison_label(k, f) for k, f in cfg.poisonings]
    auc = pd.DataFrame(np.nan, index=list(ROWS), columns=columns)
    auc.index.name = "detector"
    for _, r in input_table.iterrows():
        auc.loc[r["detector"], attack_label(r["attack"], r["eps"])] = r["auc"]
    for label, r in change_table.drop(index=CLEAN).iterrows():
        auc.loc[FINGERPRINT, label] = r["auc"]
    for _, r in data_table.iterrows():
        auc.loc[r["detector"], r["change"]] = r["auc"]
    for _, r in strip_table.iterrows():
        auc.loc[STRIP, r["change"]] = r["auc"]
    return {
        "auc": auc,
        "detector_by_attack": _detector_by_attack(cfg, columns, input_table, strip_table,
                                                  data_table, cells),
        "strip": strip_table,
        "input_detectors": input_table,
        "change_test": change_table,
        "confusion": confusion,
        "training_data": data_table,
        "cells": pd.concat([cells, pd.DataFrame(feats, columns=fingerprint.FEATURES)],
                           axis=1),
        "detectors": DETECTORS,
    }




def _categorizer_lofo(cfg: BenchConfig, ds: Dataset, seed: int) -> dict[str, pd.DataFrame]:
    """The leave-one-family-out table (`change_generator.lofo`) for cfg's recipe, width,
    sample size, null pool, probes and alpha: {"categorizer_lofo"}, and with 3 references
    or more "categorizer_in_family" (the same changes, each decided by a categorizer that
    knew every family but not the change's reference)."""
    gen = change_generator.GeneratorConfig(
        recipe=cfg.recipe, hidden=cfg.hidden, sample_size=cfg.sample_size,
        n_null=cfg.lofo_null,
        probes=cfg.probes, n_patched=cfg.n_patched, alpha=cfg.alpha,
        memory_cap=cfg.memory_cap)
    table, realised = change_generator.lofo(ds, n_refs=cfg.lofo_refs,
                                            per_family=cfg.lofo_per_family, config=gen,
                                            seed=seed)
    out = {"categorizer_lofo": table}
    if "in_family" in realised.cells:
        out["categorizer_in_family"] = categorize.lofo_table(realised.cells,
                                                             realised.cells["in_family"])
    return out


def _change_table(cfg: BenchConfig, cells: pd.DataFrame) -> pd.DataFrame:
    """Per change kind: AUC of the statistic against the clean retrains, detection rate at
    alpha, mean p-value, cross-entropy of the "changed" probability (positives and the
    clean negatives together). The clean row: its false-positive rate at alpha."""
    clean = cells[cells["change"] == CLEAN]
    rows = {}
    for label, group in cells.groupby("change", sort=False):
        row = {"n": len(group), "detected": float(np.mean(group["p_value"] <= cfg.alpha)),
               "mean_p": float(group["p_value"].mean())}
        if label != CLEAN:
            both = pd.concat([clean, group])
            truth = np.r_[np.zeros(len(clean), bool), np.ones(len(group), bool)]
            row["auc"] = detect.roc_auc(both["statistic"], truth)
            row["cross_entropy"] = detect.binary_cross_entropy(
                fingerprint.changed_probability(both["p_value"]), truth)
        rows[label] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "change"
    return table[["n", "auc", "detected", "mean_p", "cross_entropy"]]


def with_overrides(base: BenchConfig, **kw) -> BenchConfig:
    """base with some fields replaced (for tests and the CLI), validated."""
    return replace(base, **kw).validate()
