"""Training-time poisoning ([poison]): the study's sweeps E4-E7 (and "backdoors": every
backdoor family with its ASR), each trained as one population (`bench.sweeps`), then the
BadNets reference for each of `badnets_models`.

One `PoisonSweepConfig` cell per sweep and per BadNets model; the section is `sweeps.markdown`
of the tables, the finding the BadNets ASR and its cost in clean accuracy, the figures the
sweeps' curves and examples.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from mlshift_jax.bench import sweeps
from mlshift_jax.bench.cells import (
    TINY_TRAIN,
    BlockData,
    Cell,
    Experiment,
    Matrix,
    Parsers,
    ReportContext,
    cap,
    inherit,
    shrink,
    unfit_poisonings,
    unfit_study,
)
from mlshift_jax.bench.context import Loaded, Memo, base_record, capped
from mlshift_jax.bench.markdown import delta, records_of
from mlshift_jax.bench.sweeps import EXTRA_SWEEPS, STUDY_SWEEPS
from mlshift_jax.data import Spec, datasets
from mlshift_jax.models.recipes import TrainConfig
from mlshift_jax.models.registry import model_for


@dataclass(frozen=True)
class PoisonSweepConfig:
    """One of the study's poisoning sweeps (sweeps.sweep_configs), trained as one population."""

    kind: ClassVar[str] = "poison"
    dataset: str
    sweep: str
    model: str
    seed: int
    hidden: int
    epochs: int | None
    n_train: int | None
    n_test: int | None


@dataclass(frozen=True)
class Poison(BlockData):
    """E4-E7 for `model`, then the BadNets reference cells for each of `badnets_models`
    (trained on `badnets_n_train` images when set)."""

    model: str = "seed-mlp"
    sweeps: tuple[str, ...] = STUDY_SWEEPS
    badnets_models: tuple[str, ...] = ("seed-mlp", "cnn")
    badnets_n_train: int | None = None
    hidden: int = 200
    epochs: int | None = None


def schema(p: Parsers) -> dict:
    """The [poison] keys."""
    common = {k: v for k, v in p.common.items() if k != "lr"}  # each sweep's own
    return {**common, "dataset": p.dataset, "model": p.model,
            "sweeps": lambda v, w: p.chk.names(v, w, {*STUDY_SWEEPS, *EXTRA_SWEEPS}, "sweep"),
            "badnets_models": p.models, "badnets_n_train": p.chk.opt_rule("n_train"),
            "epochs": p.chk.opt_rule("epochs")}


def cells(matrix: Matrix, po: Poison) -> list[Cell]:
    """One cell per sweep, then one BadNets cell per model."""
    n_train, n_test = inherit(po.n_train, matrix.n_train), inherit(po.n_test, matrix.n_test)
    runs = [(sweep, po.model, po.epochs, n_train) for sweep in po.sweeps]
    runs += [("badnets", m, po.epochs if m == po.model else None,
              inherit(po.badnets_n_train, n_train))
             for m in po.badnets_models]
    return [Cell(f"poison/{po.dataset}/{model}/{sweep}/seed{po.seed}", "poison",
                 PoisonSweepConfig(dataset=po.dataset, sweep=sweep, model=model, seed=po.seed,
                                   hidden=po.hidden, epochs=epochs, n_train=n, n_test=n_test))
            for sweep, model, epochs, n in runs]


def tiny(po: Poison) -> Poison:
    """[poison] with hidden 8 and at most TINY_TRAIN / TINY_TEST images."""
    return shrink(po, hidden=8, badnets_n_train=cap(po.badnets_n_train, TINY_TRAIN))


def compute(cell: Cell, loaded: Loaded, memo: Memo, cache: Path, force: bool) -> dict:
    """Train the cell's sweep as one population (`sweeps.run_sweep`); its table goes in the
    record's detail."""
    cfg: PoisonSweepConfig = cell.config
    ds = capped(loaded.ds, None, cfg.n_test)
    table = sweeps.run_sweep(ds, sweeps.sweep_configs(cfg.sweep), model=cfg.model,
                             seed=cfg.seed, hidden=cfg.hidden, epochs=cfg.epochs,
                             n_train=None if cfg.n_train is None
                             else min(cfg.n_train, len(ds.y_train)))
    a = table.attrs
    return {
        **base_record(cell, loaded), "model": cfg.model,
        "arch": model_for(cfg.model, loaded.ds.spec, TrainConfig(hidden=cfg.hidden)).name,
        "seed": cfg.seed, "n_train": a["n_train"], "n_test": a["n_test"], "hidden": cfg.hidden,
        "epochs": a["epochs"], "train_s": a["train_s"], "compile_s": a["compile_s"],
        "params_finite": bool(np.all(np.isfinite(table["clean_accuracy"]))),
        "detail": {"sweep": cfg.sweep, "attrs": {k: v for k, v in a.items()
                                                 if isinstance(v, (int, float, str))},
                   "table": json.loads(table.to_json(orient="split"))},
    }


def poison_tables(records: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The poisoning sweeps of the records: {"E4": table, ..., "badnets": all models'}."""
    tables, badnets = {}, []
    for detail in records_of(records, kind="poison")["detail"]:
        table = pd.DataFrame(**detail["table"])
        table.attrs.update(detail["attrs"])
        if detail["sweep"] == "badnets":
            badnets.append(table)
        else:
            tables[detail["sweep"]] = table
    if badnets:
        tables["badnets"] = sweeps.concat_tables(badnets)
    return tables


def _markdown(records: pd.DataFrame, info: dict[str, Any]) -> str:
    tables = poison_tables(records)
    if not tables:
        return "No poisoning cells in this run.\n"
    name = records_of(records, kind="poison")["dataset"].iloc[0]
    data = info.get("datasets", {}).get(name)
    why = None if data is None else unfit_study(
        Spec(tuple(data["image_shape"]), int(data["n_classes"]), tuple(data["input_range"])))
    note = ("Each sweep is one population: every model of a table trained together in one "
            "jit from the shared clean data, each poisoning its own copy inside the jit. "
            "`clean_accuracy` is the study's \"performance\" (clean test images); `asr` is the "
            "attack success rate on triggered test images whose true class is not the target "
            "(BadNets, Gu et al. 2017); E4/E5's \"noisy\" trigger puts one patch position per "
            "class on every image of that class, labels kept (the reading of the study that "
            "reproduces its E4 claim; see the README).")
    if why is not None:  # the study's claims are of MNIST: no comparison on other data
        return (f"*{note}*\n\n" + sweeps.markdown(tables)
                + f"\nNo comparison with the study's findings on {name}: {why}.\n")
    return f"*{note}*\n\n" + sweeps.markdown(tables, sweeps.findings(tables))


def finding(records: pd.DataFrame) -> str | None:
    """The BadNets headline: each model's ASR and its cost in clean accuracy."""
    table = poison_tables(records).get("badnets")
    if table is None or not {"model", "fraction", "asr", "clean_accuracy"} <= set(table):
        return None
    parts = []
    for model, group in table.groupby("model", sort=False):
        clean = group[group["fraction"] == 0]["clean_accuracy"]
        for _, r in group[group["fraction"] > 0].iterrows():
            size = f" {int(r['patch'])}x{int(r['patch'])}" if "patch" in r else ""
            cost = (f", clean accuracy {r['clean_accuracy']:.4f} "
                    f"(Δ {delta(r['clean_accuracy'], clean.iloc[0])})" if len(clean) else "")
            parts.append(f"{model}{size} at {r['fraction']:.0%}: ASR {r['asr']:.4f}{cost}")
    return "**BadNets**: " + "; ".join(parts) + "." if parts else None


def section(records: pd.DataFrame, ctx: ReportContext) -> list[tuple[str, str]]:
    """The sweeps' tables and findings."""
    return [("E4–E7: training-time poisoning", _markdown(records, ctx.info))]


def figures(records: pd.DataFrame, figures_dir: Path, info: dict[str, Any]) -> list[Path]:
    """The sweeps' curves and poisoned examples (`sweeps.figures`), on the data the run
    loaded (a dataset the matrix named by path as the run loaded it)."""
    tables = poison_tables(records)
    if not tables:
        return []
    name = records_of(records, kind="poison")["dataset"].iloc[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = datasets.load(**info.get("load", {}).get(name, {"name": name}))
    return sweeps.figures(tables, ds, figures_dir)


def fits(cell: Cell, spec) -> str | None:
    """Every poisoning of the sweep fits the data (its target class, its patch)."""
    return unfit_poisonings(sweeps.sweep_configs(cell.config.sweep), spec)


EXPERIMENT = Experiment(
    block="poison", Block=Poison, Config=PoisonSweepConfig, schema=schema, cells=cells,
    tiny=tiny, compute=compute, section=section, place=40, finding=finding, figures=figures,
    fits=fits)
