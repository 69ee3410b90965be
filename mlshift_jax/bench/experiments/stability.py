"""E2, stability over random training samples ([e2]): `samples` seed-mlp models, each on its
own random sample of `size` training images, trained as one population in one compiled call
(`bench.stability`), scored on the test set.

One `StabilityConfig` cell; its section is the per-sample table with mean / std / min / max
and the accuracy's distance from the study's full-data E1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from mlshift_jax.bench import stability
from mlshift_jax.bench.cells import (
    Cell,
    Experiment,
    Matrix,
    Parsers,
    ReportContext,
    StudyTraining,
    inherit,
    shrink,
    unfit_study,
)
from mlshift_jax.bench.context import Loaded, Memo, base_record, capped
from mlshift_jax.bench.markdown import delta, fmt_time, md, records_of
from mlshift_jax.core import study

BLOCK = "e2"  # the study's experiment number, as committed matrices spell it


@dataclass(frozen=True)
class StabilityConfig:
    """E2: `samples` seed-mlp models on random subsets of `size` images, one population."""

    kind: ClassVar[str] = "stability"
    dataset: str
    samples: int
    size: int
    hidden: int
    lr: float
    epochs: int
    seed: int
    n_train: int | None
    n_test: int | None


@dataclass(frozen=True)
class Stability(StudyTraining):
    """The [e2] table: `samples` random samples of `size` training images."""

    samples: int = 10
    size: int = 10_000


def schema(p: Parsers) -> dict:
    """The [e2] keys."""
    return {**p.common, "dataset": p.dataset, "samples": p.chk.rule("samples"),
            "size": p.chk.rule("size")}


def cells(matrix: Matrix, e2: Stability) -> list[Cell]:
    """The one population cell."""
    config = StabilityConfig(
        dataset=e2.dataset, samples=e2.samples, size=e2.size, hidden=e2.hidden, lr=e2.lr,
        epochs=e2.epochs, seed=e2.seed, n_train=inherit(e2.n_train, matrix.n_train),
        n_test=inherit(e2.n_test, matrix.n_test))
    return [Cell(f"e2/{e2.dataset}/seed-mlp/stability/seed{e2.seed}", BLOCK, config)]


def tiny(e2: Stability) -> Stability:
    """[e2] with 2 samples of at most 300 images."""
    return shrink(e2, samples=min(e2.samples, 2), size=min(e2.size, 300))


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """Train `samples` seed-mlp models on random subsets as one population
    (`stability.stability`); the per-sample table goes in the record's detail."""
    cfg: StabilityConfig = cell.config
    ds = capped(loaded.ds, cfg.n_train, cfg.n_test)
    size = min(cfg.size, len(ds.y_train))
    table, train_s = stability.stability(ds, samples=cfg.samples, size=size, hidden=cfg.hidden,
                                         lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed)
    mean = table.loc["mean"]
    return {
        **base_record(cell, loaded), "model": "seed-mlp", "arch": "seed-mlp", "seed": cfg.seed,
        "n_train": size, "n_test": len(ds.y_test), "hidden": cfg.hidden, "lr": cfg.lr,
        "epochs": cfg.epochs, **{m: float(mean[m]) for m in table.columns},
        "train_s": train_s, "params_finite": bool(np.all(np.isfinite(table.to_numpy()))),
        "detail": {"samples": cfg.samples, "size": size,
                   "table": json.loads(table.to_json(orient="split"))},
    }


def _table(records: pd.DataFrame) -> str:
    rows = records_of(records, kind="stability")
    if not len(rows):
        return "No E2 cells in this run.\n"
    r = rows.iloc[0]
    t = r["detail"]["table"]
    table = pd.DataFrame(t["data"], index=t["index"], columns=t["columns"])
    table["Δ accuracy vs study E1"] = [
        "—" if name == "std" else delta(a, study.E1["accuracy"])
        for name, a in zip(table.index, table["accuracy"], strict=True)]
    head = (f"{int(r['detail']['samples'])} seed-mlp models, each trained on its own random "
            f"sample of {int(r['detail']['size']):,} {r['dataset']} training images, trained "
            f"as one population in one compiled call ({fmt_time(r['train_s'])}, compile "
            f"included); scored on "
            f"{int(r['n_test']):,} test images.\n\n")
    note = ("One row per sample, then mean / std (ddof=1) / min / max over samples. The study "
            "showed these as charts and published no numbers (study.py has none), so the only "
            f"comparison is with its full-data accuracy, {study.E1['accuracy']:g}: training on "
            f"a {int(r['detail']['size']):,}-image sample instead of the whole training set "
            "costs the difference.")
    return head + md(table, note)


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """E2's table."""
    return [("E2: stability over random training samples", _table(records))]


EXPERIMENT = Experiment(
    block=BLOCK, Block=Stability, Config=StabilityConfig, schema=schema, cells=cells,
    tiny=tiny, compute=compute, section=section, place=20,
    fits=lambda cell, spec: unfit_study(spec))
