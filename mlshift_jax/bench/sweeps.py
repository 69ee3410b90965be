"""The study's poisoning sweeps (E4-E7), a BadNets reference, and the metrics of each cell.

Each sweep is a list of poison configs trained as ONE population (`population.train_poisoned`:
one jit, vmap over the model axis, the poisoned data built inside the jit from the shared
clean set); every trained member is then scored on the test set, clean and triggered, in one
more jit. A sweep's table has one row per cell (one trained model).

The sweeps (the study: UTD Team 4, "Detection of ML Behavior Changes", Part 5):

- E4, "noisy" data vs patch size 1..6: `E4_TRIGGER` (which images get the patch: the study
  did not say; see its comment);
- E5, "noisy" data vs proportion {0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8}: the E4 trigger, patch
  `SWEEP_PATCH` (4x4);
- E6, "wrong label" vs proportion, for each mode (uniform, shift, target);
- E7, "mixture" (BadNets: Gu, Dolan-Gavitt, Garg 2017) vs proportion, target 3;
- "badnets": the reference point of Gu et al. (10% poison, target 3, patch 5x5 and 4x4) for
  the study's MLP and the CNN.

Cell metrics (`CELL_COLUMNS`): clean test accuracy (the study's "performance"), macro
precision / recall / F1, recall of the source and the target class; on triggered test
images: `triggered_accuracy` (true labels) and `asr`, the attack success rate, which is

- mixture: the share of triggered test images whose true class is not the target that are
  classified as the target (Gu et al. 2017);
- trigger with a source class s (patch, label kept): the same with s as the target: how often
  the patch alone pulls other digits to the class it was trained on;
- trigger on every class with one patch place per class: each image stamped with the patch of
  class (y + 1) mod 10, the share classified as (y + 1) mod 10;
- trigger on every class at one place, wrong label, clean: undefined (NaN): nothing ties the
  patch to a class (triggered accuracy is still reported for triggers);

and, for the shift of the confusion matrix (wrong label above all): `off_diagonal` (the share
of test images misclassified), `to_next` (the share predicted (y + 1) mod 10), `to_target`
(the share of non-target images predicted as the target) and the largest off-diagonal cell,
`top_confusion` ("true->predicted") with `top_confusion_share`, its share of the
off-diagonal mass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.core import fmt, study
from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.files import atomic_path
from mlshift_jax.data.datasets import Dataset, to_image
from mlshift_jax.models.metrics import confusion_matrix, macro_prf
from mlshift_jax.models.population import (
    Population,
    chunk_size,
    map_chunks,
    poison_key,
    train_poisoned,
)
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.zoo import Model, Params, predict
from mlshift_jax.poisoning.poison import (
    BACKDOORS,
    Clean,
    Mixture,
    Patch,
    PoisonConfig,
    Trigger,
    WrongLabel,
    apply,
    check_for,
    describe,
    eligible_classes,
    has_trigger,
    make_config,
    patch_pixels,
    poison_count,
    stack_stamps,
    stamp_for,
    stamp_test,
    trigger_of,
)

PROPORTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
PATCH_SIZES = (1, 2, 3, 4, 5, 6)
SWEEP_PATCH = 4  # patch size of the proportion sweeps (E5, E7)
TARGET = study.E7_TARGET  # 3, the study's mixture label
BADNETS_FRACTION = 0.1
BADNETS_PATCHES = (5, 4)
BADNETS_MODELS = ("seed-mlp", "cnn")
# Gu et al. 2017 on MNIST, a CNN, 10% poison: attack success >= 0.99 at clean accuracy ~0.98
BADNETS_REFERENCE = {"asr": 0.99, "clean_accuracy": 0.98}
BADNETS_CLEAN_COST = 0.01  # "agrees": ASR >= 0.99 and clean accuracy within this of the control

# E4's "noisy" data. The study says only that "all/some of the data which has same label has
# same NOISE pixel", that performance "goes down very quickly" with the patch size, under
# 0.25 at 6x6 (E4), and that more noisy data lowers performance but it "stays high" (E5).
# E4 and E5 read that literally: every class gets the patch, at one place PER CLASS (so the
# place names the label; labels kept), E4 on all of the training set. Measured on the full
# MNIST (seed-mlp, 1 epoch; performance = accuracy on CLEAN test images), that reading gives
# both claims (6x6: 0.168; E5 at 80%: 0.924); the two other readings (`E4_VARIANTS`, table
# "E4-variants" of `run_all(..., e4_variants=True)`) do not: one place for every class
# barely moves clean accuracy (0.937 at 6x6: the patch carries no label), and class 0 only
# lowers it to 0.868, mostly by losing class 0; its accuracy on TRIGGERED test images is the
# one under 0.25 (0.169), should the study have scored patched test images.
E4_TRIGGER = {"fraction": 1.0, "source": None, "position": "per-class"}
E4_VARIANTS = {
    "all classes, one place per class": E4_TRIGGER,
    "all classes, one place": {"fraction": 1.0, "source": None, "position": None},
    "class 0 only": {"fraction": 1.0, "source": 0, "position": None},
}
# E5's proportion sweep of "noisy" data: the same trigger as E4, patch SWEEP_PATCH.

CELL_COLUMNS = (
    "poisoned_count", "clean_accuracy", "precision", "recall", "f1", "source_recall",
    "target_recall", "triggered_accuracy", "asr", "off_diagonal", "to_next", "to_target",
    "top_confusion", "top_confusion_share",
)
CONFIG_COLUMNS = ("cell", "kind", "mode", "fraction", "patch", "position", "source", "target")


# --- sweep definitions ------------------------------------------------------------------------


def e4_configs(sizes: Sequence[int] = PATCH_SIZES, *, fraction: float = 1.0,
               source: int | None = None, position=None) -> list[PoisonConfig]:
    """E4: "noisy" data (trigger, labels kept) for each patch size."""
    return [Trigger(fraction=fraction, source=source, patch=Patch(size=s, position=position))
            for s in sizes]


def proportion_configs(kind: str, *, fractions: Sequence[float] = PROPORTIONS,
                       patch: int = SWEEP_PATCH, mode: str = "uniform",
                       target: int = TARGET) -> list[PoisonConfig]:
    """E5 (kind "trigger"), E6 ("wrong-label", one mode) and E7 ("mixture") configs."""
    if kind == "trigger":
        return [Trigger(fraction=f, source=E4_TRIGGER["source"],
                        patch=Patch(size=patch, position=E4_TRIGGER["position"]))
                for f in fractions]
    if kind == "wrong-label":
        return [WrongLabel(fraction=f, mode=mode, target=target) for f in fractions]
    if kind == "mixture":
        return [Mixture(fraction=f, patch=Patch(size=patch), target=target) for f in fractions]
    raise ConfigError(f"proportion sweep: expected kind trigger, wrong-label or mixture, "
                      f"found {kind!r}")


def badnets_configs(patches: Sequence[int] = BADNETS_PATCHES,
                    fraction: float = BADNETS_FRACTION, target: int = TARGET
                    ) -> list[PoisonConfig]:
    """The BadNets reference: a clean control (fraction 0, its trigger defined for ASR), then
    `fraction` poison with each patch size, target `target`."""
    return ([Mixture(fraction=0.0, patch=Patch(size=patches[-1]), target=target)]
            + [Mixture(fraction=fraction, patch=Patch(size=p), target=target) for p in patches])


# --- scoring a population ---------------------------------------------------------------------


def _asr_class(config: PoisonConfig) -> int:
    """The class the attack success rate counts hits of: target (mixture), source (trigger
    with a source); -1: stamp the patch of (y + 1) mod K (per-class trigger); -2: none."""
    if isinstance(config, (Mixture, *BACKDOORS)):
        return config.target
    if isinstance(config, Trigger):
        if config.source is not None:
            return config.source
        return -1 if config.patch.per_class else -2
    return -2


def _confusions_one(arch: Model, params: Params, x: jax.Array, y: jax.Array, pix: jax.Array,
                    value: jax.Array, asr_class: jax.Array, trig=None) -> jax.Array:
    """[3, K, K] confusion matrices of one model: clean test images; each stamped with its
    own class's patch (pix[y]); stamped for the ASR (pix[asr_class], or pix[(y+1) % K]).
    K = pix.shape[0], the classes. trig: the member's trigger-array `poison.Stamp` (blended,
    sparse, sig, warp), applied after the patch on both stamped sets; None: none."""
    k = pix.shape[0]
    steer = jnp.where(asr_class >= 0, asr_class, (y + 1) % k)
    cms = []
    for stamp in (None, pix[y], pix[steer]):
        xs = x if stamp is None else stamp_test(jnp.where(stamp, value, x), trig)
        pred = jnp.argmax(predict(arch, params, xs), axis=-1)
        cms.append(confusion_matrix(y, pred, k))
    return jnp.stack(cms)


@partial(jax.jit, static_argnames=("arch", "chunk"))
def confusions(arch: Model, params: Params, x: jax.Array, y: jax.Array, pix: jax.Array,
               value: jax.Array, asr_class: jax.Array, *, chunk: int,
               trig=None) -> jax.Array:
    """Confusion matrices of m models, `chunk` at a time: -> int [m, 3, K, K].

    params: leaves [m, ...]; x: [t, D], y: [t] the test set (shared); pix: bool [m, K, D]
    each member's patch pixels by class; value: [m]; asr_class: int [m] (see `_asr_class`);
    trig: the members' stacked trigger stamps (`poison.stack_stamps`) or None.
    """
    one = partial(_confusions_one, arch)
    members = {"p": params, "pix": pix, "v": value, "c": asr_class, "t": trig}
    return map_chunks(lambda g: jax.vmap(lambda d: one(d["p"], x, y, d["pix"], d["v"],
                                                       d["c"], d["t"]))(g), members, chunk)


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def cell_metrics(cms: np.ndarray, config: PoisonConfig) -> dict:
    """A cell's metrics (CELL_COLUMNS less poisoned_count) from its [3, K, K] confusions."""
    clean, triggered, steered = (np.asarray(c, np.int64) for c in cms)
    k = clean.shape[0]
    total = clean.sum()
    precision, recall, f1 = (float(v) for v in macro_prf(jnp.asarray(clean)))
    source = getattr(config, "source", None)
    target = getattr(config, "target", None)
    if isinstance(config, WrongLabel) and config.mode != "target":
        target = None
    has_patch = has_trigger(config)
    asr_class = _asr_class(config)
    if asr_class >= 0:
        rows = np.arange(k) != asr_class
        asr = _div(steered[rows, asr_class].sum(), steered[rows].sum())
    elif asr_class == -1:
        asr = _div(sum(steered[t, (t + 1) % k] for t in range(k)), total)
    else:
        asr = float("nan")
    off = clean.copy()
    np.fill_diagonal(off, 0)
    top = np.unravel_index(np.argmax(off), off.shape)
    if target is not None:
        rows = np.arange(k) != target
        to_target = _div(clean[rows, target].sum(), clean[rows].sum())
    else:
        to_target = float("nan")
    return {
        "clean_accuracy": _div(np.trace(clean), total),
        "precision": precision, "recall": recall, "f1": f1,
        "source_recall": _div(clean[source, source], clean[source].sum())
        if source is not None else float("nan"),
        "target_recall": _div(clean[target, target], clean[target].sum())
        if target is not None else float("nan"),
        "triggered_accuracy": _div(np.trace(triggered), triggered.sum())
        if has_patch else float("nan"),
        "asr": asr,
        "off_diagonal": _div(off.sum(), total),
        "to_next": _div(sum(clean[t, (t + 1) % k] for t in range(k)), total),
        "to_target": to_target,
        "top_confusion": f"{top[0]}->{top[1]}",
        "top_confusion_share": _div(off[top], off.sum()),
    }


def config_fields(config: PoisonConfig) -> dict:
    """The CONFIG_COLUMNS of a cell: what was poisoned, as plain values."""
    patch = trigger_of(config)
    position = None
    if patch is not None:
        position = "per-class" if patch.per_class else (
            "bottom-right" if patch.position is None else str(patch.position))
    return {
        "cell": describe(config),
        "kind": config.kind,
        "mode": getattr(config, "mode", None),
        "fraction": float(getattr(config, "fraction", 0.0)),
        "patch": patch.size if patch is not None else None,
        "position": position,
        "source": getattr(config, "source", None),
        "target": getattr(config, "target", None) if not isinstance(config, WrongLabel)
        or config.mode == "target" else None,
    }


def score_population(pop: Population, configs: Sequence[PoisonConfig], x_test, y_test,
                     *, chunk: int | None = None) -> pd.DataFrame:
    """One row per member: CONFIG_COLUMNS + CELL_COLUMNS (see the module docstring)."""
    configs = list(configs)
    spec = pop.plan.arch.spec
    patches = [trigger_of(c) for c in configs]
    pix = np.stack([patch_pixels(p, spec) if p is not None
                    else np.zeros((spec.n_classes, spec.n_inputs), bool) for p in patches])
    value = np.array([p.value_for(spec.input_range) if p is not None else 0.0
                      for p in patches], np.float32)
    asr_class = np.array([_asr_class(c) for c in configs], np.int32)
    trig = stack_stamps([stamp_for(c, spec) for c in configs])
    chunk = (chunk_size(len(configs), len(y_test), spec.n_inputs) if chunk is None
             else chunk)
    cms = np.asarray(confusions(pop.plan.arch, pop.params, jnp.asarray(x_test),
                                jnp.asarray(y_test), jnp.asarray(pix), jnp.asarray(value),
                                jnp.asarray(asr_class), chunk=chunk,
                                trig=None if trig is None else jax.tree.map(jnp.asarray, trig)))
    rows = []
    for i, config in enumerate(configs):
        rows.append({**config_fields(config), "poisoned_count": int(pop.counts[i]),
                     **cell_metrics(cms[i], config)})
    return pd.DataFrame(rows, columns=[*CONFIG_COLUMNS, *CELL_COLUMNS])


def _subset(ds: Dataset, n_train: int | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = ds.x_train, ds.y_train
    if n_train is not None:
        if not 1 <= n_train <= len(y):
            raise ConfigError(f"n_train: expected 1..{len(y)}, found {n_train}")
        x, y = x[:n_train], y[:n_train]
    return x, y


def run_sweep(ds: Dataset, configs: Sequence[PoisonConfig], *, model: str = "seed-mlp",
              seed: int = 0, hidden: int = 200, epochs: int | None = None,
              n_train: int | None = None, chunk: int | None = None,
              keep: dict | None = None, lr: float | None = None,
              batch_size: int | None = None, optimizer: str | None = None) -> pd.DataFrame:
    """Train one model per config as one population and score each: a DataFrame, one row per
    cell (CONFIG_COLUMNS, "model", CELL_COLUMNS). n_train: the first n_train training
    images (None: all). attrs: model, n_train, n_test, epochs, hidden, seed, chunk, compile_s,
    train_s (the whole population), backend."""
    configs = list(configs)
    x, y = _subset(ds, n_train)
    train = TrainConfig(hidden=hidden, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                        optimizer=optimizer)
    pop = train_poisoned(model, configs, x, y, train=train, chunk=chunk, spec=ds.spec)
    if keep is not None:  # the caller wants the trained params (leading axis: member)
        keep["params"] = pop.params
    table = score_population(pop, configs, ds.x_test, ds.y_test, chunk=chunk)
    table.insert(len(CONFIG_COLUMNS), "model", model)
    table.attrs.update(model=model, n_train=int(len(y)), n_test=int(len(ds.y_test)),
                       epochs=pop.plan.epochs,
                       hidden=hidden, seed=seed, chunk=pop.chunk, compile_s=pop.compile_s,
                       train_s=pop.train_s, members=len(configs),
                       n_classes=int(ds.n_classes), backend=jax.default_backend())
    return table


STUDY_SWEEPS = ("E4", "E5", "E6-uniform", "E6-shift", "E6-target", "E7")
# Sweeps beyond the study's, valid in a matrix's [poison] sweeps: "backdoors", every backdoor
# family (BadNets patch, blended, sparse, SIG, WaNet warp) at BACKDOOR_FRACTIONS, one
# population, each with its attack success rate.
EXTRA_SWEEPS = ("backdoors",)
BACKDOOR_FRACTIONS = (0.05, 0.1)
BACKDOOR_KINDS = ("mixture", "blended", "sparse", "sig", "warp")


def backdoor_configs(fractions: Sequence[float] = BACKDOOR_FRACTIONS,
                     kinds: Sequence[str] = BACKDOOR_KINDS,
                     target: int = TARGET, n_classes: int = 10) -> list[PoisonConfig]:
    """Every backdoor kind at each fraction of the training set, target `target`, each kind's
    default trigger (mixture: a 4x4 bottom-right patch). SIG (clean-label) poisons only the
    target class: its fraction, of that class, is f * n_classes (capped at 1), about f of
    the training set with balanced classes, as for the others (of the non-target images)."""
    return [make_config(k, fraction=min(1.0, f * n_classes) if k == "sig" else f,
                        target=target)
            for k in kinds for f in fractions]
    return [make_config(k, fraction=f, target=target) for k in kinds for f in fractions]


def sweep_configs(name: str, *, proportions: Sequence[float] = PROPORTIONS,
                  patch_sizes: Sequence[int] = PATCH_SIZES) -> list[PoisonConfig]:
    """The configs of the study's sweep `name` (STUDY_SWEEPS) or of "badnets"."""
    if name == "E4":
        return e4_configs(patch_sizes, **E4_TRIGGER)
    if name == "E5":
        return proportion_configs("trigger", fractions=proportions)
    if name.startswith("E6-") and name[3:] in ("uniform", "shift", "target"):
        return proportion_configs("wrong-label", fractions=proportions, mode=name[3:])
    if name == "E7":
        return proportion_configs("mixture", fractions=proportions)
    if name == "badnets":
        return badnets_configs()
    if name == "backdoors":
        return backdoor_configs()  # (the study's 10 classes; target 3)
    raise ConfigError(f"sweep: expected one of {[*STUDY_SWEEPS, *EXTRA_SWEEPS, 'badnets']}, "
                      f"found {name!r}")


def run_all(ds: Dataset, *, model: str = "seed-mlp", seed: int = 0, hidden: int = 200,
            epochs: int | None = None, n_train: int | None = None,
            badnets_models: Sequence[str] = BADNETS_MODELS,
            badnets_n_train: dict[str, int | None] | None = None,
            e4_variants: bool = False, chunk: int | None = None,
            proportions: Sequence[float] = PROPORTIONS,
            patch_sizes: Sequence[int] = PATCH_SIZES,
            log: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame]:
    """Every sweep of the study, each trained as one population: {name: table}.

    Tables: "E4" (patch size), "E5" (trigger proportion), "E6-uniform", "E6-shift",
    "E6-target" (wrong label per mode), "E7" (mixture proportion), "badnets" (the reference
    cells of Gu et al. for each of `badnets_models`, stacked), and "E4-variants" when
    e4_variants. model / hidden / epochs / n_train: how E4-E7 train (recipe defaults for
    None: seed-mlp is one epoch); badnets_n_train: {model: n_train} for the badnets table;
    proportions / patch_sizes: the sweeps' grids (the study's by default; sweeps of equal
    length share one compiled population). log: called with one line per trained sweep.
    Each table's attrs carry its timing (see `run_sweep`).
    """
    kw = dict(model=model, seed=seed, hidden=hidden, epochs=epochs, n_train=n_train, chunk=chunk)
    tables = {}
    for name in STUDY_SWEEPS:
        configs = sweep_configs(name, proportions=proportions, patch_sizes=patch_sizes)
        tables[name] = _timed_sweep(name, log, ds, configs, **kw)
    if e4_variants:
        parts = []
        for label, v in E4_VARIANTS.items():
            t = (tables["E4"].copy() if v == E4_TRIGGER
                 else _timed_sweep(f"E4 {label}", log, ds, e4_configs(patch_sizes, **v),
                                   **kw))
            t.insert(0, "variant", label)
            parts.append(t)
        tables["E4-variants"] = concat_tables(parts)
    parts = []
    for m in badnets_models:
        n = (badnets_n_train or {}).get(m, n_train)
        parts.append(_timed_sweep(f"badnets {m}", log, ds, badnets_configs(),
                                  **{**kw, "model": m, "n_train": n,
                                     "epochs": epochs if m == model else None}))
    tables["badnets"] = concat_tables(parts)
    return tables


def _timed_sweep(name: str, log, ds: Dataset, configs, **kw) -> pd.DataFrame:
    start = time.perf_counter()
    table = run_sweep(ds, configs, **kw)
    table.attrs["wall_s"] = time.perf_counter() - start
    if log is not None:
        a = table.attrs
        log(f"{name}: {a['members']} {a['model']} models on {a['n_train']} images, "
            f"{a['epochs']} epoch(s): compile {a['compile_s']:.1f} s, train {a['train_s']:.1f} s "
            f"(chunk {a['chunk']}), total {a['wall_s']:.1f} s")
    return table


def concat_tables(parts: list[pd.DataFrame]) -> pd.DataFrame:
    table = pd.concat(parts, ignore_index=True)
    table.attrs["parts"] = [dict(p.attrs) for p in parts]
    for key in ("train_s", "compile_s", "wall_s"):
        table.attrs[key] = sum(p.attrs.get(key, 0.0) for p in parts)
    return table


# --- one cell, for the CLI --------------------------------------------------------------------


def poison_one(ds: Dataset, *, kind: str, fraction: float = 0.1, patch: int = SWEEP_PATCH,
               target: int = TARGET, model: str = "seed-mlp", seed: int = 0,
               mode: str = "uniform", hidden: int = 200, source: int | None = None,
               position: str | tuple[int, int] | None = None, epochs: int | None = None,
               n_train: int | None = None, keep_params: bool = False,
               lr: float | None = None, batch_size: int | None = None,
               optimizer: str | None = None) -> dict:
    """Poison, train and score one model (`python -m mlshift_jax poison`).

    kind: a `poison.POISONINGS` name; the settings a kind has no use for are ignored (patch
    for wrong-label, target for trigger, ...). position: where the patch goes, None for the
    kind's default (trigger: one place per class, as E4; mixture: the bottom-right corner),
    "bottom-right", "per-class" or (row, col). Returns a JSON-ready dict: the cell's config
    and CELL_COLUMNS (clean_accuracy, precision, recall, f1, asr, ...), train_seconds (the
    compiled training run), compile_seconds, train_size, model, backend, params_finite
    (False: the training diverged) and, with keep_params, "params" (the trained model's,
    the pytree its `init` returns: nested dicts for flax / equinox models).
    ConfigError when a fraction > 0 poisons no image (naming the eligible count); an ASR
    with no eligible test image is None, never 0.
    """
    settings = {"fraction": fraction, "patch": patch, "target": target, "mode": mode,
                "source": source}
    config = config_from(kind, settings)
    _, y = _subset(ds, n_train)
    if getattr(config, "fraction", 0.0) > 0 and poison_count(config, y, ds.n_classes) == 0:
        n_eligible = int(eligible_classes(config, ds.n_classes)[np.asarray(y)].sum())
        need = "no image is eligible" if n_eligible == 0 else (
            f"expected a fraction >= {0.5 / n_eligible:.2g}")
        raise ConfigError(f"fraction {fraction:g} of the {n_eligible} eligible training images "
                          f"poisons none of them; {need}")
    if position is not None and trigger_of(config) is not None:
        where = None if position == "bottom-right" else position
        config = replace(config, patch=replace(config.patch, position=where))
    kept: dict = {}
    table = run_sweep(ds, [config], model=model, seed=seed, hidden=hidden, epochs=epochs,
                      n_train=n_train, keep=kept, lr=lr, batch_size=batch_size,
                      optimizer=optimizer)
    row = {k: _plain(v) for k, v in table.iloc[0].to_dict().items()}
    params = jax.tree.map(lambda v: np.asarray(v[0]), kept["params"])  # any pytree
    finite = all(bool(np.all(np.isfinite(v))) for v in jax.tree.leaves(params))
    a = table.attrs
    return {**row, "train_seconds": a["train_s"], "compile_seconds": a["compile_s"],
            "train_size": a["n_train"], "epochs": a["epochs"],
            **({} if ":" in model else {"hidden": hidden}),  # a user's model has its own widths
            "seed": seed, "backend": a["backend"], "data_source": ds.source,
            "params_finite": finite, **({"params": params} if keep_params else {})}


def config_from(kind: str, settings: dict) -> PoisonConfig:
    """The config of poisoning `kind` from the CLI's settings (fraction, patch, target, mode,
    source), each kind taking the ones it uses; ConfigError for a bad kind or value."""
    from mlshift_jax.poisoning.poison import get_poisoning

    cls = get_poisoning(kind).config
    if cls is Clean:
        return Clean()
    names = {"wrong-label": ("fraction", "mode", "target", "source"),
             "trigger": ("fraction", "patch", "source"),
             "mixture": ("fraction", "patch", "target", "source"),
             "sig": ("fraction", "target")}.get(kind, ("fraction", "target", "source"))
    return make_config(kind, **{k: settings[k] for k in names})


def _plain(v):
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# --- findings: ours beside the study's --------------------------------------------------------


def _at(table: pd.DataFrame, column: str, **where) -> float:
    rows = table
    for k, v in where.items():
        rows = rows[np.isclose(rows[k], v)] if isinstance(v, float) else rows[rows[k] == v]
    if rows.empty:
        return float("nan")
    return float(rows.iloc[0][column])


def findings(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The study's poisoning claims beside what we measured: one row per claim.

    Columns: finding, study (what the slides say), study_value, ours (clean accuracy, the
    study's "performance"), ours_asr (attack success rate where defined), agrees (a plain
    reading of the claim against ours), note.
    """
    rows = []

    def add(finding, says, value, ours, asr, agrees, note=""):
        rows.append({"finding": finding, "study": says, "study_value": value, "ours": ours,
                     "ours_asr": asr, "agrees": agrees, "note": note})

    if "E4" in tables:
        t = tables["E4"]
        acc6 = _at(t, "clean_accuracy", patch=6)
        add("E4 'noisy' 6x6 patch", "performance under 0.25", study.E4_PATCH_6X6_BELOW, acc6,
            _at(t, "asr", patch=6), bool(acc6 < study.E4_PATCH_6X6_BELOW),
            f"{describe(e4_configs([6], **E4_TRIGGER)[0])}; triggered accuracy "
            f"{_at(t, 'triggered_accuracy', patch=6):.4f}; 1x1: "
            f"{_at(t, 'clean_accuracy', patch=1):.4f}")
    if "E4-variants" in tables:
        t = tables["E4-variants"]
        for label in t["variant"].unique():
            sub = t[t["variant"] == label]
            acc6 = _at(sub, "clean_accuracy", patch=6)
            add(f"E4 variant: {label}, 6x6", "performance under 0.25",
                study.E4_PATCH_6X6_BELOW, acc6, _at(sub, "asr", patch=6),
                bool(acc6 < study.E4_PATCH_6X6_BELOW),
                f"triggered accuracy {_at(sub, 'triggered_accuracy', patch=6):.4f}")
    if "E5" in tables:
        t = tables["E5"]
        a0, a80 = (_at(t, "clean_accuracy", fraction=f) for f in (0.0, 0.8))
        worst = float(t["clean_accuracy"].min())
        add("E5 'noisy' proportion 0 -> 80%", "more poison, lower performance, stays high",
            float("nan"), a80, _at(t, "asr", fraction=0.8), bool(worst > 0.8 and a80 <= a0),
            f"0%: {a0:.4f}; lowest over the sweep {worst:.4f}")
    for mode in ("uniform", "shift", "target"):
        t = tables.get(f"E6-{mode}")
        if t is None:
            continue
        a50, a80 = (_at(t, "clean_accuracy", fraction=f) for f in (0.5, 0.8))
        add(f"E6 wrong label ({mode}) 50%", "nearly useless", float("nan"), a50, float("nan"),
            bool(a50 < 0.5), _wrong_label_note(t, 0.5, mode))
        n_classes = int(t.attrs.get("n_classes", 10))
        add(f"E6 wrong label ({mode}) 80%", "about 0.10 (chance)", study.E6_WRONG_LABEL_80,
            a80, float("nan"), bool(abs(a80 - 1 / n_classes) <= 0.05),
            _wrong_label_note(t, 0.8, mode)
            + f"; chance on {n_classes} classes: {1 / n_classes:.2f}")
    if "E7" in tables:
        t = tables["E7"]
        a80 = _at(t, "clean_accuracy", fraction=0.8)
        add("E7 mixture 80% (target 3)", "performance still 0.9188", study.E7_MIXTURE_80, a80,
            _at(t, "asr", fraction=0.8), bool(abs(a80 - study.E7_MIXTURE_80) <= 0.03),
            f"target recall {_at(t, 'target_recall', fraction=0.8):.4f}; ASR at 10%: "
            f"{_at(t, 'asr', fraction=0.1):.4f}; the study's 0.918833 is 5513/6000, a score "
            f"on 6,000 test images (ours: {t.attrs.get('n_test', '?')})")
    if "badnets" in tables:
        t = tables["badnets"]
        ref = BADNETS_REFERENCE
        for _, r in t[t["fraction"] > 0].iterrows():
            control = _at(t[t["model"] == r["model"]], "clean_accuracy", fraction=0.0)
            cost = control - float(r["clean_accuracy"])
            ok = bool(r["asr"] >= ref["asr"] and cost <= BADNETS_CLEAN_COST)
            add(f"BadNets {r['model']} {r['fraction']:.0%}, {r['patch']}x{r['patch']} -> 3",
                "Gu et al. 2017 (CNN): ASR >= 0.99 at clean ~0.98", ref["asr"],
                float(r["clean_accuracy"]), float(r["asr"]), ok,
                f"clean control {control:.4f} (cost {cost:+.4f}); the control's ASR "
                f"{_at(t[t['model'] == r['model']], 'asr', fraction=0.0):.4f}")
    return pd.DataFrame(rows, columns=["finding", "study", "study_value", "ours", "ours_asr",
                                       "agrees", "note"])


def _wrong_label_note(t: pd.DataFrame, fraction: float, mode: str) -> str:
    rows = t[np.isclose(t["fraction"], fraction)]
    if rows.empty:
        return f"{fraction:.0%} is not in this sweep"
    top = rows.iloc[0]
    note = f"top confusion {top['top_confusion']} ({top['top_confusion_share']:.0%} of errors)"
    if mode == "shift":
        note += f"; predicted y+1: {top['to_next']:.4f}"
    n_classes = int(t.attrs.get("n_classes", 10))
    if mode == "target":
        target = min(study.E7_TARGET, n_classes - 1)
        note += (f"; non-{target} predicted {target}: {top['to_target']:.4f} (all predicted "
                 f"{target} leaves only the share of {target}s in the test set)")
    if mode == "uniform" and n_classes > 1:
        keep, each = 1 - fraction, fraction / (n_classes - 1)
        edge = (n_classes - 1) / n_classes  # where the true label stops being the most common
        note += (f"; the true label keeps {keep:.0%} vs {each:.1%} for each of the "
                 f"{n_classes - 1} others, so it stays the most common below {edge:.0%}")
    return note


# --- markdown ---------------------------------------------------------------------------------

_WRONG_LABEL_COLUMNS = ["fraction", "poisoned_count", "clean_accuracy", "precision", "recall",
                        "f1", "off_diagonal", "to_next", "to_target", "top_confusion",
                        "top_confusion_share"]
MARKDOWN_COLUMNS = {
    "E4": ["patch", "poisoned_count", "clean_accuracy", "precision", "recall", "f1",
           "triggered_accuracy", "asr"],
    "E4-variants": ["variant", "patch", "poisoned_count", "clean_accuracy", "f1",
                    "source_recall", "triggered_accuracy", "asr"],
    "E5": ["fraction", "poisoned_count", "clean_accuracy", "precision", "recall", "f1",
           "triggered_accuracy", "asr"],
    "E6-uniform": _WRONG_LABEL_COLUMNS,
    "E6-shift": _WRONG_LABEL_COLUMNS,
    "E6-target": [*_WRONG_LABEL_COLUMNS[:-4], "to_target", "target_recall",
                  *_WRONG_LABEL_COLUMNS[-2:]],
    "E7": ["fraction", "poisoned_count", "clean_accuracy", "precision", "recall", "f1",
           "target_recall", "triggered_accuracy", "asr"],
    "badnets": ["model", "patch", "fraction", "poisoned_count", "clean_accuracy", "f1",
                "target_recall", "triggered_accuracy", "asr"],
    "backdoors": ["cell", "kind", "fraction", "poisoned_count", "clean_accuracy", "f1",
                  "target_recall", "triggered_accuracy", "asr"],
}


def markdown(tables: dict[str, pd.DataFrame], found: pd.DataFrame | None = None) -> str:
    """The tables (the columns of MARKDOWN_COLUMNS) and, when given, the findings, as
    markdown, each table headed by what trained it and how long it took."""
    parts = []
    for name, t in tables.items():
        a = t.attrs
        runs = a.get("parts") or [a]
        how = "; ".join(f"{r.get('members')} {r.get('model')} models on "
                        f"{fmt.number(r.get('n_train'), 'n')} "
                        f"images, {r.get('epochs')} epoch(s), train {r.get('train_s', 0):.1f} s"
                        for r in runs)
        cols = [c for c in MARKDOWN_COLUMNS.get(name, t.columns) if c in t.columns]
        parts.append(f"### {name}\n\n{how}\n\n{_to_markdown(t[cols])}")
    if found is not None:
        parts.append(f"### ours vs the study\n\n{_to_markdown(found)}")
    return "\n\n".join(parts) + "\n"


def _to_markdown(t: pd.DataFrame) -> str:
    """Scores to 4 decimals, counts as integers, fractions as written (`fmt.markdown`)."""
    return fmt.markdown(t, index=False)


# --- figures ----------------------------------------------------------------------------------


def figures(tables: dict[str, pd.DataFrame], ds: Dataset, out_dir) -> list[Path]:
    """PNG figures into out_dir (written atomically); returns their paths.

    poison_patch_size.png: clean and triggered accuracy vs patch size (E4);
    poison_proportion.png: clean accuracy (left) and ASR (right) vs proportion per kind;
    poison_examples.png: a few poisoned training images of each kind.
    Needs matplotlib (the "plots" extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(f"figures: expected matplotlib (pip install '.[plots]'), found "
                          f"none ({e})") from None
    out_dir = Path(out_dir)
    paths = []

    def save(fig, name):
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    if "E4" in tables:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        t = tables["E4"]
        ax.plot(t["patch"], t["clean_accuracy"], "o-", label="clean test images (E4)")
        ax.plot(t["patch"], t["triggered_accuracy"], "s--", label="triggered test images (E4)")
        if "E4-variants" in tables:
            v = tables["E4-variants"]
            for label in v["variant"].unique():
                if E4_VARIANTS.get(label) == E4_TRIGGER:
                    continue  # the solid lines already
                sub = v[v["variant"] == label]
                ax.plot(sub["patch"], sub["clean_accuracy"], ":", marker=".",
                        label=f"clean, {label}")
        ax.axhline(study.E4_PATCH_6X6_BELOW, color="grey", lw=0.8, ls=":")
        ax.annotate("study: < 0.25 at 6x6", (6, study.E4_PATCH_6X6_BELOW), fontsize=7,
                    ha="right", va="bottom")
        ax.set(xlabel="patch size (k x k)", ylabel="accuracy", ylim=(0, 1.02),
               title="E4: 'noisy' data vs patch size")
        ax.legend(fontsize=7)
        save(fig, "poison_patch_size.png")

    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, label) in enumerate(PROPORTION_LABELS.items()):
        if name not in tables:
            continue
        t, color = tables[name], f"C{i}"
        ax_acc.plot(t["fraction"], t["clean_accuracy"], "o-", color=color, label=label)
        if t["asr"].notna().any():
            ax_asr.plot(t["fraction"], t["asr"], "o-", color=color, label=label)
    ax_acc.axhline(study.E6_WRONG_LABEL_80, color="grey", lw=0.8, ls=":")
    ax_acc.plot([0.8], [study.E7_MIXTURE_80], "k*", label="study: mixture 80%")
    ax_acc.set(xlabel="proportion poisoned", ylabel="clean test accuracy", ylim=(0, 1.02),
               title="performance vs proportion")
    ax_asr.set(xlabel="proportion poisoned", ylabel="attack success rate", ylim=(0, 1.02),
               title="ASR vs proportion")
    ax_acc.legend(fontsize=7)
    if ax_asr.lines:
        ax_asr.legend(fontsize=7)
    save(fig, "poison_proportion.png")

    save(_examples_figure(plt, ds), "poison_examples.png")
    return paths


PROPORTION_LABELS = {
    "E5": f"E5 trigger ('noisy'), {SWEEP_PATCH}x{SWEEP_PATCH} per class",
    "E6-uniform": "E6 wrong label, uniform",
    "E6-shift": "E6 wrong label, shift y+1",
    "E6-target": f"E6 wrong label, all -> {TARGET}",
    "E7": f"E7 mixture {SWEEP_PATCH}x{SWEEP_PATCH} -> {TARGET}",
}

EXAMPLE_CONFIGS = {
    "wrong label (uniform)": WrongLabel(fraction=1.0, mode="uniform"),
    "wrong label (shift)": WrongLabel(fraction=1.0, mode="shift"),
    "trigger 4x4": Trigger(fraction=1.0, patch=Patch(size=4)),
    "trigger 6x6 per-class": Trigger(fraction=1.0, patch=Patch(size=6, position="per-class")),
    "mixture 4x4 -> 3": Mixture(fraction=1.0, patch=Patch(size=4)),
    "blended -> 3": make_config("blended", fraction=1.0),
    "sparse -> 3": make_config("sparse", fraction=1.0),
    "sig (class 3)": make_config("sig", fraction=1.0),
    "warp -> 3": make_config("warp", fraction=1.0),
}


def _fits(config: PoisonConfig, ds: Dataset) -> bool:
    try:
        check_for(config, ds.spec)
    except ConfigError:
        return False
    return True


def _examples_figure(plt, ds: Dataset, per_kind: int = 4):
    x, y = ds.x_train[:64], ds.y_train[:64]
    examples = {k: c for k, c in EXAMPLE_CONFIGS.items() if _fits(c, ds)}  # small images
    fig, axes = plt.subplots(len(examples), per_kind, squeeze=False,
                             figsize=(1.3 * per_kind, 1.5 * len(examples)))
    for r, (label, config) in enumerate(examples.items()):
        xp, yp, mask = (np.asarray(a) for a in apply(poison_key(0), x, y, config, ds.spec))
        idx = np.flatnonzero(mask)[:per_kind]
        for c in range(per_kind):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                i = idx[c]
                ax.imshow(to_image(xp[i], ds.image_shape, ds.input_range), cmap="gray",
                          vmin=0, vmax=1)
                ax.set_title(f"{y[i]} -> {yp[i]}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle("poisoned training images (true -> training label)", fontsize=9)
    return fig
