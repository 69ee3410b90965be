"""The held-out backdoor-scan benchmark: `mlshift scan-model`'s calibrated verdict (Neural
Cleanse and MM-BD, one min-p rule: `detection.scan`) judged on models it never saw.

Two populations of one recipe (each model on every training image in its own random order,
as `scan-model`'s null by default, or on its own random sample of `sample_size` images;
each with its own seed):

- the **null** (`scan.calibrate_null`, exactly as `scan-model` builds it, at the bench's
  sample size and search settings): `n_null` clean models, each one of the 13 benign variants
  of `detection.benign` in turn; the verdict's cut-off is set on it at `alpha`, and its
  held-out false-positive rate over folds of the null is reported as the CLI reports it;
- the **held-out** set, made apart (member seeds from `HELDOUT_STREAM`, never the null's):
  `per_variant` more models of every benign variant (retrains with other seeds, samples,
  epochs and learning rates; pruning 10/30/50%; 8- and 4-bit and float16 weights; a clean
  fine-tune; distillation), and for each trigger family in `kinds` and poison rate in
  `rates`, `per_cell` BadNets-style backdoors: that share of the sample, drawn from the other
  classes, stamped with the family's trigger (`poisoning.triggers`; blended and sparse drawn
  per model) and relabelled to a target class drawn per model. Stamping happens inside the
  jit; every group of models is one vmap.

Every held-out model is scanned as the null was (same images, keys and settings) and judged
by `scan.judge`, the function `scan-model` calls, so this table and the CLI cannot drift.
`scan_table` returns:

- "scan_model": one row per held-out change: kind ("clean" for plain retrains, "benign",
  or the trigger family), rate, models, detected (share called "backdoor": the false-positive
  rate on the clean and benign rows, the detection rate on backdoors), found (flagged with
  the right target), target_accuracy (the verdict's target class right, flagged or not),
  asr (the backdoors' attack success rate: the share of the first `asr_images` test images
  not of the target class that the model's own trigger sends to the target),
  nc_flagged / mm_bd_flagged (the share each detector's p-value alone is at or below the
  cut-off), mean_min_p;
- "scan_model_summary": the null's size and alpha, the cut-off, the null's held-out FPR
  (and each detector's), the held-out set's clean + benign FPR, the search settings, and
  seconds: null training and scanning, held-out training, per model within the held-out
  scan, and one model alone (Neural Cleanse compiled, median of `rounds`, plus MM-BD).

What a run measured is in its results folder (tables.md, the scan-model section).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mlshift_jax.core.errors import ConfigError
from mlshift_jax.core.timing import time_call
from mlshift_jax.data.datasets import Dataset, subsample
from mlshift_jax.detection import benign, mm_bd, scan
from mlshift_jax.detection import neural_cleanse as nc
from mlshift_jax.models.population import fit_group, init_members, member, plan_for
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.train import map_chunks
from mlshift_jax.poisoning import triggers

HELDOUT_STREAM = 0x6E1D0  # held-out member seeds: + seed * 10,000 (the null's: scan.NULL_STREAM)
CLEAN_VARIANT = "retrain"  # the benign variant reported as the "clean" row


@dataclass(frozen=True)
class ScanBenchConfig:
    """What `scan_table` trains and scans (see the module docstring)."""

    recipe: str = "seed-mlp"
    hidden: int = 200
    sample_size: int | None = None  # training images of each model (None: all, as the CLI)
    n_null: int = 104
    alpha: float = 0.05
    folds: int = 5
    per_variant: int = 2
    kinds: tuple[str, ...] = ("patch", "checkerboard", "blended", "sparse")
    rates: tuple[float, ...] = (0.01, 0.05, 0.10)
    per_cell: int = 3
    images: int = 200
    scan: nc.ScanConfig = nc.ScanConfig(steps=150, batch=32)
    margin: mm_bd.MarginConfig = mm_bd.MarginConfig(steps=100, starts=4)
    rounds: int = 2
    asr_images: int = 1000  # test images each backdoor's attack success rate is read on
    chunk_bytes: int = 2**29  # members per training vmap: their data within this

    def null_config(self, seed: int) -> scan.NullConfig:
        """The null's settings (validated: an alpha its size cannot resolve is refused)."""
        return scan.NullConfig(n_null=self.n_null, sample_size=self.sample_size,
                               images=self.images, alpha=self.alpha, seed=seed,
                               folds=self.folds).validate()

    def validate(self) -> ScanBenchConfig:
        """Raise ConfigError for settings the benchmark cannot run; return self."""
        for kind in self.kinds:
            if kind not in triggers.FAMILIES:
                raise ConfigError(f"scan bench: expected trigger families from "
                                  f"{list(triggers.FAMILIES)}, found {kind!r}")
        if any(not 0.0 < r < 1.0 for r in self.rates):
            raise ConfigError(f"scan bench: expected poison rates in (0, 1), found "
                              f"{self.rates}")
        if min(self.per_cell, self.per_variant, self.rounds) < 1:
            raise ConfigError(f"scan bench: expected per_cell, per_variant and rounds >= 1, "
                              f"found {self.per_cell}, {self.per_variant}, {self.rounds}")
        self.null_config(0)
        self.scan.validate()
        self.margin.validate()
        return self


FULL = ScanBenchConfig()
QUICK = ScanBenchConfig(hidden=32, sample_size=2000, n_null=20, alpha=0.25, folds=2,
                        per_variant=1, rates=(0.05,), per_cell=1, images=100,
                        scan=nc.ScanConfig(steps=40, batch=64),
                        margin=mm_bd.MarginConfig(steps=50, starts=4), rounds=1)


def _size(cfg: ScanBenchConfig, ds: Dataset) -> int:
    """Training images of each model: `sample_size`, at most the training set."""
    n = len(ds.y_train)
    return n if cfg.sample_size is None else min(cfg.sample_size, n)


def _base(cfg: ScanBenchConfig) -> TrainConfig:
    """The recipe's settings, as `scan.calibrate_null` trains its null."""
    return replace(TrainConfig(), hidden=cfg.hidden, seed=0)


def _backdoors(cfg: ScanBenchConfig, n_classes: int, seed: int) -> pd.DataFrame:
    """One row per held-out backdoored model: change label, trigger kind, rate, target (drawn
    per model), member seed."""
    rows = [(f"{kind} {rate:.0%}", kind, rate) for kind in cfg.kinds for rate in cfg.rates
            for _ in range(cfg.per_cell)]
    table = pd.DataFrame(rows, columns=["change", "kind", "rate"])
    first = HELDOUT_STREAM + seed * 10_000 + 5_000
    table["member_seed"] = first + np.arange(len(table))
    table["target"] = np.random.default_rng([seed, HELDOUT_STREAM]).integers(
        0, n_classes, len(table))
    table["role"] = "backdoor"
    return table


def _poison_plan(row, y: np.ndarray, size: int, n_classes: int, ds: Dataset):
    """(sample idx [size], poison mask [size], target, TriggerArrays) of one member."""
    idx = subsample(int(row.member_seed), len(y), size)
    mask = np.zeros(size, bool)
    if row.role != "backdoor":
        return idx, mask, 0, triggers.identity(ds.image_shape)
    rng = np.random.default_rng(int(row.member_seed) + 1)
    others = np.flatnonzero(y[idx] != row.target)
    count = min(len(others), max(1, int(round(row.rate * size))))
    mask[rng.choice(others, count, replace=False)] = True
    trig = triggers.make(row.kind, ds.image_shape, ds.input_range,
                         **({} if row.kind in ("patch", "checkerboard", "sig")
                            else {"seed": int(row.member_seed)}))
    return idx, mask, int(row.target), trig


def _group(plan, lo, hi, shape, x, y, g):
    """Gather, stamp and train one group of members inside the jit."""
    xs, ys = x[g["idx"]], y[g["idx"]]  # [c, size, D], [c, size]

    def one(xm, ym, mask, target, trig):
        stamped = jax.vmap(lambda v: triggers.stamp_one(v, trig, shape, lo, hi))(xm)
        return (jnp.where(mask[:, None], stamped, xm), jnp.where(mask, target, ym))

    xs, ys = jax.vmap(one)(xs, ys, g["mask"], g["target"], g["trigger"])
    return fit_group(plan, g, xs, ys)


@partial(jax.jit, static_argnames=("plan", "lo", "hi", "shape", "chunk"))
def _train(members, x, y, *, plan, lo, hi, shape, chunk):
    return map_chunks(partial(_group, plan, lo, hi, shape, x, y), members, chunk)


def _train_backdoors(cfg: ScanBenchConfig, ds: Dataset, table: pd.DataFrame):
    """Params of every backdoored member (stacked in table order), the seconds."""
    size = _size(cfg, ds)
    y_host = np.asarray(ds.y_train)
    x = jax.device_put(jnp.asarray(ds.x_train, jnp.float32))
    y = jax.device_put(jnp.asarray(y_host, jnp.int32))
    d = int(x.shape[1])
    chunk = int(max(1, cfg.chunk_bytes // (3 * size * d * 4)))
    lo, hi = (float(v) for v in ds.input_range)
    plan = plan_for(cfg.recipe, _base(cfg), ds.spec)
    planned = [_poison_plan(r, y_host, size, ds.n_classes, ds) for r in table.itertuples()]
    params, keys = init_members(plan, table["member_seed"].tolist(), d)
    members = {
        "params": params, "shuffle_key": keys,
        "idx": jnp.asarray(np.stack([p[0] for p in planned]), jnp.int32),
        "mask": jnp.asarray(np.stack([p[1] for p in planned])),
        "target": jnp.asarray([p[2] for p in planned], jnp.int32),
        "trigger": jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *[p[3] for p in planned]),
    }
    start = time.perf_counter()
    out = jax.block_until_ready(_train(members, x, y, plan=plan, lo=lo, hi=hi,
                                       shape=tuple(ds.image_shape),
                                       chunk=min(chunk, len(table))))
    asr = _asr(plan.arch, out, members["trigger"], members["target"], ds, cfg.asr_images)
    return out, plan, time.perf_counter() - start, asr


@partial(jax.jit, static_argnames=("model", "shape", "lo", "hi"))
def _asr_kernel(model, params, trig, target, x, y, *, shape, lo, hi):
    def one(args):
        p, t, c = args
        stamped = jax.vmap(lambda v: triggers.stamp_one(v, t, shape, lo, hi))(x)
        hit = jnp.argmax(jax.vmap(model.apply, in_axes=(None, 0))(p, stamped), -1) == c
        other = y != c
        return jnp.sum(hit & other) / jnp.maximum(jnp.sum(other), 1)
    return jax.lax.map(one, (params, trig, target))


def _asr(model, params, trig, target, ds: Dataset, n: int) -> np.ndarray:
    """Attack success rate of each backdoored member [M]: the share of the first n test
    images not of its target class that its own trigger sends to the target."""
    n = min(n, len(ds.y_test))
    lo, hi = (float(v) for v in ds.input_range)
    return np.asarray(_asr_kernel(model, params, trig, target,
                                  jnp.asarray(ds.x_test[:n], jnp.float32),
                                  jnp.asarray(ds.y_test[:n], jnp.int32),
                                  shape=tuple(ds.image_shape), lo=lo, hi=hi))


def _heldout_benign(cfg: ScanBenchConfig, ds: Dataset, seed: int):
    """per_variant models of every benign variant, with seeds the null never used: (params
    stacked, variant names, seconds)."""
    plan = plan_for(cfg.recipe, _base(cfg), ds.spec)
    size = _size(cfg, ds)
    n = cfg.per_variant * len(benign.VARIANTS)
    seeds = (HELDOUT_STREAM + seed * 10_000 + np.arange(n)).tolist()
    start = time.perf_counter()
    params, names = benign.benign_null(plan, ds.x_train, ds.y_train, seeds=seeds, size=size,
                                       chunk=benign.train_chunk(n, size, ds.spec.n_inputs))
    return params, names, time.perf_counter() - start


def _scan(model, params, x, y, cfg: ScanBenchConfig, seed: int):
    """Neural Cleanse norms [M, K] and MM-BD margins [M, K] of stacked params, searched as
    the null's were."""
    found = nc.scan_in_groups(model, params, x, y, key=scan.scan_key(seed), config=cfg.scan,
                              group=scan.SCAN_GROUP)
    margins = np.asarray(jax.block_until_ready(mm_bd.margins_population(
        model, params, key=scan.margin_key(seed), config=cfg.margin)))
    return np.asarray(found.norms, np.float64), margins


def scan_table(ds: Dataset, *, quick: bool = False, seed: int = 0,
               config: ScanBenchConfig | None = None) -> dict[str, pd.DataFrame]:
    """Calibrate the null, train and scan the held-out set, judge it: {"scan_model",
    "scan_model_summary"} (module docstring). quick: `QUICK` (a minute on 2 cores) instead
    of `FULL`; config overrides both. Same seed, same tables (up to the timings).
    ConfigError for settings the benchmark cannot run (`ScanBenchConfig.validate`)."""
    cfg = (config or (QUICK if quick else FULL)).validate()
    null = scan.calibrate_null(cfg.recipe, cfg.hidden, ds, cfg.null_config(seed),
                               scan=cfg.scan, margin=cfg.margin, train=_base(cfg), cache=False)
    benign_params, names, benign_s = _heldout_benign(cfg, ds, seed)
    doors = _backdoors(cfg, ds.n_classes, seed)
    door_params, plan, door_s, asr = _train_backdoors(cfg, ds, doors)
    params = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]),
                          benign_params, door_params)
    x, y = scan.scan_images(ds, cfg.images, seed)
    start = time.perf_counter()
    norms, margins = _scan(plan.arch, params, x, y, cfg, seed)
    population_s = time.perf_counter() - start
    judged = scan.judge(null, norms, margins)
    m_benign = len(names)
    table = pd.DataFrame({
        "change": [("clean" if v == CLEAN_VARIANT else f"benign: {v}") for v in names]
        + doors["change"].tolist(),
        "kind": [("clean" if v == CLEAN_VARIANT else "benign") for v in names]
        + doors["kind"].tolist(),
        "rate": [0.0] * m_benign + doors["rate"].tolist(),
        "target": [-1] * m_benign + doors["target"].tolist(),
        "flagged": judged.flagged,
        "nc": judged.p[:, 0] <= null.combined["cut"],
        "mm": judged.p[:, 1] <= null.combined["cut"],
        "min_p": judged.p.min(1), "named": judged.target,
        "asr": np.concatenate([np.full(m_benign, np.nan), asr])})
    table["on_target"] = table["named"] == table["target"]
    rows = {}
    for change, g in table.groupby("change", sort=False):
        backdoor = bool((g["target"] >= 0).all())
        rows[change] = {
            "kind": g["kind"].iloc[0], "rate": g["rate"].iloc[0], "models": len(g),
            "detected": g["flagged"].mean(),
            "found": (g["flagged"] & g["on_target"]).mean() if backdoor else np.nan,
            "target_accuracy": g["on_target"].mean() if backdoor else np.nan,
            "asr": g["asr"].mean(),
            "nc_flagged": g["nc"].mean(), "mm_bd_flagged": g["mm"].mean(),
            "mean_min_p": g["min_p"].mean()}
    result = pd.DataFrame.from_dict(rows, orient="index").rename_axis("change")
    one = member(params, 0)
    single = time_call(partial(nc.reverse_triggers, plan.arch, one, x, y,
                               key=scan.scan_key(seed), config=cfg.scan), rounds=cfg.rounds)
    single_mm = time_call(partial(mm_bd.max_margins, plan.arch, one,
                                  key=scan.margin_key(seed), config=cfg.margin),
                          rounds=cfg.rounds)
    m = len(table)
    summary = {
        "null_models": float(cfg.n_null), "alpha": cfg.alpha, "cut": null.combined["cut"],
        "null_heldout_fpr": null.combined["fpr"],
        "null_nc_heldout_fpr": float(null.combined["nc_fpr"]),
        "null_mm_bd_heldout_fpr": float(null.combined["mm_bd_fpr"]),
        "heldout_benign_fpr": float(table["flagged"][:m_benign].mean()),
        "heldout_models": float(m), "images": float(x.shape[0]),
        "steps": float(cfg.scan.steps), "batch": float(cfg.scan.batch),
        "margin_steps": float(cfg.margin.steps), "margin_starts": float(cfg.margin.starts),
        "sample_size": float(_size(cfg, ds)),
        "null_train_s": float(null.seconds["train_s"]),
        "null_scan_s": float(null.seconds["scan_s"]),
        "heldout_train_s": benign_s + door_s,
        "s_per_model_population": population_s / m,
        "s_per_model_single": single.median_s + single_mm.median_s,
    }
    return {"scan_model": result,
            "scan_model_summary": pd.DataFrame({"value": summary}).rename_axis("measure")}
