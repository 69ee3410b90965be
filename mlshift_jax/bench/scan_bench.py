"""The scan-model benchmark: how well the reference-free backdoor scan (`detection.scan`,
Neural Cleanse, Wang et al. IEEE S&P 2019, with a threshold calibrated on clean models)
finds backdoors and names their target, and how often it flags clean models.

One population of models of one recipe, each on its own random training sample
(`sample_size` images) with its own seed:

- the **null**: `n_null` clean models; the anomaly-index threshold is calibrated on them
  (`neural_cleanse.calibrate_threshold`, at least 2, at most a share alpha of them above;
  its leave-one-out false-positive rate is reported);
- **clean**: `n_clean` more clean models of the same recipe (fresh negatives: their flagged
  share is the false-positive rate on models the threshold never saw);
- **benign**: clean models trained differently (`benign`: twice the recipe's epochs, half
  its learning rate; `n_benign` each): false positives under a recipe mismatch;
- **backdoored**: for each trigger family in `kinds` (`poisoning.triggers`) and poison rate
  in `rates`, `per_cell` models whose sample has that share of its images, drawn from the
  other classes, stamped with the trigger and relabelled to a target class (a different
  target per model: (member index * 3 + 1) mod K). The stamping happens inside the jit.

Every model trains in one jit per training setting (`train.map_chunks` over groups of
`chunk` members, each group a vmap), and every model is scanned in one jitted
`scan_population` (vmap over classes inside, `lax.map` or vmap over models): the same clean
test images (`images`) and key for all. `scan_table` returns two tables:

- "scan_model": per change (row): models, detected (share flagged "backdoor"; for the
  clean and benign rows the false-positive rate), target_accuracy (share whose most
  anomalous class is the true target, flagged or not), found (flagged with the right
  target), mean anomaly index and mean index of the log norms (a scale-free variant);
- "scan_model_summary": the threshold, its leave-one-out FPR, the null's size, alpha, the
  search's settings, and seconds per model: one model alone (`reverse_triggers`, compiled,
  median of `rounds`), and per model within the whole population's one scan (compile
  excluded), plus the compile and training times.

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
from mlshift_jax.detection import neural_cleanse as nc
from mlshift_jax.detection.scan import log_norms, scan_images, scan_key
from mlshift_jax.models.population import fit_group, init_members, member, plan_for
from mlshift_jax.models.recipes import TrainConfig, resolve
from mlshift_jax.models.registry import get_recipe
from mlshift_jax.models.train import map_chunks
from mlshift_jax.poisoning import triggers

CLEAN, NULL = "clean", "null"


@dataclass(frozen=True)
class ScanBenchConfig:
    """What `scan_table` trains and scans (see the module docstring)."""

    recipe: str = "seed-mlp"
    hidden: int = 200
    sample_size: int = 10_000
    kinds: tuple[str, ...] = ("patch", "checkerboard", "blended", "sparse")
    rates: tuple[float, ...] = (0.01, 0.05)
    per_cell: int = 2
    n_null: int = 12
    n_clean: int = 4
    n_benign: int = 2
    images: int = 200
    scan: nc.ScanConfig = nc.ScanConfig(steps=150, batch=128)
    alpha: float = 0.05
    rounds: int = 2
    chunk_bytes: int = 2**29  # members per training vmap: their data within this

    def validate(self) -> ScanBenchConfig:
        """Raise ConfigError for settings the benchmark cannot run; return self."""
        for kind in self.kinds:
            if kind not in triggers.FAMILIES:
                raise ConfigError(f"scan bench: expected trigger families from "
                                  f"{list(triggers.FAMILIES)}, found {kind!r}")
        if any(not 0.0 < r < 1.0 for r in self.rates):
            raise ConfigError(f"scan bench: expected poison rates in (0, 1), found "
                              f"{self.rates}")
        if self.n_null < 2 or min(self.per_cell, self.n_clean, self.images) < 1 or (
                self.n_benign < 0):
            raise ConfigError(f"scan bench: expected n_null >= 2, per_cell, n_clean, "
                              f"images >= 1 and n_benign >= 0, found {self.n_null}, "
                              f"{self.per_cell}, {self.n_clean}, {self.images}, "
                              f"{self.n_benign}")
        self.scan.validate()
        return self


FULL = ScanBenchConfig()
QUICK = ScanBenchConfig(hidden=32, sample_size=2000, rates=(0.05,), per_cell=1, n_null=4,
                        n_clean=2, n_benign=0, images=100,
                        scan=nc.ScanConfig(steps=40, batch=64), rounds=1)


def _members(cfg: ScanBenchConfig, base: TrainConfig, n_classes: int, seed: int) -> pd.DataFrame:
    """One row per model: role, change label, trigger kind, rate, target, its TrainConfig."""
    rows = [(NULL, NULL, None, 0.0, -1, base)] * cfg.n_null
    rows += [(CLEAN, "clean", None, 0.0, -1, base)] * cfg.n_clean
    benign = {f"benign: epochs x2 ({base.epochs * 2})": replace(base, epochs=base.epochs * 2),
              f"benign: lr x0.5 ({base.lr / 2:g})": replace(base, lr=base.lr / 2)}
    for label, train in benign.items():
        rows += [("benign", label, None, 0.0, -1, train)] * cfg.n_benign
    for kind in cfg.kinds:
        for rate in cfg.rates:
            rows += [("backdoor", f"{kind} {rate:.0%}", kind, rate, 0, base)] * cfg.per_cell
    table = pd.DataFrame(rows, columns=["role", "change", "kind", "rate", "target", "train"])
    table["member_seed"] = seed * 100_000 + np.arange(len(table))
    backdoor = table["role"] == "backdoor"
    table.loc[backdoor, "target"] = (np.flatnonzero(backdoor) * 3 + 1) % n_classes
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


def _train_population(cfg: ScanBenchConfig, ds: Dataset, table: pd.DataFrame) -> tuple:
    """Params of every member (stacked in table order) and the training seconds."""
    size = min(cfg.sample_size, len(ds.y_train))
    y_host = np.asarray(ds.y_train)
    x = jax.device_put(jnp.asarray(ds.x_train, jnp.float32))
    y = jax.device_put(jnp.asarray(y_host, jnp.int32))
    d = int(x.shape[1])
    chunk = int(max(1, cfg.chunk_bytes // (3 * size * d * 4)))
    lo, hi = (float(v) for v in ds.input_range)
    parts, order, seconds = [], [], 0.0
    for _, rows in table.groupby(table["train"].map(repr), sort=False):
        plan = plan_for(cfg.recipe, rows["train"].iloc[0], ds.spec)
        planned = [_poison_plan(r, y_host, size, ds.n_classes, ds) for r in rows.itertuples()]
        params, keys = init_members(plan, rows["member_seed"].tolist(), d)
        members = {
            "params": params, "shuffle_key": keys,
            "idx": jnp.asarray(np.stack([p[0] for p in planned]), jnp.int32),
            "mask": jnp.asarray(np.stack([p[1] for p in planned])),
            "target": jnp.asarray([p[2] for p in planned], jnp.int32),
            "trigger": jax.tree.map(lambda *a: jnp.asarray(np.stack(a)),
                                    *[p[3] for p in planned]),
        }
        start = time.perf_counter()
        parts.append(jax.block_until_ready(_train(
            members, x, y, plan=plan, lo=lo, hi=hi, shape=tuple(ds.image_shape),
            chunk=min(chunk, len(rows)))))
        seconds += time.perf_counter() - start
        order += list(rows.index)
        model = plan.arch
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    back = np.argsort(order)  # table order
    return jax.tree.map(lambda a: a[back], stacked), model, seconds


def scan_table(ds: Dataset, *, quick: bool = False, seed: int = 0,
               config: ScanBenchConfig | None = None) -> dict[str, pd.DataFrame]:
    """Train the population, scan it, score the scan: {"scan_model", "scan_model_summary"}
    (module docstring). quick: `QUICK` (seconds on 2 cores) instead of `FULL`; config
    overrides both. Same seed, same tables (up to the timings)."""
    cfg = (config or (QUICK if quick else FULL)).validate()
    base = resolve(get_recipe(cfg.recipe), TrainConfig(hidden=cfg.hidden))
    table = _members(cfg, base, ds.n_classes, seed)
    params, model, train_s = _train_population(cfg, ds, table)
    x, y = scan_images(ds, min(cfg.images, len(ds.y_test)), seed)
    key = scan_key(seed)
    start = time.perf_counter()
    scan = nc.compile_population(model, params, x, y, key=key, config=cfg.scan)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    found = jax.block_until_ready(scan())
    population_s = time.perf_counter() - start
    one = partial(nc.reverse_triggers, model, member(params, 0), x, y, key=key,
                  config=cfg.scan)
    single = time_call(one, rounds=cfg.rounds)
    norms = np.asarray(found.norms, np.float64)
    index, cls = nc.anomaly_index(norms)
    log_index, _ = nc.anomaly_index(log_norms(norms))
    is_null = (table["role"] == NULL).to_numpy()
    threshold = nc.calibrate_threshold(index[is_null], alpha=cfg.alpha)
    log_threshold = nc.calibrate_threshold(log_index[is_null], alpha=cfg.alpha)
    table["flagged"] = index > threshold.value
    table["log_flagged"] = log_index > log_threshold.value
    table["on_target"] = cls == table["target"].to_numpy()
    table["index"], table["log_index"] = index, log_index
    rows = {}
    for change, g in table[~is_null].groupby("change", sort=False):
        backdoor = g["role"].iloc[0] == "backdoor"
        rows[change] = {
            "kind": g["kind"].iloc[0] if backdoor else g["role"].iloc[0], "rate": g["rate"].iloc[0],
            "models": len(g), "detected": g["flagged"].mean(),
            "target_accuracy": g["on_target"].mean() if backdoor else np.nan,
            "found": (g["flagged"] & g["on_target"]).mean() if backdoor else np.nan,
            "mean_anomaly_index": g["index"].mean(),
            "detected_log": g["log_flagged"].mean(),
            "mean_log_index": g["log_index"].mean()}
    result = pd.DataFrame.from_dict(rows, orient="index").rename_axis("change")
    m = len(table)
    summary = {
        "threshold": threshold.value, "threshold_fpr_loo": threshold.fpr_loo,
        "log_threshold": log_threshold.value, "log_threshold_fpr_loo": log_threshold.fpr_loo,
        "null_models": float(threshold.n_null), "alpha": cfg.alpha,
        "null_mean_index": float(index[is_null].mean()),
        "null_max_index": float(index[is_null].max()),
        "images": float(x.shape[0]), "steps": float(cfg.scan.steps),
        "batch": float(cfg.scan.batch), "models": float(m),
        "train_s": train_s, "scan_compile_s": compile_s,
        "s_per_model_single": single.median_s,
        "s_per_model_population": population_s / m,
    }
    return {"scan_model": result,
            "scan_model_summary": pd.DataFrame({"value": summary}).rename_axis("measure")}

